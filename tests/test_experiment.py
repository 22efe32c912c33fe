"""The experiment driver's table (scripts/cpu_experiment.py): means over seeds and their standard errors."""
import importlib.util, math, os
import xml.etree.ElementTree as ET
import numpy as np
import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location('cpu_experiment', os.path.join(ROOT, 'scripts', 'cpu_experiment.py'))
cpu_experiment = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cpu_experiment)  # (its flow runs only as a script)

def row(rng, loss, docs):
    return {'val_loss': loss, 'kl_to_teacher': rng.uniform(0, 3), 'top1_agreement': rng.uniform(0, 1), 'samples': {},
            **{f'{t}/{a}': rng.integers(0, n + 1) / n for t, n in docs.items() for a in ('acc', 'acc_norm')},
            **{f'{t}/documents': n for t, n in docs.items()}}

@pytest.mark.parametrize('seeds', [1, 3])
def test_summary_against_numpy(seeds):
    rng, docs = np.random.default_rng(seeds), {'arc_easy': 570, 'boolq': 1000}
    results = {'T': row(rng, 3.9, docs), 'P': row(rng, 15.4, docs)}
    groups = {m: [f'{m}-{s}' for s in range(seeds)] for m in ('sft', 'logits')}
    for m, specs in groups.items():
        for s in specs:
            results[s] = row(rng, rng.uniform(5, 6), docs)
    table = cpu_experiment.summarize(results, 'T', 'P', groups, list(docs))
    assert list(table) == ['teacher', 'pruned', 'sft', 'logits']
    teacher_mean = np.mean([results['T'][f'{t}/acc_norm'] for t in docs])
    for m, specs in groups.items():
        got, x = table[m], {c: np.array([results[s][c] for s in specs], dtype=np.float64) for c in results[specs[0]] if c != 'samples'}
        assert got['val_loss'] == pytest.approx(x['val_loss'].mean(), rel=1e-12)
        assert got['gap_closed'] == pytest.approx((15.4 - x['val_loss'].mean()) / (15.4 - 3.9), rel=1e-12)
        for c in ('val_loss', 'kl_to_teacher', 'top1_agreement'):
            if seeds > 1:
                assert got[c + '_se'] == pytest.approx(x[c].std(ddof=1) / math.sqrt(seeds), rel=1e-12)
            else:
                assert c + '_se' not in got  # one seed: no spread to estimate
        for a in ('acc', 'acc_norm'):
            ses = []
            for t, n in docs.items():
                p = x[f'{t}/{a}'].mean()
                assert got[f'{t}/{a}'] == pytest.approx(p, rel=1e-12)
                assert got[f'{t}/{a}_se'] == pytest.approx(math.sqrt(p * (1 - p) / n), rel=1e-12)
                ses.append(p * (1 - p) / n)
            assert got[f'mean_{a}'] == pytest.approx(np.mean([x[f'{t}/{a}'].mean() for t in docs]), rel=1e-12)
            assert got[f'mean_{a}_se'] == pytest.approx(math.sqrt(sum(ses)) / len(docs), rel=1e-12)
        mean = np.mean([x[f'{t}/acc_norm'].mean() for t in docs])
        assert got['retained'] == pytest.approx(mean / teacher_mean, rel=1e-12)
    assert table['teacher']['gap_closed'] == 1 and table['pruned']['gap_closed'] == 0 and table['teacher']['retained'] == 1

def test_summary_without_a_gap():
    """A pruned start as good as the teacher (e.g. nothing pruned) leaves no gap to close: None, not a ZeroDivisionError."""
    rng, docs = np.random.default_rng(0), {'arc_easy': 570}
    results = {'T': row(rng, 3.9, docs), 'P': row(rng, 3.9, docs), 'sft-0': row(rng, 3.5, docs)}
    table = cpu_experiment.summarize(results, 'T', 'P', {'sft': ['sft-0']}, list(docs))
    assert [r['gap_closed'] for r in table.values()] == [None, None, None] and table['sft']['val_loss'] == 3.5

