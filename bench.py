"""
Speed and memory of distillation, plain (full logits) vs chunked (loss_chunk), as ratios measured in one run.

    python prepare_data.py && python bench.py            # both parts below
    python bench.py --part=loss                           # the loss alone: peak memory and time
    python bench.py --part=step                           # 4 x 512 tokens, distill.py's defaults

--part=loss: forward + backward of CE + forward KL at T=2 from final hidden states, for V = 49,152 and
151,936, hidden 576 and 1,536, 8,192 positions; each case in a fresh process, peak memory = its peak RSS
above the inputs. --part=step: one whole KD step (the packaged SmolLM2-135M teacher -> its 10-layer copy,
fp32) through distill.py's own Trainable, plain and chunked, with the cost of each part of the step. MFU is
the median over the steps of each step's FLOP/s over this machine's fp32 matmul peak measured just before
that step: a shared machine's speed drifts by more than the differences measured here.
"""
import argparse, json, os, resource, statistics, subprocess, sys, time
import torch
import distill, prepare_data
from distill import ChunkedHeadLoss, Trainable, flops_per_token, load_model, loss_sums, measure_matmul_flops, student_from_teacher_layers

p = argparse.ArgumentParser()
p.add_argument('--part', default='all', choices=['all', 'loss', 'step'])
p.add_argument('--positions', type=int, default=8192)
p.add_argument('--chunk', type=int, default=256, help='positions per chunk on the chunked path (distill.py: loss_chunk)')
p.add_argument('--max_gb', type=float, default=16.0, help='fewer positions where the plain path would need more memory')
p.add_argument('--vocabs', type=int, nargs='+', default=[49152, 151936])
p.add_argument('--batch_size', type=int, default=4)  # distill.py's defaults
p.add_argument('--block_size', type=int, default=512)
p.add_argument('--steps', type=int, default=5)
p.add_argument('--dataset', default='data/demo')
p.add_argument('--case', help=argparse.SUPPRESS)  # internal: one loss case in this process
args = p.parse_args()

def rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB

def loss_case(path, V, d, n, chunk, repeats=2):
    """One loss case in this process: prints seconds per forward + backward and peak memory above the inputs."""
    if path == 'chunked':
        distill.keep_freed_memory()  # as distill.py does on a CPU with loss_chunk > 0
    torch.manual_seed(0)
    h = (torch.randn(n, d) * 0.5).requires_grad_()
    W = (torch.randn(V, d) * d ** -0.5).requires_grad_()
    t_h, t_W = torch.randn(n, d), torch.randn(V, d) * d ** -0.5
    Y = torch.randint(0, V, (n,))
    base = rss_gb()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        if path == 'plain':
            ce, kd = loss_sums((h @ W.T)[None], Y[None], torch.ones(1, n), (t_h @ t_W.T)[None], V, 'fkl', 2.0)
            loss = 0.5 * ce + 2.0 * kd
        else:
            loss, ce, kd = ChunkedHeadLoss.apply(h, W, Y, t_h, t_W, V, 0.5, 2.0, 'fkl', 2.0, 0.5, chunk)
        (loss / n).backward()
        times.append(time.perf_counter() - t0)
        h.grad = W.grad = None
    print(json.dumps({'seconds': min(times), 'peak_gb': rss_gb() - base, 'loss': loss.item() / n}))

if args.case:
    path, V, d, n = args.case.split(',')
    loss_case(path, int(V), int(d), int(n), args.chunk)
    sys.exit(0)

