"""
One KD training step in distill.py and in TRL's DistillationTrainer (dev-only: pip install trl) on the same
models, data and batch: tokens/s and peak memory, each in its own fresh process.

    python prepare_data.py && python scripts/compare_trl.py

Teacher: the packaged SmolLM2-135M-Instruct; student: its 10-layer copy (blocks 0, 3, ..., 27); 4 documents of
the demo data at 512 tokens (distill.py's batch_size and block_size defaults), on the CPU in fp32 and in bf16 (both
tools' steps in torch.autocast bf16; distill.py's teacher in bf16 weights, as it runs it), in the same run; forward KL at
T=2 on the supervised tokens, learning rate 0 (every step sees the same weights). TRL's trainer generates its
completions on-policy; here it is handed the documents' own tokens as completions (prompt = the first token,
completion mask = distill's loss mask), and its compute_loss, backward and optimizer step are timed: the work
both tools share, generation left out. Its gradient checkpointing, which would slow it down, is turned off.
distill.py's step also computes the CE term; TRL's loss has none.
'trl+allocator' is TRL with distill.py's CPU allocator setting (machine.keep_freed_memory), 'trl' as shipped.
"""
import argparse, contextlib, json, os, resource, statistics, subprocess, sys, tempfile, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
import distill
from kd.chunked import auto_chunk
from kd.teacher import Teacher
from kd.data import check_dataset, load_split, make_batch
from kd.machine import cpu_name, keep_freed_memory
from kd.models import (cast_parameters, demo_tokenizer, load_model, model_tokenizer, output_rows,
                    student_from_teacher_layers)

p = argparse.ArgumentParser()
p.add_argument('--batch_size', type=int, default=None, help='default 4 (distill.py), on-policy 8')
p.add_argument('--block_size', type=int, default=512)
p.add_argument('--steps', type=int, default=4, help='timed steps after one warm-up step')
p.add_argument('--chunk', type=int, default=0, help="distill.py's loss_chunk (0: what 'auto' picks)")
p.add_argument('--dataset', help='default data/demo (on-policy: data/demo-chat)')
p.add_argument('--dtypes', nargs='+', default=['float32', 'bfloat16'], choices=['float32', 'bfloat16'],
               help='both tools in each of these dtypes (bf16: autocast)')
p.add_argument('--case', default='offpolicy', choices=['offpolicy', 'onpolicy'])
p.add_argument('--max_new_tokens', type=int, default=32, help='--case=onpolicy: new tokens per completion at most')
p.add_argument('--rounds', type=int, default=2, help='--case=onpolicy: rounds of both tools, alternated')
p.add_argument('--tool', help=argparse.SUPPRESS)  # internal: run one tool in this process
args = p.parse_args()
args.batch_size = args.batch_size or (8 if args.case == 'onpolicy' else 4)
args.dataset = args.dataset or ('data/demo-chat' if args.case == 'onpolicy' else 'data/demo')

def rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB

def one_tool(tool, dtype):
    """Builds the models and the batch, runs steps + 1 steps (the first warms up), prints one JSON line."""
    if tool != 'trl':
        keep_freed_memory()  # distill.py's CPU allocator setting (see machine.keep_freed_memory)
    torch.manual_seed(0)
    teacher = load_model(demo_tokenizer()).eval().requires_grad_(False)
    student = student_from_teacher_layers(teacher, list(range(0, 30, 3))).train()
    meta = json.load(open(os.path.join(args.dataset, 'meta.json')))
    split = load_split(args.dataset, 'train')
    idx = split['idx']
    docs = [d for d in range(len(idx) - 1) if idx[d + 1] - idx[d] > args.block_size][:args.batch_size]
    batch = make_batch(split, [(d, 0) for d in docs], args.block_size, meta['pad_id'], 'cpu')
    X, Y, M = batch.X, batch.Y, batch.M
    bf16 = dtype == 'bfloat16'
    if tool == 'distill':  # distill.py's defaults: alpha 0.5, forward KL at T = 2
        chunk = args.chunk or auto_chunk(output_rows(student), dtype)
        model = distill.Trainable(student, meta['vocab_size'], (0.5, 0.5, 0.0), distill.Divergence('fkl', 2.0), chunk)
        teacher_fn = Teacher(teacher, meta['vocab_size'], 'head')
        optimizer = distill.configure_optimizer(model, 0.0, 0.0, (0.9, 0.999))
        cast_parameters(teacher, getattr(torch, dtype))  # as distill.py: the frozen teacher in the compute dtype
        ctx = torch.autocast('cpu', torch.bfloat16) if bf16 else contextlib.nullcontext()
        def step():
            with ctx:
                out = model(batch, teacher_fn(batch), M.sum().item())
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return (out.kd / M.sum()).item()
    else:
        from datasets import Dataset
        from trl import DistillationConfig, DistillationTrainer
        config = DistillationConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size,
                                    gradient_checkpointing=False, bf16=False, use_cpu=True, beta=0.0, temperature=2.0,
                                    learning_rate=0.0, report_to=[], max_completion_length=args.block_size)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config,
                                      train_dataset=Dataset.from_dict({'prompt': ['hi'] * args.batch_size}),
                                      processing_class=model_tokenizer(demo_tokenizer()))
        trainer.create_optimizer_and_scheduler(num_training_steps=args.steps + 1)
        rows = torch.cat([X, Y[:, -1:]], 1)  # the whole document row: X plus its last target
        inputs = {'prompt_ids': rows[:, :1], 'prompt_mask': torch.ones_like(rows[:, :1]),
                  'completion_ids': rows[:, 1:], 'completion_mask': M}
        ctx = torch.autocast('cpu', torch.bfloat16) if bf16 else contextlib.nullcontext()  # (its bf16 flag alone left
        def step():                                                                      # the CPU step in fp32)
            with ctx:
                loss = trainer.compute_loss(trainer.model, inputs, num_items_in_batch=M.sum())
            trainer.accelerator.backward(loss)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            return loss.item()  # the mean divergence, no T^2 factor: comparable with distill's kd
    base = rss_gb()
    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        kd = step()
        times.append(time.perf_counter() - t0)
    step_s = sum(times[1:]) / args.steps
    print(json.dumps({'tokens_per_s': X.numel() / step_s, 'ms': step_s * 1000, 'peak_gb': rss_gb(),
                      'step_peak_gb': rss_gb() - base, 'kd': kd}))

