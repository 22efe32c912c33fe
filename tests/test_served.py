"""A served teacher (kd/served.py): the loss on its top k with the rest as one bucket, the policy-gradient loss for a
teacher that gives only sampled tokens' log-probabilities, and the client over real HTTP against a stand-in server
that injects faults (tests/stub_server.py; scripts/check_served.py checks a real vLLM server)."""
import json, math, os, socket, subprocess, sys
import pytest, torch
from conftest import BYTES_VOCAB, ROOT, tiny_model, tiny_work
from stub_server import Stub, model_logprobs
from test_cross_logits import divergence64
import distill
from kd.configurator import ConfigError
from kd.data import Align, Batch, TopK, pack_rows
from kd.models import encode
from kd.served import ServedTeacher, ServerError, check_served

def softmax64(z, T):
    m = max(z)
    e = [math.exp((v - m) / T) for v in z]
    return [v / sum(e) for v in e]

def served_topk(t, k, T):
    """What a served teacher sends of logits t (n, V): its top k at T = 1 and the rest's mass, log sum_rest p^(1/T)
    (at T = 1: log(1 - sum of the k)), nothing drawn."""
    logp = torch.log_softmax(t, -1)
    values, ids = logp.topk(k, -1)
    rest = logp.scatter(-1, ids, -math.inf)
    return TopK(ids, values, torch.logsumexp(rest / T, -1), torch.zeros(len(t), 0, dtype=t.dtype))

def bucketed(t_row, s_row, ids, kind, T, beta):
    """float64 brute force: both distributions at T coarsened to (the k tokens, everything else)."""
    p, q = softmax64(t_row, T), softmax64(s_row, T)
    coarse = lambda d: torch.tensor([d[i] for i in ids] + [1 - sum(d[i] for i in ids)], dtype=torch.float64)
    return float(divergence64(kind, coarse(p), coarse(q), beta))

@pytest.mark.parametrize('kind', distill.KD_KINDS)
@pytest.mark.parametrize('T', [1.0, 2.0])
def test_top_k_with_the_rest_as_one_bucket(kind, T):
    """Value and gradient equal the float64 formula on the coarsened distributions; the value is a lower bound of the
    full divergence (every one here is an f-divergence: coarsening never raises it); forward KL's gradient is exact
    on the k tokens."""
    g = torch.Generator().manual_seed(0)
    V, k, beta = 9, 3, 0.3
    t = torch.randn(5, V, generator=g, dtype=torch.float64) * 3
    s = (torch.randn(5, V, generator=g, dtype=torch.float64) * 2).requires_grad_()
    top = served_topk(t, k, T)
    got = distill.kd_divergence(s, top, kind, T, beta)
    ref = [bucketed(t[i].tolist(), row, top.ids[i].tolist(), kind, T, beta) for i, row in enumerate(s.tolist())]
    assert got.tolist() == pytest.approx(ref, rel=1e-9, abs=1e-12)
    full = distill.kd_divergence(s, t, kind, T, beta)
    assert (got <= full + 1e-12).all() and (got < full - 1e-6).any()
    grad, = torch.autograd.grad(got.sum(), s)
    eps, num = 1e-6, torch.zeros_like(s)
    for i in range(len(s)):
        for j in range(V):
            hi, lo = s[i].tolist(), s[i].tolist()
            hi[j] += eps
            lo[j] -= eps
            ids = top.ids[i].tolist()
            num[i, j] = (bucketed(t[i].tolist(), hi, ids, kind, T, beta)
                         - bucketed(t[i].tolist(), lo, ids, kind, T, beta)) / (2 * eps)
    assert torch.allclose(grad, num, rtol=1e-5, atol=1e-8)
    if kind == 'fkl':
        exact, = torch.autograd.grad(full.sum(), s)
        assert torch.allclose(grad.gather(1, top.ids), exact.gather(1, top.ids), rtol=1e-9, atol=1e-12)
        assert not torch.allclose(grad, exact, atol=1e-4)  # (off the k tokens it is not)

