"""Hidden-state distillation: layer maps, the losses against float64 references, projections, alignment
across tokenizers, and real runs of distill.py across architectures and tokenizers."""
import json, os
import numpy as np
import pytest, torch
from conftest import BYTES_VOCAB, tiny_model, write_jsonl, save_tiny_model
import prepare_data
from kd import models
from kd.configurator import ConfigError
from kd.data import Align, Batch
from kd.teacher import TeacherOut
from distill import LayerMap, Trainable, hidden_distance, make_layer_pairs
from test_distill import assert_same_run, run, train_log, weights, work  # noqa: F401 (the shared fixture)

def test_layer_maps():
    assert make_layer_pairs('uniform', 3, 6) == [(1, 2), (2, 4), (3, 6)]
    assert make_layer_pairs('uniform', 10, 30) == [(l, 3 * l) for l in range(1, 11)]
    assert make_layer_pairs('uniform', 4, 2) == [(1, 1), (2, 1), (3, 2), (4, 2)]  # a student deeper than its teacher
    assert make_layer_pairs('uniform', 2, 3) == [(1, 2), (2, 3)]  # 1.5 rounds up
    assert make_layer_pairs('last', 4, 30) == [(4, 30)]
    assert make_layer_pairs([(0, 0), [2, 5]], 2, 5) == [(0, 0), (2, 5)]
    # a student of teacher blocks 0, 1, 4, 5 (of 6): each output <-> the teacher's input to the next block kept
    assert make_layer_pairs('kept', 4, 6, [0, 1, 4, 5]) == [(1, 1), (2, 4), (3, 5), (4, 6)]
    assert make_layer_pairs('kept', 10, 30, list(range(0, 30, 3))) == make_layer_pairs('uniform', 10, 30)  # evenly kept
    with pytest.raises(ConfigError, match="layer_map='kept' .* student_init='teacher_layers'"):
        make_layer_pairs('kept', 2, 5)
    with pytest.raises(ConfigError, match=r'layer_map pair \(3, 1\) is out of range.*0\.\.2'):
        make_layer_pairs([(3, 1)], 2, 5)
    with pytest.raises(ConfigError, match='out of range'):
        make_layer_pairs([(1, -1)], 2, 5)
    for bad in ('middle', [(1, 2, 3)], [], [('1', 2)], 7):
        with pytest.raises(ConfigError, match="layer_map must be 'uniform', 'last', 'kept' or a list"):
            make_layer_pairs(bad, 2, 5)

def distance64(hs, ht, kind, rms):
    """One position, plain Python floats."""
    if rms:
        hs = [v / (sum(x * x for x in hs) / len(hs) + 1e-6) ** 0.5 for v in hs]
        ht = [v / (sum(x * x for x in ht) / len(ht) + 1e-6) ** 0.5 for v in ht]
    if kind == 'mse':
        return sum((a - b) ** 2 for a, b in zip(hs, ht)) / len(ht)
    dot = sum(a * b for a, b in zip(hs, ht))
    return 1 - dot / (sum(a * a for a in hs) ** 0.5 * sum(b * b for b in ht) ** 0.5)

