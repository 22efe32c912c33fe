"""The teacher cache (cache_teacher.py, distill.py teacher_cache): the sparse divergence against a float64
reference, the files written then read bit for bit, training from a full cache equal to online KD, a killed write."""
import json, os, signal, subprocess, sys
import numpy as np
import pytest, torch
from conftest import ROOT, save_tiny_model, tiny_model, write_jsonl
from test_distill import run, train_log, weights
from test_losses import divergence_of64, softmax64
import cache_teacher, distill, prepare_data
from distill import KD_KINDS, ChunkedHeadLoss, TopK, loss_sums

def coarse64(s, t, ids, kind, T, beta):
    """One position in plain float64, from the definitions: the full distributions at T, collapsed to the teacher's
    k tokens and one outcome for all the others, then the divergence between the two collapsed ones."""
    p, q = softmax64(t, T), softmax64(s, T)
    p = [p[i] for i in ids] + [sum(v for j, v in enumerate(p) if j not in ids)]
    q = [q[i] for i in ids] + [sum(v for j, v in enumerate(q) if j not in ids)]
    return divergence_of64(p, q, kind, beta)

def cached(t, k, T):
    ids, logp, tail = cache_teacher.top_k(t, k, [T])
    return TopK(ids, logp, tail[:, 0])

@pytest.mark.parametrize('kind', KD_KINDS)
@pytest.mark.parametrize('k', [3, 7])  # 7 = V: no tail (its bucket is empty on both sides)
@pytest.mark.parametrize('T', [1.0, 2.0])
def test_sparse_divergence_value_and_gradient(kind, k, T):
    g = torch.Generator().manual_seed(0)
    V, beta = 7, 0.3
    t = torch.randn(5, V, generator=g, dtype=torch.float64) * 3
    s = (torch.randn(5, V, generator=g, dtype=torch.float64) * 2).requires_grad_()
    top = cached(t, k, T)
    got = distill.kd_divergence(s, top, kind, T, beta)
    ref = [coarse64(sr, tr, ir, kind, T, beta) for sr, tr, ir in zip(s.tolist(), t.tolist(), top.ids.tolist())]
    assert got.tolist() == pytest.approx(ref, rel=1e-9, abs=1e-12)
    grad, = torch.autograd.grad(got.sum(), s)
    h, num = 1e-6, torch.zeros_like(s)
    for i in range(5):
        for j in range(V):
            up, down = s.detach().clone(), s.detach().clone()
            up[i, j] += h
            down[i, j] -= h
            num[i, j] = (coarse64(up[i].tolist(), t[i].tolist(), top.ids[i].tolist(), kind, T, beta)
                         - coarse64(down[i].tolist(), t[i].tolist(), top.ids[i].tolist(), kind, T, beta)) / (2 * h)
    assert torch.allclose(grad, num, rtol=1e-5, atol=1e-7), (grad, num)

def test_sparse_divergence_at_full_k_is_the_full_divergence():
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(6, 11, generator=g) * 3, torch.randn(6, 11, generator=g)
    for kind in KD_KINDS:
        full, sparse = distill.kd_divergence(s, t, kind, 2.0, 0.5), distill.kd_divergence(s, cached(t, 11, 2.0), kind, 2.0, 0.5)
        assert torch.allclose(full, sparse, rtol=1e-5, atol=1e-6), kind
    # and it can fail: a smaller k collapses the tail, which loses the tail's own divergence (data processing)
    assert (distill.kd_divergence(s, cached(t, 2, 2.0), 'fkl', 2.0) < distill.kd_divergence(s, t, 'fkl', 2.0) - 1e-4).all()

@pytest.mark.parametrize('kind', ['fkl', 'jsd'])
def test_chunked_sparse_equals_plain_with_padding_rows(kind):
    """ChunkedHeadLoss on a TopK teacher equals loss_sums on full logits; the student's head has padding rows past the
    vocabulary, which never enter the divergence."""
    g = torch.Generator().manual_seed(2)
    vocab, rows, d, n = 13, 16, 8, 37
    h, W = torch.randn(n, d, generator=g), torch.randn(rows, d, generator=g)  # fp32, as the chunked path computes
    y, top = torch.randint(0, vocab, (n,), generator=g), cached(torch.randn(n, vocab, generator=g) * 3, 4, 2.0)
    coef = (0.3, 0.7 * 4)
    h1, W1 = h.clone().requires_grad_(), W.clone().requires_grad_()
    ce, kd = loss_sums(h1 @ W1.T, y, top, vocab, kind, 2.0, 0.5)
    (coef[0] * ce + coef[1] * kd).backward()
    h2, W2 = h.clone().requires_grad_(), W.clone().requires_grad_()
    ce2, kd2 = ChunkedHeadLoss.apply(h2, W2, y, top, None, coef, vocab, kind, 2.0, 0.5, 5)
    (coef[0] * ce2 + coef[1] * kd2).backward()
    assert torch.allclose(ce, ce2, rtol=1e-5) and torch.allclose(kd, kd2, rtol=1e-5)
    assert torch.allclose(h1.grad, h2.grad, rtol=1e-4, atol=1e-6) and torch.allclose(W1.grad, W2.grad, rtol=1e-4, atol=1e-6)
    assert W2.grad[vocab:].abs().sum() > 0  # (the CE's softmax covers the padding rows; the divergence does not)

