"""
Does distillation beat fine-tuning here? One pruned student, one dataset, identical steps and schedule,
trained as SFT, logit KD and hidden-state KD (and a mix); then eval.py on every model; then a table and a plot.

    python prepare_data.py && python scripts/cpu_experiment.py            # the full run (5,156 s measured on 2 CPU cores)
    python scripts/cpu_experiment.py --short                              # a few minutes: the quick start

Prints the comparison (held-out loss, KL to and top-1 agreement with the teacher, ARC-Easy acc_norm, and the
fraction of the pruned -> teacher held-out-loss gap each method closes) and writes it to <out>/results.json.
"""
import argparse, json, os, subprocess, sys, time
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import prepare_data

p = argparse.ArgumentParser()
p.add_argument('--short', action='store_true', help='SFT, logits and hidden for 15 steps each; 100 ARC-Easy documents')
p.add_argument('--out', default=None, help='default: out-cpu-experiment (out-cpu-experiment-short with --short)')
p.add_argument('--methods', default=None, help='default: sft,logits,hidden,mix (sft,logits,hidden with --short)')
args = p.parse_args()
args.out = args.out or ('out-cpu-experiment-short' if args.short else 'out-cpu-experiment')
args.methods = args.methods or ('sft,logits,hidden' if args.short else 'sft,logits,hidden,mix')
steps, arc_limit, val_windows = (15, 100, 100) if args.short else (100, None, None)  # (None: all)
methods = {'sft': ['--distill=none'], 'logits': ['--distill=logits'], 'hidden': ['--distill=hidden'],
           'mix': ['--distill=logits', '--ce_weight=0.5', '--kd_weight=0.5', '--hidden_weight=0.5']}
teacher = prepare_data.demo_tokenizer()
config = os.path.join(ROOT, 'configs', 'cpu_experiment.py')
t_start = time.time()

def run(*cmd):
    print('+', ' '.join(cmd), flush=True)
    subprocess.run([sys.executable, *cmd], check=True, cwd=ROOT)

# the untrained pruned student: iteration 0, exported as is
run('distill.py', config, '--max_iters=0', '--distill=none', f'--out_dir={args.out}/pruned')
previous = os.path.join(ROOT, args.out, 'results.json')  # training times of runs a rerun skips
seconds = {k: v['train_seconds'] for k, v in json.load(open(previous))['table'].items()} if os.path.exists(previous) else {}
trained = False
for name in args.methods.split(','):
    t0 = time.time()
    done = [json.loads(l) for l in open(os.path.join(ROOT, args.out, name, 'log.jsonl'))] if os.path.exists(
        os.path.join(ROOT, args.out, name, 'student', 'config.json')) else []
    if any(r.get('iter') == steps and 'val_ce' in r for r in done):
        print(f'{name}: already trained for {steps} steps in {args.out}/{name}')
        continue
    run('distill.py', config, *methods[name], f'--max_iters={steps}', f'--out_dir={args.out}/{name}',
        *(['--checkpoint=False'] if args.short else []))  # (never resumed: no 0.76 GB checkpoint, 12 B x 63.7M)
    seconds[name], trained = time.time() - t0, True
models = [teacher, f'{args.out}/pruned'] + [f'{args.out}/{m}' for m in args.methods.split(',')]
eval_file = os.path.join(ROOT, args.out, 'eval.json')
if os.path.exists(eval_file) and set(models) <= set(json.load(open(eval_file))['results']) and not trained:
    print(f'every model is already evaluated in {args.out}/eval.json')
else:
    run('eval.py', *models, f'--teacher={teacher}', '--data=data/demo', '--tasks=arc_easy', f'--output={args.out}/eval.json',
        '--block_size=128', *([f'--limit={arc_limit}'] if arc_limit else []), *([f'--val_windows={val_windows}'] if val_windows else []),
        '--batch_size=16')
results = json.load(open(os.path.join(ROOT, args.out, 'eval.json')))['results']
l_teacher, l_pruned = results[teacher]['val_loss'], results[f'{args.out}/pruned']['val_loss']
print(f'\n{"model":10s} {"val loss":>9s} {"gap closed":>11s} {"KL(t||s)":>9s} {"top-1 agr":>10s} {"ARC-E acc_norm":>15s} {"train s":>8s}')
table = {}
for label, spec in [('teacher', teacher), ('pruned', f'{args.out}/pruned')] + [(m, f'{args.out}/{m}') for m in args.methods.split(',')]:
    r = results[spec]
    gap = (l_pruned - r['val_loss']) / (l_pruned - l_teacher)
    table[label] = {'val_loss': r['val_loss'], 'gap_closed': gap, 'kl_to_teacher': r['kl_to_teacher'],
                    'top1_agreement': r['top1_agreement'], 'arc_easy_acc_norm': r['arc_easy/acc_norm'],
                    'arc_easy_acc': r['arc_easy/acc'], 'train_seconds': seconds.get(label)}
    print(f'{label:10s} {r["val_loss"]:9.4f} {gap:11.1%} {r["kl_to_teacher"]:9.4f} {r["top1_agreement"]:10.4f} '
          f'{r["arc_easy/acc_norm"]:15.4f} {seconds.get(label) or 0:8.0f}')
json.dump({'steps': steps, 'arc_easy_documents': arc_limit or 570, 'table': table, 'seconds': time.time() - t_start},
          open(os.path.join(ROOT, args.out, 'results.json'), 'w'), indent=2)
try:  # the loss curves (matplotlib is a dev-only extra)
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for m in args.methods.split(','):
        log = [json.loads(l) for l in open(os.path.join(ROOT, args.out, m, 'log.jsonl'))]
        train = [r for r in log if 'ce' in r]
        val = [r for r in log if 'val_ce' in r]
        a.plot([r['iter'] for r in train], [r['ce'] for r in train], label=m, alpha=0.8)
        b.plot([r['iter'] for r in val], [r['val_ce'] for r in val], marker='o', label=m)
    b.axhline(l_teacher, color='k', ls='--', label=f'teacher ({val_windows or "all"} val windows of 128 tokens)')
    a.set(title='training CE (supervised tokens)', xlabel='step', ylabel='nats/token', ylim=(3.5, 9))
    b.set(title='held-out CE (distill.py: 32 val windows; pruned start: 15.4)', xlabel='step', ylim=(3.5, 8))
    a.legend(); b.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(ROOT, args.out, 'loss_curves.png'), dpi=110)
    print(f'wrote {args.out}/loss_curves.png')
except ImportError:
    print('(pip install matplotlib for the loss-curve plot)')
print(f'total {time.time() - t_start:.0f} s')
