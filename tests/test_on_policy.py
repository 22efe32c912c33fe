"""On-policy distillation (distill.py on_policy, sampling.py): the rows the student writes, the loss on them against
a float64 reference, seeds, resume and ranks."""
import numpy as np
import pytest, torch
import transformers as T
from conftest import BYTES_VOCAB, online, tiny_model, tiny_work
from test_distill import assert_same_run, run, train_log, weights
import distill
from kd import data, models, sampling

@pytest.fixture(scope='module')
def chat(tmp_path_factory):
    """A bytes-tokenized dataset of question/answer records only (prompts everywhere), a teacher and two students."""
    recs = [{'question': f'what is {i} plus {i}?', 'answer': f'{2 * i}, I think.'} for i in range(60)]
    return tiny_work(tmp_path_factory.mktemp('on_policy'), recs, gpt2=True)

def sampled(chat, model, rows=(1, 2), seed=0, max_new=12, temperature=1.0, top_p=1.0, B=48):
    split = data.load_split(str(chat / 'data' / 'tiny'), 'train')
    windows = data.block_windows(split, B)[[0, 5, 9, 14]]
    batch = data.make_batch(split, windows, B, 256, 'cpu')
    lengths = sampling.prompt_lengths(split)
    stops = sampling.stop_tokens(split, lengths, 256, {256, 257, 258}, 'tiny')
    out, n = sampling.sample_rows(model, batch, split, windows[:, 0], list(rows), lengths, B,
                                  (max_new, temperature, top_p, stops), seed, 256, 259)
    return split, windows, batch, out, n, lengths, stops

@pytest.mark.parametrize('arch', ['llama', 'gpt2'])
def test_rows_the_student_writes(chat, arch):
    """Each on-policy row is its document's prompt then the reply: M covers exactly the sampled tokens up to and
    including the stop (or the cut), sampled marks them there alone (no hard label) and Y holds them, the data's rows are
    untouched (the draws themselves: tests/test_decode.py); same seed, same rows."""
    model = tiny_model(arch=arch, vocab=BYTES_VOCAB, hidden=16, layers=2, heads=2, seed=3).eval()
    split, windows, batch, out, n, lengths, stops = sampled(chat, model)
    assert stops == [256] and n == int(out.M[[1, 2]].sum()) and out.X.max() < 259  # (the head's rows past 259: never)
    for i in (0, 3):  # the data's rows
        L = batch.X.shape[1]
        assert torch.equal(out.X[i, :L], batch.X[i]) and torch.equal(out.M[i, :L], batch.M[i]) and not out.M[i, L:].any()
    for i in (1, 2):
        d = windows[i, 0]
        prompt = np.asarray(split['tokens'][split['idx'][d]:split['idx'][d] + lengths[d]]).tolist()
        sup = out.M[i].nonzero().flatten().tolist()
        reply = out.X[i, len(prompt):sup[-1] + 1].tolist() + [out.Y[i, sup[-1]].item()]
        assert out.X[i, :len(prompt)].tolist() == prompt and sup == list(range(len(prompt) - 1, len(prompt) - 1 + len(reply)))
        assert out.sampled[i, sup].all() and split['mask'][split['idx'][d] + lengths[d]] == 1
        assert out.Y[i, sup[:-1]].tolist() == out.X[i, [p + 1 for p in sup[:-1]]].tolist()
        # the reply: ends at its first stop token, else at max_new_tokens (12) or the end of the block
        assert (256 not in reply[:-1]) and (reply[-1] == 256 or len(reply) == min(12, 49 - len(prompt)))
    again = sampled(chat, model)[3]
    other = sampled(chat, model, seed=1)[3]
    assert all(torch.equal(a, b) for a, b in zip(again[:3], out[:3])) and not torch.equal(other.X, out.X)

def reference_loss(student, teacher, b, kind, T, w_ce, w_kd):
    """The loss in float64, brute force: CE where Y has a label over those targets, D over every supervised target."""
    s64, t64 = (m.double() for m in (student, teacher))
    zs, zt = s64(input_ids=b.X).logits, t64(input_ids=b.X).logits
    loss, n_targets, n_labeled = 0, int(b.M.sum()), int(b.labeled().sum())
    for r, p in b.M.nonzero().tolist():
        if b.labeled()[r, p]:
            loss = loss + w_ce * -torch.log_softmax(zs[r, p], -1)[b.Y[r, p]] / n_labeled
        log_p, log_q = torch.log_softmax(zt[r, p, :259] / T, -1), torch.log_softmax(zs[r, p, :259] / T, -1)
        d = distill.DIVERGENCES[kind](log_p, log_q, 0.5).sum()
        loss = loss + w_kd * T * T * d / n_targets
    return loss