@pytest.fixture(scope='module')
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp('cache')
    recs = [{'question': f'what is {i} plus {i}?', 'answer': f'{2 * i}, I think.'} for i in range(40)]
    recs += [{'text': 'the cat sat on a mat while dogs ran far away ' * (1 + i % 4)} for i in range(20)]
    write_jsonl(d / 'in.jsonl', recs)
    assert prepare_data.main([str(d / 'in.jsonl'), '--tokenizer', 'bytes', '--out_root', str(d / 'data'),
                              '--name', 'tiny', '--val_fraction', '0.1']) == 0
    teacher = tiny_model(vocab=300, hidden=32, layers=2)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30)
    teacher.save_pretrained(d / 'teacher')
    save_tiny_model(d / 'student', vocab=280, hidden=16, layers=2, heads=2, seed=1)
    return d

def write(work, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'cache_teacher.py'), f'--teacher={work / "teacher"}',
                           f'--dataset={work / "data" / "tiny"}', '--device=cpu', '--dtype=float32', '--block_size=48', *args],
                          capture_output=True, text=True, cwd=work, timeout=300)

def test_written_rows_read_back_bit_for_bit(work):
    out = write(work, '--k=5', '--temperatures=1,2', '--batch_size=3', '--name=k5')
    assert out.returncode == 0, out.stderr
    folder, data_dir = work / 'data' / 'tiny' / 'k5', str(work / 'data' / 'tiny')
    teacher = distill.load_model(str(work / 'teacher')).eval()
    meta = json.load(open(os.path.join(data_dir, 'meta.json')))
    for name in ('train', 'val'):
        split = distill.load_split(data_dir, name)
        distill.attach_topk(split, name, str(folder), data_dir, 48, 2.0)
        windows, n = distill.block_windows(split, 48), 0
        for a in range(0, len(windows), 3):  # the writer's batches (the same shapes: the same round-off)
            b = distill.make_batch(split, windows[a:a + 3], 48, meta['pad_id'], 'cpu')
            keep = b.M.bool()
            with torch.no_grad():
                ids, logp, tail = cache_teacher.top_k(teacher(input_ids=b.X).logits[keep][:, :meta['vocab_size']], 5, [1.0, 2.0])
            assert torch.equal(b.topk.ids[keep], ids)
            assert torch.equal(b.topk.logp[keep], logp.half().float())  # stored in fp16, read back exactly
            assert torch.equal(b.topk.tail[keep], tail[:, 1])  # the T = 2 column
            assert (b.topk.ids[~keep] == 0).all()
            n += keep.sum().item()
        assert n == json.load(open(folder / 'meta.json'))['splits'][name]['rows'] > 0
        assert os.path.getsize(folder / f'{name}_ids.bin') == n * 5 * 2  # uint16

def test_full_cache_trains_like_the_online_teacher(work):
    """k = V with exact values: the cache path (no teacher in memory) equals online KD, chunked and plain."""
    assert write(work, '--k=259', '--values=float32', '--temperatures=2', '--name=full').returncode == 0
    for chunk in (0, 16):
        common = ('--max_iters=3', '--batch_size=2', '--gradient_accumulation_steps=2', '--eval_interval=3', f'--loss_chunk={chunk}')
        run(work, work / f'online{chunk}', *common)
        run(work, work / f'cached{chunk}', *common, '--teacher_cache=full', '--teacher=none')
        a, b = train_log(work / f'online{chunk}'), train_log(work / f'cached{chunk}')
        for ra, rb in zip(a, b):
            for key in ('loss', 'ce', 'kd', 'grad_norm'):
                assert ra[key] == pytest.approx(rb[key], rel=1e-5), (key, ra, rb)
        wa, wb = weights(work / f'online{chunk}'), weights(work / f'cached{chunk}')
        assert all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-5) for k in wa)
        val = lambda out: [r for r in map(json.loads, open(out / 'log.jsonl')) if 'val_kd' in r]
        assert [r['val_kd'] for r in val(work / f'online{chunk}')] == pytest.approx([r['val_kd'] for r in val(work / f'cached{chunk}')], rel=1e-5)
    # and it can fail: top-3 loses most of the distribution's detail
    assert write(work, '--k=3', '--temperatures=2', '--name=k3').returncode == 0
    run(work, work / 'cached_k3', *common, '--teacher_cache=k3')
    assert train_log(work / 'cached_k3')[0]['kd'] < 0.9 * train_log(work / 'online16')[0]['kd']

