"""
Is the cache's held-out gap the draws' noise? distill.py with an online teacher whose distribution is reduced, at
every step, to what cache_teacher.py would store (the top k and m tokens drawn from the tail, fp16 log-probabilities)
and fresh draws each step: the cache's estimator without the cache. Varying m shows what more draws buy.

    python scripts/sampled_online.py --k=16 --samples=32 -- configs/cpu_experiment.py --out_dir=out-sampled-32 ...

Everything after -- goes to distill.py (an online teacher, distill='logits', no teacher_cache).
"""
import argparse, os, sys
import torch
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from kd.data import TopK, top_k
from kd.teacher import TeacherOut

p = argparse.ArgumentParser()
p.add_argument('--k', type=int, default=16)
p.add_argument('--samples', type=int, default=32)
p.add_argument('--seed', type=int, default=0, help="the draws' generator")
args, rest = p.parse_known_args()
rest = [a for a in rest if a != '--']
generator = torch.Generator().manual_seed(args.seed)

def sampled_forward(trainable, teacher, batch):
    """The teacher's logits at every position reduced to a cache row; one temperature, the training one."""
    T = trainable.divergence.temperature
    with torch.no_grad():
        logits = teacher(input_ids=batch.X, position_ids=batch.pos, use_cache=False).logits
    logits = logits[..., trainable.compared].float()
    rows, length, vocab = logits.shape
    ids, logp, tail = top_k(logits.reshape(-1, vocab), args.k, [T], args.samples, generator)
    shape = lambda t: t.reshape(rows, length, *t.shape[1:])
    tail = shape(tail[:, 0])
    return TeacherOut(logits=TopK.from_rows(shape(ids), shape(logp.half().float()), tail, tail, args.samples, T))

source = open(os.path.join(ROOT, 'distill.py')).read()
call = 'teacher_fn(b)'  # (distill.py's teacher hook, in the evaluation and in the step)
assert source.count(call) == 2, 'distill.py changed: update this script'
source = source.replace(call, 'sampled_forward(raw_model, teacher_model, b)')
sys.argv = [os.path.join(ROOT, 'distill.py'), *rest]
exec(compile(source, sys.argv[0], 'exec'), {'__name__': '__main__', '__file__': sys.argv[0], 'sampled_forward': sampled_forward})