def test_policy_gradient_estimates_reverse_kl_and_its_gradient():
    """kd_kind='pg' on tokens x ~ q, given log p(x) alone: its mean value is reverse KL and its mean gradient reverse
    KL's gradient, each within 4 standard errors of 100,000 draws (Monte Carlo); forward KL's gradient is not."""
    g = torch.Generator().manual_seed(3)
    V, n = 6, 100_000
    t = torch.randn(V, generator=g, dtype=torch.float64) * 2
    s = torch.randn(V, generator=g, dtype=torch.float64)
    log_p = torch.log_softmax(t, -1)
    x = torch.multinomial(torch.softmax(s, -1), n, replacement=True, generator=g)
    rows = s.expand(n, V).clone().requires_grad_()
    teacher = TopK(x[:, None], log_p[x][:, None], torch.zeros(n, dtype=torch.float64),
                   torch.zeros(n, 0, dtype=torch.float64))
    value = distill.kd_divergence(rows, teacher, 'pg', 1.0)
    grads, = torch.autograd.grad(value.sum(), rows)  # (row i: draw i's gradient)
    exact_s = s.clone().requires_grad_()
    exact = distill.kd_divergence(exact_s[None], t[None], 'rkl', 1.0)[0]
    exact_grad, = torch.autograd.grad(exact, exact_s)
    se = lambda v: v.std(0) / n ** 0.5
    assert abs(value.mean() - exact) < 4 * se(value.detach()), (value.mean().item(), exact.item())
    assert ((grads.mean(0) - exact_grad).abs() < 4 * se(grads)).all(), (grads.mean(0), exact_grad, se(grads))
    forward_s = s.clone().requires_grad_()
    forward_grad, = torch.autograd.grad(distill.kd_divergence(forward_s[None], t[None], 'fkl', 1.0)[0], forward_s)
    assert ((grads.mean(0) - forward_grad).abs() > 4 * se(grads)).any()  # (the test tells the two apart)
    with pytest.raises(ValueError, match="'rkl' is exact"):
        distill.kd_divergence(s[None], t[None], 'pg', 1.0)

def test_settings_a_served_teacher_cannot_serve():
    url, logits, hidden = 'http://localhost:8000/v1', (0.5, 0.5, 0.0), (0.5, 0.0, 1.0)
    ok, plain = (1, 1, 1), ('pretrained', None, False)
    check_served(url, None, logits, 'fkl', 1.0, (0, 1, 1), *plain)
    check_served(url, 8, logits, 'pg', 1.0, ok, *plain)
    check_served('teacher.gguf', 8, logits, 'fkl', 2.0, ok, *plain)
    for args, message in [((url, None, hidden, 'fkl', 1.0, ok, *plain), 'hidden-state'),
                          ((url, None, logits, 'fkl', 1.0, ok, 'teacher_layers', None, False), 'teacher_layers'),
                          ((url, None, logits, 'fkl', 1.0, ok, 'pretrained', None, True), 'across tokenizers'),
                          ((url, None, logits, 'fkl', 2.0, ok, *plain), 'set temperature=1'),
                          (('teacher.gguf', None, logits, 'pg', 1.0, ok, *plain), "'rkl' is exact"),
                          ((url, None, logits, 'pg', 1.0, (0.5, 1, 1), *plain), 'on_policy=1'),
                          ((url, None, logits, 'pg', 1.0, (1, 0.7, 1), *plain), 'sample_temperature=1'),
                          (('t.gguf', 0, logits, 'fkl', 1.0, ok, *plain), 'positive integer'),
                          (('t.gguf', 8, logits, 'fkl', 1.0, ok, 'pretrained', 'cache', False), 'cache_teacher'),
                          (('t.gguf', 8, logits, 'fkl', 1.0, ok, 'pretrained', None, True), 'another tokenizer'),
                          (('t.gguf', 300, logits, 'fkl', 1.0, ok, 'pretrained', None, False, 259), 'at most 259'),
                          ((url, None, logits, 'fkl', 1.0, ok, 'pretrained', 'c8', False), 'unset teacher_cache'),
                          ((url, None, logits, 'fkl', 1.0, ok, *plain, 259, (0, 300.0, 5)), 'teacher_requests must'),
                          ((url, None, logits, 'fkl', 1.0, ok, *plain, 259, (8, 300.0, -1)), 'teacher_retries >= 0')]:
        with pytest.raises(ConfigError, match=message):
            check_served(*args)
    from types import SimpleNamespace
    from kd.served import check_pg
    check_pg('pg', SimpleNamespace(with_prompt=1.0))
    check_pg('fkl', SimpleNamespace(with_prompt=0.5))
    with pytest.raises(ConfigError, match='50% of the training documents have no prompt'):
        check_pg('pg', SimpleNamespace(with_prompt=0.5))

