"""
Check eval.py against lm-evaluation-harness (dev-only: pip install lm_eval) on the same model and documents.

    python scripts/compare_lm_eval.py --task=arc_easy            # the packaged SmolLM2-135M-Instruct teacher

Prints both harnesses' acc and acc_norm, the largest per-request log-likelihood difference, and the times.
"""
import argparse, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
from kd.benchmarks import accuracy, load_documents, loglikelihoods, task_path
from kd.models import demo_tokenizer, load_model, model_path, model_tokenizer

p = argparse.ArgumentParser()
p.add_argument('--model', default=None, help='default: the packaged SmolLM2-135M-Instruct (converted HF folder)')
p.add_argument('--task', default='arc_easy')
p.add_argument('--limit', type=int)
p.add_argument('--batch_size', type=int, default=16)
args = p.parse_args()
folder = model_path(args.model or demo_tokenizer())
docs = load_documents(task_path(args.task))[:args.limit]
requests = [r for d in docs for r in d['requests']]

scores = lambda lls: accuracy(docs, lls)[:2]  # eval.py's rule, applied to both harnesses' log-likelihoods

from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
lm = HFLM(pretrained=folder, device='cpu', dtype=torch.float32, batch_size=args.batch_size)
t0 = time.time()
theirs = lm.loglikelihood([Instance('loglikelihood', {}, r, i) for i, r in enumerate(requests)], disable_tqdm=True)
t_theirs = time.time() - t0
model, tok = load_model(folder).eval(), model_tokenizer(folder)
t0 = time.time()
ours = loglikelihoods(model, tok, requests, args.batch_size, 'cpu', model.config.max_position_embeddings)
t_ours = time.time() - t0
diff = max(abs(a[0] - b[0]) for a, b in zip(ours, theirs))
greedy_same = sum(a[1] == b[1] for a, b in zip(ours, theirs))
print(f'{args.task}: {len(docs)} documents, {len(requests)} requests, batch {args.batch_size}, fp32 CPU')
print(f'  lm-evaluation-harness {__import__("lm_eval").__version__}: acc {scores(theirs)[0]:.4f}, acc_norm {scores(theirs)[1]:.4f}, {t_theirs:.1f} s')
print(f'  eval.py:                   acc {scores(ours)[0]:.4f}, acc_norm {scores(ours)[1]:.4f}, {t_ours:.1f} s')
print(f'  largest |log-likelihood difference|: {diff:.2e}; is_greedy equal on {greedy_same}/{len(requests)}')
