"""
What a teacher cache (cache_teacher.py) costs and saves, on the demo data with the packaged SmolLM2-135M teacher and
its 10-block copy as the student (the CPU experiment's start):

    python prepare_data.py && python scripts/bench_cache.py

1. bytes per supervised target for each cache shape (the files cache_teacher.py writes: ids and fp16 log-probabilities
   of the top k and of m draws from the tail, one fp32 tail sum per stored temperature), checked against a cache it
   writes of the validation split;
2. the error: on validation windows, the divergence at T from the cache (fp16 values, m draws) against the one from
   the teacher's full distribution: of the mean, per batch of --batch_targets targets, per position; the same with
   no draws and the tail as one bucket (k + 1 outcomes, a lower bound: the design the draws replaced), the relative
   error of the fkl gradient w.r.t. the student's logits over a batch (what the draws' noise does to a step), and
   KL(full || cached) where the cached distribution spreads the tail's mass evenly over the tokens outside the top k;
3. a KD step (batch x block tokens, loss_chunk 256, distill.py's Trainable) with the cache against the online
   teacher, on the same windows, each in a fresh process (its own peak RSS), alternating, in the dtype distill.py's
   'auto' picks here.
"""
import argparse, contextlib, json, os, resource, statistics, subprocess, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np
import torch
import torch.nn.functional as F
from kd.data import TopK, block_windows, load_split, make_batch, top_k
from distill import KD_KINDS, Divergence, Trainable, configure_optimizer, kd_divergence
from kd.cache import CachedTeacher
from kd.teacher import Teacher
from kd.machine import choose_dtype, keep_freed_memory
from kd.models import cast_parameters, demo_tokenizer, load_model, student_from_teacher_layers

p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument('--dataset', default='data/demo', help='a folder written by prepare_data.py')
p.add_argument('--shapes', nargs='+', default=['8,32', '16,16', '16,32', '32,32', '128,32'], help='cache shapes k,m to measure')
p.add_argument('--k', type=int, default=16, help='the cache the step uses (written for the validation split)')
p.add_argument('--samples', type=int, default=32, help='its draws per position')
p.add_argument('--kinds', nargs='+', default=list(KD_KINDS), help='divergences measured at --k, --samples')
p.add_argument('--batch_targets', type=int, default=1000, help="targets per batch for the per-batch error (the CPU experiment's step has <= 1,024 tokens)")
p.add_argument('--temperature', type=float, default=2.0)
p.add_argument('--block_size', type=int, default=512)
p.add_argument('--batch_size', type=int, default=4)
p.add_argument('--windows', type=int, default=48, help='validation windows the error is measured on')
p.add_argument('--steps', type=int, default=3, help='timed steps per round (after one warm-up step)')
p.add_argument('--rounds', type=int, default=2)
p.add_argument('--trained', help="also measure the error for this student: distill.py's export of the 10-block copy (out_dir/student)")
p.add_argument('--parts', type=int, nargs='+', default=[1, 2, 3], help='which of the three measurements to run')
p.add_argument('--row', help=argparse.SUPPRESS)  # internal: one step row in this process
args = p.parse_args()
teacher_path = demo_tokenizer()
meta = json.load(open(os.path.join(args.dataset, 'meta.json')))
name = f'teacher_k{args.k}_m{args.samples}_b{args.block_size}'
split = load_split(args.dataset, 'val')
windows = block_windows(split, args.block_size)

def models(dtype):
    teacher = load_model(teacher_path).eval().requires_grad_(False)
    student = student_from_teacher_layers(teacher, list(range(0, 30, 3)))
    return cast_parameters(teacher, dtype), student

