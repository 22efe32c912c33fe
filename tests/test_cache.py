"""The teacher cache (cache_teacher.py, distill.py teacher_cache): the sparse divergence against a float64
reference, the files written then read bit for bit, training from a full cache equal to online KD, a killed write."""
import json, shutil, os, signal, subprocess, sys, zlib
import numpy as np
import pytest, torch
import torch.nn.functional as F
from conftest import ROOT, tiny_work, write_jsonl
from test_distill import command, run, train_log, weights
from test_losses import divergence64, divergence_of64, softmax64
import distill, prepare_data
from kd import data, models
from kd.data import TopK
from functools import partial
from distill import KD_KINDS, Divergence, loss_sums
from kd.chunked import ChunkedHeadLoss, HeadLoss

def estimate64(s, t, ids, k, kind, T, beta, Ts):
    """One position in plain float64, from the definitions: the divergence's terms at the teacher's k tokens, plus
    those at the m drawn tokens ids[k:], each divided by m r, r its chance under the tail's distribution at Ts."""
    p, q, m = softmax64(t, T), softmax64(s, T), len(ids) - k
    tail = [j for j in range(len(t)) if j not in ids[:k]]
    r = dict(zip(tail, softmax64([t[j] for j in tail], Ts) if tail else []))
    term = lambda j: divergence_of64([p[j]], [q[j]], kind, beta)  # (every divergence is a sum over tokens)
    return sum(term(j) for j in ids[:k]) + sum(term(x) / (m * r[x]) for x in ids[k:])

def cached(t, k, T, samples=0, Ts=2.0, seed=0):
    ids, logp, tail = data.top_k(t, k, [T, Ts], samples, torch.Generator().manual_seed(seed))
    return TopK.from_rows(ids, logp, tail[:, 0], tail[:, 1], samples, Ts)

def numeric64(f, s, h=1e-6):
    """Central differences of f(row as a list) w.r.t. every entry of every row of s."""
    num = torch.zeros_like(s, dtype=torch.float64)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            up, down = s[i].tolist(), s[i].tolist()
            up[j] += h
            down[j] -= h
            num[i, j] = (f(i, up) - f(i, down)) / (2 * h)
    return num

@pytest.mark.parametrize('kind', KD_KINDS)
@pytest.mark.parametrize('k,m', [(3, 4), (1, 9), (7, 0)])  # 7 = V: no tail, nothing drawn
@pytest.mark.parametrize('T', [1.0, 2.0])
def test_sparse_divergence_value_and_gradient(kind, k, m, T):
    """For given draws, the value and the gradient equal the float64 formula's (draws at Ts = 2, trained at T)."""
    g = torch.Generator().manual_seed(0)
    V, beta = 7, 0.3
    t = torch.randn(5, V, generator=g, dtype=torch.float64) * 3
    s = (torch.randn(5, V, generator=g, dtype=torch.float64) * 2).requires_grad_()
    top = cached(t, k, T, m)
    got = distill.kd_divergence(s, top, kind, T, beta)
    ref = lambda i, row: estimate64(row, t[i].tolist(), top.ids[i].tolist(), k, kind, T, beta, 2.0)
    assert got.tolist() == pytest.approx([ref(i, row) for i, row in enumerate(s.tolist())], rel=1e-9, abs=1e-12)
    grad, = torch.autograd.grad(got.sum(), s)
    num = numeric64(ref, s.detach())
    assert torch.allclose(grad, num, rtol=1e-5, atol=1e-7), (grad, num)