def test_overlap_finds_a_benchmark_document_in_the_data(tmp_path):
    spec = importlib.util.spec_from_file_location('overlap', os.path.join(ROOT, 'scripts', 'overlap.py'))
    overlap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(overlap)
    import json, prepare_data
    question = 'Which of these would let the most heat travel through it when a pan is on the stove?'
    task = tmp_path / 'task.jsonl'
    task.write_text(''.join(json.dumps({'query': q, 'choices': ['a steel spoon', 'a wooden spoon'], 'gold': 0}) + '\n' for q in
                            ('Question: ' + question + '\nAnswer:', 'Question: Why do the leaves of some trees turn red in autumn?\nAnswer:')))
    texts = ['Shall I compare thee to a summer day? Thou art more lovely and more temperate.'] * 3
    for name, extra in (('clean', []), ('dirty', ['Notes. ' + question + ' A steel spoon.'])):
        data = tmp_path / f'{name}.jsonl'
        data.write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts + extra))
        assert prepare_data.main([str(data), '--tokenizer', 'bytes', '--val_fraction', '0', '--out_root', str(tmp_path / 'data')]) == 0
    assert overlap.overlaps(str(tmp_path / 'data' / 'clean'), [str(task)]) == {str(task): (2, [])}
    assert overlap.overlaps(str(tmp_path / 'data' / 'dirty'), [str(task)]) == {str(task): (2, [0])}  # 18 words shared
    assert overlap.overlaps(str(tmp_path / 'data' / 'dirty'), [str(task)], n=19) == {str(task): (2, [])}

def test_driver_trains_then_scores_seed_by_seed_and_keeps_what_is_done(tmp_path, monkeypatch, capsys):
    """The driver's flow with distill.py and eval.py replaced by fakes that write what they would: every run once,
    a seed's runs scored before the next seed trains, nothing redone on a rerun, a lost row re-scored alone."""
    import json, sys
    calls = []
    def fake(cmd, check, cwd):
        script, args = cmd[1], cmd[2:]
        opt = {a.split('=')[0]: a.split('=', 1)[1] for a in args if a.startswith('--') and '=' in a}
        if script == 'distill.py':
            folder = tmp_path / opt['--out_dir']
            calls.append(('train', folder.name, '--init_from=resume' in args))
            (folder / 'student').mkdir(parents=True, exist_ok=True)
            (folder / 'student' / 'config.json').write_text('{}')
            steps = int(opt['--max_iters'])
            (folder / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in [{'iter': i, 'ms': 1000.0, 'tokens_per_s': 500.0, 'ce': 3.0}
                                                                                    for i in range(steps)] + [{'iter': steps, 'val_ce': 3.0}]))
        else:
            specs = [a for a in args if not a.startswith('--')]
            calls.append(('eval', *[os.path.basename(s) for s in specs]))
            rows = {s: {'val_loss': 4.0 + len(os.path.basename(s)) % 3,  # (by name: never the checkout's path)
                         'kl_to_teacher': 1.0, 'top1_agreement': 0.5, 'arc_easy/acc': 0.5, 'arc_easy/acc_norm': 0.5,
                        'arc_easy/documents': 570, 'arc_easy/correct_norm': ('01' if 'logits' in s else '00') * 285} for s in specs}
            (tmp_path / opt['--output']).write_text(json.dumps({'results': rows}))
    monkeypatch.setattr(cpu_experiment.subprocess, 'run', fake)
    argv = ['cpu_experiment.py', '--config=configs/heal.py', f'--out={tmp_path / "out"}', '--seeds=1,2', '--methods=sft,logits']
    monkeypatch.setattr(sys, 'argv', argv)
    cpu_experiment.main()
    gguf = os.path.basename(cpu_experiment.demo_tokenizer())
    plot = polylines(tmp_path / 'out' / 'loss_curves.svg')
    assert [(c.findtext(SVG + 'title'), len(c.get('points').split())) for c in plot] == \
        [('sft', 1), ('logits', 1), ('', 1), ('', 1), ('logits', 1), ('', 1)]  # each run; minus SFT's, per seed
    assert calls == [('train', 'pruned', False), ('train', 'sft-1', False), ('train', 'logits-1', False),
                     ('eval', gguf), ('eval', 'pruned'), ('eval', 'sft-1'), ('eval', 'logits-1'),
                     ('train', 'sft-2', False), ('train', 'logits-2', False), ('eval', 'sft-2'), ('eval', 'logits-2')]
    results = json.load(open(tmp_path / 'out' / 'results.json'))
    assert results['runs']['sft-1'] == {'logged_steps': 300, 'seconds': 300.0, 'positions': 150_000}
    assert results['table']['logits']['paired_vs_sft']['mean_acc_norm'] == 0.5 and 'arc_easy/correct_norm' not in results['table']['sft']
    calls.clear()
    cpu_experiment.main()
    assert calls == []
    monkeypatch.setattr(sys, 'argv', argv[:-2] + ['--seeds=2', '--methods=sft,logits'])
    cpu_experiment.main()  # one of the seeds: its runs are found under their seed's names
    assert calls == [] and json.load(open(tmp_path / 'out' / 'results.json'))['table']['sft']['seeds'] == [4.0 + len('sft-2') % 3]
    monkeypatch.setattr(sys, 'argv', argv)
    saved = json.load(open(tmp_path / 'out' / 'eval.json'))
    del saved['results'][f'{tmp_path / "out"}/logits-1']
    (tmp_path / 'out' / 'eval.json').write_text(json.dumps(saved))
    (tmp_path / 'out' / 'sft-2' / 'log.jsonl').write_text('')  # a run killed before its end, with a checkpoint
    (tmp_path / 'out' / 'sft-2' / 'ckpt').mkdir()
    cpu_experiment.main()
    assert calls == [('eval', 'logits-1'), ('train', 'sft-2', True), ('eval', 'sft-2')]
    assert not (tmp_path / 'out' / 'sft-2' / 'ckpt').exists()

