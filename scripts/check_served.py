"""
A served teacher against the same teacher in this process, on the quick start's models and data (docs/served.md):
    scripts/serve_teacher.sh TEACHER 8000 &            # vLLM, in its own virtual environment
    python scripts/check_served.py --url=http://localhost:8000/v1
1. the top-k log-probabilities and the rest's mass at every position of some validation windows: the largest
   difference, the bytes on the wire per position, the time against the in-process forward;
2. logit KD for --steps steps twice, the teacher read as its top k either way (teacher_topk, T = 1, fp32): once in
   this process, once served; their validation lines, and each run's tokens/s.
Exits 1 where the log-probabilities differ by more than --tol_logp or a validation line by more than --tol_val.
"""
import json, os, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
import torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kd.configurator import ArgumentParser, HelpFormatter
from kd.data import block_windows, load_split, make_batch, top_k
from kd.models import load_model, load_tokenizer
from kd.served import ServedTeacher

def main():
    p = ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=HelpFormatter)
    p.add_argument('--url', required=True, help="the server, http://HOST:PORT/v1 (scripts/serve_teacher.sh)")
    p.add_argument('--teacher', default=None, help="the model it serves (default: configs/cpu_experiment.py's)")
    p.add_argument('--k', type=int, default=20, help='top k (at most the server\'s --max-logprobs)')
    p.add_argument('--windows', type=int, default=16, help='validation windows of 128 tokens for part 1')
    p.add_argument('--steps', type=int, default=30, help='logit KD steps for part 2 (0: skip it)')
    p.add_argument('--out', default='out-check-served')
    p.add_argument('--tol_logp', type=float, default=1e-4)
    p.add_argument('--tol_val', type=float, default=1e-3)
    args = p.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = os.path.join(root, 'configs', 'cpu_experiment.py')
    if args.teacher is None:
        scope = {}
        exec(open(config).read(), scope)
        args.teacher = scope['teacher']
    meta = json.load(open('data/demo/meta.json'))
    tok, vocab = load_tokenizer(meta['tokenizer']), meta['vocab_size']
    torch.set_grad_enabled(False)

    # 1. the log-probabilities, position by position
    served = ServedTeacher(args.url, tok, vocab, args.k, 128)
    model = load_model(args.teacher).eval()
    split = load_split('data/demo', 'val')
    windows = block_windows(split, 128)[:args.windows]
    worst = worst_tail = 0.0
    positions = same_set = 0
    t_served = t_local = 0.0
    for a in range(0, len(windows), 8):
        batch = make_batch(split, windows[a:a + 8], 128, meta['pad_id'], 'cpu')
        t = time.time()
        got = served(batch).logits
        t_served += time.time() - t
        t = time.time()
        ids, logp, tail = top_k(model(input_ids=batch.X).logits[..., :vocab], args.k, [1.0])
        t_local += time.time() - t
        keep = batch.M.bool()
        positions += keep.sum().item()
        same_set += (got.ids[keep].sort(-1).values == ids[keep].sort(-1).values).all(-1).sum().item()
        local = torch.full((keep.sum().item(), vocab), float('nan')).scatter_(1, ids[keep], logp[keep])
        worst = max(worst, (local.gather(1, got.ids[keep]) - got.logp[keep]).abs().nan_to_num(float('inf')).max().item())
        worst_tail = max(worst_tail, (got.tail[keep] - tail[keep][..., 0]).abs().max().item())
    wire = sum(served.received) / positions
    # the same windows again, alone and then beside others in flight (another batching on the server): bit for bit?
    first = make_batch(split, windows[:8], 128, meta['pad_id'], 'cpu')
    second = make_batch(split, windows[8:16], 128, meta['pad_id'], 'cpu')
    alone = served(first).logits.logp
    with ThreadPoolExecutor(2) as pool:
        beside = next(pool.map(served, [first, second])).logits.logp
    repeat = max((alone - served(first).logits.logp).abs().max().item(), (alone - beside).abs().max().item())
    print(f'1. top-{args.k} at {positions:,} positions ({len(windows)} windows): the same {args.k} tokens at '
          f'{same_set:,}; largest |log p served - in process| {worst:.2e}, of the rest\'s mass (log) {worst_tail:.2e}; '
          f'{wire:,.0f} bytes on the wire a position; {t_served:.2f} s served (waiting for the answers '
          f'{served.seconds[0]:.2f} s, reading them {served.seconds[1]:.2f} s) against {t_local:.2f} s in process (fp32); '
          f'the same windows scored again, alone and beside others: largest difference {repeat:.1e}')
    ok = worst <= args.tol_logp and same_set == positions

    # 2. logit KD with the teacher's top k, in this process and served
    if args.steps:
        pruned = os.path.join(args.out, 'pruned', 'student')
        common = [sys.executable, os.path.join(root, 'distill.py'), config, '--checkpoint=False']
        if not os.path.isdir(pruned):
            subprocess.run([*common, '--max_iters=0', '--distill=none', f'--out_dir={os.path.dirname(pruned)}'],
                           check=True, stdout=subprocess.DEVNULL)
        lines = {}
        for name, teacher in (('in process', args.teacher), ('served', args.url)):
            out = os.path.join(args.out, name.replace(' ', '_'))
            subprocess.run([*common, f'--teacher={teacher}', f'--student={pruned}', '--student_init=pretrained',
                            f'--teacher_topk={args.k}', '--temperature=1', f'--max_iters={args.steps}',
                            '--eval_interval=10', '--eval_docs=16', f'--out_dir={out}'], check=True)
            log = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
            lines[name] = {r['iter']: (r['val_ce'], r['val_kd']) for r in log if 'val_ce' in r}
            steps = [r['tokens_per_s'] for r in log if 'tokens_per_s' in r][1:]
            print(f'   {name}: {sorted(steps)[len(steps) // 2]:,.0f} tokens/s (median of steps 1..)')
        gap = max(abs(a - b) for i in lines['served'] for a, b in zip(lines['served'][i], lines['in process'][i]))
        print(f'2. {args.steps} steps of logit KD (top-{args.k}, T = 1, fp32): validation (ce, kd) at '
              + ', '.join(f'{i}: {lines["in process"][i][0]:.4f}/{lines["served"][i][0]:.4f}, '
                          f'{lines["in process"][i][1]:.4f}/{lines["served"][i][1]:.4f}' for i in lines['served'])
              + f' (in process/served); largest difference {gap:.2e}')
        ok = ok and gap <= args.tol_val
    print('check passed' if ok else 'check FAILED')
    return 0 if ok else 1

if __name__ == '__main__':
    sys.exit(main())
