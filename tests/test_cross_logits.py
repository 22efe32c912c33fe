"""Logit distillation across tokenizers: the vocabulary map on real tokenizers against a brute force, the loss against a
float64 reference on hand-made aligned pairs (value and gradient, every divergence, plain and chunked), identical
tokenizers giving the same-tokenizer loss, and a real distill.py run."""
import numpy as np
import pytest, torch
import tiktoken
from transformers.convert_slow_tokenizer import bytes_to_unicode
import prepare_data
from kd import models
from kd.data import Align, Batch
from kd.cross import CrossTeacher
from distill import KD_KINDS, Divergence, Trainable
from conftest import online, tiny_model

TEXT = 'Grüße, Welt! naïve café — 東京 2024\n\tdone.'

def smol_bytes(tok, j):
    """A SmolLM2 token's bytes, read through transformers' own byte alphabet (not models.byte_alphabet)."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    return bytes(byte_of[c] for c in tok.convert_ids_to_tokens(j))

def brute_map(student, teacher, ids):
    """For each teacher id: the lowest student id of the same bytes, else of the longest bytes the teacher's begin
    with; -1 where none is."""
    out = []
    for j in ids:
        t = teacher[j]
        best = max(((len(s), -i) for i, s in enumerate(student) if s and t.startswith(s)), default=None) if t else None
        out.append(-1 if best is None else -best[1])
    return np.array(out)

def test_token_strings_are_the_text(smol_tok, gpt2_tok, bytes_tok):
    for tok in (smol_tok, gpt2_tok, bytes_tok):
        ids = models.encode(tok, TEXT)[0]
        strings = models.token_strings(tok, models.vocab_size(tok))
        assert b''.join(strings[i] for i in ids) == TEXT.encode()
    strings = models.token_strings(smol_tok, 49152)
    rng = np.random.default_rng(0)
    for j in rng.choice(np.arange(17, 49152), 300, replace=False).tolist():  # (ids 0-16 are special)
        assert strings[j] == smol_bytes(smol_tok, j)
    assert all(s == b'' for s in strings[:17])

@pytest.mark.parametrize('direction', ['gpt2->smol', 'smol->gpt2'])
def test_vocab_map_matches_brute_force(smol_tok, gpt2_tok, direction):
    student_tok, teacher_tok = (gpt2_tok, smol_tok) if direction == 'gpt2->smol' else (smol_tok, gpt2_tok)
    V_s, V_t = models.vocab_size(student_tok), models.vocab_size(teacher_tok)
    student = [gpt2_tok.decode_single_token_bytes(i) if i < 50256 else b'' for i in range(V_s)] \
        if student_tok is gpt2_tok else [b''] * 17 + [smol_bytes(smol_tok, i) for i in range(17, V_s)]
    teacher = [gpt2_tok.decode_single_token_bytes(i) if i < 50256 else b'' for i in range(V_t)] \
        if teacher_tok is gpt2_tok else [b''] * 17 + [smol_bytes(smol_tok, i) for i in range(17, V_t)]
    carried = models.vocab_map(student_tok, teacher_tok, V_s, V_t + 3)  # (3 rows of head padding: carried nowhere)
    ids = np.random.default_rng(1).choice(V_t, 150, replace=False)
    np.testing.assert_array_equal(carried[ids], brute_map(student, teacher, ids))
    assert (carried[V_t:] == -1).all()
    # <|endoftext|> is special in both: carried by its name
    assert carried[teacher_tok.encode('<|endoftext|>', allowed_special='all')[0] if teacher_tok is gpt2_tok else 0] == \
        (50256 if student_tok is gpt2_tok else 0)
    shared = sum(1 for j in range(V_t) if carried[j] >= 0 and teacher[j] and student[carried[j]] == teacher[j])
    assert 30_000 < shared < 45_000  # the two English byte-level BPEs share most of their tokens

def test_vocab_map_identity_and_bytes(smol_tok, bytes_tok):
    np.testing.assert_array_equal(models.vocab_map(smol_tok, smol_tok, 49152, 49152), np.arange(49152))
    strings = models.token_strings(smol_tok, 49152)
    carried = models.vocab_map(bytes_tok, smol_tok, 259, 49152)
    # a byte-level student: every teacher token goes to its first byte (the bytes encoding's id of byte b is b)
    assert all(carried[j] == strings[j][0] for j in range(49152) if strings[j])
    assert carried[[1, 2]].tolist() == [257, 258]  # <|im_start|>, <|im_end|>: the same names

# --- the loss against a float64 reference

STUDENT = [b'a', b'b', b'c', b'd', b'ab', b'cd', b'abcd', b'dab']
TEACHER = [b'a', b'b', b'c', b'd', b'ab', b'bc', b'cd', b'abc', b'bcd', b'x']
# each teacher token's student token, by hand: the same bytes, else the longest student prefix ('x': none)
BY_HAND = {'a': 'a', 'b': 'b', 'c': 'c', 'd': 'd', 'ab': 'ab', 'bc': 'b', 'cd': 'cd', 'abc': 'ab', 'bcd': 'b',
           'x': None}
DOCS = [  # (student tokens, teacher tokens) of the same text
    (['abcd', 'ab', 'c', 'd'], ['ab', 'cd', 'ab', 'cd']),  # a student token over two teacher tokens (abcd = ab + cd)
    (['ab', 'cd', 'ab', 'cd'], ['abc', 'd', 'abc', 'd']),  # ab ends inside abc: CE alone there
    (['b', 'cd', 'ab', 'd'], ['bcd', 'ab', 'd']),  # a teacher token over two student tokens (bcd = b + cd)
]

def encoding(vocab):
    return tiktoken.Encoding('hand', pat_str=models.GPT2_PATTERN, mergeable_ranks={b: i for i, b in enumerate(vocab)},
                             special_tokens={})

def hand_batch():
    """The documents as a batch: X, Y, M (every target supervised), and the aligned pairs at positions with a target:
    prepare_data.align_positions on each side's byte ends."""
    rows, teacher_rows, pairs = [], [], []
    for i, (s, t) in enumerate(DOCS):
        ids_s, ids_t = [STUDENT.index(x.encode()) for x in s], [TEACHER.index(x.encode()) for x in t]
        ends = lambda toks: np.cumsum([len(x) for x in toks])
        pairs += [(i, a, b) for a, b in prepare_data.align_positions(ends(s), ends(t)) if a < len(s) - 1]
        rows.append(ids_s)
        teacher_rows.append(ids_t)
    L, LT = max(map(len, rows)) - 1, max(map(len, teacher_rows))
    X, Y, M = (torch.zeros(len(rows), L, dtype=torch.long) for _ in range(3))
    XT = torch.zeros(len(rows), LT, dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, teacher_rows)):
        X[i, :len(r) - 1], Y[i, :len(r) - 1], M[i, :len(r) - 1] = torch.tensor(r[:-1]), torch.tensor(r[1:]), 1
        XT[i, :len(t)] = torch.tensor(t)
    b, s, t = torch.tensor(pairs).T
    return Batch(X, Y, M, Align(XT, b, s, t))