@pytest.fixture(scope='module')
def served(bytes_tok):
    model = tiny_model(vocab=BYTES_VOCAB, hidden=32, layers=2).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # (a peaked teacher: top-k masses well away from 1)
    stub = Stub(model_logprobs(model, BYTES_VOCAB), lambda text: [int(i) for i in encode(bytes_tok, text)[0]])
    yield model, stub
    stub.close()

def batch_of(rows, lengths, seed=0):
    """A Batch of right-padded rows: supervised from the third token to each row's length."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    X = torch.randint(0, 256, (rows, L + 1), generator=g)
    M = torch.zeros(rows, L, dtype=torch.long)
    for r, n in enumerate(lengths):
        M[r, 2:n] = 1
        X[r, n + 1:] = 0
    b, s = M.nonzero(as_tuple=True)
    return Batch(X[:, :-1].contiguous(), X[:, 1:].contiguous(), M, Align(None, b, s, s))

def test_served_top_k_equals_the_model_in_process(served, bytes_tok):
    """At every supervised position, the server's top k and the rest's mass equal the in-process model's (float64
    there, fp32 on the way); a packed batch (windows restarting their positions) reads each window apart."""
    model, stub = served
    teacher = ServedTeacher(stub.url, bytes_tok, BYTES_VOCAB, 5, 64, requests=3)
    batch = batch_of(4, [20, 9, 14, 6])
    got = teacher(batch).logits
    with torch.no_grad():
        want = served_topk(torch.log_softmax(model(input_ids=batch.X).logits[..., :BYTES_VOCAB].double(), -1), 5, 1.0)
    keep = batch.M.bool()
    assert torch.equal(got.ids[keep], want.ids[keep])
    assert torch.allclose(got.logp[keep].double(), want.logp[keep], atol=1e-6)
    assert torch.allclose(got.tail[keep].double(), want.tail[keep], atol=1e-5)
    assert got.logw.shape[-1] == 0 and (got.ids[1:, -1] == 0).all()  # (past a row's last target: nothing asked)
    packed = pack_rows(batch._replace(topk=got), block_size=32, pad_id=0)
    assert len(packed.X) < len(batch.X)  # (several windows a row)
    again = teacher(packed).logits
    keep = packed.M.bool()
    assert torch.equal(again.ids[keep], packed.topk.ids[keep])
    assert torch.allclose(again.logp[keep], packed.topk.logp[keep], atol=1e-6)
    only = ServedTeacher(stub.url, bytes_tok, BYTES_VOCAB, 0, 64)(batch).logits  # (kd_kind='pg': the token that came)
    keep = batch.M.bool()
    assert torch.equal(only.ids[keep][:, 0], batch.Y[keep])
    with torch.no_grad():
        token = torch.log_softmax(model(input_ids=batch.X).logits[..., :BYTES_VOCAB].double(), -1)
    assert torch.allclose(only.logp[keep][:, 0].double(), token.gather(-1, batch.Y[..., None])[..., 0][keep], atol=1e-6)

def test_faults_each_stop_with_one_line(served, bytes_tok):
    model, stub = served
    make = lambda k=4, url=stub.url, **kw: ServedTeacher(url, bytes_tok, BYTES_VOCAB, k, 64, retries=2, **kw)
    batch = batch_of(2, [10, 7])
    teacher = make()
    stub.fail = 2  # two 500s, then answers: tried again
    assert teacher(batch).logits.ids.shape == (2, 10, 4) and stub.fail == 0
    cases = [({'fail': 5}, {}, 'no usable answer in 3 tries.*HTTP 500'),
             ({'truncate': True}, {}, 'no usable answer.*JSONDecodeError'),
             ({'slow': 0.5}, {'timeout': 0.1}, 'no usable answer.*timed out'),
             ({'cap': 2}, {}, '--max-logprobs 4'),
             ({'answer_as': 'other/model'}, {}, "answered for model 'other/model'"),
             ({'garbage': True}, {}, 'no usable answer.*BadStatusLine')]
    for fault, kw, message in cases:
        try:
            teacher = make(**kw)
            for name, value in fault.items():
                setattr(stub, name, value)
            with pytest.raises(ServerError, match=message):
                teacher(batch)
        finally:
            stub.fail, stub.slow, stub.truncate, stub.cap, stub.answer_as, stub.garbage = 0, 0.0, False, None, None, False
    closed = socket.socket()
    closed.bind(('127.0.0.1', 0))  # (a port nothing listens on once closed)
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(ServerError, match='no usable answer.*Connection refused'):
        make(url=f'http://127.0.0.1:{port}/v1')
    with pytest.raises(ServerError, match="not 'other'"):
        make(url=stub.url + '#other')
    with pytest.raises(ServerError, match='--max-model-len 5001'):
        ServedTeacher(stub.url, bytes_tok, BYTES_VOCAB, 4, 5000)
    stub.max_model_len = 12  # (a window longer than the server reads: a teacher's rows with a context)
    try:
        with pytest.raises(ServerError, match='--max-model-len 21'):
            ServedTeacher(stub.url, bytes_tok, BYTES_VOCAB, 4, 10)(batch_of(1, [20]))
    finally:
        stub.max_model_len = 4096
    tokenize, stub.tokenize = stub.tokenize, lambda text: list(range(len(text)))
    try:
        with pytest.raises(ServerError, match='tokenizes differently'):
            make()
    finally:
        stub.tokenize = tokenize

def run(work, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'distill.py'), *args], cwd=work, capture_output=True,
                          text=True, timeout=600)

def log(path):
    return [json.loads(line) for line in open(path)]

def test_a_run_with_a_served_teacher(tmp_path, bytes_tok):
    """distill.py with teacher=URL: with every token sent (k = V: no bucket) it trains as the same teacher in this
    process does; the server going down stops the run with one line, and once it is back the run resumes from its
    last checkpoint to the same losses as a run that never stopped."""
    work = tiny_work(tmp_path, [{'text': 'the quick brown fox jumps over the lazy dog ' * (1 + i % 3)}
                                for i in range(60)])
    import transformers
    teacher = transformers.AutoModelForCausalLM.from_pretrained(work / 'teacher').eval()
    stub = Stub(model_logprobs(teacher, BYTES_VOCAB), lambda text: [int(i) for i in encode(bytes_tok, text)[0]])
    common = ['--dataset=tiny', '--student=student', '--block_size=32', '--batch_size=2',
              '--gradient_accumulation_steps=2', '--max_iters=6', '--eval_interval=2', '--eval_docs=4', '--dtype=float32',
              '--device=cpu', '--temperature=1', '--learning_rate=1e-3', '--warmup_frac=0', '--min_lr=1e-3']
    try:
        local = run(work, *common, '--teacher=teacher', '--out_dir=out-local')
        assert local.returncode == 0, local.stderr
        remote = run(work, *common, f'--teacher={stub.url}', f'--teacher_topk={BYTES_VOCAB}', '--out_dir=out-served')
        assert remote.returncode == 0, remote.stderr
        assert 'served by' in remote.stdout
        def same(a, b):
            a, b = log(work / a / 'log.jsonl'), log(work / b / 'log.jsonl')
            assert [r['iter'] for r in a] == [r['iter'] for r in b]
            for x, y in zip(a, b):
                for key in ('val_kd', 'val_ce', 'loss', 'kd'):
                    if key in x:
                        assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (key, x, y)
        same('out-local', 'out-served')
        served = ['--teacher=' + stub.url, '--teacher_topk=8', '--teacher_retries=1']
        whole = run(work, *common, *served, '--out_dir=out-whole')
        assert whole.returncode == 0, whole.stderr
        local8 = run(work, *common, '--teacher=teacher', '--teacher_topk=8', '--out_dir=out-local8')
        assert local8.returncode == 0 and 'top-8 read' in local8.stdout, local8.stderr
        same('out-local8', 'out-whole')  # (its top 8 read in this process: the same loss)
        write = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'cache_teacher.py'), f'--teacher={stub.url}',
                                '--dataset=data/tiny', '--block_size=32', '--k=8', '--values=float32', '--name=served8'],
                               cwd=work, capture_output=True, text=True, timeout=600)
        assert write.returncode == 0, write.stderr
        cached = run(work, *common, '--teacher_cache=served8', '--out_dir=out-cached8')
        assert cached.returncode == 0, cached.stderr
        same('out-cached8', 'out-whole')  # (a cache written from the server: the same loss, from disk)
        stub.fail_after = stub.requests + 30  # (down within the run: past its evaluation at 2 and its checkpoint)
        cut = run(work, *common, *served, '--out_dir=out-cut')
        stub.fail_after = None
        assert cut.returncode == 2 and cut.stderr.strip().splitlines()[-1].startswith('error: the teacher server'), \
            cut.stderr
        assert len(cut.stderr.strip().splitlines()) == 1
        resumed = run(work, *common, *served, '--out_dir=out-cut', '--init_from=resume')
        assert resumed.returncode == 0, resumed.stderr
        keys = ('loss', 'ce', 'kd', 'grad_norm', 'val_ce', 'val_kd')
        last = lambda records: {(r['iter'], 'loss' in r): {k: r.get(k) for k in keys} for r in records}
        done, again = last(log(work / 'out-whole' / 'log.jsonl')), last(log(work / 'out-cut' / 'log.jsonl'))
        assert done == again and (6, False) in done  # (bit for bit: every step and evaluation to the end)
    finally:
        stub.close()

def test_several_teachers_each_scores_its_own_documents(served, bytes_tok):
    """Routed (prepare_data.py --route): each window goes to its document's teacher, packed rows mixing routes too."""
    model, stub = served
    other = tiny_model(vocab=BYTES_VOCAB, hidden=32, layers=2, seed=5).eval()
    stub2 = Stub(model_logprobs(other, BYTES_VOCAB), stub.tokenize, name='stub/second')
    try:
        teacher = ServedTeacher({'chat': stub.url, 'plays': stub2.url}, bytes_tok, BYTES_VOCAB, 4, 64)
        batch = batch_of(4, [20, 9, 14, 6])
        route = torch.tensor([0, 1, 1, 0])[:, None].expand_as(batch.M).contiguous()
        batch = batch._replace(route=route)
        got = teacher(batch).logits
        with torch.no_grad():
            want = [served_topk(torch.log_softmax(m(input_ids=batch.X).logits[..., :BYTES_VOCAB].double(), -1), 4, 1.0)
                    for m in (model, other)]
        for r in range(4):
            keep, w = batch.M[r].bool(), want[int(route[r, 0])]
            assert torch.equal(got.ids[r][keep], w.ids[r][keep])
            assert torch.allclose(got.logp[r][keep].double(), w.logp[r][keep], atol=1e-6)
        packed = pack_rows(batch._replace(topk=got), block_size=32, pad_id=0)
        assert len(packed.X) < 4 and any(len(set(r.tolist())) > 1 for r in packed.route)  # (routes mixed in a row)
        again = teacher(packed).logits
        keep = packed.M.bool()
        assert torch.equal(again.ids[keep], packed.topk.ids[keep])
        assert 'chat: ' in str(teacher) and 'plays: ' in str(teacher)
    finally:
        stub2.close()

