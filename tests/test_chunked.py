"""The chunked loss path equals the plain one (values and gradients, fp32), for every kind, with masks,
padded vocabularies and chunk sizes that do not divide the number of positions; also in real DDP runs."""
import pytest, torch
from conftest import BYTES_VOCAB, online, tiny_model
from functools import partial
import distill
from distill import KD_KINDS, Divergence, Trainable, loss_sums
from kd.chunked import ChunkedHeadLoss, HeadLoss, auto_chunk, chunk_loss
from kd.teacher import Logits
from test_losses import tiny_batch
from test_distill import assert_same_run, run, work  # noqa: F401 (the shared fixture)

def close(a, b, rel=1e-5):
    return torch.allclose(a, b, rtol=rel, atol=rel * b.abs().max().item())

def bound(kind, temperature, beta, vocab):
    """loss_sums bound to a divergence and the first vocab tokens, and the closed form chunk_loss may take for it,
    as Trainable binds them."""
    d = Divergence(kind, temperature, beta)
    return partial(loss_sums, divergence=d, compared=slice(0, vocab)), (temperature, vocab) if d.closed_form() else None

def sums(z, y, zt, vocab, kind='fkl', temperature=1.0, beta=0.5):
    """loss_sums of a teacher's logits over all its rows (those past vocab are padding, never compared)."""
    return loss_sums(z, y, zt[:, :vocab], Divergence(kind, temperature, beta), slice(0, vocab))

def one_chunk(z, y, zt, vocab, coef, kind, temperature, beta=0.5, rows=8):
    f, closed = bound(kind, temperature, beta, vocab)
    return chunk_loss(z, y, zt[:, :vocab], f, coef, closed_form=closed, rows=rows)

def chunked(h, W, Y, t_h, t_W, coef, vocab, kind, temperature, beta, chunk):
    """ChunkedHeadLoss with the teacher's logits t_h @ t_W.T made a chunk at a time (t_h None: CE alone)."""
    f, closed = bound(kind, temperature, beta, vocab)
    teacher = None if t_h is None else Logits(t_h, t_W, lambda z: z[:, :vocab])
    return ChunkedHeadLoss.apply(h, W, HeadLoss(Y, teacher, f, coef, chunk, None, closed))

@pytest.mark.parametrize('kind', KD_KINDS)
@pytest.mark.parametrize('beta', [0.0, 0.3, 1.0])
@pytest.mark.parametrize('temperature', [1.0, 2.5])
def test_chunk_gradient(kind, beta, temperature):
    """One chunk's sums and gradient (forward KL's closed form, autograd for the rest) vs float64 autograd through
    loss_sums, padded vocabulary rows included."""
    torch.manual_seed(2)
    z, zt, y = torch.randn(6, 40) * 3, torch.randn(6, 44) * 3, torch.randint(0, 36, (6,))
    z64 = z.double().requires_grad_()
    ce64, kd64 = sums(z64, y, zt.double(), 36, kind, temperature, beta)
    (0.3 * ce64 + 1.7 * kd64).backward()
    ce, kd, dz = one_chunk(z, y, zt, 36, (0.3, 1.7), kind, temperature, beta)
    assert ce.item() == pytest.approx(ce64.item(), rel=1e-6) and kd.item() == pytest.approx(kd64.item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(dz.double(), z64.grad, rtol=1e-4, atol=1e-6)

def test_forward_kl_closed_form_with_masked_teacher_tokens():
    """A teacher with -inf logits (masked tokens, or a student token no teacher token is carried onto): forward KL's
    closed form gives the float64 reference's value and gradient, not NaN (0 * -inf)."""
    torch.manual_seed(4)
    z, zt, y = torch.randn(5, 20) * 2, torch.randn(5, 20) * 2, torch.randint(0, 20, (5,))
    zt[:, [3, 7]] = -float('inf')
    z64 = z.double().requires_grad_()
    ce64, kd64 = sums(z64, y, zt.double(), 20, 'fkl', 2.0)
    (0.5 * ce64 + 1.5 * kd64).backward()
    ce, kd, dz = one_chunk(z, y, zt, 20, (0.5, 1.5), 'fkl', 2.0, 0.5)
    assert torch.isfinite(kd) and kd.item() == pytest.approx(kd64.item(), rel=1e-5)
    assert torch.allclose(dz.double(), z64.grad, rtol=1e-4, atol=1e-6)

@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float64])
def test_forward_kl_closed_form_over_row_blocks(dtype):
    """The closed form runs a few rows at a time: 37 rows (blocks of 16 and a last one of 5), unlabeled rows
    (y = -100: CE skips them, the divergence does not), padded rows on both sides; logits in the compute dtype give
    the gradient in that dtype, the sums computed in fp32 (fp64 for fp64) from those logits: against float64
    autograd through loss_sums on the same values."""
    torch.manual_seed(5)
    z, zt = (torch.randn(37, 40) * 3).to(dtype), (torch.randn(37, 44) * 3).to(dtype)
    y = torch.randint(0, 36, (37,))
    y[[0, 9, 16, 30]] = -100
    z64 = z.double().requires_grad_()
    ce64, kd64 = sums(z64, y, zt.double(), 36, 'fkl', 2.5)
    (0.3 * ce64 + 1.7 * kd64).backward()
    ce, kd, dz = one_chunk(z, y, zt, 36, (0.3, 1.7), 'fkl', 2.5, 0.5, rows=16)
    assert dz.dtype == dtype and ce.dtype == kd.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert ce.item() == pytest.approx(ce64.item(), rel=1e-6) and kd.item() == pytest.approx(kd64.item(), rel=1e-5)
    rel = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 8e-3}[dtype]  # (bf16: the gradient's rounding)
    assert torch.allclose(dz.double(), z64.grad, rtol=rel, atol=rel * z64.grad.abs().max().item())