STUDENT_BLOCKS = list(range(0, 30, 3))

def onpolicy_prompts():
    """The prompts distill.py's first steps + 1 steps write replies to (seed 1337, block_size 128), in its order."""
    from kd.data import block_windows, step_doc_ids
    from kd.sampling import prompt_lengths
    split = load_split(args.dataset, 'train')
    windows, lengths = block_windows(split, 128), prompt_lengths(split)
    docs = [int(windows[i][0]) for it in range(args.steps + 1)
            for ids in step_doc_ids(it, args.batch_size, 1, 0, 1, len(windows), 1337) for i in ids]
    return [split['tokens'][split['idx'][d]:split['idx'][d] + lengths[d]].tolist() for d in docs]

def trl_onpolicy(dtype):
    """TRL's DistillationTrainer.train() for steps + 1 steps: prints one JSON line of per-step times and counts."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer
    torch.manual_seed(0)
    teacher = load_model(demo_tokenizer()).eval().requires_grad_(False)
    student = student_from_teacher_layers(teacher, STUDENT_BLOCKS).train()
    tok = model_tokenizer(demo_tokenizer())
    prompts = onpolicy_prompts()
    texts = [tok.decode(p) for p in prompts]
    same = sum(tok(t, add_special_tokens=False)['input_ids'] == p for t, p in zip(texts, prompts))
    config = DistillationConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size,
                                gradient_checkpointing=False, bf16=dtype == 'bfloat16', use_cpu=True, beta=0.5,
                                temperature=1.0, top_p=1.0, top_k=0, learning_rate=0.0, report_to=[],
                                max_completion_length=args.max_new_tokens, max_steps=args.steps + 1,
                                shuffle_dataset=False, save_strategy='no', logging_steps=10 ** 6)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, processing_class=tok,
                                  train_dataset=Dataset.from_dict({'prompt': texts}))
    rec = {'step': [], 'sample': [], 'teacher': [], 'generated': [], 'scored': []}
    clock = {}
    generate = trainer._generate
    def timed_generate(prompts):
        t0 = time.perf_counter()
        out = generate(prompts)
        rec['sample'].append(time.perf_counter() - t0)
        rec['generated'].append(sum(map(len, out[1])))
        rec['scored'].append(len(out[0]) * max(len(p) + len(c) for p, c in zip(out[0], out[1])))
        return out
    trainer._generate = timed_generate
    rec['teacher'] = [0.0] * (args.steps + 1)
    teacher.register_forward_pre_hook(lambda m, a: clock.__setitem__('teacher', time.perf_counter()))
    teacher.register_forward_hook(lambda m, a, o: rec['teacher'].__setitem__(
        len(rec['step']), rec['teacher'][len(rec['step'])] + time.perf_counter() - clock['teacher']))
    class Steps(TrainerCallback):
        def on_step_begin(self, *a, **k):
            clock['step'] = time.perf_counter()
        def on_step_end(self, *a, **k):
            rec['step'].append(time.perf_counter() - clock['step'])
    trainer.add_callback(Steps())
    trainer.train()
    print(json.dumps({**rec, 'same_prompt_ids': same, 'prompts': len(prompts)}))

def distill_onpolicy(out_dir):
    """distill.py on_policy=1, the same models and settings: the command line."""
    return [sys.executable, 'distill.py', 'configs/on_policy.py', '--on_policy=1', '--student_init=teacher_layers',
            f'--student_layers={STUDENT_BLOCKS}', f'--max_iters={args.steps + 1}', '--learning_rate=0', '--min_lr=0',
            '--warmup_frac=0', f'--batch_size={args.batch_size}', f'--max_new_tokens={args.max_new_tokens}',
            '--eval_interval=1000000', '--dtype=auto', f'--out_dir={out_dir}',
            f'--dataset={os.path.basename(args.dataset)}']

def run_measured(cmd):
    """(stdout, the child's peak RSS in GB), the child alone measured (wait4's rusage)."""
    with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode:
            sys.exit(f'{cmd[1]} failed:\n{err.read()[-3000:]}')
        return out.read(), usage.ru_maxrss / 2 ** 20

def onpolicy_case():
    """Both tools, rounds alternated: the table."""
    from kd.machine import choose_dtype
    dtype = choose_dtype('auto', 'cpu')[0]
    print(f'on-policy step: {args.batch_size} prompts x up to {args.max_new_tokens} new tokens, JSD(0.5), T = 1, '
          f'{dtype}, {torch.get_num_threads()} threads, {cpu_name()}')
    res = {'distill': [], 'trl': []}
    for r in range(args.rounds):
        for tool in res:
            if tool == 'distill':
                out_dir = tempfile.mkdtemp()
                _, peak = run_measured(distill_onpolicy(out_dir))
                log = [json.loads(l) for l in open(os.path.join(out_dir, 'log.jsonl'))]
                log = [l for l in log if 'sample_ms' in l][1:]
                row = {'step': [l['ms'] / 1e3 for l in log], 'sample': [l['sample_ms'] / 1e3 for l in log],
                       'teacher': [l['teacher_ms'] / 1e3 for l in log], 'generated': [l['generated'] for l in log],
                       'scored': [l['tokens_per_s'] * l['ms'] / 1e3 for l in log]}
            else:
                text, peak = run_measured([sys.executable, __file__, f'--tool=trl,{dtype}', '--case=onpolicy']
                                          + sys.argv[1:])
                row = json.loads(text.strip().splitlines()[-1])
                assert row['same_prompt_ids'] == row['prompts'], 'TRL re-tokenized the prompts differently'
                row = {k: v[1:] for k, v in row.items() if isinstance(v, list)}
            med = {k: statistics.median(v) for k, v in row.items()}
            med['generated_per_s'] = statistics.median(g / s for g, s in zip(row['generated'], row['step']))
            med['scored_per_s'] = statistics.median(g / s for g, s in zip(row['scored'], row['step']))
            med['peak_gb'] = peak
            res[tool].append(med)
            print(f"round {r + 1} {tool:8s} {med['step'] * 1000:6.0f} ms a step (sampling {med['sample'] * 1000:.0f}, "
                  f"teacher {med['teacher'] * 1000:.0f}, "
                  f"student {(med['step'] - med['sample'] - med['teacher']) * 1000:.0f})"
                  f"  {med['generated']:.0f} generated ({med['generated_per_s']:.1f}/s), "
                  f"{med['scored_per_s']:.0f} scored positions/s, peak RSS {peak:.2f} GB", flush=True)
    d, t = ({k: statistics.median(r[k] for r in res[tool]) for k in res[tool][0]} for tool in ('distill', 'trl'))
    print(f"distill / trl: {t['step'] / d['step']:.2f}x the steps/s, "
          f"{d['generated_per_s'] / t['generated_per_s']:.2f}x "
          f"the generated tokens/s, {d['peak_gb'] / t['peak_gb']:.2f}x the peak memory")

if args.tool and args.case == 'onpolicy':
    trl_onpolicy(args.tool.split(',')[1])
    sys.exit(0)
if args.case == 'onpolicy':
    check_dataset(args.dataset)
    onpolicy_case()
    sys.exit(0)
if args.tool:
    one_tool(*args.tool.split(','))
    sys.exit(0)

print(f'KD step, {args.batch_size} x {args.block_size} tokens, {torch.get_num_threads()} threads, {cpu_name()}')
for dtype in args.dtypes:
    res = {}
    for tool in ('distill', 'trl', 'trl+allocator'):
        out = subprocess.run([sys.executable, __file__, f'--tool={tool},{dtype}'] + sys.argv[1:], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f'{tool} ({dtype}) failed:\n{out.stderr[-3000:]}')
        res[tool] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f'\n{dtype}:')
    for tool, r in res.items():
        print(f'{tool:14s} {r["ms"]:8.0f} ms  {r["tokens_per_s"]:7.1f} tokens/s  peak RSS {r["peak_gb"]:.2f} GB '
              f'(+{r["step_peak_gb"]:.2f} GB in the steps)  forward KL {r["kd"]:.4f}')
    d = res['distill']
    for tool in ('trl', 'trl+allocator'):
        t = res[tool]
        print(f'distill / {tool}: {d["tokens_per_s"] / t["tokens_per_s"]:.2f}x the tokens/s, {d["peak_gb"] / t["peak_gb"]:.2f}x the peak memory')