@pytest.mark.parametrize('kind', KD_KINDS)
@pytest.mark.parametrize('T', [1.0, 2.0])
def test_sparse_divergence_is_unbiased(kind, T):
    """The expectation over one draw, summed exactly over the tail's tokens, is the full divergence: value and gradient
    (against the float64 formula and its central differences)."""
    g = torch.Generator().manual_seed(3)
    V, k, beta = 9, 3, 0.3
    t = torch.randn(4, V, generator=g, dtype=torch.float64) * 3
    s = (torch.randn(4, V, generator=g, dtype=torch.float64) * 2).requires_grad_()
    ids, logp, tail = data.top_k(t, k, [T, 2.0])
    expected = torch.zeros(4, dtype=torch.float64)
    for x in range(V):  # one draw of x, weighted by its chance r_x (0 for the top k)
        drawn = torch.full((4, 1), x)
        r = torch.where((ids == x).any(-1), 0.0, F.softmax(t.scatter(-1, ids, -float('inf')) / 2.0, -1)[:, x])
        lp = F.log_softmax(t, -1).gather(-1, drawn)
        top = TopK.from_rows(torch.cat([ids, drawn], -1), torch.cat([logp, lp], -1), tail[:, 0], tail[:, 1], 1, 2.0)
        expected = expected + r * distill.kd_divergence(s, top, kind, T, beta)
    full = lambda i, row: divergence64(row, t[i].tolist(), kind, T, beta)
    assert expected.tolist() == pytest.approx([full(i, row) for i, row in enumerate(s.tolist())], rel=1e-9, abs=1e-12)
    grad, = torch.autograd.grad(expected.sum(), s)
    assert torch.allclose(grad, numeric64(full, s.detach()), rtol=1e-5, atol=1e-7)
    # and it can fail: one draw alone is not the full divergence
    one = distill.kd_divergence(s, cached(t, k, T, 1), kind, T, beta)
    assert (one - torch.tensor([full(i, row) for i, row in enumerate(s.tolist())], dtype=torch.float64)).abs().max() > 1e-3

def test_draws_follow_the_tail_at_the_highest_temperature():
    """data.top_k draws from the tokens outside the top k, in proportion to p^(1/Ts), Ts the highest T."""
    g = torch.Generator().manual_seed(4)
    t = torch.randn(1, 12, generator=g, dtype=torch.float64) * 2
    ids, _, _ = data.top_k(t, 4, [1.0, 3.0], 20000, g)
    counts = torch.bincount(ids[0, 4:], minlength=12).double()
    r = F.softmax(t.scatter(-1, ids[:, :4], -float('inf'))[0] / 3.0, -1)
    assert counts[ids[0, :4]].sum() == 0
    assert ((counts / 20000 - r).abs() <= 4 * (r * (1 - r) / 20000).sqrt() + 1e-12).all(), (counts / 20000, r)
    assert ((counts / 20000 - F.softmax(t.scatter(-1, ids[:, :4], -float('inf'))[0], -1)).abs().max() > 0.01)  # not at T = 1

def test_the_writer_draws_tokens_far_below_fp32_precision():
    """The cache's draws follow their weights even for tail tokens below float32's precision: a teacher with p = 0.5,
    one of 0.5 - 1e-5 and 1,000 tokens of 1e-8, and a student whose reverse KL lies mostly on those tiny tokens. The
    mean estimate over 16 rows of 400,000 draws each (the real writer, data.top_k) holds the exact divergence within
    its Monte-Carlo error (torch.multinomial, which sums fp32 chances, never drew one of them: 5.4 nats missing)."""
    V, rows, m = 1002, 16, 400_000
    p = torch.tensor([0.5, 0.5 - 1e-5] + [1e-8] * 1000, dtype=torch.float64)  # (the tiny ones after the running sum's 1)
    t = p.log().float().expand(rows, V).contiguous()  # the teacher's logits, in fp32 as a model returns them
    q = torch.tensor([0.25, 0.25] + [0.5 / 1000] * 1000, dtype=torch.float64)
    s = q.log().expand(rows, V)
    ids, logp, tail = data.top_k(t, 1, [1.0], m, torch.Generator().manual_seed(0))
    estimate = distill.kd_divergence(s, TopK.from_rows(ids, logp, tail[:, 0], tail[:, 0], m, 1.0), 'rkl', 1.0)
    exact = distill.kd_divergence(s[:1], t[:1], 'rkl', 1.0).item()
    se = estimate.std().item() / rows ** 0.5
    assert (ids[:, 1:] >= 2).sum() > 0  # tiny tokens drawn (about 8 per row expected)
    assert abs(estimate.mean().item() - exact) < 4 * se + 1e-3 * exact, (estimate.mean().item(), exact, se)

