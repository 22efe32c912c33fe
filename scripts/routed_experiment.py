"""
Two teachers, each better on its own part of the data, routed by row (docs/served.md):
    python scripts/routed_experiment.py --out=out-routed --seeds=1337,1338
1. the demo prepared with --route=source (chat exchanges, Shakespeare's plays);
2. two copies of the packaged teacher fine-tuned briefly, one on the chat documents of its training split, one on
   the plays' (SFT), each served by vLLM (scripts/serve_teacher.sh);
3. the quick start's pruned student distilled (logit KD, top-20 at T = 1) from both teachers, each document scored by
   its own ({'chat': ..., 'plays': ...}), and from each teacher alone, the same seeds and steps;
4. every model's held-out loss on the mixed validation split and on each part of it; the paired differences.
Each stage is skipped where its output exists.
"""
import json, math, os, subprocess, sys, time, urllib.request
import numpy as np
import torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kd.configurator import ArgumentParser, HelpFormatter
from kd.data import block_windows, load_split, make_batch
from kd.models import load_model, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'configs', 'cpu_experiment.py')

def sh(*cmd, log=None):
    print('+', ' '.join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, stdout=open(log, 'w') if log else None,
                   stderr=subprocess.STDOUT if log else None)

@torch.no_grad()
def heldout(spec, data_dir, routes, stride=4):
    """Mean CE per supervised token on every stride-th window of 128 of the validation split, all of it and per
    route (fp32)."""
    model = load_model(spec).eval()
    split, meta = load_split(data_dir, 'val'), json.load(open(os.path.join(data_dir, 'meta.json')))
    ce, n = np.zeros(len(routes)), np.zeros(len(routes))
    all_windows = block_windows(split, 128)[::stride]
    for a in range(0, len(all_windows), 16):
        b = make_batch(split, all_windows[a:a + 16], 128, meta['pad_id'], 'cpu')
        loss = torch.nn.functional.cross_entropy(model(input_ids=b.X).logits.transpose(1, 2).float(), b.Y,
                                                 reduction='none') * b.M
        for r in range(len(routes)):
            rows = b.route[:, 0] == r
            ce[r] += loss[rows].sum().item()
            n[r] += b.M[rows].sum().item()
    return {'all': ce.sum() / n.sum(), **{name: ce[r] / n[r] for r, name in enumerate(routes)}}

def wait_for(url, seconds=900):
    t0 = time.time()
    while time.time() - t0 < seconds:
        try:
            urllib.request.urlopen(url + '/models', timeout=5).read()
            return time.time() - t0
        except OSError:
            time.sleep(5)
    raise SystemExit(f'error: no server answered at {url} in {seconds} s')