SVG = '{http://www.w3.org/2000/svg}'
polylines = lambda path: list(ET.parse(path).getroot().iter(SVG + 'polyline'))

def test_loss_curves_svg(tmp_path):
    """The plot without a plotting library: one polyline per line, a point per value, placed where the values say."""
    sft, logits = [(0, 15.7), (5, 10.2), (10, 8.9), (15, 8.3)], [(0, 15.7), (5, 10.0), (15, 8.1)]
    left = {'title': 'held-out CE', 'ylabel': 'nats', 'lines': [('sft', 'red', sft), ('logits', 'blue', logits)],
            'levels': [('teacher', 'black', 3.84)]}
    right = {'title': 'minus SFT', 'ylabel': 'nats', 'lines': [('logits', 'blue', [(0, 0.0), (5, -0.2), (15, -0.2)])]}
    cpu_experiment.svg_plot(tmp_path / 'p.svg', [left, right], width=500, height=300)
    got = polylines(tmp_path / 'p.svg')
    assert [(c.findtext(SVG + 'title'), c.get('stroke')) for c in got] == [('sft', 'red'), ('logits', 'blue')] + \
        [('logits', 'blue')]
    points = [[tuple(map(float, xy.split(','))) for xy in c.get('points').split()] for c in got]
    assert [len(p) for p in points] == [4, 3, 3]
    (x0, _), (x15, y15) = points[0][0], points[0][-1]
    assert x15 - x0 == pytest.approx(500 - 60 - 15) and points[0][1][0] == pytest.approx(x0 + (x15 - x0) / 3, abs=0.1)
    assert [y for _, y in points[0]] == sorted(y for _, y in points[0])  # a falling loss: rising pixel rows
    assert points[1][2][1] > y15 and points[1][1][1] > points[0][1][1]  # logits below SFT where lower
    assert all(500 < x < 1000 for x, _ in points[2]) and points[2][1][1] == points[2][2][1] > points[2][0][1]
    text = {t.text for t in ET.parse(tmp_path / 'p.svg').getroot().iter(SVG + 'text')}
    assert {'held-out CE', 'minus SFT', 'sft', 'logits', 'teacher', '0', '15'} <= text

def test_paired_difference_against_numpy():
    rng = np.random.default_rng(0)
    docs = {'arc_easy': 57, 'boolq': 100}
    outcomes = {m: {t: rng.integers(0, 2, n) for t, n in docs.items()} for m in ('a1', 'a2', 'b1', 'b2')}
    results = {m: {f'{t}/correct_norm': ''.join(map(str, o)) for t, o in per.items()} for m, per in outcomes.items()}
    d, se = cpu_experiment.paired(results, ['a1', 'a2'], ['b1', 'b2'], list(docs))
    diffs = [(outcomes['a1'][t] + outcomes['a2'][t]) / 2 - (outcomes['b1'][t] + outcomes['b2'][t]) / 2 for t in docs]
    assert d == pytest.approx(np.mean([x.mean() for x in diffs]))
    assert se == pytest.approx(np.sqrt(sum(x.var(ddof=1) / len(x) for x in diffs)) / 2)
    del results['b2']['boolq/correct_norm']
    assert cpu_experiment.paired(results, ['a1', 'a2'], ['b1', 'b2'], list(docs)) is None  # (a row scored before they were kept)