print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, fp32')
if args.part in ('all', 'loss'):
    print(f'\nloss alone (CE + forward KL, T=2), {args.positions} positions, chunk {args.chunk}: forward + backward')
    print(f'{"V":>8s} {"hidden":>6s} {"plain s":>8s} {"plain GB":>9s} {"chunked s":>10s} {"chunked GB":>11s} {"time ratio":>11s} {"memory ratio":>13s}')
    for V in args.vocabs:
        for d in (576, 1536):
            n = args.positions
            while 10 * n * V * 4 / 2 ** 30 > args.max_gb:  # the plain path peaks at ~10 (n, V) fp32 tensors (measured)
                n //= 2
            res = {}
            for path in ('plain', 'chunked'):
                out = subprocess.run([sys.executable, __file__, f'--case={path},{V},{d},{n}', f'--chunk={args.chunk}'],
                                     capture_output=True, text=True)
                res[path] = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
            pl, ch = res['plain'], res['chunked']
            assert pl and ch and abs(pl['loss'] - ch['loss']) <= 1e-4 * abs(pl['loss']), (pl, ch)
            print(f'{V:8d} {d:6d} {pl["seconds"]:8.2f} {pl["peak_gb"]:9.2f} {ch["seconds"]:10.2f} {ch["peak_gb"]:11.2f} '
                  f'{ch["seconds"] / pl["seconds"]:11.2f} {ch["peak_gb"] / pl["peak_gb"]:13.2f}'
                  + (f'   at {n} positions: the plain path at {args.positions} would need ~{10 * args.positions * V * 4 / 2 ** 30:.0f} GB'
                     if n != args.positions else ''))
            if n != args.positions:  # the chunked path at the full size: its memory over plain's at n bounds the ratio
                out = subprocess.run([sys.executable, __file__, f'--case=chunked,{V},{d},{args.positions}', f'--chunk={args.chunk}'],
                                     capture_output=True, text=True)
                full = json.loads(out.stdout.strip().splitlines()[-1])
                print(f'{"":15s} chunked at {args.positions} positions: {full["seconds"]:.2f} s, {full["peak_gb"]:.2f} GB = '
                      f'{full["peak_gb"] / pl["peak_gb"]:.2f}x plain at {n}: the memory ratio at {args.positions} is below that')
    try:
        import liger_kernel  # noqa: F401  (Triton kernels: CUDA only)
        print('liger-kernel is installed, but its fused linear JSD runs on CUDA devices only: not measured on this CPU')
    except ImportError:
        print('liger-kernel: not installed (its fused kernels are Triton, CUDA only): not measured on this CPU')

def loss_alone(student, model, X, Y, M, t_out, chunk):
    """Seconds per forward + backward of the step's loss alone, from the student's final hidden states."""
    with torch.no_grad():
        h = student.base_model(input_ids=X).last_hidden_state
    keep, W, cfg, times = M.bool(), student.get_output_embeddings().weight, model.loss, []
    for _ in range(args.steps + 1):
        hs = h.detach().requires_grad_()
        t0 = time.perf_counter()
        if chunk:
            weighted, _, _ = ChunkedHeadLoss.apply(hs[keep], W, Y[keep], t_out[0][keep], t_out[1], cfg['vocab'], *cfg['weights'],
                                                   cfg['kind'], cfg['temperature'], cfg['beta'], chunk, model.chunk_fn)
        else:
            ce, kd = loss_sums(hs @ W.T, Y, M, t_out[0], cfg['vocab'], cfg['kind'], cfg['temperature'], cfg['beta'])
            weighted = cfg['weights'][0] * ce + cfg['weights'][1] * kd
        (weighted / M.sum()).backward()
        times.append(time.perf_counter() - t0)
        W.grad = None
    return sum(times[1:]) / args.steps

