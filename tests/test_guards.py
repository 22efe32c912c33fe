"""The third review's findings (issue 43) held by tests: on-policy's share, draws and stop token, its mixture of
sources, the data a resume reads, the guards that keep the last good checkpoint, and an earlier run's files."""
import json, math, os, shutil
import numpy as np
import pytest, torch
import transformers as T
from conftest import BYTES_VOCAB, online, tiny_model, tiny_work
from test_distill import run, train_log, weights
from test_decode import replay
from test_on_policy import reference_loss, sampled
import distill, prepare_data
from kd import checkpoint, sampling
from kd.configurator import ConfigError

@pytest.fixture(scope='module')
def chat(tmp_path_factory):
    recs = [{'question': f'what is {i} plus {i}?', 'answer': f'{2 * i}, I think.'} for i in range(60)]
    return tiny_work(tmp_path_factory.mktemp('guards'), recs)

COMMON = ('--dataset=tiny', '--batch_size=2', '--gradient_accumulation_steps=2', '--max_new_tokens=6')

# -----------------------------------------------------------------------------
# on-policy

def test_on_policy_share_is_the_runs_not_rounded_down_per_step(chat):
    """lambda = 0.2 with 4 rows a step: the run's first n rows hold floor(0.2 n) student rows (per step, floor(0.8) = 0
    rounded every step away); the selection is the run's, so it does not depend on how the steps are cut."""
    rows = [len(sampling.on_policy_rows(first, 2, 0.2)) for first in range(0, 40, 2)]
    assert np.cumsum(rows)[1::2].tolist() == [math.floor(0.2 * 4 * (s + 1)) for s in range(10)]
    run(chat, chat / 'share', *COMMON, '--on_policy=0.2', '--max_iters=5', '--eval_interval=100')
    log = train_log(chat / 'share')
    assert [r['student_rows'] for r in log] == [0, 1, 1, 1, 1]  # rows 4, 9, 14, 19 of the run
    assert all((r['generated'] > 0) == (r['student_rows'] > 0) for r in log)

def test_sampling_ignores_the_models_generation_config(chat):
    """A student shipping a repetition penalty, min_p and no_repeat_ngram_size in its generation_config.json samples
    exactly softmax(z / T) over the real vocabulary all the same: the rows equal a plain loop's seeded draws."""
    model = tiny_model(vocab=BYTES_VOCAB + 5, hidden=16, layers=2, heads=2, seed=3).eval()
    model.generation_config = T.GenerationConfig(repetition_penalty=3.0, min_p=0.5, no_repeat_ngram_size=1,
                                                 top_k=5, temperature=0.3)
    prompts = [torch.tensor([72, 105, 33, 10]), torch.tensor([97, 98, 99, 100])]
    settings, seed = (12, 1.5, 1.0, [256]), 7
    got = sampling.generate(model, prompts, 64, settings, seed, BYTES_VOCAB, torch.device('cpu'))
    assert model.generation_config.repetition_penalty == 3.0  # (the model's own, untouched)
    want = replay(model, prompts, [12, 12], 1.5, 1.0, [256], seed, BYTES_VOCAB)  # (a full forward per token)
    assert [r.tolist() for r in got] == [r.tolist() for r in want]

def split_of(docs):
    """A split dict of (tokens, mask) documents."""
    tokens = np.concatenate([t for t, _ in docs]).astype(np.uint16)
    mask = np.concatenate([m for _, m in docs]).astype(np.uint8)
    return {'tokens': tokens, 'mask': mask, 'idx': np.cumsum([0] + [len(t) for t, _ in docs])}

def test_stop_token_is_what_ends_the_first_replies():
    """A text-heavy mix (plain text ends in EOS 256) whose replies end in <|im_end|> (258): the stop tokens are EOS
    and 258 (a vote over every supervised run picked EOS alone); where every reply was cut short (ending in a
    letter), one line instead of stopping at that letter."""
    text = [(np.array([104, 105, 106, 256]), np.array([0, 1, 1, 1]))] * 30
    chat = [(np.array([257, 113, 63, 10, 257, 97, 110, 258, 10, 257, 113, 50, 10, 257, 98, 258]),
             np.array([0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1]))] * 5
    split = split_of(text + chat)
    lengths = sampling.prompt_lengths(split)
    assert sampling.stop_tokens(split, lengths, 256, {256, 257, 258}, 'mix') == [256, 258]
    cut = split_of(text + [(np.array([257, 113, 63, 10, 97, 110, 110]), np.array([0, 0, 0, 0, 1, 1, 1]))] * 5)
    with pytest.raises(ConfigError, match='no first reply of cut ends in a special token'):
        sampling.stop_tokens(cut, sampling.prompt_lengths(cut), 256, {256, 257, 258}, 'cut')