def test_sparse_divergence_at_full_k_is_the_full_divergence():
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(6, 11, generator=g) * 3, torch.randn(6, 11, generator=g)
    for kind in KD_KINDS:
        full, sparse = distill.kd_divergence(s, t, kind, 2.0, 0.5), distill.kd_divergence(s, cached(t, 11, 2.0), kind, 2.0, 0.5)
        assert torch.allclose(full, sparse, rtol=1e-5, atol=1e-6), kind

@pytest.mark.parametrize('kind', ['fkl', 'jsd'])
def test_chunked_sparse_equals_plain_with_padding_rows(kind):
    """ChunkedHeadLoss on a TopK teacher equals loss_sums on full logits; the student's head has padding rows past the
    vocabulary, which never enter the divergence."""
    g = torch.Generator().manual_seed(2)
    vocab, rows, d, n = 13, 16, 8, 37
    h, W = torch.randn(n, d, generator=g), torch.randn(rows, d, generator=g)  # fp32, as the chunked path computes
    y, top = torch.randint(0, vocab, (n,), generator=g), cached(torch.randn(n, vocab, generator=g) * 3, 4, 2.0, 6)
    coef = (0.3, 0.7 * 4)
    h1, W1 = h.clone().requires_grad_(), W.clone().requires_grad_()
    sums = partial(loss_sums, divergence=Divergence(kind, 2.0, 0.5), compared=slice(0, vocab))
    ce, kd = sums(h1 @ W1.T, y, top)
    (coef[0] * ce + coef[1] * kd).backward()
    h2, W2 = h.clone().requires_grad_(), W.clone().requires_grad_()
    ce2, kd2 = ChunkedHeadLoss.apply(h2, W2, HeadLoss(y, top, sums, coef, 5))
    (coef[0] * ce2 + coef[1] * kd2).backward()
    assert torch.allclose(ce, ce2, rtol=1e-5) and torch.allclose(kd, kd2, rtol=1e-5)
    assert torch.allclose(h1.grad, h2.grad, rtol=1e-4, atol=1e-6) and torch.allclose(W1.grad, W2.grad, rtol=1e-4, atol=1e-6)
    assert W2.grad[vocab:].abs().sum() > 0  # (the CE's softmax covers the padding rows; the divergence does not)

@pytest.fixture(scope='module')
def work(tmp_path_factory):
    recs = [{'question': f'what is {i} plus {i}?', 'answer': f'{2 * i}, I think.'} for i in range(40)]
    recs += [{'text': 'the cat sat on a mat while dogs ran far away ' * (1 + i % 4)} for i in range(20)]
    return tiny_work(tmp_path_factory.mktemp('cache'), recs)

def write(work, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'cache_teacher.py'), f'--teacher={work / "teacher"}',
                           f'--dataset={work / "data" / "tiny"}', '--device=cpu', '--dtype=float32', '--block_size=48', *args],
                          capture_output=True, text=True, cwd=work, timeout=300)

def test_written_rows_read_back_bit_for_bit(work):
    out = write(work, '--k=5', '--samples=4', '--temperatures=1,2', '--batch_size=3', '--name=k5')
    assert out.returncode == 0, out.stderr
    folder, data_dir = work / 'data' / 'tiny' / 'k5', str(work / 'data' / 'tiny')
    teacher = models.load_model(str(work / 'teacher')).eval()
    meta = json.load(open(os.path.join(data_dir, 'meta.json')))
    for name in ('train', 'val'):
        split = data.load_split(data_dir, name)
        data.attach_topk(split, name, str(folder), data_dir, 48, 2.0)
        windows, n = data.block_windows(split, 48), 0
        for a in range(0, len(windows), 3):  # the writer's batches (the same shapes: the same round-off)
            b = data.make_batch(split, windows[a:a + 3], 48, meta['pad_id'], 'cpu')
            keep = b.M.bool()
            with torch.no_grad():
                logits = teacher(input_ids=b.X).logits[keep][:, :meta['vocab_size']]
            rows = [data.top_k(z, 5, [1.0, 2.0], 4, torch.Generator().manual_seed(zlib.crc32(f'0 {name} {i}'.encode())))
                    for i, z in zip(range(a, a + 3), logits.split(b.M.sum(1).tolist()))]  # each window's draws from its own seed
            ids, logp, tail = (torch.cat(x) for x in zip(*rows))
            assert torch.equal(b.topk.ids[keep], ids)
            assert torch.equal(b.topk.logp[keep], logp.half().float())  # stored in fp16, read back exactly
            assert torch.equal(b.topk.tail[keep], tail[:, 1])  # the T = 2 column
            assert (b.topk.ids[~keep] == 0).all()
            n += keep.sum().item()
        assert n == json.load(open(folder / 'meta.json'))['splits'][name]['rows'] > 0
        assert os.path.getsize(folder / f'{name}_ids.bin') == n * 9 * 2  # uint16