def test_routes_prepared_and_checked(tmp_path):
    """prepare_data.py --route keeps each document's teacher; distill.py's teacher={route: URL} must name every route
    of the data and no other (routed_urls); a record without the field is one line with its file and line."""
    import prepare_data
    from kd.data import load_split
    from kd.served import routed_urls
    records = [{'text': f'chat number {i} ' * 4, 'source': 'chat'} for i in range(12)] + \
              [{'text': f'a play, scene {i} ' * 4, 'source': 'plays'} for i in range(12)]
    path = tmp_path / 'in.jsonl'
    path.write_text('\n'.join(json.dumps(r) for r in records) + '\n')
    assert prepare_data.main([str(path), '--tokenizer=bytes', f'--out_root={tmp_path}', '--name=r', '--route=source',
                              '--val_fraction=0.25']) == 0
    meta = json.load(open(tmp_path / 'r' / 'meta.json'))
    assert meta['routes'] == ['chat', 'plays'] and meta['route_field'] == 'source'
    for split in ('train', 'val'):
        data = load_split(str(tmp_path / 'r'), split)
        tokens = bytes(int(t) if t < 256 else 0 for t in data['tokens'])
        for d, r in enumerate(data['route']):
            text = tokens[data['idx'][d]:data['idx'][d + 1]]
            assert (b'chat' in text) == (meta['routes'][r] == 'chat')
    url = 'http://127.0.0.1:1/v1'
    assert list(routed_urls({'plays': url + 'p', 'chat': url}, meta, 'data/r')) == ['chat', 'plays']
    path.write_text('\n'.join(json.dumps(r) for r in records + [{'text': '', 'source': 'empty'}]) + '\n')
    assert prepare_data.main([str(path), '--tokenizer=bytes', f'--out_root={tmp_path}', '--name=r2', '--route=source',
                              '--val_fraction=0.25']) == 0
    assert json.load(open(tmp_path / 'r2' / 'meta.json'))['routes'] == ['chat', 'plays']  # (no document: no route)
    assert routed_urls(url, meta, 'data/r') == url
    for teacher, message in [({'chat': url}, "route 'plays'.*have no teacher"),
                             ({'chat': url, 'plays': url, 'play': url}, "'play'.*did you mean 'plays'")]:
        with pytest.raises(ConfigError, match=message):
            routed_urls(teacher, meta, 'data/r')
    with pytest.raises(ConfigError, match='--route=FIELD'):
        routed_urls({'chat': url}, {}, 'data/r')
    with pytest.raises(ConfigError, match='each a URL'):
        check_served({'chat': url, 'plays': 'teacher.gguf'}, None, (0.5, 0.5, 0), 'fkl', 1.0, (0, 1, 1),
                     'pretrained', None, False)
    path.write_text('\n'.join(json.dumps(r) for r in records[:3] + [{'text': 'no route here'}]) + '\n')
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'prepare_data.py'), str(path), '--tokenizer=bytes',
                          f'--out_root={tmp_path}', '--name=bad', '--route=source'], capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.strip() == \
        f"error: {path}:4: no 'source' field naming the record's teacher (--route=source): give every record one " \
        '(a name), or drop --route'
    assert not (tmp_path / 'bad').exists()