def divergence64(kind, P, Q, beta):
    kl = lambda a, b: sum(x * torch.log(x / y) for x, y in zip(a, b) if x > 0)
    mix = lambda a, b, w: [w * x + (1 - w) * y for x, y in zip(a, b)]
    return {'fkl': lambda: kl(P, Q), 'rkl': lambda: kl(Q, P),
            'jsd': lambda: beta * kl(P, mix(P, Q, beta)) + (1 - beta) * kl(Q, mix(P, Q, beta)),
            'skl': lambda: kl(P, mix(P, Q, beta)), 'srkl': lambda: kl(Q, mix(Q, P, beta)),
            'tvd': lambda: 0.5 * sum(torch.abs(x - y) for x, y in zip(P, Q))}[kind]()

def reference(zs, zt, batch, kind, T, beta, weights):
    """The loss in float64, written out: CE at every supervised target; at an aligned one also the divergence between
    the teacher's probabilities at T summed onto the student tokens BY_HAND carries them to and the student's, both
    over the student tokens that receive some (renormalised there); w_ce CE / N + w_kd T^2 D / N."""
    compared = sorted({STUDENT.index(v.encode()) for v in BY_HAND.values() if v})
    aligned = {(b, s): t for b, s, t in zip(*(x.tolist() for x in batch.align[1:]))}
    ce = kd = 0
    for b, s in batch.M.nonzero().tolist():
        ce = ce - torch.log_softmax(zs[b, s], -1)[batch.Y[b, s]]
        if (b, s) in aligned:
            p = torch.softmax(zt[b, aligned[b, s]] / T, -1)
            P = [sum(p[j] for j, x in enumerate(TEACHER) if BY_HAND[x.decode()] == STUDENT[i].decode())
                 for i in compared]
            q = torch.softmax(zs[b, s] / T, -1)
            Q = [q[i] for i in compared]
            P, Q = [x / sum(P) for x in P], [x / sum(Q) for x in Q]
            kd = kd + divergence64(kind, P, Q, beta)
    n = batch.M.sum()
    return weights[0] * ce / n + weights[1] * T ** 2 * kd / n