def test_an_edited_divergence_entry_is_what_the_chunked_loss_takes(monkeypatch):
    """A fork that replaces DIVERGENCES['fkl'] gets what it wrote on the default (chunked) path too, value and
    gradient: here reverse KL's terms under the name 'fkl', against float64 autograd through loss_sums with 'rkl'."""
    torch.manual_seed(3)
    h, W = torch.randn(12, 8, requires_grad=True), (torch.randn(30, 8) * 0.5).requires_grad_()
    t_h, t_W, Y = torch.randn(12, 8), torch.randn(30, 8), torch.randint(0, 30, (12,))

    def run_chunked(kind):
        ce, kd = chunked(h, W, Y, t_h, t_W, (0.5, 2.0), 30, kind, 2.0, 0.5, 5)
        (0.5 * ce + 2.0 * kd).backward()
        grads = h.grad.clone(), W.grad.clone()
        h.grad = W.grad = None
        return kd, grads
    h64, W64 = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    ce64, kd64 = sums(h64 @ W64.T, Y, t_h.double() @ t_W.double().T, 30, 'rkl', 2.0)
    (0.5 * ce64 + 2.0 * kd64).backward()
    shipped, _ = run_chunked('fkl')
    monkeypatch.setitem(distill.DIVERGENCES, 'fkl', distill.DIVERGENCES['rkl'])
    edited, (dh, dW) = run_chunked('fkl')
    assert edited.item() == pytest.approx(kd64.item(), rel=1e-5) and abs(edited.item() - shipped.item()) > 1e-2
    assert close(dh.double(), h64.grad, 1e-4) and close(dW.double(), W64.grad, 1e-4)

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
    ce, kd = sums(h @ W.T, Y, t_h @ t_W.T, vocab, kind, 2.0, 0.3)
    (w_ce * ce + w_kd * kd).backward()
    grads = h.grad.clone(), W.grad.clone()
    h.grad = W.grad = None
    ce_c, kd_c = chunked(h, W, Y, t_h, t_W, (w_ce, w_kd), vocab, kind, 2.0, 0.3, chunk)
    (w_ce * ce_c + w_kd * kd_c).backward()
    assert close(ce_c, ce) and close(kd_c, kd)
    assert close(h.grad, grads[0]) and close(W.grad, grads[1])
    # the upstream gradient scales the replayed one (1/N, world size, the fp16 loss scale)
    h.grad = W.grad = None
    ce_c, kd_c = chunked(h, W, Y, t_h, t_W, (w_ce, w_kd), vocab, kind, 2.0, 0.3, chunk)
    (0.25 * (w_ce * ce_c + w_kd * kd_c)).backward()
    assert close(h.grad, 0.25 * grads[0]) and close(W.grad, 0.25 * grads[1])
    # a loss that weighs the outputs otherwise than the gradient computed in forward is refused, never silently wrong
    ce_c, kd_c = chunked(h, W, Y, t_h, t_W, (w_ce, w_kd), vocab, kind, 2.0, 0.3, chunk)
    with pytest.raises(RuntimeError, match='weighs its outputs otherwise'):
        (w_ce * ce_c + 2 * w_kd * kd_c).backward()