def test_a_run_with_two_served_teachers(tmp_path, bytes_tok):
    """distill.py with teacher={route: URL}: every window is scored by its route's server alone; the run records its
    teachers, and a resume with others is refused in one line."""
    import prepare_data
    from conftest import save_tiny_model
    records = [{'text': 'the quick brown fox ' * (2 + i % 3), 'source': 'chat'} for i in range(30)] + \
              [{'text': 'TO BE OR NOT TO BE ' * (2 + i % 3), 'source': 'plays'} for i in range(30)]
    (tmp_path / 'in.jsonl').write_text('\n'.join(json.dumps(r) for r in records) + '\n')
    assert prepare_data.main([str(tmp_path / 'in.jsonl'), '--tokenizer=bytes', f'--out_root={tmp_path / "data"}',
                              '--name=routed', '--route=source', '--val_fraction=0.2']) == 0
    save_tiny_model(tmp_path / 'student', vocab=280, hidden=16, layers=2, heads=2, seed=1)
    stubs = [Stub(model_logprobs(tiny_model(vocab=BYTES_VOCAB, seed=s).eval(), BYTES_VOCAB),
                  lambda text: [int(i) for i in encode(bytes_tok, text)[0]], name=f'teacher/{s}') for s in (3, 4)]
    try:
        teachers = {'chat': stubs[0].url, 'plays': stubs[1].url}
        args = ['--dataset=routed', '--student=student', '--block_size=32', '--batch_size=4', '--max_iters=2',
                '--eval_interval=1', '--eval_docs=4', '--dtype=float32', '--device=cpu', '--temperature=1',
                '--teacher_topk=4', '--pack=False']
        done = run(tmp_path, *args, f'--teacher={teachers!r}', '--out_dir=out')
        assert done.returncode == 0, done.stderr
        assert f"chat: {stubs[0].url} ('teacher/3')" in done.stdout
        text = lambda ids: bytes(i for i in ids if i < 256)
        assert stubs[0].prompts and not any(text(p).upper() == text(p) for p in stubs[0].prompts)  # (never a play's)
        assert stubs[1].prompts and all(text(p).upper() == text(p) for p in stubs[1].prompts)
        swapped = run(tmp_path, *args, f"--teacher={{'chat': '{stubs[1].url}', 'plays': '{stubs[0].url}'}}",
                      '--out_dir=out', '--init_from=resume', '--max_iters=3')
        assert swapped.returncode == 2 and swapped.stderr.startswith('error: teacher was ') \
            and 'that is another run' in swapped.stderr and len(swapped.stderr.strip().splitlines()) == 1, swapped.stderr
    finally:
        for s in stubs:
            s.close()