@pytest.mark.parametrize('chunk', [16, 0])
def test_on_policy_mixture_by_rows(chat, chunk):
    """D over a batch of student rows and data rows = (R_s / R) mean over the student's tokens + (1 - R_s / R) mean
    over the data's, value and gradient against a float64 brute force, the plain path and the chunked one."""
    student = T.AutoModelForCausalLM.from_pretrained(chat / 'student').float()
    teacher = T.AutoModelForCausalLM.from_pretrained(chat / 'teacher').float().eval()
    b = sampled(chat, student, rows=(0,))[3]
    own = b.M.bool() & ~b.labeled()
    n_targets, n_student = int(b.M.sum()), int(own.sum())
    mix = distill.mixing_weights(4, 1, n_targets, n_student)
    model = distill.Trainable(student, 259, (0.0, 1.0, 0.0), distill.Divergence('fkl', 2.0, 0.5), chunk)
    out = model(b, online(model, teacher)(b), n_targets, 1, n_targets - n_student, mix)
    out.loss.backward()
    refs = []
    for keep in (own, b.M.bool() & ~own):  # each source's mean divergence, float64
        ref_student = T.AutoModelForCausalLM.from_pretrained(chat / 'student')
        part = b._replace(M=keep.long())
        refs.append((ref_student, reference_loss(ref_student, teacher, part, 'fkl', 2.0, 0.0, 1.0)))
    ref = 0.25 * refs[0][1] + 0.75 * refs[1][1]
    (0.25 * refs[0][1]).backward(), (0.75 * refs[1][1]).backward()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    by_tokens = (n_student * refs[0][1] + (n_targets - n_student) * refs[1][1]) / n_targets  # the other mixture
    assert abs(out.loss.item() - by_tokens.item()) > 1e-3 * ref.item()
    for (name, p), q, r in zip(student.named_parameters(), refs[0][0].parameters(), refs[1][0].parameters()):
        assert torch.allclose(p.grad.double(), q.grad + r.grad, rtol=1e-4, atol=1e-7), name
    assert distill.mixing_weights(4, 0, n_targets, 0) is None and distill.mixing_weights(4, 4, 9, 9) is None

# -----------------------------------------------------------------------------
# what a resume reads, and the guards that keep the last good checkpoint

GUARDED = ('--dataset=tiny', '--batch_size=2', '--gradient_accumulation_steps=2', '--eval_interval=1', '--max_iters=6')

def ckpt_iter(out):
    return json.load(open(os.path.join(out, 'ckpt', 'manifest.json')))['iter_num']

def one_line(proc, text):
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and text in err[0], proc.stderr[-2000:]

def test_resume_refuses_data_prepared_anew_under_the_same_name(chat, tmp_path):
    """The checkpoint records the data's fingerprint: the same name re-prepared from other records is refused."""
    shutil.copytree(chat / 'data', tmp_path / 'data')
    models = (f'--teacher={chat / "teacher"}', f'--student={chat / "student"}', f'--data_root={tmp_path / "data"}')
    run(tmp_path, tmp_path / 'out', *GUARDED, *models, '--stop_iter=2')
    recs = [{'question': f'what is {i} times {i}?', 'answer': f'{i * i}.'} for i in range(60)]
    with open(tmp_path / 'other.jsonl', 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in recs)
    assert prepare_data.main([str(tmp_path / 'other.jsonl'), '--tokenizer=bytes', f'--out_root={tmp_path / "data"}',
                              '--name=tiny', '--val_fraction=0.1']) == 0
    proc = run(tmp_path, tmp_path / 'out', *GUARDED, *models, '--init_from=resume', check=False)
    one_line(proc, 'changed since')
    assert ckpt_iter(tmp_path / 'out') == 2