@pytest.mark.parametrize('kind,chunk', [('fkl', 16), ('fkl', 0), ('rkl', 16), ('jsd', 16)])
def test_on_policy_loss_value_and_gradient(chat, kind, chunk):
    """A batch with data rows and student-written rows: Trainable's loss and gradient equal the float64 reference,
    on the chunked path (fkl's closed form included) and the plain one."""
    student = T.AutoModelForCausalLM.from_pretrained(chat / 'student').float()
    teacher = T.AutoModelForCausalLM.from_pretrained(chat / 'teacher').float().eval()
    b = sampled(chat, student, rows=(0, 2))[3]
    assert b.sampled[b.M.bool()].any() and b.labeled()[b.M.bool()].any()
    model = distill.Trainable(student, 259, (0.4, 0.6, 0.0), distill.Divergence(kind, 2.0, 0.5), chunk)
    n_targets, n_labeled = int(b.M.sum()), int(b.labeled().sum())
    out = model(b, online(model, teacher)(b), n_targets, 1, n_labeled)
    out.loss.backward()
    ref_student = T.AutoModelForCausalLM.from_pretrained(chat / 'student')
    ref = reference_loss(ref_student, teacher, b, kind, 2.0, 0.4, 0.6)
    ref.backward()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for (name, p), q in zip(student.named_parameters(), ref_student.parameters()):
        assert torch.allclose(p.grad.double(), q.grad, rtol=1e-4, atol=1e-7), name

COMMON = ('--dataset=tiny', '--batch_size=2', '--gradient_accumulation_steps=2', '--max_new_tokens=10',
          '--eval_interval=2')

def test_on_policy_runs_say_where_time_goes_and_zero_is_off(chat):
    """lambda = 1: every row written by the student (no CE: ce 0), the log line splits the step's time; lambda = 0
    trains as a run without the setting, bit for bit."""
    proc = run(chat, chat / 'all', *COMMON, '--on_policy=1', '--max_iters=2')
    assert 'on-policy: the student writes 1 of the rows' in proc.stdout and '(sampling ' in proc.stdout
    log = train_log(chat / 'all')
    assert all(r['ce'] == 0 and r['kd'] > 0 and r['generated'] > 0 and r['sample_ms'] > 0 for r in log)
    run(chat, chat / 'zero', *COMMON, '--on_policy=0', '--max_iters=2')
    run(chat, chat / 'off', *COMMON, '--max_iters=2')
    assert [r['loss'] for r in train_log(chat / 'zero')] == [r['loss'] for r in train_log(chat / 'off')]
    assert all(torch.equal(a, b) for a, b in zip(weights(chat / 'zero').values(), weights(chat / 'off').values()))

def test_on_policy_resume_and_ranks(chat):
    """lambda = 0.5, a GPT-2 student with dropout and a Llama one: stop at 2 and resume = straight, bit for bit; 2 DDP
    ranks = 1 process with 2x accumulation (the same rows drawn, the same samples)."""
    for student in ('gpt2', 'student'):  # (decoded through its own forward, and through kd/decode.py's Decoder)
        common = (*COMMON, '--on_policy=0.5', '--max_iters=4', f'--student={chat / student}')
        run(chat, chat / f'straight-{student}', *common)
        run(chat, chat / f'split-{student}', *common, '--stop_iter=2')
        run(chat, chat / f'split-{student}', *common, '--init_from=resume')
        straight, split = train_log(chat / f'straight-{student}'), train_log(chat / f'split-{student}')
        assert [r['loss'] for r in straight] == [r['loss'] for r in split] and straight[-1]['generated'] > 0
        assert all(torch.equal(a, b) for a, b in zip(weights(chat / f'straight-{student}').values(),
                                                     weights(chat / f'split-{student}').values()))
    one = (*COMMON, '--on_policy=0.5', '--max_iters=2', '--batch_size=1', '--gradient_accumulation_steps=4')
    run(chat, chat / 'one', *one)
    run(chat, chat / 'two', *one, nproc=2)
    assert_same_run(chat / 'one', chat / 'two')
    assert [r['generated'] for r in train_log(chat / 'one')] == [r['generated'] for r in train_log(chat / 'two')]

def test_a_prompt_longer_than_the_block_is_one_line(chat):
    proc = run(chat, chat / 'long', '--dataset=tiny', '--on_policy=1', '--block_size=16', '--max_iters=1', check=False)
    assert proc.returncode == 2 and 'no room for a reply in block_size=16' in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1

