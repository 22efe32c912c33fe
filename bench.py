"""
Speed of one logit-distillation step, next to this machine's matmul peak measured in the same run.

    python prepare_data.py && python bench.py                 # packaged SmolLM2-135M teacher -> its 10-layer copy
    python bench.py --batch_size=4 --block_size=256 --steps=5

Prints the peak (fp32 matmul FLOP/s), tokens/s, MFU, and what each part of the step costs.
"""
import argparse, json, os, time
import numpy as np
import torch
import distill, prepare_data
from distill import flops_per_token, load_model, loss_sums, measure_matmul_flops, student_from_teacher_layers, total_loss

p = argparse.ArgumentParser()
p.add_argument('--batch_size', type=int, default=8)
p.add_argument('--block_size', type=int, default=128)
p.add_argument('--steps', type=int, default=3)
p.add_argument('--dataset', default='data/demo')
args = p.parse_args()
torch.manual_seed(0)

teacher = load_model(prepare_data.demo_tokenizer()).eval().requires_grad_(False)
student = student_from_teacher_layers(teacher, list(range(0, 30, 3))).train()
meta = json.load(open(os.path.join(args.dataset, 'meta.json')))
split = distill.load_split(args.dataset, 'train')
idx = split['idx']
long_docs = [d for d in range(len(idx) - 1) if idx[d + 1] - idx[d] > args.block_size][:args.batch_size]
X, Y, M, _ = distill.make_batch(split, long_docs, args.block_size, meta['pad_id'], 'cpu')
optimizer = distill.configure_optimizer(student, 1e-5, 0.0, (0.9, 0.999), 'cpu')
n_tokens = X.numel()

peak = measure_matmul_flops('cpu', n=2048, seconds=3.0)
parts = {k: 0.0 for k in ('teacher forward', 'student forward', 'loss', 'backward', 'optimizer')}
for step in range(args.steps + 1):  # step 0 warms up
    times = []
    t = time.perf_counter()
    with torch.no_grad():
        t_logits = teacher(input_ids=X).logits
    times.append(time.perf_counter())
    s_logits = student(input_ids=X).logits
    times.append(time.perf_counter())
    ce, kd = loss_sums(s_logits, Y, M, t_logits, meta['vocab_size'], 'fkl', 2.0)
    loss = total_loss(ce, kd, 0.0, (0.5, 0.5, 0.0), 2.0) / M.sum()
    times.append(time.perf_counter())
    loss.backward()
    times.append(time.perf_counter())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times.append(time.perf_counter())
    if step:
        for k, a, b in zip(parts, [t] + times[:-1], times):
            parts[k] += (b - a) / args.steps
step_s = sum(parts.values())
flops = flops_per_token(student, args.block_size, True) + flops_per_token(teacher, args.block_size, False)
tok_s = n_tokens / step_s
print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, fp32')
print(f'matmul peak (2048x2048 fp32): {peak / 1e9:.1f} GFLOP/s')
print(f'KD step: {args.batch_size} x {args.block_size} tokens, teacher {sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M, '
      f'student {sum(p.numel() for p in student.parameters()) / 1e6:.1f}M, {flops / 1e9:.2f} GFLOP/token')
print(f'  {step_s * 1000:.0f} ms/step, {tok_s:.1f} tokens/s, {flops * tok_s / 1e9:.1f} GFLOP/s = MFU {flops * tok_s / peak * 100:.1f}%')
for k, v in parts.items():
    print(f'  {k:16s} {v * 1000:8.0f} ms  {v / step_s * 100:5.1f}%')
