"""Every divergence against a brute-force float64 reference, value and gradient."""
import math
import pytest, torch
from conftest import online, tiny_model
from kd.data import Align, Batch
from kd.teacher import Logits, Teacher, TeacherOut
from distill import KD_KINDS, Divergence, LayerMap, Trainable, kd_divergence, loss_sums

def kd_loss(s, t, mask, kind='fkl', T=1.0, beta=0.5):
    """Mean over masked positions of kd_divergence: only supervised positions are computed."""
    keep = mask.bool()
    return kd_divergence(s[keep], t[keep], kind, T, beta).sum() / keep.sum().clamp(min=1)

def softmax64(z, T):
    z = [v / T for v in z]
    mx = max(z)
    e = [math.exp(v - mx) for v in z]
    return [v / sum(e) for v in e]

def kl64(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)

def mix64(a, b, w):
    return [w * x + (1 - w) * y for x, y in zip(a, b)]

def divergence64(s, t, kind, T, beta):
    """One position, plain Python floats (float64), straight from the formulas."""
    return divergence_of64(softmax64(t, T), softmax64(s, T), kind, beta)

def divergence_of64(p, q, kind, beta):
    """D(p, q) of two probability lists."""
    if kind == 'fkl' or (kind == 'jsd' and beta == 0):
        return kl64(p, q)
    if kind == 'rkl' or (kind == 'jsd' and beta == 1):
        return kl64(q, p)
    if kind == 'jsd':
        m = mix64(p, q, beta)
        return beta * kl64(p, m) + (1 - beta) * kl64(q, m)
    if kind == 'skl':
        return kl64(p, mix64(p, q, beta))
    if kind == 'srkl':
        return kl64(q, mix64(q, p, beta))
    return 0.5 * sum(abs(x - y) for x, y in zip(p, q))

def loss64(s, t, mask, kind, T, beta):
    rows = [(sr, tr) for sr, tr, m in zip(s.reshape(-1, s.shape[-1]).tolist(), t.reshape(-1, t.shape[-1]).tolist(),
                                           mask.reshape(-1).tolist()) if m]
    return sum(divergence64(sr, tr, kind, T, beta) for sr, tr in rows) / len(rows)

def numeric_grad(s, t, mask, kind, T, beta, h=1e-6):
    """Central differences of the float64 reference w.r.t. every student logit."""
    g = torch.zeros_like(s, dtype=torch.float64)
    flat = s.double().flatten()
    for i in range(flat.numel()):
        up, down = flat.clone(), flat.clone()
        up[i] += h
        down[i] -= h
        g.view(-1)[i] = (loss64(up.view_as(s), t, mask, kind, T, beta) - loss64(down.view_as(s), t, mask, kind, T, beta)) / (2 * h)
    return g

CASES = [(k, b) for k in KD_KINDS for b in ((0.5,) if k in ('fkl', 'rkl', 'tvd') else (0.0, 0.1, 0.5, 0.9, 1.0))]

@pytest.mark.parametrize('kind,beta', CASES)
@pytest.mark.parametrize('T', [1.0, 2.0])
def test_divergence_value_and_gradient(kind, beta, T):
    torch.manual_seed(0)
    s = (torch.randn(2, 3, 7) * 2).double().requires_grad_()
    t = torch.randn(2, 3, 7).double() * 2
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]])
    value = kd_loss(s, t, mask, kind, T, beta)
    assert value.item() == pytest.approx(loss64(s.detach(), t, mask, kind, T, beta), rel=1e-10, abs=1e-12)
    expected = numeric_grad(s.detach(), t, mask, kind, T, beta)
    if not value.requires_grad:  # skl / srkl at beta = 1 compare a distribution with itself
        assert expected.abs().max() < 1e-8 and value.item() == 0
        return
    value.backward()
    assert torch.allclose(s.grad, expected, rtol=1e-5, atol=1e-8)

def test_beta_ends():
    torch.manual_seed(1)
    s, t = torch.randn(5, 11), torch.randn(5, 11)
    fkl, rkl = kd_divergence(s, t, 'fkl'), kd_divergence(s, t, 'rkl')
    assert torch.allclose(kd_divergence(s, t, 'jsd', beta=0.0), fkl)  # convention: the limit of JSD / beta
    assert torch.allclose(kd_divergence(s, t, 'jsd', beta=1.0), rkl)  # ... and of JSD / (1 - beta)
    assert torch.allclose(kd_divergence(s, t, 'skl', beta=0.0), fkl, atol=1e-6)
    assert torch.allclose(kd_divergence(s, t, 'srkl', beta=0.0), rkl, atol=1e-6)
    assert kd_divergence(s, t, 'skl', beta=1.0).abs().max() < 1e-6
    assert kd_divergence(s, t, 'srkl', beta=1.0).abs().max() < 1e-6
    # just inside the ends, JSD / beta approaches the convention's value
    assert torch.allclose(kd_divergence(s.double(), t.double(), 'jsd', beta=1e-6) / 1e-6, fkl.double(), rtol=1e-3)
    assert torch.allclose(kd_divergence(s.double(), t.double(), 'jsd', beta=1 - 1e-6) / 1e-6, rkl.double(), rtol=1e-3)

@pytest.mark.parametrize('kind', KD_KINDS)
def test_zero_when_equal_and_nonnegative(kind):
    torch.manual_seed(2)
    z = torch.randn(4, 6, 13) * 3
    assert kd_divergence(z, z.clone(), kind, 2.0).abs().max() < 1e-6
    d = kd_divergence(torch.randn(4, 6, 13) * 3, z, kind, 2.0)
    assert (d >= -1e-7).all() and (d > 1e-4).all()

