"""The chunked loss path equals the plain one (values and gradients, fp32), for every kind, with masks,
padded vocabularies and chunk sizes that do not divide the number of positions; also in real DDP runs."""
import pytest, torch
from conftest import BYTES_VOCAB, tiny_model
from distill import KD_KINDS, ChunkedHeadLoss, Trainable, kd_divergence, kd_divergence_grad, loss_sums
from test_distill import assert_same_run, run, work  # noqa: F401 (the shared fixture)

def close(a, b, rel=1e-5):
    return torch.allclose(a, b, rtol=rel, atol=rel * b.abs().max().item())

@pytest.mark.parametrize('kind', KD_KINDS)
@pytest.mark.parametrize('beta', [0.0, 0.3, 1.0])
@pytest.mark.parametrize('temperature', [1.0, 2.5])
def test_closed_form_gradient(kind, beta, temperature):
    """The chunked path's closed-form divergence and gradient vs float64 autograd through kd_divergence."""
    torch.manual_seed(2)
    z, zt = torch.randn(6, 40) * 3, torch.randn(6, 40) * 3
    z64 = z.double().requires_grad_()
    ref = kd_divergence(z64, zt.double(), kind, temperature, beta) + 0 * z64.sum(-1)  # skl at beta=1 is 0: no graph
    ref.sum().backward()
    d, g = kd_divergence_grad(z, zt, kind, temperature, beta)
    assert torch.allclose(d.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(g.double(), z64.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match='kd_kind'):
        kd_divergence_grad(z, zt, 'kl', temperature, beta)

@pytest.mark.parametrize('kind', KD_KINDS)
@pytest.mark.parametrize('chunk', [1, 5, 64])
def test_chunked_equals_plain(kind, chunk):
    torch.manual_seed(0)
    n, d_s, d_t, vocab = 37, 8, 6, 45
    h = torch.randn(n, d_s, requires_grad=True)
    W = (torch.randn(50, d_s) * 0.5).requires_grad_()  # 50 and 60 rows: padded past the 45 real tokens
    t_h, t_W = torch.randn(n, d_t), torch.randn(60, d_t)
    Y = torch.randint(0, vocab, (n,))
    w_ce, w_kd = 0.3, 0.7 * 4.0
    ce, kd = loss_sums((h @ W.T)[None], Y[None], torch.ones(1, n), (t_h @ t_W.T)[None], vocab, kind, 2.0, 0.3)
    (w_ce * ce + w_kd * kd).backward()
    grads = h.grad.clone(), W.grad.clone()
    h.grad = W.grad = None
    weighted, ce_c, kd_c = ChunkedHeadLoss.apply(h, W, Y, t_h, t_W, vocab, w_ce, w_kd, kind, 2.0, 0.3, chunk)
    (weighted * 1.0).backward()
    assert close(ce_c, ce) and close(kd_c, kd) and close(weighted, w_ce * ce + w_kd * kd)
    assert close(h.grad, grads[0]) and close(W.grad, grads[1])
    # the upstream gradient scales the replayed one (1/N, world size, the fp16 loss scale)
    h.grad = W.grad = None
    weighted, _, _ = ChunkedHeadLoss.apply(h, W, Y, t_h, t_W, vocab, w_ce, w_kd, kind, 2.0, 0.3, chunk)
    (weighted * 0.25).backward()
    assert close(h.grad, 0.25 * grads[0]) and close(W.grad, 0.25 * grads[1])

def test_chunked_ce_only():
    torch.manual_seed(1)
    h, W, Y = torch.randn(9, 4, requires_grad=True), torch.randn(20, 4, requires_grad=True), torch.randint(0, 20, (9,))
    weighted, ce, kd = ChunkedHeadLoss.apply(h, W, Y, None, None, 20, 1.0, 0.0, 'fkl', 1.0, 0.5, 4)
    ref = torch.nn.functional.cross_entropy(h @ W.T, Y, reduction='sum')
    assert close(ce, ref) and kd == 0 and close(weighted, ref)

@pytest.mark.parametrize('kind', ['fkl', 'jsd', 'tvd'])
def test_trainable_chunked_equals_plain_with_masks(kind):
    """The whole student forward: the same sums and parameter gradients, prompt and padding masked out."""
    teacher = tiny_model(vocab=300, hidden=24, layers=2, seed=3).eval()
    torch.manual_seed(4)
    X, Y = torch.randint(0, BYTES_VOCAB, (3, 11)), torch.randint(0, BYTES_VOCAB, (3, 11))
    M = (torch.rand(3, 11) > 0.4).long()
    with torch.no_grad():
        t_out = teacher.base_model(input_ids=X)
        t_logits = teacher(input_ids=X).logits
    results = []
    for chunk in (0, 4):
        student = tiny_model(vocab=280, hidden=16, layers=2, heads=2, seed=5)  # untied head, padded rows
        loss = {'vocab': BYTES_VOCAB, 'weights': (0.5, 2.0), 'kind': kind, 'temperature': 2.0, 'beta': 0.4, 'chunk': chunk}
        model = Trainable(student, loss)
        teacher_in = (t_out.last_hidden_state, teacher.get_output_embeddings().weight, None) if chunk else (t_logits, None, None)
        weighted, ce, kd, _ = model(X, Y, M, teacher_in)
        weighted.backward()
        results.append((weighted.detach(), ce, kd, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    (w0, c0, k0, g0), (w1, c1, k1, g1) = results
    assert close(w1, w0) and close(c1, c0) and close(k1, k0)
    assert g0.keys() == g1.keys() and all(close(g1[k], g0[k]) for k in g0)

def test_chunked_ddp_and_split_invariance(work):
    """Real runs: chunked 2 ranks x 2 micro-batches == plain 1 process x 4 micro-batches == chunked 1 x 4."""
    common = ['--batch_size=1', '--gradient_accumulation_steps=4', '--max_iters=2', '--kd_kind=jsd']
    run(work, work / 'plain', *common, '--loss_chunk=0')
    run(work, work / 'chunk2', *common, '--loss_chunk=7', nproc=2)
    run(work, work / 'chunk1', '--batch_size=4', '--gradient_accumulation_steps=1', '--max_iters=2', '--kd_kind=jsd', '--loss_chunk=5')
    assert_same_run(work / 'plain', work / 'chunk2')
    assert_same_run(work / 'plain', work / 'chunk1')

def test_chunked_second_backward_raises():
    """backward scales its saved gradients in place (no extra V x d buffer): a second backward through the same
    graph must fail loudly, never return doubly scaled gradients."""
    torch.manual_seed(3)
    h, W, Y = torch.randn(7, 4, requires_grad=True), torch.randn(12, 4, requires_grad=True), torch.randint(0, 12, (7,))
    weighted, _, _ = ChunkedHeadLoss.apply(h, W, Y, torch.randn(7, 3), torch.randn(12, 3), 12, 0.5, 2.0, 'fkl', 2.0, 0.5, 3)
    (weighted * 0.5).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match='inplace'):
        weighted.backward()