if args.part in ('all', 'step'):
    torch.manual_seed(0)
    teacher = load_model(prepare_data.demo_tokenizer()).eval().requires_grad_(False)
    meta = json.load(open(os.path.join(args.dataset, 'meta.json')))
    split = distill.load_split(args.dataset, 'train')
    idx = split['idx']
    long_docs = [d for d in range(len(idx) - 1) if idx[d + 1] - idx[d] > args.block_size][:args.batch_size]
    X, Y, M, _ = distill.make_batch(split, [(d, 0) for d in long_docs], args.block_size, meta['pad_id'], 'cpu')
    print(f'\nKD step: {args.batch_size} x {args.block_size} tokens; each step next to the fp32 matmul peak (2048 x 2048) measured just before it')
    for label, chunk, compiled in (('plain', 0, False), (f'chunked (loss_chunk={args.chunk})', args.chunk, False),
                                   (f'chunked (loss_chunk={args.chunk}), compile=True', args.chunk, True)):
        student = student_from_teacher_layers(teacher, list(range(0, 30, 3))).train()
        loss_settings = {'vocab': meta['vocab_size'], 'weights': (0.5, 0.5 * 4), 'kind': 'fkl', 'temperature': 2.0,
                         'beta': 0.5, 'chunk': chunk, 'compile': compiled}
        model = Trainable(student, loss_settings)
        flops = flops_per_token(student, args.block_size, True) + flops_per_token(teacher, args.block_size, False)
        if chunk:
            distill.keep_freed_memory()  # as distill.py does on a CPU with loss_chunk > 0 (process-wide from here on)
        optimizer = distill.configure_optimizer(model, 0.0, 0.0, (0.9, 0.999))  # lr 0: every row sees the same weights
        teacher_net = teacher.base_model if chunk else teacher
        if compiled:  # as distill.py --compile=True: both transformer stacks (the teacher's: for this last row) and the loss
            student.base_model.compile()
            teacher.base_model.compile()
        parts = dict.fromkeys(('data', 'teacher forward', 'student forward + loss', 'backward', 'optimizer'), 0.0)
        t_compile, ratios = 0.0, []
        for step in range(args.steps + 1 + compiled):  # step 0 warms up (and compiles, and recompiles)
            # the machine's speed drifts: its peak right before each timed step (warm-up steps need none)
            peak = measure_matmul_flops('cpu', n=2048, seconds=1.0) if step > compiled else None
            t = [time.perf_counter()]
            X, Y, M, _ = distill.make_batch(split, [(d, 0) for d in long_docs], args.block_size, meta['pad_id'], 'cpu')
            t.append(time.perf_counter())
            with torch.no_grad():
                out = teacher_net(input_ids=X)
                t_out = (out.last_hidden_state, teacher.get_output_embeddings().weight, None) if chunk else (out.logits, None, None)
            t.append(time.perf_counter())
            weighted, ce, kd, _ = model(X, Y, M, t_out)
            t.append(time.perf_counter())
            (weighted / M.sum()).backward()
            t.append(time.perf_counter())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t.append(time.perf_counter())
            if step <= compiled:
                t_compile += t[-1] - t[0]
                continue
            for k, a, b in zip(parts, t[:-1], t[1:]):
                parts[k] += (b - a) / args.steps
            ratios.append((flops * X.numel() / (t[-1] - t[0]), peak))
        step_s = sum(parts.values())
        tok_s = X.numel() / step_s
        mfus, peak = sorted(r / p for r, p in ratios), statistics.median(p for _, p in ratios)
        print(f'{label}: {step_s * 1000:.0f} ms, {tok_s:.1f} tokens/s, {flops * tok_s / 1e9:.1f} GFLOP/s; MFU '
              f'{statistics.median(mfus):.1%} (median over the steps of each one\'s FLOP/s over the peak measured just '
              f'before it; steps {mfus[0]:.1%}-{mfus[-1]:.1%}; median peak {peak / 1e9:.1f} GFLOP/s) '
              f'(loss {(ce / M.sum()).item():.4f} ce, {(kd / M.sum()).item():.4f} kd)'
              + (f'; compiling took {t_compile:.0f} s' if compiled else ''))
        for k, v in parts.items():
            print(f'  {k:24s} {v * 1000:8.0f} ms  {v / step_s:6.1%}')
        print(f'  of which the loss alone (its forward + backward from the final hidden states, heads included): '
              f'{loss_alone(student, model, X, Y, M, t_out, chunk) * 1000:.0f} ms')