def test_full_cache_trains_like_the_online_teacher(work):
    """k = V with exact values: the cache path (no teacher in memory) equals online KD, chunked and plain."""
    assert write(work, '--k=259', '--samples=0', '--values=float32', '--temperatures=2', '--name=full').returncode == 0
    for chunk in (0, 16):
        common = ('--max_iters=3', '--batch_size=2', '--gradient_accumulation_steps=2', '--eval_interval=3', f'--loss_chunk={chunk}')
        run(work, work / f'online{chunk}', *common)
        run(work, work / f'cached{chunk}', *common, '--teacher_cache=full', '--teacher=none')
        a, b = train_log(work / f'online{chunk}'), train_log(work / f'cached{chunk}')
        for ra, rb in zip(a, b):
            for key in ('loss', 'ce', 'kd', 'grad_norm'):
                assert ra[key] == pytest.approx(rb[key], rel=1e-5), (key, ra, rb)
        wa, wb = weights(work / f'online{chunk}'), weights(work / f'cached{chunk}')
        # (AdamW's normalised step turns fp32 round-off in tiny gradients into weight differences of ~1e-5: 1.007e-5
        # measured on an EPYC without bf16 units, with the sums of both paths equal to 1e-5 relative above)
        assert all(torch.allclose(wa[k], wb[k], rtol=0, atol=3e-5) for k in wa)
        val = lambda out: [r for r in map(json.loads, open(out / 'log.jsonl')) if 'val_kd' in r]
        assert [r['val_kd'] for r in val(work / f'online{chunk}')] == pytest.approx([r['val_kd'] for r in val(work / f'cached{chunk}')], rel=1e-5)
    # and it can fail: top-3 and 8 draws give an estimate of the divergence, near the full one but not equal
    assert write(work, '--k=3', '--samples=8', '--temperatures=2', '--name=k3').returncode == 0
    run(work, work / 'cached_k3', *common, '--teacher_cache=k3')
    kd3, kd = train_log(work / 'cached_k3')[0]['kd'], train_log(work / 'online16')[0]['kd']
    assert 1e-3 < abs(kd3 / kd - 1) < 0.2, (kd3, kd)

def test_sampled_online_script_reduces_the_teacher_as_the_cache_does(work):
    """scripts/sampled_online.py (the online teacher cut to a cache row, fresh draws every step): at k = V it trains
    as online KD, up to the fp16 log-probabilities; with draws its divergence is an estimate near the full one."""
    common = ('--max_iters=3', '--batch_size=2', '--gradient_accumulation_steps=2', '--eval_interval=3', '--loss_chunk=16')
    if not (work / 'online16' / 'log.jsonl').exists():
        run(work, work / 'online16', *common)
    for name, k, m in (('so_full', 259, 0), ('so_k3', 3, 8)):
        args = command(work, work / name, *common)[2:]
        out = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'sampled_online.py'), f'--k={k}', f'--samples={m}', '--', *args],
                             capture_output=True, text=True, cwd=work, env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
    online, full, k3 = (train_log(work / n) for n in ('online16', 'so_full', 'so_k3'))
    for ra, rb in zip(online, full):
        for key in ('loss', 'ce', 'kd', 'grad_norm'):
            assert ra[key] == pytest.approx(rb[key], rel=1e-3), (key, ra, rb)  # (measured: <= 2.2e-4)
    assert 1e-3 < abs(k3[0]['kd'] / online[0]['kd'] - 1) < 0.2

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