def test_chunked_ce_only():
    torch.manual_seed(1)
    h, W, Y = torch.randn(9, 4, requires_grad=True), torch.randn(20, 4, requires_grad=True), torch.randint(0, 20, (9,))
    ce, kd = chunked(h, W, Y, None, None, (1.0, 0.0), 20, 'fkl', 1.0, 0.5, 4)
    ref = torch.nn.functional.cross_entropy(h @ W.T, Y, reduction='sum')
    assert close(ce, ref) and kd == 0
    ce.backward()
    grads = h.grad, W.grad
    h.grad = W.grad = None
    ref.backward()
    assert close(grads[0], h.grad) and close(grads[1], W.grad)

@pytest.mark.parametrize('kind', ['fkl', 'jsd', 'tvd'])
def test_trainable_chunked_equals_plain_with_masks(kind):
    """The whole student forward: the same sums, loss and parameter gradients, prompt and padding masked out."""
    teacher = tiny_model(vocab=300, hidden=24, layers=2, seed=3).eval()
    batch = tiny_batch(rows=3, length=11, vocab=BYTES_VOCAB, seed=4)
    results = []
    for chunk in (0, 4):
        student = tiny_model(vocab=280, hidden=16, layers=2, heads=2, seed=5)  # untied head, padded rows
        model = Trainable(student, BYTES_VOCAB, (0.5, 0.5, 0.0), Divergence(kind, 2.0, 0.4), chunk)
        t_out = online(model, teacher)(batch)
        assert (t_out.logits.head is not None) == bool(chunk) and t_out.logits.h.shape[-1] == (24 if chunk else 300)
        with torch.no_grad():  # evaluation: values only (no gradient work), the same ones
            values = model(batch, t_out, n_targets=5.0)
        out = model(batch, t_out, n_targets=5.0)
        assert all(close(a, b, rel=1e-4) for a, b in zip(values, out))  # (loss_sums vs forward KL's closed form:
        # two fp32 formulations of a divergence of 0.04, within 1e-5 of float64 each: see test_chunk_gradient)
        out.loss.backward()
        results.append((out, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    (o0, g0), (o1, g1) = results
    assert all(close(a, b, rel=1e-4) for a, b in zip(o1, o0))
    assert g0.keys() == g1.keys() and all(close(g1[k], g0[k]) for k in g0)

def test_chunked_ddp_and_split_invariance(work):
    """Real runs: chunked 2 ranks x 2 micro-batches == plain 1 process x 4 micro-batches == chunked 1 x 4."""
    common = ['--batch_size=1', '--gradient_accumulation_steps=4', '--max_iters=2', '--kd_kind=jsd']
    run(work, work / 'plain', *common, '--loss_chunk=0')
    run(work, work / 'chunk2', *common, '--loss_chunk=7', nproc=2)
    run(work, work / 'chunk1', '--batch_size=4', '--gradient_accumulation_steps=1', '--max_iters=2', '--kd_kind=jsd', '--loss_chunk=5')
    assert_same_run(work / 'plain', work / 'chunk2')
    assert_same_run(work / 'plain', work / 'chunk1')

def test_auto_chunk_rule():
    """loss_chunk='auto': 1,024 positions in 16-bit compute; in fp32 the most, a power of two from 256 to 1,024,
    whose logits fit 2^26 elements."""
    for V in (259, 32000, 49152, 50257, 100352, 128256, 151936, 256000):
        assert auto_chunk(V, 'bfloat16') == auto_chunk(V, 'float16') == 1024
        c = auto_chunk(V, 'float32')
        assert c in (256, 512, 1024) and (c == 256 or c * V <= 2 ** 26) and (c == 1024 or 2 * c * V > 2 ** 26), (V, c)
    assert [auto_chunk(V, 'float32') for V in (49152, 100352, 151936)] == [1024, 512, 256]

def test_chunked_second_backward_raises():
    """backward scales its saved gradients in place (no extra V x d buffer): a second backward through the same
    graph must fail loudly, never return doubly scaled gradients."""
    torch.manual_seed(3)
    h, W, Y = torch.randn(7, 4, requires_grad=True), torch.randn(12, 4, requires_grad=True), torch.randint(0, 12, (7,))
    ce, kd = chunked(h, W, Y, torch.randn(7, 3), torch.randn(12, 3), (0.5, 2.0), 12, 'fkl', 2.0, 0.5, 3)
    loss = 0.5 * ce + 2.0 * kd
    (loss * 0.5).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match='inplace'):
        loss.backward()