@pytest.mark.parametrize('override,message', [
    ('--block_size=40', 'was written for block_size=48, not 40'),
    ('--temperature=3.0', 'holds the tail for temperatures [1.0, 2.0], not 3'),
    ('--distill=hidden', "for logit distillation alone"),
    ('--dataset=other', 'was written for other data than'),
])
def test_mismatched_cache_is_one_line(work, override, message):
    if not (work / 'data' / 'tiny' / 'k5').exists():
        assert write(work, '--k=5', '--temperatures=1,2', '--name=k5').returncode == 0
    if override == '--dataset=other' and not (work / 'data' / 'other').exists():
        write_jsonl(work / 'other.jsonl', [{'text': f'another corpus, line {i}'} for i in range(30)])
        assert prepare_data.main([str(work / 'other.jsonl'), '--tokenizer', 'bytes', '--out_root', str(work / 'data'), '--name', 'other']) == 0
    cache = f'--teacher_cache={work / "data" / "tiny" / "k5"}'
    out = run(work, work / 'bad', '--max_iters=1', cache, override, check=False)
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr

def test_killed_write_leaves_nothing_taken_for_complete(work):
    """SIGKILL after the first split's rows: no folder that distill.py reads; the next run clears it and completes."""
    folder = work / 'data' / 'tiny' / 'killed'
    code = ('import os, signal, sys, cache_teacher as c\n'
            'w = c.write_split\n'
            'def once(*a):\n    w(*a)\n    os.kill(os.getpid(), signal.SIGKILL)\n'
            'c.write_split = once\n'
            f'c.main(sys.argv[1:])')
    args = [f'--teacher={work / "teacher"}', f'--dataset={work / "data" / "tiny"}', '--device=cpu', '--dtype=float32',
            '--block_size=48', '--k=4', '--name=killed']
    out = subprocess.run([sys.executable, '-c', code, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == -signal.SIGKILL
    leftovers = [p for p in os.listdir(work / 'data' / 'tiny') if p.startswith('killed')]
    assert not folder.exists() and len(leftovers) == 1 and '.tmp' in leftovers[0]
    fail = run(work, work / 'bad_killed', '--max_iters=1', '--teacher_cache=killed', check=False)
    assert fail.returncode == 2 and 'not a complete cache' in fail.stderr
    tmp = work / 'data' / 'tiny' / leftovers[0]
    with pytest.raises(Exception, match='not a complete cache'):  # nor is the half-written folder itself
        distill.attach_topk(distill.load_split(str(work / 'data' / 'tiny'), 'train'), 'train', str(tmp), str(work / 'data' / 'tiny'), 48, 1.0)
    assert write(work, '--k=4', '--name=killed').returncode == 0
    assert sorted(p for p in os.listdir(work / 'data' / 'tiny') if p.startswith('killed')) == ['killed']

def test_two_ranks_write_what_one_writes(work):
    """torchrun: each rank writes its share of the rows in place; the files equal a single process's byte for byte
    (one window per forward in both, so the same shapes give the same round-off)."""
    one = write(work, '--k=6', '--batch_size=1', '--name=one')
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                          os.path.join(ROOT, 'cache_teacher.py'), f'--teacher={work / "teacher"}', f'--dataset={work / "data" / "tiny"}',
                          '--device=cpu', '--dtype=float32', '--block_size=48', '--k=6', '--batch_size=1', '--name=two'],
                         capture_output=True, text=True, cwd=work, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = work / 'data' / 'tiny' / 'one', work / 'data' / 'tiny' / 'two'
    files = sorted(f for f in os.listdir(a) if f.endswith('.bin'))
    assert files == sorted(f for f in os.listdir(b) if f.endswith('.bin')) and len(files) == 6
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert json.load(open(a / 'meta.json'))['splits'] == json.load(open(b / 'meta.json'))['splits']

@pytest.mark.parametrize('args,message', [
    (['--k=300'], 'is more than the vocabulary'),
    (['--k=0'], 'must be positive'),
    (['--temperatures=1,x'], 'must be positive'),
    (['--splits=train,test'], 'has the splits'),
    (['--dataset=nowhere'], 'no prepared dataset in nowhere'),
    (['--teacher=./nowhere'], "model './nowhere' is neither"),
])
def test_bad_cache_command_is_one_line_and_writes_nothing(work, args, message):
    before = sorted(os.listdir(work / 'data' / 'tiny'))
    out = write(work, *args)
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert sorted(os.listdir(work / 'data' / 'tiny')) == before
