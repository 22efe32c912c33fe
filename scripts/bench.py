"""
Speed and memory of distillation, plain (full logits) vs chunked (loss_chunk), as ratios measured in one run.

    python prepare_data.py && python scripts/bench.py            # both parts below
    python scripts/bench.py --part=loss                           # the loss alone: peak memory and time
    python scripts/bench.py --part=chunk                          # forward KL's closed form per chunk, by rows per block
    python scripts/bench.py --part=step                           # 4 x 512 tokens, distill.py's defaults
    python scripts/bench.py --part=step --profile                 # and where a step's time goes, by kind of op
    python scripts/bench.py --part=sample                         # the on-policy sampler against HF generate
    python scripts/bench.py --part=pack                           # packed rows vs padded: real tokens per second
    python scripts/bench.py --part=lora                           # LoRA r16, r64 vs full training: memory, step time

--part=loss: forward + backward of CE + forward KL at T=2 from final hidden states, for V = 49,152 and
151,936, hidden 576 and 1,536, 8,192 positions; each case in a fresh process, peak memory = its peak RSS
above the inputs; also the chunked path across tokenizers (the teacher's distribution carried onto the student's
tokens, autograd). --part=chunk: chunk_loss's closed form (CE + forward KL at T=2 and the gradient) on one chunk of
--chunk x V logits in fp32 and in bf16, taken 4 to 256 rows at a time, alternated over --steps rounds.
--part=step: one whole KD step (the packaged SmolLM2-135M teacher -> its 10-layer copy)
through distill.py's own Trainable, plain and chunked (and compiled, with --compile), in fp32 and in bf16
autocast, with the cost of each part of the step. MFU is the median over the steps of each step's FLOP/s over
this machine's matmul rate in that dtype, measured just before that step: a shared machine's speed drifts by
more than the differences measured here. A dtype this CPU only emulates (10x slower than fp32 or worse) is
measured but not stepped. --part=sample: the on-policy sampler (kd/decode.py) against HF generate on the same
model (the quick start's student, --sample_blocks), demo prompts and settings, for each batch x new tokens of --sample_shapes, alternated over
--steps rounds. --part=pack: the same KD step (without the optimizer)
on micro-batches of the demo's training windows in distill.py's order, padded to the longest and packed (pack=True),
alternated over --rounds rounds per shape (--shapes block x batch); real tokens are the windows' positions up to
their last supervised target (what packing keeps), the padding share is the rest of the positions computed.
--part=lora (not in 'all'): distill.py itself on configs/heal.py (logit KD into the pruned 20-block student, the
fastest dtype) for --steps_lora steps, trained fully and into LoRA adapters of each --ranks, each run in a fresh
process, the rows alternated over --rounds rounds: the median step time after the first step, the process's peak RSS
(the teacher, the data and the interpreter included) and the estimate's peak and its parts as distill.py prints them.
"""
import argparse, contextlib, json, os, resource, statistics, subprocess, sys, time
import numpy as np
import torch
from transformers import GenerationConfig
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # (the repository's root)
from kd.configurator import exit_on_error
from kd.data import block_windows, check_dataset, doc_order, kept_lengths, load_split, make_batch, pack_rows
from functools import partial
from distill import Divergence, Trainable, configure_optimizer, loss_sums
from kd.chunked import ChunkedHeadLoss, HeadLoss, auto_chunk, chunk_loss
from kd.cross import to_student_vocab
from kd.teacher import Logits, Teacher
from kd.machine import cpu_name, flops_per_token, keep_freed_memory, measure_matmul_flops
from kd.models import (cast_parameters, demo_tokenizer, load_model, output_rows,
                    student_from_teacher_layers)
from kd import decode
from kd.sampling import prompt_lengths

p = argparse.ArgumentParser()
p.add_argument('--part', default='all', choices=['all', 'loss', 'chunk', 'step', 'sample', 'pack', 'lora'])
p.add_argument('--positions', type=int, default=8192)
p.add_argument('--chunk', type=int, default=0, help="positions per chunk on the chunked path (distill.py's loss_chunk); "
               "0: what loss_chunk='auto' picks for the V and dtype (--part=chunk: 256)")
