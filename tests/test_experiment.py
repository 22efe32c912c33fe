"""The experiment driver's table (scripts/cpu_experiment.py): means over seeds and their standard errors."""
import importlib.util, math, os
import numpy as np
import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location('cpu_experiment', os.path.join(ROOT, 'scripts', 'cpu_experiment.py'))
cpu_experiment = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cpu_experiment)  # (its flow runs only as a script)

def row(rng, loss, docs):
    return {'val_loss': loss, 'kl_to_teacher': rng.uniform(0, 3), 'top1_agreement': rng.uniform(0, 1), 'samples': {},
            **{f'{t}/acc_norm': rng.integers(0, n + 1) / n for t, n in docs.items()},
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
        ses = []
        for t, n in docs.items():
            p = x[f'{t}/acc_norm'].mean()
            assert got[f'{t}/acc_norm'] == pytest.approx(p, rel=1e-12)
            assert got[f'{t}/acc_norm_se'] == pytest.approx(math.sqrt(p * (1 - p) / n), rel=1e-12)
            ses.append(p * (1 - p) / n)
        mean = np.mean([x[f'{t}/acc_norm'].mean() for t in docs])
        assert got['mean_acc_norm'] == pytest.approx(mean, rel=1e-12)
        assert got['mean_acc_norm_se'] == pytest.approx(math.sqrt(sum(ses)) / len(docs), rel=1e-12)
        assert got['retained'] == pytest.approx(mean / teacher_mean, rel=1e-12)
    assert table['teacher']['gap_closed'] == 1 and table['pruned']['gap_closed'] == 0 and table['teacher']['retained'] == 1

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