@pytest.mark.parametrize('kind', KD_KINDS)
@pytest.mark.parametrize('chunk', [0, 2])
def test_cross_loss_matches_float64_reference(kind, chunk):
    compared, cols, counts = models.vocab_columns(encoding(STUDENT), encoding(TEACHER), len(STUDENT), len(TEACHER))
    assert counts == {'same': 6, 'prefix': 3, 'none': 1} and compared.tolist() == [0, 1, 2, 3, 4, 5]
    batch = hand_batch()
    # aligned (student, teacher) positions with a target: (0, 1), (1, 2); (1, 1); (1, 0), (2, 1): CE alone at the rest
    assert batch.align.s.tolist() == [0, 1, 1, 1, 2] and batch.align.t.tolist() == [1, 2, 1, 0, 1]
    student = tiny_model(vocab=len(STUDENT), hidden=16, seed=3)
    teacher = tiny_model(vocab=len(TEACHER), hidden=16, seed=4)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(4)  # sharper than chance
    weights, T, beta = (0.4, 0.6, 0.0), 2.0, 0.3
    compared, cols = torch.from_numpy(compared), torch.from_numpy(cols)
    loss_fn = Trainable(student, compared, weights, Divergence(kind, T, beta), chunk)
    t_out = CrossTeacher(online(loss_fn, teacher), compared, cols, T)(batch)
    n = batch.M.sum().item()
    out = loss_fn(batch, t_out, n)
    out.loss.backward()
    got = {k: p.grad.clone() for k, p in student.named_parameters()}
    student.zero_grad()
    s64, t64 = student.double(), teacher.double()
    ref = reference(s64(input_ids=batch.X).logits, t64(input_ids=batch.align.XT).logits.detach(), batch, kind, T, beta,
                    weights)
    ref.backward()
    assert out.loss.item() == pytest.approx(ref.item(), rel=2e-5)
    for k, p in s64.named_parameters():
        torch.testing.assert_close(got[k].double(), p.grad, rtol=2e-4, atol=2e-6, msg=k)

@pytest.mark.parametrize('chunk', [0, 4])
@pytest.mark.parametrize('kind', ['fkl', 'jsd'])
def test_identical_tokenizers_give_the_same_tokenizer_loss(bytes_tok, kind, chunk):
    """The cross path with one tokenizer on both sides (the identity map, every supervised target aligned) equals
    today's same-tokenizer loss, value and gradient."""
    torch.manual_seed(0)
    X = torch.randint(0, 256, (3, 12))
    Y, M = torch.roll(X, -1, 1), (torch.rand(3, 12) < 0.7).long()
    b, s = M.nonzero(as_tuple=True)
    perm = torch.randperm(len(b))  # (the pairs in any order)
    batch = Batch(X, Y, M, Align(X, b[perm], s[perm], s[perm]))
    compared, cols, _ = models.vocab_columns(bytes_tok, bytes_tok, 259, 300)  # (the teacher's 41 padding rows: dropped)
    assert compared.tolist() == list(range(259)) and cols[:259].tolist() == list(range(259))
    assert (cols[259:] == 259).all()
    teacher = tiny_model(vocab=300, hidden=32, seed=5).double()  # (float64: two formulations, equal to rounding)
    grads, losses = [], []
    for cross in ((torch.from_numpy(compared), torch.from_numpy(cols)), None):
        student = tiny_model(vocab=280, hidden=16, seed=6).double()
        loss_fn = Trainable(student, 259 if cross is None else cross[0], (0.5, 0.5, 0.0), Divergence(kind, 2.0, 0.4), chunk)
        teacher_fn = online(loss_fn, teacher) if cross is None else CrossTeacher(online(loss_fn, teacher), *cross, 2.0)
        out = loss_fn(batch, teacher_fn(batch._replace(align=batch.align._replace(XT=X if cross else None))), M.sum().item())
        out.loss.backward()
        losses.append((out.loss.item(), out.ce.item(), out.kd.item()))
        grads.append([p.grad for p in student.parameters()])
    assert losses[0] == pytest.approx(losses[1], rel=1e-10)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