p.add_argument('--max_gb', type=float, default=16.0, help='fewer positions where the plain path would need more memory')
p.add_argument('--vocabs', type=int, nargs='+', default=[49152, 151936])
p.add_argument('--batch_size', type=int, default=4)  # distill.py's defaults
p.add_argument('--block_size', type=int, default=512)
p.add_argument('--steps', type=int, default=5)
p.add_argument('--dtypes', nargs='+', default=['float32', 'bfloat16'], help='--part=step: autocast dtypes, one row set each')
p.add_argument('--compile', action='store_true', help='--part=step: also the chunked path with compile=True (minutes to compile)')
p.add_argument('--profile', action='store_true', help='--part=step: also where one more step spends its time, by kind of op')
p.add_argument('--dataset', default='data/demo')
p.add_argument('--sample_blocks', type=int, default=10, choices=[10, 15, 30],
               help="--part=sample: the student's blocks (every third: the quick start's; 30: the teacher)")
p.add_argument('--sample_shapes', default='1x64,1x256,8x64,8x256,32x64,32x256',
               help='--part=sample: batch x new tokens, comma-separated')
p.add_argument('--shapes', default='2048x8,512x4,128x8,1024x1', help='--part=pack: block_size x batch_size, comma-separated')
p.add_argument('--rounds', type=int, default=2, help='--part=pack: timed rounds per shape (after one to warm up)')
p.add_argument('--ranks', default='16,64', help='--part=lora: the LoRA ranks, each against full training (alpha = 2 r)')
p.add_argument('--steps_lora', type=int, default=12, help='--part=lora: steps per run')
p.add_argument('--case', help=argparse.SUPPRESS)  # internal: one loss case in this process
p.add_argument('--row', help=argparse.SUPPRESS)  # internal: one step row in this process
args = p.parse_args()
exit_on_error()  # bad input: one line `error: ...`, exit 2
if args.part not in ('loss', 'chunk'):
    check_dataset(args.dataset)  # (before any part runs: the step and sampling parts read it)

def rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB

def loss_case(path, V, d, n, chunk, repeats=2):
    """One loss case in this process: prints seconds per forward + backward and peak memory above the inputs.
    path 'autograd': the chunked path with forward KL written as jsd at beta 0 (the same divergence), so that its
    gradient comes from autograd instead of forward KL's closed form; 'cross': the chunked path across tokenizers,
    the teacher's V tokens carried onto the student's V at random (to_student_vocab; autograd)."""
    if path != 'plain':
        keep_freed_memory()  # as distill.py does on a CPU with loss_chunk > 0
    torch.manual_seed(0)
    h = (torch.randn(n, d) * 0.5).requires_grad_()
    W = (torch.randn(V, d) * d ** -0.5).requires_grad_()
    t_h, t_W = torch.randn(n, d), torch.randn(V, d) * d ** -0.5
    Y = torch.randint(0, V, (n,))
    base = rss_gb()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        d = Divergence('fkl', 2.0) if path != 'autograd' else Divergence('jsd', 2.0, 0.0)
        if path == 'plain':
            ce, kd = loss_sums(h @ W.T, Y, t_h @ t_W.T, d, slice(0, V))
        elif path == 'cross':
            cols = torch.randint(0, V, (V,), generator=torch.Generator().manual_seed(0))
            teacher = Logits(t_h, t_W, partial(to_student_vocab, cols=cols, n=V, temperature=2.0))
            sums = partial(loss_sums, divergence=d, compared=torch.arange(V))
            ce, kd = ChunkedHeadLoss.apply(h, W, HeadLoss(Y, teacher, sums, (0.5 / n, 2.0 / n), chunk))
        else:
            sums = partial(loss_sums, divergence=d, compared=slice(0, V))
            ce, kd = ChunkedHeadLoss.apply(h, W, HeadLoss(Y, Logits(t_h, t_W, lambda z: z), sums, (0.5 / n, 2.0 / n),
                                                          chunk, None, (2.0, V) if path == 'chunked' else None))
        loss = (0.5 * ce + 2.0 * kd) / n
        loss.backward()
        times.append(time.perf_counter() - t0)
        h.grad = W.grad = None
    print(json.dumps({'seconds': min(times), 'peak_gb': rss_gb() - base, 'loss': loss.item()}))