def main():
    p = ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=HelpFormatter)
    p.add_argument('--out', default='out-routed')
    p.add_argument('--seeds', default='1337,1338')
    p.add_argument('--teacher_steps', type=int, default=40, help="each teacher's SFT steps on its part")
    p.add_argument('--steps', type=int, default=40, help="each student's logit KD steps")
    p.add_argument('--ports', default='8021,8022')
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    scope = {}
    exec(open(CONFIG).read(), scope)
    base = scope['teacher']

    # 1. the demo with routes; each route's training documents as text for its teacher
    data = 'data/demo-routed'
    if not os.path.isdir(data):
        sh(sys.executable, os.path.join(ROOT, 'prepare_data.py'), '--route=source', '--name=demo-routed')
    meta = json.load(open(os.path.join(data, 'meta.json')))
    routes, tok = meta['routes'], load_tokenizer(meta['tokenizer'])
    split = load_split(data, 'train')
    for r, name in enumerate(routes):
        part = f'data/demo-routed-{name}'
        if not os.path.isdir(part):
            path = os.path.join(args.out, f'{name}.jsonl')
            with open(path, 'w') as f:
                for d in np.flatnonzero(split['route'] == r):
                    ids = np.asarray(split['tokens'][split['idx'][d]:split['idx'][d + 1]]).tolist()
                    f.write(json.dumps({'text': tok.decode(ids)}) + '\n')
            sh(sys.executable, os.path.join(ROOT, 'prepare_data.py'), path, f'--tokenizer={meta["tokenizer"]}',
               f'--name=demo-routed-{name}', '--val_fraction=0.02')

    # 2. the teachers, fine-tuned and served
    teachers, urls = {}, {}
    for (r, name), port in zip(enumerate(routes), args.ports.split(',')):
        out = os.path.join(args.out, f'teacher-{name}')
        if not os.path.isdir(os.path.join(out, 'student')):
            sh(sys.executable, os.path.join(ROOT, 'distill.py'), CONFIG, '--distill=none', f'--student={base}',
               '--student_init=pretrained', f'--dataset=demo-routed-{name}', f'--max_iters={args.teacher_steps}',
               '--learning_rate=1e-4', '--min_lr=1e-5', '--dtype=auto', '--checkpoint=False', '--eval_docs=8',
               f'--eval_interval={args.teacher_steps}', f'--out_dir={out}', log=os.path.join(out + '.log'))
        teachers[name], urls[name] = os.path.join(out, 'student'), f'http://localhost:{port}/v1'
        try:
            urllib.request.urlopen(urls[name] + '/models', timeout=5).read()
        except OSError:
            subprocess.Popen([os.path.join(ROOT, 'scripts', 'serve_teacher.sh'), teachers[name], port],
                             stdout=open(os.path.join(args.out, f'serve-{name}.log'), 'w'), stderr=subprocess.STDOUT)
    for name in routes:
        print(f'server {name}: ready after {wait_for(urls[name]):.0f} s more', flush=True)

    # 3. the students: routed, and each teacher alone
    pruned = os.path.join(args.out, 'pruned')
    if not os.path.isdir(os.path.join(pruned, 'student')):
        sh(sys.executable, os.path.join(ROOT, 'distill.py'), CONFIG, '--max_iters=0', '--distill=none',
           '--checkpoint=False', f'--out_dir={pruned}', log=pruned + '.log')
    arms = {'routed': repr(urls), **{f'{name} alone': urls[name] for name in routes}}
    runs = {}
    for seed in args.seeds.split(','):
        for arm, teacher in arms.items():
            out = os.path.join(args.out, f"{arm.replace(' ', '-')}-{seed}")
            if not os.path.isdir(os.path.join(out, 'student')):
                sh(sys.executable, os.path.join(ROOT, 'distill.py'), CONFIG, f'--teacher={teacher}',
                   f"--student={os.path.join(pruned, 'student')}", '--student_init=pretrained', '--dataset=demo-routed',
                   '--temperature=1', '--teacher_topk=20', f'--max_iters={args.steps}', f'--seed={seed}',
                   '--dtype=auto', '--checkpoint=False', '--eval_docs=16', f'--eval_interval={args.steps}',
                   f'--out_dir={out}', log=out + '.log')
            runs.setdefault(arm, []).append(os.path.join(out, 'student'))

    # 4. held-out loss, all of it and per route
    scores_path = os.path.join(args.out, 'heldout.json')
    scores = json.load(open(scores_path)) if os.path.exists(scores_path) else {}
    for spec in [base, *teachers.values(), os.path.join(pruned, 'student'), *(s for r in runs.values() for s in r)]:
        if spec not in scores:
            scores[spec] = heldout(spec, data, routes)
            json.dump(scores, open(scores_path, 'w'), indent=1)
    columns = ['all', *routes]
    print(f"| model | {' | '.join(f'val loss: {c}' for c in columns)} |\n|---|{'---|' * len(columns)}")
    named = {'teacher (packaged)': [base], **{f'teacher fine-tuned on {n}': [teachers[n]] for n in routes},
             'pruned start': [os.path.join(pruned, 'student')], **{f'student, {arm}': s for arm, s in runs.items()}}
    for label, specs in named.items():
        cells = []
        for c in columns:
            v = [scores[s][c] for s in specs]
            cells.append(f'{np.mean(v):.4f}' + (f' ({", ".join(f"{x:.4f}" for x in v)})' if len(v) > 1 else ''))
        print(f"| {label} | {' | '.join(cells)} |")
    for name in routes:
        for c in columns:
            d = [scores[a][c] - scores[b][c] for a, b in zip(runs['routed'], runs[f'{name} alone'])]
            se = np.std(d, ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float('nan')
            print(f'routed - {name} alone, val loss {c}: {np.mean(d):+.4f} ± {2 * se:.4f} (2 SE; per seed '
                  f'{", ".join(f"{x:+.4f}" for x in d)})')

if __name__ == '__main__':
    main()