if args.row:  # one step row: 'online' or 'cache', in dtype
    mode, dtype = args.row.split(',')
    dtype = getattr(torch, dtype)
    ctx = torch.autocast('cpu', dtype) if dtype != torch.float32 else contextlib.nullcontext()
    torch.manual_seed(0)
    teacher, student = models(dtype)
    if mode == 'cache':
        teacher = CachedTeacher(os.path.join(args.dataset, name), args.dataset, {'val': split}, args.block_size,
                                args.temperature, (0.5, 0.5, 0.0))  # (the model: only its blocks, in the student)
    else:
        teacher = Teacher(teacher, meta['vocab_size'], 'head')
    model = Trainable(student.train(), meta['vocab_size'], (0.5, 0.5, 0.0), Divergence('fkl', args.temperature), 256)
    keep_freed_memory()
    optimizer = configure_optimizer(model, 0.0, 0.0, (0.9, 0.999))
    times = []
    for step in range(args.steps + 1):
        t0 = time.perf_counter()
        b = make_batch(split, windows[step * args.batch_size:(step + 1) * args.batch_size], args.block_size, meta['pad_id'], 'cpu')
        with ctx:
            out = model(b, teacher(b), b.M.sum().item())
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append((time.perf_counter() - t0, b.X.numel()))
    tok_s = sum(n for _, n in times[1:]) / sum(t for t, _ in times[1:])
    print(json.dumps({'tok_s': tok_s, 'kd': (out.kd / b.M.sum()).item(), 'rss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}))
    sys.exit(0)

cpu = open('/proc/cpuinfo').read() if os.path.exists('/proc/cpuinfo') else ''
cpu_name = next((l.split(':', 1)[1].strip() for l in cpu.splitlines() if l.startswith('model name')), 'unknown CPU')
dtype, why, _ = choose_dtype('auto', 'cpu')
print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name}; dtype {dtype} ({why})')

# 1. bytes per supervised target
folder = os.path.join(args.dataset, name)
t0 = time.time()
reuse = os.path.exists(os.path.join(folder, 'meta.json'))  # (a complete cache: meta.json comes last)
out = subprocess.CompletedProcess([], 0) if reuse else subprocess.run([sys.executable, os.path.join('scripts', 'cache_teacher.py'), f'--teacher={teacher_path}', f'--dataset={args.dataset}', '--splits=val',
                      f'--k={args.k}', f'--samples={args.samples}', f'--block_size={args.block_size}', f'--temperatures=1,{args.temperature:g}', f'--name={name}'],
                     capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if out.returncode:
    sys.exit(out.stderr)
written = json.load(open(os.path.join(folder, 'meta.json')))
rows = written['splits']['val']['rows']
on_disk = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith('.bin'))
print(f'\n1. cache_teacher.py on the validation split (k={args.k}, m={args.samples}, block {args.block_size}): {rows:,} rows '
      + ('(written before: not timed); ' if reuse else f'in {time.time() - t0:.0f} s (with the teacher\'s loading); ') + f' {on_disk:,} bytes = {on_disk / rows:.1f} bytes per supervised target')
ids_bytes = np.dtype(written['ids_dtype']).itemsize
shapes = [tuple(map(int, x.split(','))) for x in args.shapes]
print('   k     m     bytes/target (uint16 ids + fp16 log-probs + 2 fp32 tails)   450k samples x 1,000 targets')
for k, m in shapes:
    b = (ids_bytes + 2) * (k + m) + 4 * 2
    print(f'   {k:<5d} {m:<5d} {b:<60d} {b * 450e6 / 1e9:,.0f} GB')

if 2 not in args.parts and 3 not in args.parts:
    sys.exit(0)
# 2. the error
teacher, student = models(getattr(torch, dtype))
students = {'at its start': cast_parameters(student, torch.float32).eval()}
if args.trained:
    students[f'trained ({args.trained})'] = cast_parameters(load_model(args.trained), torch.float32).eval()
ctx = torch.autocast('cpu', getattr(torch, dtype)) if dtype != 'float32' else contextlib.nullcontext()
T, V = args.temperature, meta['vocab_size']
g = torch.Generator().manual_seed(0)

def bucket(z, ids, logp, tail):
    """The forward KL between the two distributions collapsed to the top k and one bucket for the rest."""
    log_q = F.log_softmax(z / T, -1)
    q = torch.cat([log_q.gather(-1, ids), log_q.scatter(-1, ids, -float('inf')).logsumexp(-1, keepdim=True)], -1)
    p = F.log_softmax(torch.cat([logp / T, tail[:, None]], -1), -1)
    return (p.exp() * (p - q)).sum(-1)

for label, student in students.items() if 2 in args.parts else ():
    rows, gradient_errors = {}, {}  # (kind, k, m) -> per-position online and cached divergences; (k, m) -> per batch
    for a in range(0, min(args.windows, len(windows)), args.batch_size):
        b = make_batch(split, windows[a:a + args.batch_size], args.block_size, meta['pad_id'], 'cpu')
        keep = b.M.bool()
        with torch.no_grad(), ctx:
            zt, z = teacher(input_ids=b.X).logits[keep][:, :V].float(), student(input_ids=b.X).logits[keep][:, :V].float()
        log_p = F.log_softmax(zt / T, -1)
        for k, m in shapes + [(k, 0) for k in sorted({k for k, _ in shapes})]:
            ids, logp, tail = top_k(zt, k, [1.0, T], m, g)
            logp = logp.half().float()
            for kind in (args.kinds if (k, m) == (args.k, args.samples) else ['fkl']):
                online = kd_divergence(z, zt, kind, T)
                cached = kd_divergence(z, TopK.from_rows(ids, logp, tail[:, 1], tail[:, 1], m, T), kind, T) if m else bucket(z, ids, logp, tail[:, 1])
                rows.setdefault((kind, k, m), []).append(torch.stack([online, cached]))
            # the gradient w.r.t. the student's logits of a batch's summed divergence (fkl at every shape, every kind at
            # --k, --samples): its error relative to the online one and its cosine with it
            for kind in (args.kinds if (k, m) == (args.k, args.samples) else ['fkl'] if m else []):
                n_b = min(args.batch_targets, len(z))
                grads = [torch.autograd.grad(kd_divergence(zz, target, kind, T).sum(), zz)[0] for zz, target in
                         ((z[:n_b].clone().requires_grad_(), zt[:n_b]),
                          (z[:n_b].clone().requires_grad_(), TopK.from_rows(ids, logp, tail[:, 1], tail[:, 1], m, T)[:n_b]))]
                gradient_errors.setdefault((kind, k, m), []).append((((grads[1] - grads[0]).norm() / grads[0].norm()).item(),
                                                                     F.cosine_similarity(grads[1].flatten(), grads[0].flatten(), 0).item()))
            if m == 0:  # the cached distribution over the whole vocabulary: its k tokens, the bucket spread evenly over the others
                coarse = F.log_softmax(torch.cat([logp / T, tail[:, 1:]], -1), -1)
                log_c = (coarse[:, -1:] - np.log(V - k)).expand(-1, V).scatter(-1, ids, coarse[:, :-1])
                rows.setdefault(('even', k, 0), []).append((log_p.exp() * (log_p - log_c)).sum(-1)[None].expand(2, -1))
    n = sum(len(x[0]) for x in rows[('fkl',) + shapes[0]])
    print(f'\n2. divergences at T={T:g}, the student {label}, {n:,} supervised targets of {min(args.windows, len(windows))} '
          f'validation windows (block {args.block_size}); teacher in {dtype}; batches of {args.batch_targets:,} targets')
    print('   kind  k     m     mean online   mean cached   error of the mean   mean |batch error|   per-position rms / mean')
    for (kind, k, m), xs in rows.items():
        if kind == 'even':
            continue
        o, c = torch.cat(xs, 1).double()
        nb = len(o) // args.batch_targets
        batch = (c[:nb * args.batch_targets].view(nb, -1).mean(1) / o[:nb * args.batch_targets].view(nb, -1).mean(1) - 1).abs().mean()
        print(f'   {kind:5s} {k:<5d} {m if m else "bucket":<5} {o.mean():<13.5f} {c.mean():<13.5f} {c.mean() / o.mean() - 1:<+19.3%} '
              f'{batch:<20.3%} {(c - o).pow(2).mean().sqrt() / o.mean():.3f}')
    print(f'   the gradient w.r.t. the student logits of {args.batch_targets:,} targets (a batch\'s first): ||cached - full|| / '
          '||full||, and the cosine of the two (the mean over batches)')
    for (kind, k, m), v in gradient_errors.items():
        print(f'   {kind:5s} {k} + {m}: error {np.mean([e for e, _ in v]):.3f}, cosine {np.mean([c for _, c in v]):+.3f} '
              f'({min(c for _, c in v):+.2f} ... {max(c for _, c in v):+.2f})')
    print('   KL(full || top k + the tail spread evenly): ' + ', '.join(f'k={k}: {torch.cat(xs, 1)[0].mean():.4f} nats'
                                                                    for (kind, k, _), xs in rows.items() if kind == 'even'))

# 3. tokens/s, cache vs online
if 3 not in args.parts:
    sys.exit(0)
print(f'\n3. KD step, {args.batch_size} x {args.block_size} tokens (validation windows), loss_chunk 256, {dtype}; '
      f'{args.rounds} rounds x {args.steps} timed steps, each row a fresh process')
res = {'online': [], 'cache': []}
for r in range(args.rounds):
    for mode in res:
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], f'--row={mode},{dtype}'], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        res[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
for mode, rs in res.items():
    speeds = ' / '.join(f"{x['tok_s']:.1f}" for x in rs)
    print(f"   {mode:7s} {speeds} tokens/s, peak RSS {max(x['rss_gb'] for x in rs):.2f} GB, "
          f"kd {rs[0]['kd']:.4f}")
ratio = statistics.median(a['tok_s'] / b['tok_s'] for a, b in zip(res['cache'], res['online']))
print(f'   cache / online: {ratio:.2f}x tokens/s (median over the rounds)')