@pytest.mark.parametrize('kind', ['mse', 'cosine'])
@pytest.mark.parametrize('rms', [False, True])
def test_hidden_distance_value_and_gradient(kind, rms):
    torch.manual_seed(0)
    hs = (torch.randn(5, 6) * 3).double().requires_grad_()
    ht = torch.randn(5, 6).double() * 7
    d = hidden_distance(hs, ht, kind, rms)
    ref = [distance64(a, b, kind, rms) for a, b in zip(hs.tolist(), ht.tolist())]
    assert torch.allclose(d, torch.tensor(ref, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    d.sum().backward()
    h = 1e-6
    for i in range(5):
        for j in range(6):
            up, down = hs.detach().tolist(), hs.detach().tolist()
            up[i][j] += h
            down[i][j] -= h
            num = (distance64(up[i], ht[i].tolist(), kind, rms) - distance64(down[i], ht[i].tolist(), kind, rms)) / (2 * h)
            assert hs.grad[i, j].item() == pytest.approx(num, rel=1e-5, abs=1e-8)
    assert hidden_distance(ht, ht.clone(), kind, rms).abs().max() < 1e-12
    if rms:  # scale-free: the guard against massive activations
        assert torch.allclose(hidden_distance(hs * 100, ht, kind, rms), d, rtol=1e-4)

def test_projections_receive_gradients_and_are_not_the_student():
    student = tiny_model(arch='gpt2', hidden=16, layers=2, heads=2)
    model = Trainable(student, BYTES_VOCAB, (1.0, 0.0, 1.0),
                      layer_map=LayerMap([(1, 1), (2, 3)], 16, 32, init='identity')).eval()  # no dropout
    assert model.proj[0].weight.shape == (32, 16) and torch.equal(model.proj[0].weight, torch.eye(32, 16))
    X = torch.randint(0, BYTES_VOCAB, (2, 7))
    M = torch.ones(2, 7, dtype=torch.long)
    b, s = M.nonzero(as_tuple=True)
    teacher_hidden = [torch.randn(2, 7, 32), torch.randn(2, 7, 32)]
    h = model(Batch(X, X, M, Align(None, b, s, s)), TeacherOut(hidden=teacher_hidden)).hidden
    model(Batch(X, X, M, Align(None, b, s, s)), TeacherOut(hidden=teacher_hidden)).loss.backward()
    assert all(p.weight.grad.abs().sum() > 0 for p in model.proj)
    assert set(k for k in model.state_dict() if k.startswith('proj.')) == {'proj.0.weight', 'proj.1.weight'}
    expected = sum(hidden_distance(model.proj[i](model.model(X, output_hidden_states=True).hidden_states[ls][b, s]),
                                   teacher_hidden[i][b, s]).sum() for i, (ls, _) in enumerate([(1, 1), (2, 3)])) / 2
    assert h.item() == pytest.approx(expected.item(), rel=1e-6)

def hidden_run(work, out, *extra, **kw):
    return run(work, out, '--distill=hidden', '--alpha=0.5', f'--student={work / "gpt2"}', *extra, **kw)

def test_cross_architecture_run_trains_projections(work):
    """Llama teacher (width 32) -> GPT-2 student (width 16): projections change, export excludes them."""
    hidden_run(work, work / 'h', '--batch_size=2', '--gradient_accumulation_steps=2', '--max_iters=6',
               '--proj_init=identity', '--learning_rate=3e-3', '--layer_map=[(1, 1), (2, 2)]')
    log = train_log(work / 'h')
    assert all(r['kd'] == 0 and r['hidden'] > 0 for r in log) and log[-1]['hidden'] < log[0]['hidden']
    w = weights(work / 'h')
    assert w['proj.0.weight'].shape == (32, 16) and not torch.equal(w['proj.0.weight'], torch.eye(32, 16))
    from safetensors.torch import load_file
    keys = set(load_file(work / 'h' / 'student' / 'model.safetensors'))
    student_keys = [k for k in w if k.startswith('model.')]  # the checkpoint: model.* and proj.*
    assert len(keys) == len(student_keys) == len(w) - 2 and not any(k.startswith('proj') for k in keys)

def test_hidden_invariance_and_ddp(work):
    common = ['--max_iters=2', '--hidden_loss=cosine', '--hidden_rms_norm=True', '--kd_weight=0.3',
              f'--student={work / "student"}']  # no dropout: split-invariance is exact
    hidden_run(work, work / 'hi1', '--batch_size=1', '--gradient_accumulation_steps=4', *common)
    hidden_run(work, work / 'hi4', '--batch_size=4', '--gradient_accumulation_steps=1', *common)
    hidden_run(work, work / 'hi2', '--batch_size=1', '--gradient_accumulation_steps=4', *common, nproc=2)
    assert_same_run(work / 'hi1', work / 'hi4')
    assert_same_run(work / 'hi1', work / 'hi2')
    assert all(r['kd'] > 0 and r['hidden'] > 0 for r in train_log(work / 'hi1'))

def test_hidden_resume_restores_projections(work):
    common = ['--batch_size=2', '--gradient_accumulation_steps=2', '--max_iters=4']
    hidden_run(work, work / 'hs', *common)
    hidden_run(work, work / 'hr', *common, '--stop_iter=2')
    hidden_run(work, work / 'hr', *common, '--init_from=resume')
    a, b = weights(work / 'hs'), weights(work / 'hr')
    assert 'proj.0.weight' in a and all(torch.equal(a[k], b[k]) for k in a)

def test_bad_layer_map_is_one_line(work):
    proc = hidden_run(work, work / 'bad', '--layer_map=[(5, 1)]', '--max_iters=1', check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        'error: layer_map pair (5, 1) is out of range: the student has hidden states 0..2, the teacher 0..2 (0 = embedding output)']

# --- alignment across tokenizers

def test_align_positions_hand_worked():
    align = prepare_data.align_positions
    # a multi-byte character: the byte-level side splits 'é' (2 bytes), the other side has it whole
    assert align([1, 2, 3], [1, 3]) == [(0, 0), (2, 1)]
    # runs of whitespace: 'a', ' ', ' b' against 'a', '  ', 'b'
    assert align([1, 2, 4], [1, 3, 4]) == [(0, 0), (2, 2)]
    # a special token, one token on one side, four pieces ('<|', 'im', '_end', '|>') on the other
    assert align([3, 13], [3, 5, 7, 11, 13]) == [(0, 0), (1, 4)]
    # an appended eos covers no text: it, not the token before it, stands for the end
    assert align([2, 5, 5], [5, 5]) == [(2, 1)]
    assert align([], [1]) == []

def test_byte_ends(bytes_tok, smol_tok):
    ids, starts, ends = models.encode(bytes_tok, 'aé<|im_end|>')
    assert ids == [97, 195, 169, 258] and list(ends) == [1, 2, 3, 13]
    ids, starts, ends = models.encode(smol_tok, 'Hi  é<|im_end|>')
    pieces = [smol_tok.decode(ids[:k + 1]).encode() for k in range(len(ids))]
    assert list(ends) == [len(p) for p in pieces] and ends[-1] == len('Hi  é<|im_end|>'.encode())

def token_bytes(tok, ids):
    """The bytes each token stands for; eos stands for none (it is appended, not text)."""
    if models.is_tiktoken(tok):
        return [b'' if i == tok.eot_token else tok.decode_single_token_bytes(i) for i in ids]
    # SmolLM2's BPE is byte-level, GPT-2 style: printable bytes stand for themselves, the others for chr(256 + n)
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    byte_of = {chr(b): b for b in printable}
    byte_of.update({chr(256 + n): b for n, b in enumerate(b for b in range(256) if b not in printable)})
    special = set(tok.all_special_ids)
    return [b'' if i == tok.eos_token_id else tok.convert_ids_to_tokens(i).encode() if i in special
            else bytes(byte_of[c] for c in tok.convert_ids_to_tokens(i)) for i in ids]

def check_alignment(tok_s, tok_t, docs):
    """Pairs are exactly the places where both token prefixes cover the same bytes (the last such token on
    each side), byte for byte."""
    for ids, mask, t_ids, pairs in docs:
        s_pref = np.cumsum([len(b) for b in token_bytes(tok_s, ids.tolist())])
        t_pref = np.cumsum([len(b) for b in token_bytes(tok_t, t_ids.tolist())])
        s_bytes, t_bytes = b''.join(token_bytes(tok_s, ids.tolist())), b''.join(token_bytes(tok_t, t_ids.tolist()))
        # where a document boundary splits a character, the teacher's token holding it belongs to neither side
        offset = s_bytes.find(t_bytes)
        assert offset >= 0 and len(s_bytes) - len(t_bytes) <= 4
        t_last = {int(e) + offset: j for j, e in enumerate(t_pref)}
        s_last = {int(e): i for i, e in enumerate(s_pref)}
        want = sorted((i, t_last[e]) for e, i in s_last.items() if e in t_last)
        assert sorted(map(tuple, pairs.tolist())) == want and len(want) > 0

def test_process_aligns_documents(bytes_tok, smol_tok):
    prepare_data.TOK, prepare_data.TEACHER_TOK = bytes_tok, smol_tok
    prepare_data.ARGS = {'format': None, 'max_length': 16, 'train_on_prompt': False, 'bos': [], 'teacher_bos': []}
    try:
        text_docs, reason, _ = prepare_data.process({'text': 'Naïve  café, über   alles.'})
        chat_docs, _, _ = prepare_data.process({'messages': [{'role': 'user', 'content': 'Çà va?'},
                                                             {'role': 'assistant', 'content': 'Très  bien'}]})
    finally:
        prepare_data.TEACHER_TOK = None
    assert reason is None and len(text_docs) == 2  # 27 bytes + eos split at 16 tokens: a document boundary
    check_alignment(bytes_tok, smol_tok, text_docs + chat_docs)
    first, second = text_docs
    # the teacher's tokens of each piece lie inside that piece's bytes (a teacher token across the split would be
    # lost, at most 4 bytes; here SmolLM2 splits 'ü' into its two bytes, whose ends are read off the tokens, so
    # nothing is); the eos pair ends the second
    student_bytes, teacher_bytes = bytes(first[0].tolist()), b''.join(token_bytes(smol_tok, first[2].tolist()))
    assert student_bytes.startswith(teacher_bytes) and 0 <= len(student_bytes) - len(teacher_bytes) <= 4
    assert tuple(second[3][-1]) == (len(second[0]) - 1, len(second[2]) - 1) and second[2][-1] == smol_tok.eos_token_id

@pytest.fixture(scope='module')
def cross(work, smol_gguf):
    """The same records, prepared for a bytes student and a SmolLM2-tokenizer teacher."""
    assert prepare_data.main([str(work / 'in.jsonl'), '--tokenizer', 'bytes', '--teacher_tokenizer', smol_gguf,
                              '--out_root', str(work / 'data'), '--name', 'cross', '--val_fraction', '0.1']) == 0
    save_tiny_model(work / 'smol_teacher', vocab=49152, hidden=32, layers=2)
    return work

def test_cross_tokenizer_run(cross, bytes_tok, smol_tok):
    meta = json.load(open(cross / 'data' / 'cross' / 'meta.json'))
    # a byte-level student aligns only where a teacher token ends: about one position in (bytes per teacher token)
    assert 0.2 < meta['splits']['train']['aligned_supervised_fraction'] < 0.5
    common = ['--dataset=cross', f'--teacher={cross / "smol_teacher"}', '--batch_size=2', '--gradient_accumulation_steps=2']
    hidden_run(cross, cross / 'xt', *common, '--max_iters=4', '--learning_rate=3e-3')
    log = train_log(cross / 'xt')
    assert all(r['hidden'] > 0 and r['kd'] == 0 for r in log) and log[-1]['hidden'] < log[0]['hidden']
    # logits across the tokenizers: the divergence where both end on one byte boundary, CE alone elsewhere
    proc = run(cross, cross / 'xl', *common, '--max_iters=4', '--learning_rate=3e-3', '--distill=logits',
               f'--student={cross / "student"}')  # (a llama: no dropout, so that 2 ranks draw nothing differently)
    share = meta['splits']['train']['aligned_supervised_fraction']
    assert f'the divergence at the {share:.1%} of supervised training targets' in proc.stdout
    compared, _, counts = models.vocab_columns(bytes_tok, smol_tok, BYTES_VOCAB, 49152)
    assert counts['same'] == 238 and len(compared) == 238  # SmolLM2 has 235 of the 256 bytes, and the 3 specials
    assert (f"teacher's tokens go to the student's {counts['same']:,} of the same bytes, {counts['prefix']:,} to the "
            f"longest student token they begin with, {counts['none']:,} nowhere") in proc.stdout.replace('\n', ' ')
    assert all(r['kd'] > 0 and r['hidden'] == 0 for r in train_log(cross / 'xl'))
    val = [r for r in map(json.loads, open(cross / 'xl' / 'log.jsonl')) if 'val_kd' in r]
    assert val[-1]['val_kd'] < val[0]['val_kd'] and val[-1]['val_ce'] < val[0]['val_ce']  # (held out: the same text)
    # and under FSDP on 2 ranks (the teacher's head gathered for the carry): the same run
    run(cross, cross / 'xl_fsdp', *common, '--max_iters=4', '--learning_rate=3e-3', '--distill=logits',
        f'--student={cross / "student"}', '--parallel=fsdp', nproc=2)
    assert_same_run(cross / 'xl', cross / 'xl_fsdp')

def test_cross_tokenizer_batch_pairs(cross, bytes_tok, smol_tok):
    """make_batch hands the teacher its own tokens, and pairs equal text prefixes at supervised positions."""
    from distill import load_split, make_batch
    split = load_split(str(cross / 'data' / 'cross'), 'train')
    X, Y, M, (XT, b, s, t) = make_batch(split, [(0, 0), (1, 0), (2, 0)], 48, 2, 'cpu', teacher_pad_id=2)[:4]
    assert len(b) > 0 and (M[b, s] == 1).all()
    for bi, si, ti in zip(b.tolist(), s.tolist(), t.tolist()):
        assert bytes_tok.decode(X[bi, :si + 1].tolist()) == smol_tok.decode(XT[bi, :ti + 1].tolist())
    # windows past a document's start: the teacher starts at the last boundary both tokenizations share before the
    # student's window, so the student's text is the end of the teacher's (all of it when that boundary is aligned)
    from distill import block_windows
    windows = [w for w in block_windows(split, 16) if w[1] > 0][:8]
    X, Y, M, (XT, b, s, t) = make_batch(split, windows, 16, 2, 'cpu', teacher_pad_id=2)[:4]
    assert len(windows) == 8 and len(b) > 0 and (M[b, s] == 1).all()
    for bi, si, ti in zip(b.tolist(), s.tolist(), t.tolist()):
        student, teacher = bytes_tok.decode(X[bi, :si + 1].tolist()), smol_tok.decode(XT[bi, :ti + 1].tolist())
        assert teacher.endswith(student) and len(teacher) < len(student) + 40  # (a few teacher tokens before it)
