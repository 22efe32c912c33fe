"""
Does distillation beat fine-tuning here? One pruned student, one dataset, identical steps and schedule, trained
as SFT, logit KD and hidden-state KD (and both), once per seed, each seed's runs then scored by eval.py (with the
teacher and the pruned start); then a table and a plot.

    python prepare_data.py && python scripts/cpu_experiment.py            # the full run (5,156 s measured on 2 CPU cores)
    python scripts/cpu_experiment.py --short                              # the quick start (README: its time, its table)
    python scripts/cpu_experiment.py --config=configs/heal.py --out=out-heal --seeds=1337,1338 \\
        --tasks=arc_easy,arc_challenge,piqa,boolq,hellaswag --limit=1000  # 30 -> 20 blocks, healed (configs/heal.py)

Prints the comparison (held-out loss, KL to and top-1 agreement with the teacher, the tasks' acc_norm, the
fraction of the pruned -> teacher held-out-loss gap each method closes; over several seeds the mean and its
standard error, an accuracy with its binomial standard error; each method's mean accuracy against SFT's also paired
over the same documents) and each run's steps' time and input positions; writes them, acc beside acc_norm, to
<out>/results.json, and the held-out curves (each method's, and minus SFT's) to <out>/loss_curves.svg. A rerun
reuses finished runs and evaluations and resumes a killed run from its checkpoint
(deleted once the run is done).
On a dataset of two tokenizers (configs/cross_tokenizer.py: the student reads other tokens than the teacher) the
teacher is not scored (it cannot read the data's tokens): bits per byte compare the students, and 'pruned' is the
untrained start; with several seeds the held-out loss and bits per byte are also compared paired by seed.
--short: 15 steps per method in the fastest dtype, held-out figures on 40 validation windows (distill.py's own on
8 documents, every 5 steps), no benchmark (at 15 steps every student sits at chance there), no own-sample measures
(eval.py --sample_prompts=0: the students' replies scored by the teacher, the slowest part of the evaluation), no
checkpoints.
"""
import argparse, json, math, os, runpy, shutil, statistics, subprocess, sys, time
from xml.sax.saxutils import escape
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from kd.configurator import HelpFormatter
from kd.models import demo_tokenizer

OWN = ('draft_acceptance', 'own_sample_rkl', 'own_sample_teacher_nll')  # eval.py's on-policy measures, where it ran them

COLORS = ('#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b')  # one per method, in --methods' order
DASH = ' stroke-dasharray="6,4"'

def ticks(low, high, count=6):
    """About `count` round values within [low, high]: steps of 1, 2 or 5 times a power of ten."""
    raw = (high - low) / count if high > low else 1.0
    step = next(s for s in (m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)) if s >= raw * (1 - 1e-9))
    first, last = math.ceil(low / step - 1e-9), math.floor(high / step + 1e-9)
    return [round(k * step, 12) + 0.0 for k in range(first, last + 1)]  # (+ 0.0: no '-0')