def test_a_diverging_step_is_never_checkpointed(chat):
    """Resumed at 3 with learning_rate=3: the weights of iteration 4 are judged by their own validation CE before
    they are saved; the checkpoint of 3 stays, and resuming from it with the old rate runs on."""
    out = chat / 'diverge'
    run(chat, out, *GUARDED, '--stop_iter=3')
    before = weights(out)
    proc = run(chat, out, *GUARDED, '--init_from=resume', '--learning_rate=3', '--warmup_frac=0', check=False)
    one_line(proc, 'diverged')
    assert 'iteration 3) is intact' in proc.stderr and ckpt_iter(out) == 3
    assert all(torch.equal(before[k], v) for k, v in weights(out).items())
    run(chat, out, *GUARDED, '--init_from=resume')
    assert ckpt_iter(out) == 6

def dead_student(folder, source):
    """The student with a zero head and a zero final norm: uniform outputs, and not a gradient anywhere."""
    model = T.AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.model.norm.weight.zero_()
    model.save_pretrained(folder)
    return str(folder)

def test_a_dead_student_stops_the_run(chat):
    """Gradient 0 and CE at ln V: a failed run, said in one line, nothing exported; and weights that died after the
    run was below chance are refused at the checkpoint by their validation CE."""
    out = chat / 'dead'
    proc = run(chat, out, *GUARDED, f'--student={dead_student(chat / "dead_student", chat / "student")}',
               '--distill=none', check=False)
    one_line(proc, 'the student is dead at iteration 0')
    assert not os.path.exists(out / 'student')


def test_a_scratch_run_keeps_the_earlier_runs_files_until_its_own_checkpoint(chat):
    """init_from='scratch' in a used out_dir: the earlier run's checkpoint and log move to out_dir/earlier, whole,
    and stay there when the new run fails before a checkpoint; a new run that writes one removes them."""
    out = chat / 'used'
    run(chat, out, *GUARDED, '--max_iters=2')
    ckpt, log = weights(out), open(out / 'log.jsonl').read()
    proc = run(chat, out, *GUARDED, '--learning_rate=1e4', '--warmup_frac=0', check=False)  # dies at iteration 1
    assert proc.returncode == 2 and 'earlier run' in proc.stdout
    assert open(out / 'earlier' / 'log.jsonl').read() == log and not os.path.exists(out / 'ckpt')
    kept = checkpoint.find_checkpoint(str(out / 'earlier' / 'ckpt'))
    assert kept[1] == 2 and all(torch.equal(ckpt[k], v) for k, v in weights(out / 'earlier').items())
    proc = run(chat, out, *GUARDED, '--init_from=resume', check=False)  # (a resume says where the earlier run is)
    one_line(proc, f"an earlier run's is in {out / 'earlier'}")
    os.makedirs(out / 'ckpt.tmp')  # a failed run killed in its first save: a half-written checkpoint, no manifest
    shutil.copy(out / 'earlier' / 'ckpt' / 'model.safetensors', out / 'ckpt.tmp')
    proc = run(chat, out, *GUARDED, '--learning_rate=1e4', '--warmup_frac=0', check=False)
    assert proc.returncode == 2 and not os.path.exists(out / 'ckpt.tmp') and not os.path.exists(out / 'ckpt')
    assert open(out / 'earlier' / 'log.jsonl').read() == log
    assert checkpoint.find_checkpoint(str(out / 'earlier' / 'ckpt'))[1] == 2
    run(chat, out, *GUARDED, '--max_iters=2')
    assert not os.path.exists(out / 'earlier') and checkpoint.find_checkpoint(str(out / 'ckpt'))[1] == 2

def test_hidden_states_alone_on_the_chunked_path(chat):
    """alpha = 1 with distill='hidden': neither CE nor D is in the loss; the chunked head's backward gives the head no
    gradient (it raised, dividing by a zero weight), and the run trains the hidden-state term alone."""
    run(chat, chat / 'hidden_alone', '--dataset=tiny', '--distill=hidden', '--alpha=1', '--max_iters=2',
        '--loss_chunk=16')
    assert all(r['hidden'] > 0 and r['grad_norm'] > 0 for r in train_log(chat / 'hidden_alone'))