def test_eval_draft_acceptance_and_own_samples(chat):
    """eval.py: draft acceptance = sum_v min(p_v, q_v) per validation target, and the own-sample reverse KL and
    teacher NLL, each against a float64 brute force over the same windows and the same seeded samples."""
    import eval as ev
    student = T.AutoModelForCausalLM.from_pretrained(chat / 'student').float().eval()
    teacher = T.AutoModelForCausalLM.from_pretrained(chat / 'teacher').float().eval()
    folder = str(chat / 'data' / 'tiny')
    got = ev.heldout(student, folder, 2, 48, 'cpu', teacher)
    split, V = data.load_split(folder, 'val'), 259
    windows = data.block_windows(split, 48)
    accept = n = 0
    for w in windows:
        b = data.make_batch(split, w[None], 48, 256, 'cpu')
        keep = b.M.bool()
        p, q = (torch.softmax(m.double()(input_ids=b.X).logits[keep][:, :V], -1) for m in (teacher, student))
        accept, n = accept + torch.minimum(p, q).sum().item(), n + keep.sum().item()
    assert got['draft_acceptance'] == pytest.approx(accept / n, rel=1e-5) and 0 < got['draft_acceptance'] < 1
    assert ev.heldout(teacher, folder, 2, 48, 'cpu', teacher)['draft_acceptance'] == pytest.approx(1.0, rel=1e-6)
    student.float(), teacher.float()
    own = ev.own_samples(student, teacher, folder, 2, 48, 10, 'cpu', 4, models.load_tokenizer('bytes'))
    lengths = sampling.prompt_lengths(split)
    stops = sampling.stop_tokens(split, lengths, 256, {256, 257, 258}, 'tiny')
    docs = [d for d in range(len(lengths)) if 1 < lengths[d] < 48][:4]
    rkl = nll = count = 0
    for k in range(0, 4, 2):
        b = data.make_batch(split, [(d, 0) for d in docs[k:k + 2]], 48, 256, 'cpu')
        b, g = sampling.sample_rows(student, b, split, docs[k:k + 2], [0, 1], lengths, 48, (10, 1.0, 1.0, stops), k, 256,
                                    259)
        for r, pos in b.M.nonzero().tolist():
            log_q = torch.log_softmax(student.double()(input_ids=b.X[r:r + 1]).logits[0, pos, :V], -1)
            log_p = torch.log_softmax(teacher.double()(input_ids=b.X[r:r + 1]).logits[0, pos, :V], -1)
            rkl, nll = rkl + (log_q.exp() * (log_q - log_p)).sum().item(), nll - log_p[b.Y[r, pos]].item()
        student.float(), teacher.float()
        count += g
    assert own['own_sample_tokens'] == count > 0
    assert own['own_sample_rkl'] == pytest.approx(rkl / count, rel=1e-4)
    assert own['own_sample_teacher_nll'] == pytest.approx(nll / count, rel=1e-5)

def test_policy_gradient_from_a_served_teacher(chat, bytes_tok):
    """kd_kind='pg' on_policy=1 against a served teacher (tests/stub_server.py): the server is asked for the sampled
    tokens' log-probabilities alone (k = 0), on rows the student wrote; a run without a served teacher or with data
    rows is refused in one line (the estimator itself: tests/test_served.py, by Monte Carlo)."""
    from stub_server import Stub, model_logprobs
    teacher = T.AutoModelForCausalLM.from_pretrained(chat / 'teacher').eval()
    stub = Stub(model_logprobs(teacher, BYTES_VOCAB), lambda text: [int(i) for i in models.encode(bytes_tok, text)[0]])
    asked = []
    score = stub.score
    stub.score = lambda ids, k: asked.append(k) or score(ids, k)
    try:
        proc = run(chat, chat / 'pg', *COMMON, '--on_policy=1', '--max_iters=2', '--kd_kind=pg', '--temperature=1',
                   f'--teacher={stub.url}')
        assert 'the log-probability of each token that came' in proc.stdout
        assert asked and set(asked) == {0}
        log = train_log(chat / 'pg')
        assert all(r['ce'] == 0 and r['generated'] > 0 and np.isfinite(r['kd']) for r in log)
        data_replies = {f'{2 * i}, I think.' for i in range(60)}
        texts = [bytes(t for t in p if t < 256).decode(errors='replace') for p in stub.prompts]
        assert any(not any(reply in t for reply in data_replies) for t in texts)  # (the student's own replies)
        for extra, message in [(('--on_policy=0.5',), 'on_policy=1'), ((f'--teacher={chat / "teacher"}', '--on_policy=1'),
                                                                      "'rkl' is exact")]:
            bad = run(chat, chat / 'bad', *COMMON, '--max_iters=1', '--kd_kind=pg', '--temperature=1',
                      f'--teacher={stub.url}', *extra, check=False)
            assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    finally:
        stub.close()