def svg_plot(path, panels, width=540, height=360):
    """Line charts side by side, written as SVG (no plotting library). A panel: {'title', 'ylabel', 'lines': [(label
    or None, color, [(x, y), ...])], 'levels': [(label, color, y)]}; each line one <polyline> (its label as its
    <title>), each level a dashed line; axes with ticks, a legend in the corner the lines cross least."""
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width * len(panels)}" height="{height}" '
           'font-family="sans-serif" font-size="11">', '<rect width="100%" height="100%" fill="white"/>']
    for n, p in enumerate(panels):
        lines, levels = p['lines'], p.get('levels', [])
        xs = [x for _, _, line in lines for x, _ in line] or [0]
        ys = [y for _, _, line in lines for _, y in line] + [y for _, _, y in levels] or [0]
        margin = 0.05 * ((max(ys) - min(ys)) or 1)
        x0, x1, y0, y1 = min(xs), max(xs), min(ys) - margin, max(ys) + margin
        L, R, T, B = n * width + 60, (n + 1) * width - 15, 28, height - 40  # the plot area, in pixels
        X = lambda x: L + (x - x0) / ((x1 - x0) or 1) * (R - L)
        Y = lambda y: B - (y - y0) / (y1 - y0) * (B - T)
        svg += [f'<text x="{(L + R) / 2}" y="{T - 10}" text-anchor="middle" font-size="13">{escape(p["title"])}</text>',
                f'<text x="{(L + R) / 2}" y="{height - 6}" text-anchor="middle">step</text>',
                f'<text transform="translate({L - 46},{(T + B) / 2}) rotate(-90)" text-anchor="middle">'
                f'{escape(p["ylabel"])}</text>',
                f'<rect x="{L}" y="{T}" width="{R - L}" height="{B - T}" fill="none" stroke="black"/>']
        for v in ticks(x0, x1):
            svg += [f'<line x1="{X(v):.1f}" y1="{B}" x2="{X(v):.1f}" y2="{B + 4}" stroke="black"/>',
                    f'<text x="{X(v):.1f}" y="{B + 16}" text-anchor="middle">{v:g}</text>']
        for v in ticks(y0, y1):
            svg += [f'<line x1="{L - 4}" y1="{Y(v):.1f}" x2="{L}" y2="{Y(v):.1f}" stroke="black"/>',
                    f'<text x="{L - 6}" y="{Y(v) + 4:.1f}" text-anchor="end">{v:g}</text>']
        for _, color, y in levels:
            svg.append(f'<line x1="{L}" y1="{Y(y):.1f}" x2="{R}" y2="{Y(y):.1f}" stroke="{color}"{DASH}/>')
        for label, color, line in lines:
            points = ' '.join(f'{X(x):.1f},{Y(y):.1f}' for x, y in line)
            svg.append(f'<polyline points="{points}" stroke="{color}" stroke-width="1.5" fill="none">'
                       f'<title>{escape(label or "")}</title></polyline>')
        # the legend: in whichever corner the fewest pixels of the lines pass through
        legend = [(label, color, '') for label, color, _ in lines if label] + [(l, c, DASH) for l, c, _ in levels]
        w, h = 30 + 6.5 * max((len(label) for label, _, _ in legend), default=0), 15 * len(legend)  # (6.5 px: a letter)
        drawn = [(X(a + (b - a) * t / 20), Y(c + (d - c) * t / 20)) for _, _, line in lines
                 for (a, c), (b, d) in zip(line, line[1:]) for t in range(21)]
        drawn += [(x, Y(y)) for _, _, y in levels for x in range(L, R, 5)]
        covered = lambda c: sum(c[0] <= x <= c[0] + w and c[1] <= y <= c[1] + h for x, y in drawn)
        left, top = min([(R - w - 4, T + 4), (L + 8, T + 4), (R - w - 4, B - h - 4), (L + 8, B - h - 4)], key=covered)
        for k, (label, color, dash) in enumerate(legend):
            y = top + 11 + 15 * k
            svg += [f'<line x1="{left}" y1="{y - 4}" x2="{left + 20}" y2="{y - 4}" stroke="{color}" stroke-width="2"'
                    f'{dash}/>', f'<text x="{left + 25}" y="{y}">{escape(label)}</text>']
    open(path, 'w').write('\n'.join(svg + ['</svg>']) + '\n')