@pytest.mark.parametrize('kind', KD_KINDS)
def test_temperature_divides_logits(kind):
    torch.manual_seed(3)
    s, t = torch.randn(3, 9) * 4, torch.randn(3, 9) * 4
    assert torch.allclose(kd_divergence(s, t, kind, 3.0), kd_divergence(s / 3, t / 3, kind, 1.0), atol=1e-6)

def tiny_batch(rows=2, length=6, vocab=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    X, Y = torch.randint(0, vocab, (rows, length), generator=g), torch.randint(0, vocab, (rows, length), generator=g)
    M = (torch.rand(rows, length, generator=g) > 0.3).long()
    b, s = M.nonzero(as_tuple=True)
    return Batch(X, Y, M, Align(None, b, s, s))

def test_t_squared_keeps_gradient_scale():
    """Without T^2 the gradient of D shrinks like 1/T^2; with it (Trainable's loss), it stays put as T grows."""
    batch = tiny_batch()
    teacher_logits = torch.randn(2, 6, 40, generator=torch.Generator().manual_seed(4))
    norms = {}
    for T in (8.0, 16.0):
        model = Trainable(tiny_model(vocab=40, hidden=16, layers=1, seed=5), 40, (0.0, 1.0, 0.0), Divergence('fkl', T))
        model(batch, TeacherOut(logits=Logits(teacher_logits, carry=Teacher(None, 40).carry))).loss.backward()
        norms[T] = model.model.lm_head.weight.grad.norm().item()
    assert norms[16.0] / norms[8.0] == pytest.approx(1.0, rel=0.05)

@pytest.mark.parametrize('chunk', [0, 3])
def test_the_loss_weighs_each_term_once(chunk):
    """loss = (w_ce CE + w_kd T^2 D) / N + w_hidden H / N_hidden, from the sums it reports, on both loss paths."""
    batch, T, (w_ce, w_kd, w_h) = tiny_batch(seed=1), 2.0, (0.75, 0.25, 0.5)
    teacher = tiny_model(vocab=40, hidden=24, layers=2, seed=6).eval()
    model = Trainable(tiny_model(vocab=40, hidden=16, layers=1, seed=5), 40, (w_ce, w_kd, w_h), Divergence('jsd', T, 0.3),
                      chunk, LayerMap([(1, 2)], 16, 24))
    out = model(batch, online(model, teacher)(batch), n_targets=7.0, n_hidden=5.0)
    assert out.ce > 0 and out.kd > 0 and out.hidden > 0
    ce, kd, h = out.ce.item(), out.kd.item(), out.hidden.item()
    assert out.loss.item() == pytest.approx(w_ce * ce / 7 + w_kd * T ** 2 * kd / 7 + w_h * h / 5, rel=1e-6)
    ce_ref = torch.nn.functional.cross_entropy(model.model(batch.X).logits[batch.M.bool()], batch.Y[batch.M.bool()], reduction='sum')
    assert out.ce.item() == pytest.approx(ce_ref.item(), rel=1e-5)

@pytest.mark.parametrize('kind', KD_KINDS)
def test_masked_positions_change_nothing(kind):
    torch.manual_seed(6)
    s, t = torch.randn(2, 5, 8).requires_grad_(), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 0, 0]])
    base = kd_loss(s, t, mask, kind, 2.0, 0.3)
    base.backward()
    assert (s.grad[mask == 0] == 0).all()
    s2, t2 = s.detach().clone(), t.clone()
    s2[mask == 0] = 1e4 * torch.randn_like(s2[mask == 0])
    t2[mask == 0] = float('nan')
    assert kd_loss(s2, t2, mask, kind, 2.0, 0.3).item() == pytest.approx(base.item(), rel=1e-6)

@pytest.mark.parametrize('kind', KD_KINDS)
def test_minus_inf_logits_stay_finite(kind):
    s, t = torch.randn(3, 6).requires_grad_(), torch.randn(3, 6)
    t[:, 4:] = float('-inf')
    loss = kd_loss(s, t, torch.ones(3), kind, 1.0)
    if kind == 'rkl':  # KL(q || p) is truly infinite where the student puts mass on an impossible token
        assert loss.item() == float('inf')
        return
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    if kind == 'fkl':  # tokens the teacher rules out contribute nothing to KL(p || q)
        ref = kd_loss(torch.cat([s.detach()[:, :4], s.detach()[:, 4:]], 1), t, torch.ones(3), 'fkl')
        assert loss.item() == pytest.approx(ref.item())

def test_padded_vocabulary_rows_are_ignored():
    """152064 vs 151936 rows with ~151,646 real tokens, in small: only the shared real vocabulary counts."""
    torch.manual_seed(7)
    real = 10
    s, t = torch.randn(2, 3, 12), torch.randn(2, 3, 16)  # both padded past the 10 real tokens, differently
    Y, M = torch.randint(0, real, (2, 3)), torch.ones(2, 3, dtype=torch.long)
    rows = lambda z: z.flatten(0, 1)  # every position supervised
    teacher = lambda t: Logits(rows(t), carry=Teacher(None, real).carry).distribution()  # (the teacher's real tokens)
    sums = lambda t: loss_sums(rows(s), rows(Y), teacher(t), Divergence('jsd', 2.0, 0.3), slice(0, real))
    ce, kd = sums(t)
    t2 = t.clone()
    t2[..., real:] = 100.0  # junk in the padding rows
    assert sums(t2)[1].item() == pytest.approx(kd.item())
    assert kd.item() == pytest.approx(6 * kd_loss(s[..., :real], t[..., :real], M, 'jsd', 2.0, 0.3).item(), rel=1e-6)
    assert ce.item() == pytest.approx(torch.nn.functional.cross_entropy(s.flatten(0, 1), Y.flatten(), reduction='sum').item(), rel=1e-6)
