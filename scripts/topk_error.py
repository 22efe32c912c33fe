"""
What reading only the teacher's top k costs (docs/served.md): on real teacher and student outputs (the quick start's
models, validation windows of data/demo, fp32, T = 1), the value and the gradient w.r.t. the student's logits of
forward KL, reverse KL and JSD from
  - the top k with the rest as one bucket (a served teacher, teacher_topk), and
  - a cache of the same bytes a position (scripts/cache_teacher.py: the top k/2 and k/2 tokens drawn from the rest,
    one seeded draw, unbiased),
against the full distribution's.
    python scripts/topk_error.py --student=out-check-served/in_process/student
"""
import math, os, sys
import torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distill import kd_divergence
from kd.configurator import ArgumentParser, HelpFormatter
from kd.data import TopK, block_windows, check_dataset, load_split, make_batch, top_k
from kd.models import load_model

def main():
    p = ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=HelpFormatter)
    p.add_argument('--student', required=True, help='a student of the teacher (an HF folder: an out_dir/student)')
    p.add_argument('--teacher', default=None, help="default: configs/cpu_experiment.py's")
    p.add_argument('--data', default='data/demo')
    p.add_argument('--windows', type=int, default=16, help='validation windows of 128 tokens')
    p.add_argument('--ks', default='1,8,20,64')
    args = p.parse_args()
    if args.teacher is None:
        scope = {}
        exec(open(os.path.join(os.path.dirname(__file__), '..', 'configs', 'cpu_experiment.py')).read(), scope)
        args.teacher = scope['teacher']
    meta = check_dataset(args.data)
    V, ks, kinds = meta['vocab_size'], [int(k) for k in args.ks.split(',')], ('fkl', 'rkl', 'jsd')
    teacher, student = load_model(args.teacher).eval(), load_model(args.student).eval()
    split = load_split(args.data, 'val')
    windows = block_windows(split, 128)[:args.windows]
    # per (kind, estimator): sums of D, D_est, |g|^2, |g_est|^2, g . g_est, |g - g_est|^2
    sums = {}
    g = torch.Generator().manual_seed(0)
    positions = 0
    for a in range(0, len(windows), 8):
        b = make_batch(split, windows[a:a + 8], 128, meta['pad_id'], 'cpu')
        with torch.no_grad():
            keep = b.M.bool()
            zt = teacher(input_ids=b.X).logits[keep][:, :V].float()
            zs = student(input_ids=b.X).logits[keep][:, :V].float()
        positions += len(zt)
        for c in range(0, len(zt), 128):
            t, s = zt[c:c + 128], zs[c:c + 128]
            estimators = {}
            for k in ks:
                ids, logp, tail = top_k(t, k, [1.0])
                estimators[f'top-{k}, the rest one bucket'] = (k, TopK(ids, logp, tail[:, 0], logp.new_zeros(len(t), 0)))
                if k >= 2:
                    kk, m = math.ceil(k / 2), k - math.ceil(k / 2)
                    ids, logp, tail = top_k(t, kk, [1.0], m, g)
                    estimators[f'cache: top-{kk} + {m} drawn'] = (k, TopK.from_rows(ids, logp, tail[:, 0], tail[:, 0], m, 1.0))
            for kind in kinds:
                x = s.clone().requires_grad_()
                full = kd_divergence(x, t, kind, 1.0, 0.5)
                grad, = torch.autograd.grad(full.sum(), x)
                for name, (k, est) in estimators.items():
                    y = s.clone().requires_grad_()
                    value = kd_divergence(y, est, kind, 1.0, 0.5)
                    grad_est, = torch.autograd.grad(value.sum(), y)
                    row = sums.setdefault((kind, k, name), [0.0] * 6)
                    for i, v in enumerate((full.sum(), value.sum(), grad.pow(2).sum(), grad_est.pow(2).sum(),
                                           (grad * grad_est).sum(), (grad - grad_est).pow(2).sum())):
                        row[i] += v.item()
    print(f'{positions:,} positions of {len(windows)} validation windows; student {args.student}; fp32, T = 1')
    print('| kind | k (entries a position) | estimator | D (full) | D (estimate) | value error | gradient: relative '
          'error | gradient: cosine |')
    print('|---|---|---|---|---|---|---|---|')
    for (kind, k, name), (d, d_est, gg, ee, ge, diff) in sums.items():
        print(f'| {kind} | {k} | {name} | {d / positions:.4f} | {d_est / positions:.4f} | {(d_est - d) / d:+.1%} | '
              f'{math.sqrt(diff / gg):.3f} | {ge / math.sqrt(gg * ee):.3f} |')

if __name__ == '__main__':
    main()
