"""Packed rows (data.pack_rows, distill.py pack=True): several windows to a row, each attending only to itself, give the
unpacked batch's losses, gradients and teacher outputs; the teacher cache's rows and the cross-tokenizer pairs move
with their positions; a model that does not keep packed windows apart is found by the probe (models.packs)."""
import json
import numpy as np
import pytest, torch
from conftest import online, tiny_model
from kd import data, models
from kd.data import Align, Batch, TopK
from kd.cross import CrossTeacher
from distill import Divergence, LayerMap, Trainable
from test_distill import assert_same_run, run, train_log, work  # noqa: F401 (the shared fixture)

def windows_batch(lengths, vocab, seed=0, block_size=64, cross=False):
    """An unpacked Batch of documents of the given lengths from a split held in memory: a prompt (unsupervised)
    then a reply; with cross, a teacher row of other tokens (1-3 per student token) paired at the ends of its
    supervised student tokens, as prepare_data.py's alignment pairs them."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, sum(lengths))
    idx = np.concatenate([[0], np.cumsum(lengths)])
    mask = np.zeros(len(tokens), np.uint8)
    for a, n in zip(idx[:-1], lengths):
        mask[a + rng.integers(1, n // 2 + 1):a + n] = 1
    split = {'tokens': tokens, 'mask': mask, 'idx': idx, 'bos': None}
    b = data.make_batch(split, [(d, 0) for d in range(len(lengths))], block_size, vocab - 1, 'cpu')
    if not cross:
        return b
    rows, pairs = [], []
    for i in range(len(lengths)):
        per = rng.integers(1, 4, b.X.shape[1])  # teacher tokens per student token
        rows.append(torch.from_numpy(rng.integers(0, vocab, int(per[:lengths[i] - 1].sum()))))
        ends = np.cumsum(per) - 1
        pairs += [(i, s, ends[s]) for s in range(lengths[i] - 1) if b.M[i, s] and rng.random() < 0.6]
    XT = torch.full((len(rows), max(map(len, rows))), vocab - 1, dtype=torch.long)
    for i, r in enumerate(rows):
        XT[i, :len(r)] = r
    bb, s, t = torch.tensor(pairs).T
    return b._replace(align=Align(XT, bb, s, t))

def losses(model, teacher, batch, chunk):
    """The loss's sums and the student's gradients (CE + JSD + hidden states at two layer pairs), and the teacher's
    outputs the loss read."""
    model.zero_grad()
    t_out = (online(model, teacher) if batch.align.XT is None else CrossTeacher(online(model, teacher)))(batch)
    out = model(batch, t_out)
    out.loss.backward()
    keep = batch.M.bool()
    t_final = None if model.w_kd == 0 else t_out.logits.h[keep]  # (chunk: the final hidden states, else the logits)
    t_hidden = [h[batch.align.b, batch.align.t] for h in t_out.hidden]
    return out, [p.grad.clone() for p in model.parameters()], t_final, t_hidden

@pytest.mark.parametrize('arch,chunk,cross', [('llama', 16, False), ('qwen2', 16, False), ('gpt2', 16, False),
                                               ('llama', 0, False), ('llama', 16, True), ('gpt2', 0, True)])
def test_packed_rows_give_the_unpacked_losses(arch, chunk, cross):
    """fp32: the sums of CE, D and H, every gradient and the teacher's final and mapped hidden states at the
    supervised (aligned) positions equal the unpacked batch's to 1e-5 relative; the packed batch has fewer rows.
    Without use_cache=False in the forwards (HF keeps a KV cache by default, and then ignores the packing) or
    without the position ids, the windows would see each other and this fails."""
    lengths = [37, 9, 20, 5, 30, 12, 3, 25]
    vocab = 120
    unpacked = windows_batch(lengths, vocab, cross=cross)
    packed = data.pack_rows(unpacked, 64, vocab - 1)
    assert len(packed.X) < len(unpacked.X) and packed.pos is not None and packed.M.sum() == unpacked.M.sum()
    teacher = tiny_model(arch, vocab=vocab, hidden=32, layers=3, seed=7).eval().requires_grad_(False)
    student = tiny_model(arch, vocab=vocab, hidden=16, layers=2, heads=2, seed=8)
    for m in (teacher, student):
        if hasattr(m.config, 'resid_pdrop'):  # (GPT-2's dropout off: the same function both ways)
            m.config.resid_pdrop = m.config.embd_pdrop = m.config.attn_pdrop = 0.0
            m.apply(lambda x: setattr(x, 'p', 0.0) if isinstance(x, torch.nn.Dropout) else None)
    weights = (0.4, 0.0 if cross else 0.6, 1.0)  # (logits need one tokenizer)
    model = Trainable(student, vocab, weights, Divergence('jsd', 2.0, 0.5), chunk, LayerMap([(1, 1), (2, 3)], 16, 32))
    a, grads_a, final_a, hidden_a = losses(model, teacher, unpacked, chunk)
    b, grads_b, final_b, hidden_b = losses(model, teacher, packed, chunk)
    close = lambda x, y: torch.allclose(x, y, rtol=1e-5, atol=1e-5 * y.abs().max().item())
    for x, y in zip((b.ce, b.kd, b.hidden), (a.ce, a.kd, a.hidden)):
        assert x.item() == pytest.approx(y.item(), rel=1e-5)
    assert all(close(x, y) for x, y in zip(grads_b, grads_a))
    if not cross:  # (the same positions in another order: compared by their sums over positions)
        assert close(final_b.sum(0), final_a.sum(0)) and close(final_b.abs().sum(0), final_a.abs().sum(0))
    assert all(close(x.sum(0), y.sum(0)) for x, y in zip(hidden_b, hidden_a))

def test_packing_moves_every_position_with_its_row():
    """Each packed position holds what its unpacked row held (X, Y, M, the cache's top-k, the aligned pairs and both
    sides' tokens), and its position id is its column in that row; a window's rows stay whole and in one packed row,
    no packed row is longer than block_size; a batch where no two rows fit in one comes back unchanged."""
    lengths = [37, 9, 20, 5, 30, 12, 3, 25]
    unpacked = windows_batch(lengths, 120, seed=3, cross=True)
    k = 4
    g = torch.Generator().manual_seed(0)
    topk = TopK(torch.randint(0, 120, (*unpacked.M.shape, k), generator=g), torch.randn(*unpacked.M.shape, k, generator=g),
                torch.randn(*unpacked.M.shape, generator=g), torch.randn(*unpacked.M.shape, 1, generator=g))
    unpacked = unpacked._replace(topk=topk)
    packed = data.pack_rows(unpacked, 64, 119, teacher_pad_id=118)
    assert packed.X.shape[1] <= 64 and len(packed.X) == 3  # (133 positions kept, up to each last target: 3 rows)
    (b0, s0, t0), (b1, s1, t1) = unpacked.align[1:], packed.align[1:]
    assert len(b1) == len(b0)
    for i in range(len(b0)):
        r, c, tc = b1[i], s1[i], t1[i]
        assert packed.X[r, c] == unpacked.X[b0[i], s0[i]] and packed.Y[r, c] == unpacked.Y[b0[i], s0[i]]
        assert packed.M[r, c] == 1 and packed.pos[r, c] == s0[i] and packed.teacher_pos[r, tc] == t0[i]
        assert packed.align.XT[r, tc] == unpacked.align.XT[b0[i], t0[i]]
        for x, y in zip((packed.topk.ids, packed.topk.logp, packed.topk.tail, packed.topk.logw),
                        (topk.ids, topk.logp, topk.tail, topk.logw)):
            assert torch.equal(x[r, c], y[b0[i], s0[i]])
        # the whole window up to this position came along, counting from 0: the model sees what it saw unpacked
        start = c - s0[i]
        assert torch.equal(packed.X[r, start:c + 1], unpacked.X[b0[i], :s0[i] + 1])
        assert torch.equal(packed.pos[r, start:c + 1], torch.arange(s0[i] + 1))
    assert packed.M.sum() == unpacked.M.sum()
    exact = data.pack_rows(unpacked._replace(topk=TopK(topk.ids, topk.logp, topk.tail, topk.logw[..., :0])), 64, 119)
    assert exact.topk.logw.shape == (*exact.M.shape, 0)  # a cache without draws (m = 0) packs too
    wide = windows_batch([60, 50, 40], 120, seed=4)
    assert data.pack_rows(wide, 64, 119) is wide

def test_the_probe_finds_a_model_that_does_not_keep_windows_apart():
    """models.packs: True for Llama, Qwen2 and GPT-2 as transformers builds them (with the KV cache off); False for
    one that drops the position ids, and for HF's own forward with its default KV cache (which skips the packed mask)."""
    probe = torch.arange(1, 17)[None]
    assert all(models.packs(tiny_model(a, vocab=40, hidden=16, layers=1, heads=2), probe) for a in ('llama', 'qwen2', 'gpt2'))

    class Wrapped(torch.nn.Module):
        def __init__(self, call):
            super().__init__()
            self.call = call

        def base_model(self, input_ids, position_ids=None, use_cache=None):
            return self.call(input_ids, position_ids)
    inner = tiny_model('llama', vocab=40, hidden=16, layers=1, heads=2)
    assert models.packs(Wrapped(lambda x, pos: inner.base_model(input_ids=x, position_ids=pos, use_cache=False)), probe)
    assert not models.packs(Wrapped(lambda x, pos: inner.base_model(input_ids=x, use_cache=False)), probe)
    assert not models.packs(Wrapped(lambda x, pos: inner.base_model(input_ids=x, position_ids=pos, use_cache=True)), probe)

@pytest.mark.parametrize('overrides', [('--hidden_weight=1.0', '--layer_map=last'), ('--on_policy=0.5', '--kd_kind=rkl')])
def test_a_packed_run_is_the_unpacked_run(work, overrides):
    """distill.py with pack=True (the default) and pack=False: the same losses, gradient norms, validation losses and
    weights (fp32, to round-off), logits + hidden states or half on-policy; and the packed run computes fewer
    positions (its tokens per step, padding included, are fewer)."""
    common = ('--batch_size=6', '--gradient_accumulation_steps=2', '--max_iters=3', '--eval_interval=3', *overrides)
    run(work, work / 'packed', *common)
    run(work, work / 'unpacked', *common, '--pack=False')
    assert_same_run(work / 'packed', work / 'unpacked', tol=1e-5)
    val = lambda out: [r for r in map(json.loads, open(out / 'log.jsonl')) if 'val_ce' in r]
    for a, b in zip(val(work / 'packed'), val(work / 'unpacked')):
        assert a['val_ce'] == pytest.approx(b['val_ce'], rel=1e-5) and a['val_kd'] == pytest.approx(b['val_kd'], rel=1e-5)
    positions = lambda out: sum(r['tokens_per_s'] * r['ms'] for r in train_log(out))
    assert positions(work / 'packed') < positions(work / 'unpacked')