if args.case:
    path, V, d, n = args.case.split(',')
    loss_case(path, int(V), int(d), int(n), args.chunk or auto_chunk(int(V), 'float32'))
    sys.exit(0)

if not args.row:
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}')
if args.part in ('all', 'loss'):
    print(f'\nloss alone (CE + forward KL, T=2), {args.positions} positions, chunk {args.chunk or "auto"}: '
          'forward + backward')
    print(f'{"V":>8s} {"hidden":>6s} {"plain s":>8s} {"plain GB":>9s} {"chunked s":>10s} {"chunked GB":>11s} {"time ratio":>11s} '
          f'{"memory ratio":>13s} {"autograd s":>11s} {"cross-tok s":>12s}')
    for V in args.vocabs:
        for d in (576, 1536):
            n = args.positions
            while 10 * n * V * 4 / 2 ** 30 > args.max_gb:  # the plain path peaks at ~10 (n, V) fp32 tensors (measured)
                n //= 2
            res = {}
            for path in ('plain', 'chunked', 'autograd', 'cross'):
                out = subprocess.run([sys.executable, __file__, f'--case={path},{V},{d},{n}', f'--chunk={args.chunk}'],
                                     capture_output=True, text=True)
                res[path] = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
            pl, ch, ag, cr = res['plain'], res['chunked'], res['autograd'], res['cross']
            assert pl and ch and ag and cr, res  # (the cross-tokenizer loss is another loss: its value differs)
            assert all(abs(pl['loss'] - r['loss']) <= 1e-4 * abs(pl['loss']) for r in (ch, ag)), res
            print(f'{V:8d} {d:6d} {pl["seconds"]:8.2f} {pl["peak_gb"]:9.2f} {ch["seconds"]:10.2f} {ch["peak_gb"]:11.2f} '
                  f'{ch["seconds"] / pl["seconds"]:11.2f} {ch["peak_gb"] / pl["peak_gb"]:13.2f} {ag["seconds"]:11.2f} {cr["seconds"]:12.2f}'
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

if args.part in ('all', 'chunk'):
    keep_freed_memory()  # as distill.py does on a CPU with loss_chunk > 0
    size = args.chunk or 256
    print(f'\nforward KL\'s closed form on one {size} x V chunk (chunk_loss: CE + forward KL at T=2 and the '
          f'gradient w.r.t. the logits), by rows per block; median of {args.steps} alternated rounds, ms')
    blocks = (4, 8, 16, 32, 64, 256)
    print(f'{"V":>8s} {"logits":>8s} ' + ' '.join(f'{f"{r} rows":>9s}' for r in blocks))
    for V in args.vocabs:
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(0)
            z, zt = [(torch.randn(size, V, generator=g) * 3).to(dtype) for _ in range(2)]
            y, times = torch.randint(0, V, (size,), generator=g), {r: [] for r in blocks}
            sums = partial(loss_sums, divergence=Divergence('fkl', 2.0), compared=slice(0, V))
            for i in range(args.steps + 1):  # (round 0 warms up)
                for r in blocks:
                    t0 = time.perf_counter()
                    chunk_loss(z, y, zt, sums, (0.5, 2.0), closed_form=(2.0, V), rows=r)
                    times[r] += [time.perf_counter() - t0] if i else []
            medians = [statistics.median(times[r]) * 1000 for r in blocks]
            print(f'{V:8d} {str(dtype)[6:]:>8s} ' + ' '.join(f'{m:9.1f}' for m in medians))

def loss_alone(model, batch, t_out, kind='fkl', beta=0.5):
    """Seconds per forward + backward of the step's loss alone (CE + divergence), from the student's final hidden
    states, heads included."""
    X, Y, M = batch.X, batch.Y, batch.M
    with torch.no_grad():
        h = model.model.base_model(input_ids=X).last_hidden_state
    keep, W, n, times = M.bool(), model.model.get_output_embeddings().weight, M.sum().item(), []
    coef = model.coefficients(n)[:2]  # the loss's own weights, T^2 included
    for _ in range(args.steps + 1):
        hs = h.detach().requires_grad_()
        t0 = time.perf_counter()
        d = model.divergence._replace(kind=kind, beta=beta)
        sums = partial(loss_sums, divergence=d, compared=model.compared)
        if model.chunk:
            closed = (d.temperature, model.compared.stop) if d.closed_form() else None
            ce, kd = ChunkedHeadLoss.apply(hs[keep], W, HeadLoss(Y[keep], t_out.logits[keep], sums, coef, model.chunk,
                                                                 None, closed))
        else:
            ce, kd = sums(model.model.lm_head(hs)[keep], Y[keep], t_out.logits[keep].distribution())
        (coef[0] * ce + coef[1] * kd).backward()
        times.append(time.perf_counter() - t0)
        W.grad = None
    return sum(times[1:]) / args.steps

OP_KINDS = (('matmul', ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::baddbmm')), ('attention', ('flash_attention',)),
            ('copies and dtype casts', ('aten::copy_', 'aten::_to_copy')), ('optimizer', ('_fused_adamw',)))
OTHER_OPS = 'everything else (elementwise, reductions, indexing)'

def autocast(dtype):
    """A dtype row's autocast context (none for fp32), or None, said, where this CPU only emulates the dtype."""
    if measure_matmul_flops('cpu', getattr(torch, dtype)) < measure_matmul_flops('cpu') / 10:
        print(f'{dtype}: not measured (emulated on this CPU)')
        return None
    return torch.autocast('cpu', getattr(torch, dtype)) if dtype != 'float32' else contextlib.nullcontext()

def profile_step(step, step_s):
    """Self CPU time of one more step by kind of op (torch.profiler), beside the step's time unprofiled: the profiler
    slows some ops down (fresh large tensors most), so its shares are a guide only where the two times agree."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0
    kinds = dict.fromkeys([k for k, _ in OP_KINDS] + [OTHER_OPS], 0.0)
    for e in prof.key_averages():
        kind = next((k for k, names in OP_KINDS if any(n in e.key for n in names)), OTHER_OPS)
        kinds[kind] += e.self_cpu_time_total / 1e6
    total = sum(kinds.values())
    print(f'  profiled step: {wall * 1000:.0f} ms (unprofiled {step_s * 1000:.0f} ms); self CPU time by kind of op:')
    for k, v in kinds.items():
        print(f'    {k:52s} {v * 1000:8.0f} ms  {v / total:6.1%}')

if args.part in ('all', 'step'):
    torch.manual_seed(0)
    meta = json.load(open(os.path.join(args.dataset, 'meta.json')))
    split = load_split(args.dataset, 'train')
    idx = split['idx']
    long_docs = [d for d in range(len(idx) - 1) if idx[d + 1] - idx[d] > args.block_size][:args.batch_size]
    chunked = args.chunk or 'auto'  # ('auto': resolved in the row's process, for its dtype, as distill.py does)
    rows = [('plain', 0, False), (f'chunked (loss_chunk={chunked})', chunked, False)]
    rows += [(f'chunked (loss_chunk={chunked}), compile=True', chunked, True)] if args.compile else []
    if not args.row:  # each row in a fresh process: its own peak memory
        print(f'\nKD step: {args.batch_size} x {args.block_size} tokens; each step next to the matmul rate (2048 x 2048) of its '
              'dtype measured just before it; peak RSS of the row\'s process')
        for dtype in args.dtypes:
            rate, fp32 = measure_matmul_flops('cpu', getattr(torch, dtype)), measure_matmul_flops('cpu')
            if rate < fp32 / 10:
                print(f'{dtype}: not stepped: its matmul runs at {rate / 1e9:.1f} GFLOP/s here, fp32 at {fp32 / 1e9:.0f} (emulated)')
                continue
            for i in range(len(rows)):
                out = subprocess.run([sys.executable, __file__, *sys.argv[1:], f'--row={dtype},{i}', '--part=step'], capture_output=True, text=True)
                print(out.stdout.strip() if out.returncode == 0 else f'{dtype} {rows[i][0]} failed:\n{out.stderr[-3000:]}', flush=True)
        sys.exit(0)
    dtype, row = args.row.split(',')
    dtype = getattr(torch, dtype)
    ctx = torch.autocast('cpu', dtype) if dtype != torch.float32 else contextlib.nullcontext()
    label, chunk, compiled = rows[int(row)]
    teacher = load_model(demo_tokenizer()).eval().requires_grad_(False)
    student = student_from_teacher_layers(teacher, list(range(0, 30, 3))).train()
    cast_parameters(teacher, dtype)  # frozen: in the compute dtype, as distill.py does (after the student's copy)
    if chunk == 'auto':
        chunk = auto_chunk(output_rows(student), str(dtype)[6:])
        label = label.replace('auto', f'auto: {chunk}')
    model = Trainable(student, meta['vocab_size'], (0.5, 0.5, 0.0), Divergence('fkl', 2.0), chunk)  # the defaults
    teacher_fn = Teacher(teacher, meta['vocab_size'], 'head' if chunk else 'full')
    flops = flops_per_token(student, args.block_size, True) + flops_per_token(teacher, args.block_size, False)
    if chunk:
        keep_freed_memory()  # as distill.py does on a CPU with loss_chunk > 0 (process-wide from here on)
    optimizer = configure_optimizer(model, 0.0, 0.0, (0.9, 0.999))  # lr 0: every row sees the same weights
    if compiled:  # as distill.py --compile=True: both transformer stacks
        student.base_model.compile()
        teacher.base_model.compile()
    def step():
        """One KD step as distill.py takes it; the times at its part boundaries."""
        t = [time.perf_counter()]
        batch = make_batch(split, [(d, 0) for d in long_docs], args.block_size, meta['pad_id'], 'cpu')
        t.append(time.perf_counter())
        with ctx:
            t_out = teacher_fn(batch)
            t.append(time.perf_counter())
            out = model(batch, t_out, batch.M.sum().item())
        t.append(time.perf_counter())
        out.loss.backward()
        t.append(time.perf_counter())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        return t, batch, t_out, out
    parts = dict.fromkeys(('data', 'teacher forward', 'student forward + loss', 'backward', 'optimizer'), 0.0)
    t_compile, ratios = 0.0, []
    for i in range(args.steps + 1 + compiled):  # step 0 warms up (and compiles, and recompiles)
        # the machine's speed drifts: its peak right before each timed step (warm-up steps need none)
        peak = measure_matmul_flops('cpu', dtype) if i > compiled else None
        t, batch, t_out, out = step()
        X, M = batch.X, batch.M
        if i <= compiled:
            t_compile += t[-1] - t[0]
            continue
        for k, a, b in zip(parts, t[:-1], t[1:]):
            parts[k] += (b - a) / args.steps
        ratios.append((flops * X.numel() / (t[-1] - t[0]), peak))
    step_s = sum(parts.values())
    tok_s = X.numel() / step_s
    mfus, peak = sorted(r / p for r, p in ratios), statistics.median(p for _, p in ratios)
    print(f'{str(dtype)[6:]}, {label}: {step_s * 1000:.0f} ms, {tok_s:.1f} tokens/s, {flops * tok_s / 1e9:.1f} GFLOP/s; '
          f'MFU {statistics.median(mfus):.1%} (median over the steps of each one\'s FLOP/s over the {str(dtype)[6:]} '
          f'matmul rate measured just before it; steps {mfus[0]:.1%}-{mfus[-1]:.1%}; median rate {peak / 1e9:.1f} GFLOP/s) '
          f'(loss {(out.ce / M.sum()).item():.4f} ce, {(out.kd / M.sum()).item():.4f} kd); peak RSS {rss_gb():.2f} GB'
          + (f'; compiling took {t_compile:.0f} s' if compiled else ''))
    for k, v in parts.items():
        print(f'  {k:24s} {v * 1000:8.0f} ms  {v / step_s:6.1%}')
    with ctx:
        print(f'  of which the loss alone (its forward + backward from the final hidden states, heads included): '
              f'{loss_alone(model, batch, t_out) * 1000:.0f} ms' + (f'; with forward KL by autograd (jsd at beta 0) '
              f'instead of its closed form: {loss_alone(model, batch, t_out, "jsd", 0.0) * 1000:.0f} ms' if chunk else ''))
    if args.profile:
        profile_step(step, step_s)

if args.part in ('all', 'sample'):
    meta, split = json.load(open(os.path.join(args.dataset, 'meta.json'))), load_split(args.dataset, 'train')
    lengths = prompt_lengths(split)
    docs = [d for d in range(len(lengths)) if 1 < lengths[d] <= 64]
    model = load_model(demo_tokenizer()).eval()
    if args.sample_blocks != 30:  # (the quick start's student: every third block)
        model = student_from_teacher_layers(model, list(range(0, 30, 30 // args.sample_blocks))).eval()
    print(f'\non-policy sampling: demo prompts of 2-64 tokens, {args.sample_blocks} blocks of the packaged '
          'SmolLM2-135M-Instruct, T = 1, no stop token '
          '(every row writes all its tokens); generated tokens per second, kd/decode.py against HF generate on the '
          f'same prompts, rounds alternated, medians of {args.steps}')
    for dtype in args.dtypes:
        if (ctx := autocast(dtype)) is None:
            continue
        for B, new in ((int(b), int(n)) for b, n in (c.split('x') for c in args.sample_shapes.split(','))):
            prompts = [torch.from_numpy(np.asarray(split['tokens'][split['idx'][d]:split['idx'][d] + lengths[d]],
                                                   dtype=np.int64)) for d in docs[:B]]
            width = max(map(len, prompts))
            P = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
            A = torch.stack([torch.arange(width) >= width - len(p) for p in prompts]).long()
            rates = {'decode': [], 'generate': []}
            for r in range(args.steps + 1):  # round 0 warms up
                for tool in rates:
                    with torch.no_grad(), ctx:
                        t0 = time.perf_counter()
                        if tool == 'decode':
                            n = sum(map(len, decode.generate(model, prompts, [new] * B, 1.0, 1.0, [], r,
                                                             meta['vocab_size'], torch.device('cpu'))))
                        else:  # (a blank config: the model's own generation_config.json would add processors)
                            config = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                                      max_new_tokens=new, eos_token_id=None, pad_token_id=0)
                            model.generation_config = GenerationConfig()
                            n = B * (model.generate(input_ids=P, attention_mask=A, generation_config=config).shape[1]
                                     - width)
                        dt = time.perf_counter() - t0
                    assert n == B * new, (tool, n)
                    if r:
                        rates[tool].append(n / dt)
            a, g = (statistics.median(rates[t]) for t in ('decode', 'generate'))
            print(f'{dtype} batch {B:3d} x {new:3d} new tokens: decode {a:7.1f} tokens/s, HF generate {g:7.1f} '
                  f'tokens/s: {a / g:.2f}x')

if args.part in ('all', 'pack'):
    meta, split = json.load(open(os.path.join(args.dataset, 'meta.json'))), load_split(args.dataset, 'train')
    teacher = load_model(demo_tokenizer()).eval().requires_grad_(False)
    student = student_from_teacher_layers(teacher, list(range(0, 30, 3))).train()
    print(f'\npacked rows vs padded: the KD step (teacher forward, student forward + chunked loss + backward) of the '
          f'packaged teacher -> its 10-block copy on micro-batches of demo windows in distill.py\'s order; median of '
          f'{args.rounds} rounds; real = positions up to each window\'s last supervised target')
    print(f'{"dtype":>8s} {"block x batch":>13s} {"padded: rows x width":>21s} {"pad share":>9s} {"real tok/s":>10s}'
          f' {"packed: rows x width":>21s} {"pad share":>9s} {"real tok/s":>10s} {"speed-up":>8s}')
    for dtype in args.dtypes:
        if (ctx := autocast(dtype)) is None:
            continue
        cast_parameters(teacher, getattr(torch, dtype))
        model = Trainable(student, meta['vocab_size'], (0.5, 0.5, 0.0), Divergence('fkl', 2.0),
                          args.chunk or auto_chunk(output_rows(student), dtype))
        teacher_fn = Teacher(teacher, meta['vocab_size'], 'head' if model.chunk else 'full')
        for shape in args.shapes.split(','):
            B, n = map(int, shape.split('x'))
            windows = block_windows(split, B)
            times, shapes = {False: [], True: []}, {}
            for r in range(args.rounds + 1):  # round 0 warms up; padded and packed alternate on the same windows
                batch = make_batch(split, windows[doc_order(r * n, n, len(windows), 1337)], B, meta['pad_id'], 'cpu')
                real = kept_lengths(batch.M).sum().item()
                for packed in (False, True):
                    b = pack_rows(batch, B, meta['pad_id']) if packed else batch
                    t0 = time.perf_counter()
                    with ctx:
                        out = model(b, teacher_fn(b), b.M.sum().item())
                    out.loss.backward()
                    model.zero_grad(set_to_none=True)
                    if r:
                        times[packed].append((real, b.X.numel(), time.perf_counter() - t0))
                    shapes[packed] = f'{len(b.X)} x {b.X.shape[1]}'
            row = {}
            for packed, ts in times.items():
                row[packed] = (1 - sum(t[0] for t in ts) / sum(t[1] for t in ts), statistics.median(t[0] / t[2] for t in ts))
            print(f'{dtype:>8s} {shape:>13s} {shapes[False]:>21s} {row[False][0]:9.0%} {row[False][1]:10.0f} '
                  f'{shapes[True]:>21s} {row[True][0]:9.0%} {row[True][1]:10.0f} {row[True][1] / row[False][1]:7.2f}x',
                  flush=True)

if args.part == 'lora':
    import re, tempfile
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = {'full': [], **{f'lora r{r}': [f'--lora_rank={r}', f'--lora_alpha={2 * r}'] for r in map(int, args.ranks.split(','))}}
    seen = {name: {'ms': [], 'rss': []} for name in rows}
    measured = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); " \
               "print('peak RSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"  # (KiB; its one child)
    print(f'{cpu_name()}; configs/heal.py, {args.steps_lora} steps per run, {args.rounds} rounds')
    for _ in range(args.rounds):
        for name, extra in rows.items():
            with tempfile.TemporaryDirectory() as out:
                text = subprocess.run([sys.executable, '-c', measured, sys.executable, os.path.join(root, 'distill.py'),
                                       os.path.join(root, 'configs', 'heal.py'), f'--max_iters={args.steps_lora}',
                                       '--eval_docs=0', '--checkpoint=False', '--export=False', f'--out_dir={out}', *extra],
                                      capture_output=True, text=True, check=True, cwd=root).stdout
                log = [json.loads(l) for l in open(os.path.join(out, 'log.jsonl'))]
            seen[name]['ms'] += [r['ms'] for r in log if 'ms' in r][1:]
            seen[name]['rss'].append(int(re.search(r'peak RSS (\d+)', text)[1]) / 2 ** 20)
            seen[name]['estimate'] = re.search(r'memory per rank \(estimate\): (.*)', text)[1]
            seen[name]['dtype'] = re.search(r'dtype: (\w+)', text)[1]
    full = statistics.median(seen['full']['ms'])
    print(f"{'student':10s} {'dtype':9s} {'ms/step':>8s} {'x full':>7s} {'peak RSS GB':>12s}  estimate (distill.py)")
    for name, r in seen.items():
        ms = statistics.median(r['ms'])
        print(f"{name:10s} {r['dtype']:9s} {ms:8.0f} {ms / full:7.2f} {max(r['rss']):12.2f}  {r['estimate']}")