def summarize(results, teacher, pruned, groups, tasks):
    """The table: teacher, pruned start and each method (groups: method -> its runs' eval.py rows, one per seed):
    the mean over seeds; losses, KL and agreement ± the standard error of that mean (with 2+ seeds); accuracies ±
    the binomial standard error sqrt(p (1 - p) / documents), the mean over tasks ± sqrt(sum se^2) / tasks; the
    fraction of the pruned -> teacher held-out-loss gap closed and of the teacher's mean accuracy retained."""
    l_teacher, l_pruned = results[teacher]['val_loss'] if teacher else None, results[pruned]['val_loss']
    def mean_row(specs):
        rows = [results[s] for s in specs]
        r = {c: statistics.mean(x[c] for x in rows) for c in rows[0] if isinstance(rows[0][c], (int, float))}
        r['gap_closed'] = (l_pruned - r['val_loss']) / (l_pruned - l_teacher) if l_teacher not in (None, l_pruned) \
            else None  # (no gap, or no teacher on this data: across tokenizers)
        if len(rows) > 1:
            r.update({f'{c}_se': statistics.stdev(x[c] for x in rows) / math.sqrt(len(rows)) for c in
                      ('val_loss', 'val_bpb', 'kl_to_teacher', 'top1_agreement', *OWN) if c in r})
        for t in tasks:
            for a in ('acc', 'acc_norm'):
                p, n = r[f'{t}/{a}'], r[f'{t}/documents']
                r[f'{t}/{a}_se'] = math.sqrt(p * (1 - p) / n)
        for a in ('acc', 'acc_norm') if len(tasks) > 1 else ():
            r[f'mean_{a}'] = statistics.mean(r[f'{t}/{a}'] for t in tasks)
            r[f'mean_{a}_se'] = math.sqrt(sum(r[f'{t}/{a}_se'] ** 2 for t in tasks)) / len(tasks)
        r['seeds'] = [x['val_loss'] for x in rows]
        return r
    table = {**({'teacher': mean_row([teacher])} if teacher else {}), 'pruned': mean_row([pruned]),
             **{m: mean_row(g) for m, g in groups.items()}}
    for r in table.values():
        if len(tasks) > 1 and teacher:
            r['retained'] = r['mean_acc_norm'] / table['teacher']['mean_acc_norm']
    return table

def paired(results, a, b, tasks):
    """The mean-over-tasks acc_norm difference of runs a and b (lists of eval.py rows' specs, one per seed) scored
    on the same documents, and its paired standard error: per task, d_i = (a's mean over seeds) - (b's) on document
    i, se = std(d) / sqrt(n); over tasks, sqrt(sum se^2) / tasks. None when a row lacks the per-document outcomes."""
    if not tasks or any(f'{t}/correct_norm' not in results[s] for s in a + b for t in tasks):
        return None
    d, var = 0.0, 0.0
    for t in tasks:
        per_doc = lambda specs: [statistics.mean(map(int, o)) for o in zip(*(results[s][f'{t}/correct_norm'] for s in specs))]
        diff = [x - y for x, y in zip(per_doc(a), per_doc(b))]  # (per document: the mean over seeds)
        d, var = d + statistics.mean(diff), var + statistics.variance(diff) / len(diff)
    return d / len(tasks), math.sqrt(var) / len(tasks)