def test_a_cache_damaged_at_its_size_is_one_line(work):
    """Token ids past the vocabulary (a file changed in place, so its size still matches): one line naming the file."""
    assert write(work, '--k=4', '--name=damaged').returncode == 0
    ids = work / 'data' / 'tiny' / 'damaged' / 'train_ids.bin'
    ids.write_bytes(np.full(os.path.getsize(ids) // 2, 60000, np.uint16).tobytes())
    out = run(work, work / 'damaged_run', '--max_iters=1', '--teacher_cache=damaged', check=False)
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(err) == 1 and 'train_ids.bin holds token id 60000 for a vocabulary of 259' in err[0], out.stderr

def test_rewriting_the_dataset_keeps_its_caches_or_refuses(work, tmp_path):
    """prepare_data.py again on the same records keeps the caches inside the dataset (they were deleted, exit 0); on
    other records it refuses in one line naming them, and deletes them only with --drop_caches."""
    data = tmp_path / 'data'
    argv = lambda src, *more: [str(src), '--tokenizer', 'bytes', '--out_root', str(data), '--name', 'tiny',
                                '--val_fraction', '0.1', *more]
    shutil.copytree(work / 'data' / 'tiny', data / 'tiny')
    assert write(work, '--k=4', f'--dataset={data / "tiny"}', '--name=kept').returncode == 0
    before = open(data / 'tiny' / 'kept' / 'train_ids.bin', 'rb').read()
    assert prepare_data.main(argv(work / 'in.jsonl')) == 0
    assert open(data / 'tiny' / 'kept' / 'train_ids.bin', 'rb').read() == before
    assert run(work, tmp_path / 'from_kept', f'--data_root={data}', '--max_iters=1', '--teacher_cache=kept').returncode == 0
    write_jsonl(tmp_path / 'other.jsonl', [{'text': f'other words {i}'} for i in range(30)])
    assert prepare_data.main(argv(tmp_path / 'other.jsonl')) == 1
    assert (data / 'tiny' / 'kept' / 'meta.json').exists()
    assert prepare_data.main(argv(tmp_path / 'other.jsonl', '--drop_caches')) == 0
    assert not (data / 'tiny' / 'kept').exists()

def test_a_cache_with_a_kind_whose_gradient_it_cannot_estimate_is_said(work):
    """From drawn tokens, reverse KL's gradient is mostly noise (docs/performance.md): one note at start; forward KL
    has none."""
    assert write(work, '--k=4', '--name=noisy').returncode == 0
    note = "note: from a teacher cache, rkl's gradient is mostly the draws' noise"
    assert note in run(work, work / 'noisy_rkl', '--max_iters=1', '--teacher_cache=noisy', '--kd_kind=rkl').stdout
    assert 'is mostly the draws' not in run(work, work / 'noisy_fkl', '--max_iters=1', '--teacher_cache=noisy').stdout

def test_killed_write_leaves_nothing_taken_for_complete(work):
    """SIGKILL after the first split's rows: no folder that distill.py reads; the next run clears it and completes."""
    folder = work / 'data' / 'tiny' / 'killed'
    code = ('import os, signal, sys\nsys.path.insert(0, "scripts")\nimport cache_teacher as c\n'
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
        data.attach_topk(data.load_split(str(work / 'data' / 'tiny'), 'train'), 'train', str(tmp), str(work / 'data' / 'tiny'), 48, 1.0)
    assert write(work, '--k=4', '--name=killed').returncode == 0
    assert sorted(p for p in os.listdir(work / 'data' / 'tiny') if p.startswith('killed')) == ['killed']

def test_two_ranks_write_what_one_writes(work):
    """torchrun: each rank writes its share of the rows in place; the files equal a single process's byte for byte
    (one window per forward in both, so the same shapes give the same round-off)."""
    one = write(work, '--k=6', '--batch_size=1', '--name=one')
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                          os.path.join(ROOT, 'scripts', 'cache_teacher.py'), f'--teacher={work / "teacher"}', f'--dataset={work / "data" / "tiny"}',
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
    (['--samples=0'], 'leaves the tail unrepresented'),
    (['--k=259'], 'there is no tail to draw from'),
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
