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
import argparse, contextlib, json, os, resource, subprocess, sys, tempfile, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
import distill
from kd.chunked import auto_chunk
from kd.teacher import Teacher
from kd.data import load_split, make_batch
from kd.machine import cpu_name, keep_freed_memory
from kd.models import (cast_parameters, demo_tokenizer, load_model, model_tokenizer, output_rows,
                    student_from_teacher_layers)

p = argparse.ArgumentParser()
p.add_argument('--batch_size', type=int, default=4)  # distill.py's defaults
p.add_argument('--block_size', type=int, default=512)
p.add_argument('--steps', type=int, default=4)
p.add_argument('--chunk', type=int, default=0, help="distill.py's loss_chunk (0: what 'auto' picks)")
p.add_argument('--dataset', default='data/demo')
p.add_argument('--dtypes', nargs='+', default=['float32', 'bfloat16'], choices=['float32', 'bfloat16'],
               help='both tools in each of these dtypes (bf16: autocast)')
p.add_argument('--tool', help=argparse.SUPPRESS)  # internal: run one tool in this process
args = p.parse_args()

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