def main():
    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument('--short', action='store_true', help='SFT, logits and hidden for 15 steps each; 40 validation '
                   'windows, no benchmark, no own samples')
    p.add_argument('--config', default=os.path.join('configs', 'cpu_experiment.py'), help='the runs\' distill.py config')
    p.add_argument('--out', default=None, help='default: out-cpu-experiment (out-cpu-experiment-short with --short)')
    p.add_argument('--methods', default=None, help='default: sft,logits,hidden,mix (sft,logits,hidden with --short); also '
                   'onpolicy and mixed (logits with on_policy=1, 0.5), lora16 and lora64 (logits into LoRA adapters of rank 16, 64)')
    p.add_argument('--seeds', default='1337', help='comma-separated: every method is trained once per seed (data order)')
    p.add_argument('--tasks', default=None, help="eval.py's benchmarks (default: arc_easy; none with --short)")
    p.add_argument('--limit', type=int, help='at most this many documents per benchmark (default: all)')
    p.add_argument('--steps', type=int, help="each run's steps (default: the config's max_iters)")
    args = p.parse_args()
    args.out = args.out or ('out-cpu-experiment-short' if args.short else 'out-cpu-experiment')
    args.methods = (args.methods or ('sft,logits,hidden' if args.short else 'sft,logits,hidden,mix')).split(',')
    tasks = [t for t in (args.tasks if args.tasks is not None else '' if args.short else 'arc_easy').split(',') if t]
    seeds = [int(s) for s in args.seeds.split(',')]
    config = os.path.join(ROOT, args.config)
    cfg = runpy.run_path(config)
    steps, val_windows, eval_docs = (15, 40, 8) if args.short else (args.steps or cfg['max_iters'], None, cfg['eval_docs'])
    methods = {'sft': ['--distill=none'], 'logits': ['--distill=logits'], 'hidden': ['--distill=hidden'],
               'mix': ['--distill=logits', '--ce_weight=0.5', '--kd_weight=0.5', '--hidden_weight=0.5'],
               'onpolicy': ['--distill=logits', '--on_policy=1'], 'mixed': ['--distill=logits', '--on_policy=0.5'],
               'lora16': ['--distill=logits', '--lora_rank=16', '--lora_alpha=32'],  # (alpha = 2 r: the same scale, 2)
               'lora64': ['--distill=logits', '--lora_rank=64', '--lora_alpha=128']}
    out = os.path.join(ROOT, args.out)
    runs = {(m, s): f'{m}-{s}' if len(seeds) > 1 or os.path.isdir(os.path.join(out, f'{m}-{s}')) else m
            for s in seeds for m in args.methods}  # -> out/<name> (one seed: <method>, unless a many-seed run left <method>-<seed>)
    teacher = demo_tokenizer()
    meta_file = os.path.join(ROOT, 'data', cfg['dataset'], 'meta.json')
    meta = json.load(open(meta_file)) if os.path.exists(meta_file) else {}  # (none yet: distill.py's first run says so)
    if 'teacher_tokenizer' in meta:  # across tokenizers: the teacher cannot read the data's tokens; bits per byte compare
        teacher = None
    t_start = time.time()

    def run(*cmd):
        print('+', ' '.join(cmd), flush=True)
        subprocess.run([sys.executable, *cmd], check=True, cwd=ROOT)

    def log(name):
        path = os.path.join(out, name, 'log.jsonl')
        return [json.loads(l) for l in open(path)] if os.path.exists(path) else []

    # the untrained pruned student: iteration 0, exported as is
    if not os.path.exists(os.path.join(out, 'pruned', 'student', 'config.json')):
        run('distill.py', config, '--max_iters=0', '--distill=none', f'--out_dir={args.out}/pruned', '--checkpoint=False')
    models = {**({'teacher': teacher} if teacher else {}), 'pruned': f'{args.out}/pruned',
              **{n: f'{args.out}/{n}' for n in runs.values()}}
    settings = {'tasks': ','.join(tasks), 'limit': args.limit, 'val_windows': val_windows, 'block_size': 128,
                **({'sample_prompts': 0} if args.short else {})}  # (--short: no own samples)
    eval_file = os.path.join(out, 'eval.json')
    saved = json.load(open(eval_file)) if os.path.exists(eval_file) else {}
    results = {k: v for k, v in saved.get('results', {}).items() if saved['settings'] == settings and k in models.values()}

    def train(method, seed, name):
        done = os.path.exists(os.path.join(out, name, 'student', 'config.json')) and \
            any(r.get('iter') == steps and 'val_ce' in r for r in log(name))
        if done:
            return print(f'{name}: already trained for {steps} steps in {args.out}/{name}')
        resume = os.path.isdir(os.path.join(out, name, 'ckpt')) and not args.short
        run('distill.py', config, *methods[method], f'--max_iters={steps}', f'--seed={seed}', f'--out_dir={args.out}/{name}',
            *(['--checkpoint=False', '--dtype=auto', f'--eval_docs={eval_docs}', '--eval_interval=5'] * args.short),
            *(['--init_from=resume'] if resume else []))
        shutil.rmtree(os.path.join(out, name, 'ckpt'), ignore_errors=True)  # (done: nothing to resume; 12 B per parameter)
        results.pop(models[name], None)  # (its row, if any, was of an earlier model)

    def evaluate(specs):
        """eval.py on the models without a row in eval.json (same settings): a long experiment scores one model per
        call and keeps each row as it is done; the quick start, all in one call."""
        missing = [spec for spec in specs if spec not in results]
        for group in [missing] if args.short and missing else [[spec] for spec in missing]:
            run('eval.py', *group, f'--teacher={teacher}' if teacher else f'--tokenizer={meta["tokenizer"]}',
                f'--data=data/{cfg["dataset"]}', f'--tasks={settings["tasks"]}', '--batch_size=16',
                f'--output={args.out}/eval-new.json', '--block_size=128', *(['--sample_prompts=0'] * args.short),
                *(f'--{k}={settings[k]}' for k in ('limit', 'val_windows') if settings[k]))
            results.update(json.load(open(os.path.join(out, 'eval-new.json')))['results'])
            json.dump({'settings': settings, 'results': results}, open(eval_file + '.tmp', 'w'), indent=2)
            os.replace(eval_file + '.tmp', eval_file)
            os.remove(os.path.join(out, 'eval-new.json'))

    for seed in seeds:  # a seed's runs, then their evaluation: a session cut short leaves whole seeds scored
        for method in args.methods:
            train(method, seed, runs[method, seed])
        if not args.short:
            evaluate([*([teacher] if teacher else []), models['pruned']] + [models[runs[m, seed]] for m in args.methods])
    evaluate(models.values())

    # the table
    table = summarize(results, teacher, models['pruned'], {m: [models[runs[m, s]] for s in seeds] for m in args.methods}, tasks)
    first = table['pruned']
    columns = [c for c in ('val_loss', 'val_bpb', 'gap_closed', 'kl_to_teacher', 'top1_agreement') if c in first] + \
        [f'{t}/acc_norm' for t in tasks] + (['mean_acc_norm', 'retained'] if len(tasks) > 1 and teacher else []) + \
        [c for c in OWN if c in first]
    heads = {'val_loss': 'val loss', 'val_bpb': 'bits/byte', 'gap_closed': 'gap closed', 'kl_to_teacher': 'KL(t||s)', 'top1_agreement': 'top-1 agr',
             'mean_acc_norm': 'mean acc_norm', 'retained': 'of teacher', 'draft_acceptance': 'draft accept',
             'own_sample_rkl': 'own-sample rKL', 'own_sample_teacher_nll': 'teacher NLL'}
    cell = lambda c, r: '-' if r[c] is None else f'{r[c]:.1%}' if c in ('gap_closed', 'retained') else f'{r[c]:.4f}' + (f' ±{r[c + "_se"]:.4f}' if c + '_se' in r else '')
    print(f'\n{len(seeds)} seed(s) per method' + ('; ± the standard error of the mean over seeds (losses, KL, agreement)' if len(seeds) > 1
          else '') + ('; ± binomial standard error (accuracies)' if tasks else ''))
    print(f'{"model":10s}' + ''.join(f'{heads.get(c, c.split("/")[0]):>18s}' for c in columns))
    for label, r in table.items():
        print(f'{label:10s}' + ''.join(f'{cell(c, r):>18s}' for c in columns))
    accuracy = 'mean_acc_norm' if len(tasks) > 1 else f'{tasks[0]}/acc_norm' if tasks else 'none'
    verdict = lambda d, se: f'(2 SE {2 * se:.4f}: ' + ('resolved)' if abs(d) > 2 * se else 'within the noise)')
    for method in args.methods[1:]:  # against the first (SFT): a difference is resolved when it exceeds twice its standard error
        for c in ('val_loss', 'val_bpb', accuracy, *OWN):
            a, b = table[method], table[args.methods[0]]
            if c + '_se' in a:
                d, se = a[c] - b[c], math.hypot(a[c + '_se'], b[c + '_se'])
                print(f'{method} - {args.methods[0]}: {c} {d:+.4f} {verdict(d, se)}')
        for c in ('val_loss', 'val_bpb') if len(seeds) > 1 else ():  # the same seed: the same start and data order
            diffs = [results[models[runs[method, s]]].get(c, math.nan) - results[models[runs[args.methods[0], s]]].get(c, math.nan)
                     for s in seeds]
            if all(map(math.isfinite, diffs)):
                d, se = statistics.mean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))
                table[method][f'paired_{c}_vs_{args.methods[0]}'] = {'mean': d, 'se': se, 'per_seed': diffs}
                print(f'{method} - {args.methods[0]}: {c} {d:+.4f}, paired over seeds {verdict(d, se)}')
        pair = paired(results, [models[runs[method, s]] for s in seeds], [models[runs[args.methods[0], s]] for s in seeds], tasks)
        if pair:  # the same documents: their paired differences are far less noisy than two independent binomials
            d, se = pair
            table[method]['paired_vs_' + args.methods[0]] = {'mean_acc_norm': d, 'se': se}
            print(f'{method} - {args.methods[0]}: mean acc_norm {d:+.4f}, paired over documents {verdict(d, se)}')
    logs = {name: log(name) for name in runs.values()}
    cost = {}  # each run's steps: their time and input positions (padding included), from its log
    for name in runs.values():
        last = {r['iter']: r for r in logs[name] if 'ms' in r}  # (a resumed run logged the steps after its checkpoint again)
        cost[name] = {'logged_steps': len(last), 'seconds': round(sum(r['ms'] for r in last.values()) / 1000, 1),
                      'positions': round(sum(r['tokens_per_s'] * r['ms'] / 1000 for r in last.values()))}
    print('steps (time, input positions): ' + ', '.join(f'{n} {c["seconds"]:,.0f} s {c["positions"]:,}' for n, c in cost.items()))
    json.dump({'steps': steps, 'seeds': seeds, 'eval_settings': settings, 'table': table, 'runs': cost,
               'seconds': time.time() - t_start}, open(os.path.join(out, 'results.json'), 'w'), indent=2)
    # the loss curves: distill.py's held-out CE along each run, and each method's minus the first's (SFT's)
    val = {name: sorted((r['iter'], r['val_ce']) for r in logs[name] if 'val_ce' in r) for name in runs.values()}
    base, curves, diffs = args.methods[0], [], []
    for (method, seed), name in runs.items():
        label, color = method if seed == seeds[0] else None, COLORS[args.methods.index(method) % len(COLORS)]
        curves.append((label, color, val[name]))
        if method != base:  # against the first method of the same seed: the same documents, the same data order
            ref = dict(val[runs[base, seed]])
            diffs.append((label, color, [(i, v - ref[i]) for i, v in val[name] if i in ref]))
    windows = f'{val_windows or "all"} windows'
    levels = [(f'teacher (eval.py: {windows})', 'black', table['teacher']['val_loss'])] if teacher else []
    panels = [{'title': f'held-out CE (distill.py: {eval_docs} val documents)', 'ylabel': 'nats/token', 'lines': curves,
               'levels': levels},
              {'title': f"held-out CE minus {base}'s, same seed", 'ylabel': 'nats/token', 'lines': diffs,
               'levels': [(base, COLORS[0], 0.0)]}]
    svg_plot(os.path.join(out, 'loss_curves.svg'), [p for p in panels if p['lines']])
    print(f'wrote {args.out}/loss_curves.svg')
    print(f'total {time.time() - t_start:.0f} s')

if __name__ == '__main__':
    main()
