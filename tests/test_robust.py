"""Nothing lost, one clear line: kills at every step of a checkpoint or dataset swap, the non-finite guard, the
masks of edge-case records, and the catalogue of bad inputs (each: exit code, one line on stderr, no file left)."""
import importlib.util, json, os, random, shutil, signal, subprocess, sys, time
import numpy as np
import pytest, torch
from safetensors.torch import load_file
from conftest import ROOT, save_tiny_model, tiny_model, write_jsonl
from kd import checkpoint, configurator, data, models
import eval as ev
import prepare_data as P

ENV = dict(os.environ, OMP_NUM_THREADS='1')

@pytest.fixture(scope='module')
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp('robust')
    rng = random.Random(1)
    words = 'a bird in the hand is worth two in the bush'.split()
    recs = [{'text': ' '.join(rng.choice(words) for _ in range(rng.randint(3, 20)))} for _ in range(40)]
    recs += [{'question': f'{i} + 1?', 'answer': f'{i + 1}.'} for i in range(40)]
    write_jsonl(d / 'in.jsonl', recs)
    for name, val in (('tiny', '0.1'), ('noval', '0')):
        assert P.main([str(d / 'in.jsonl'), '--tokenizer=bytes', f'--out_root={d / "data"}', f'--name={name}',
                       f'--val_fraction={val}']) == 0
    save_tiny_model(d / 'teacher', vocab=280, hidden=16, layers=2, heads=2, seed=3)
    save_tiny_model(d / 'gpt2', arch='gpt2', vocab=280, hidden=16, layers=2, heads=2, seed=2)  # dropout: RNG matters
    return d

def args(work, out, *overrides):
    return [os.path.join(ROOT, 'distill.py'), f'--data_root={work / "data"}', '--dataset=tiny', f'--out_dir={out}',
            f'--teacher={work / "teacher"}', f'--student={work / "gpt2"}', '--device=cpu', '--dtype=float32',
            '--block_size=32', '--batch_size=2', '--gradient_accumulation_steps=2', '--learning_rate=1e-2',
            '--eval_interval=1', '--eval_docs=4', '--max_iters=4', '--peak_flops=1e12', *overrides]

def run(work, out, *overrides, prefix=()):
    return subprocess.run([sys.executable, *prefix, *args(work, out, *overrides)], capture_output=True, text=True,
                          env=ENV, cwd=work)

def tree(folder):
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, ds, fs in os.walk(folder) for f in fs + ds)

def train_records(out):
    return [r for r in map(json.loads, open(os.path.join(out, 'log.jsonl'))) if 'loss' in r]

@pytest.fixture(scope='module')
def straight(work):
    proc = run(work, work / 'straight')
    assert proc.returncode == 0, proc.stderr[-2000:]
    return load_file(work / 'straight' / 'ckpt' / 'model.safetensors'), train_records(work / 'straight')

# -----------------------------------------------------------------------------
# checkpoints: every kill point of the swap, in process (exhaustive, twice in a row) and as real SIGKILLs

class Killed(BaseException):
    pass

def save_with_crash(folder, module, it, crash_at, monkeypatch):
    """save_checkpoint of module's weights at iteration it, 'killed' before its crash_at-th file operation (a file
    being written is left half-written); returns whether its manifest was in place by then."""
    from safetensors import torch as st
    count, state = [0], {'manifest': False}
    real = {'makedirs': os.makedirs, 'replace': os.replace, 'rmtree': shutil.rmtree, 'fsync': os.fsync,
            'save': torch.save, 'save_model': st.save_model, 'exchange': checkpoint.exchange}

    def hook(name):
        def op(*a, **k):
            if sys._getframe(1).f_code.co_name not in ('save_checkpoint', 'seal', 'swap_in'):
                return real[name](*a, **k)
            count[0] += 1
            if count[0] == crash_at:
                if name in ('save', 'save_model'):  # half of the file reaches the disk
                    real[name](*a, **k)
                    path = a[1]
                    with open(path, 'r+b') as f:
                        f.truncate(os.path.getsize(path) // 2)
                raise Killed(name)
            out = real[name](*a, **k)
            if name == 'replace' and str(a[1]).endswith('manifest.json'):
                state['manifest'] = True
            return out
        return op
    opt, scaler = torch.optim.SGD(module.parameters()), torch.amp.GradScaler('cpu', enabled=False)
    with monkeypatch.context() as m:
        for target, name in ((os, 'makedirs'), (os, 'replace'), (shutil, 'rmtree'), (os, 'fsync'), (torch, 'save'),
                             (st, 'save_model'), (checkpoint, 'exchange')):
            m.setattr(target, name, hook(name))
        try:
            checkpoint.save_checkpoint(folder, module, opt.state_dict(), scaler, it, it, [], {})
        except Killed:
            return state['manifest'], False
    return state['manifest'], True

def net(value):
    module = torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)
    return module

def loaded_value(path):
    return load_file(os.path.join(path, 'model.safetensors'))['weight'][0, 0].item()

@pytest.mark.parametrize('exchange', [True, False])
def test_every_crash_point_of_two_saves_keeps_the_newest_complete_checkpoint(tmp_path, monkeypatch, exchange):
    """Iteration 1 saved; a kill at any file operation of save 2, then at any of save 3 (from what the first kill
    left): the newest complete checkpoint is found with its own weights, and a clean save 4 tidies everything. With
    the atomic exchange of two folders, and without it (other systems: the old folder renamed aside first)."""
    if not exchange:
        monkeypatch.setattr(checkpoint, 'exchange', lambda a, b: False)
    n_ops = 0
    while save_with_crash(str(tmp_path / 'count'), net(0.0), 1, n_ops + 1, monkeypatch)[1] is False:
        n_ops += 1
    assert n_ops >= (9 if exchange else 10)  # makedirs, 2 files, 3 fsyncs, manifest, exchange (or 2 renames), a removal
    cases = 0
    for first in range(1, n_ops + 2):
        for second in range(1, n_ops + 4):
            ckpt = str(tmp_path / f'c{first}_{second}' / 'ckpt')
            assert save_with_crash(ckpt, net(1.0), 1, 0, monkeypatch)[1]
            newest = 1
            for it, crash in ((2, first), (3, second)):
                manifest, done = save_with_crash(ckpt, net(float(it)), it, crash, monkeypatch)
                newest = it if manifest or done else newest
                path, found, _ = checkpoint.find_checkpoint(ckpt)
                assert found == newest and loaded_value(path) == float(newest), (first, second, it)
            assert save_with_crash(ckpt, net(4.0), 4, 0, monkeypatch)[1]
            assert os.listdir(os.path.dirname(ckpt)) == ['ckpt'] and loaded_value(ckpt) == 4.0
            cases += 1
    assert cases == (n_ops + 1) * (n_ops + 3)

def test_truncated_checkpoint_falls_back_or_says_which_file(tmp_path, monkeypatch):
    ckpt = str(tmp_path / 'ckpt')
    save_with_crash(ckpt, net(1.0), 1, 0, monkeypatch)
    shutil.copytree(ckpt, str(tmp_path / 'first'))
    save_with_crash(ckpt, net(2.0), 2, 0, monkeypatch)
    shutil.copytree(str(tmp_path / 'first'), ckpt + '.tmp.old')  # as a kill before the old one's removal leaves it
    with open(os.path.join(ckpt, 'model.safetensors'), 'r+b') as f:
        f.truncate(100)
    path, it, problems = checkpoint.find_checkpoint(ckpt)
    assert (path, it) == (ckpt + '.tmp.old', 1) and 'model.safetensors has 100 bytes' in problems[0]
    shutil.rmtree(ckpt + '.tmp.old')
    with pytest.raises(configurator.ConfigError, match=r"no complete checkpoint in .*model\.safetensors has 100 bytes"):
        checkpoint.find_checkpoint(ckpt)
    save_with_crash(ckpt, net(3.0), 3, 0, monkeypatch)
    shutil.copytree(ckpt, ckpt + '.tmp')
    for path in (ckpt, ckpt + '.tmp'):
        os.remove(os.path.join(path, 'manifest.json'))
    shutil.rmtree(ckpt)
    with pytest.raises(configurator.ConfigError, match=r"ckpt\.tmp has no manifest"):  # a leftover never counts
        checkpoint.find_checkpoint(ckpt)

HOOK = """
import json, os, shutil, signal, sys
n, count = int(os.environ['KILL_AT']), [0]
def hook(fn, callers=None):  # SIGKILL this process at the n-th call of the hooked functions (from callers)
    def op(*a, **k):
        if callers is None or sys._getframe(1).f_code.co_name in callers:
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **k)
    return op
"""

KILL = HOOK + """
import runpy, torch
from safetensors import torch as st
from kd import checkpoint
callers = ('save_checkpoint', 'seal', 'swap_in')
os.makedirs, os.replace, shutil.rmtree, os.fsync, torch.save, st.save_model, checkpoint.exchange = (hook(f, callers) for f in (
    os.makedirs, os.replace, shutil.rmtree, os.fsync, torch.save, st.save_model, checkpoint.exchange))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""

def in_pairs(commands):
    """Run (command, env, kill after seconds or None) two at a time (the machine has 2 cores); their Popens."""
    procs = []
    for k in range(0, len(commands), 2):
        started = [(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                    after) for cmd, env, after in commands[k:k + 2]]
        for p, after in started:
            if after is not None:
                try:
                    p.wait(timeout=after)
                except subprocess.TimeoutExpired:
                    p.send_signal(signal.SIGKILL)
            p.out, p.err = p.communicate()
            procs.append(p)
    return procs

def test_sigkill_then_resume_is_bit_identical(work, straight):
    """Real SIGKILLs: at file operation 4 (inside the first save: nothing complete yet, so the run starts again)
    and 15-17 (the second save: before its manifest, complete but not swapped in, swapped in but the old one not
    yet removed), and at two random times; then resume. The final weights and the log's training lines equal
    the uninterrupted run's, bit for bit, and no leftovers remain."""
    weights, records = straight
    rng = random.Random(0)
    points = [(f'at{n}', ['-c', KILL], {'KILL_AT': str(n)}, None) for n in (4, 15, 16, 17)]
    points += [(f'time{k}', [], {}, rng.uniform(2.0, 5.0)) for k in range(2)]
    outs = [work / f'kill_{name}' for name, *_ in points]
    killed = in_pairs([([sys.executable, *pre, *args(work, out)], dict(ENV, **env), after)
                       for out, (_, pre, env, after) in zip(outs, points)])
    assert all(p.returncode == -signal.SIGKILL for p, (_, _, _, after) in zip(killed, points) if after is None)
    resumed = in_pairs([([sys.executable, *args(work, out, '--init_from=resume')], ENV, None) for out in outs])
    again = [out for out, p in zip(outs, resumed) if p.returncode and 'no complete checkpoint' in p.err]
    assert work / 'kill_at4' in again
    in_pairs([([sys.executable, *args(work, out)], ENV, None) for out in again])
    for out, p in zip(outs, resumed):
        got = load_file(out / 'ckpt' / 'model.safetensors')
        assert all(torch.equal(got[k], weights[k]) for k in weights), (out, p.err[-2000:])
        assert [r['loss'] for r in train_records(out)] == [r['loss'] for r in records], out
        assert sorted(os.listdir(out)) == ['ckpt', 'log.jsonl', 'student'], out

def test_non_finite_step_is_never_applied_nor_saved(work):
    out = work / 'nan'
    proc = run(work, out, '--learning_rate=1e6', '--max_iters=2', '--warmup_frac=0.0')
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: non-finite') and 'at iteration' in lines[0]
    if os.path.exists(out / 'ckpt'):  # what was written is finite and resumable
        assert 'is intact' in lines[0]
        assert all(torch.isfinite(v).all() for v in load_file(out / 'ckpt' / 'model.safetensors').values())
        it = json.load(open(out / 'ckpt' / 'manifest.json'))['iter_num']
        assert f'iteration {it}) is intact' in lines[0]
    else:
        assert 'no checkpoint was written' in lines[0]

NAN_GRAD = """
import runpy, sys, torch
real, calls = torch.nn.utils.clip_grad_norm_, [0]
def clip(params, *a, **k):
    params = list(params)
    calls[0] += 1
    if calls[0] == 3:  # iteration 2: a NaN gradient behind a finite loss
        params[0].grad.fill_(float('nan'))
    return real(params, *a, **k)
torch.nn.utils.clip_grad_norm_ = clip
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""

def test_non_finite_gradient_is_not_applied_and_the_run_resumes_exactly(work, straight):
    out = work / 'nangrad'
    proc = subprocess.run([sys.executable, '-c', NAN_GRAD, *args(work, out)], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f'error: non-finite gradient norm at iteration 2: the step was not applied; the last checkpoint ({out / "ckpt"}, '
        'iteration 1) is intact; lower learning_rate or check the data')  # (2's waits for its step: never written)
    proc = run(work, out, '--init_from=resume')  # from that checkpoint, without the fault: the uninterrupted run
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = load_file(out / 'ckpt' / 'model.safetensors')
    assert all(torch.equal(got[k], straight[0][k]) for k in got)

def test_non_finite_weights_are_never_saved(work):
    """A NaN weight that no loss reads (a position past every document): the checkpoint is refused."""
    model = tiny_model(arch='gpt2', vocab=280, hidden=16, layers=2, heads=2, seed=2)
    with torch.no_grad():
        model.transformer.wpe.weight[-1, 0] = float('nan')  # a position no document reaches: only weight decay and
    model.save_pretrained(work / 'nanpos')                  # the norm see it
    proc = run(work, work / 'gn', f'--student={work / "nanpos"}', '--weight_decay=0.1')
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == ('error: non-finite weights at iteration 1: not checkpointed; no checkpoint was written')

# -----------------------------------------------------------------------------
# datasets: a killed re-run of prepare_data.py leaves the old dataset or the new one, never a mix

PREP_KILL = HOOK + """
import prepare_data as P
from kd import checkpoint
os.makedirs, os.replace, shutil.rmtree, json.dump = map(hook, (os.makedirs, os.replace, shutil.rmtree, json.dump))
P.write_ragged, P.swap_in, checkpoint.exchange = hook(P.write_ragged), hook(P.swap_in), hook(checkpoint.exchange)
sys.exit(P.main(sys.argv[1:]))
"""

def test_killed_prepare_data_keeps_a_whole_dataset(tmp_path):
    old, new = (write_jsonl(tmp_path / f'{k}.jsonl', [{'text': f'{k} text number {i}'} for i in range(n)])
                for k, n in (('old', 30), ('new', 50)))
    cmd = lambda src: [src, '--tokenizer=bytes', f'--out_root={tmp_path / "data"}', '--name=d', '--val_fraction=0.1']
    assert P.main(cmd(old)) == 0
    sizes = {k: None for k in ('old', 'new')}
    reference = json.load(open(tmp_path / 'data' / 'd' / 'meta.json'))['splits']
    for n in range(1, 12):
        proc = subprocess.run([sys.executable, '-c', PREP_KILL, *cmd(new)], env=dict(ENV, KILL_AT=str(n)), cwd=ROOT,
                              capture_output=True, text=True)
        meta = data.check_dataset(str(tmp_path / 'data' / 'd'))  # complete, whichever it is
        which = 'new' if meta['records_read'] == 50 else 'old'
        assert meta['records_read'] == (50 if which == 'new' else 30)
        sizes[which] = meta['splits']
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL
        assert P.main(cmd(old)) == 0  # the re-run also removes what the killed one left
        assert sorted(os.listdir(tmp_path / 'data')) == ['d']
    assert sizes['old'] == reference and sizes['new'] is not None and n > 6

def test_incomplete_dataset_is_named(work, tmp_path):
    shutil.copytree(work / 'data' / 'tiny', tmp_path / 'd')
    with open(tmp_path / 'd' / 'train.bin', 'r+b') as f:
        f.truncate(10)
    with pytest.raises(configurator.DataError, match=r'd is incomplete: .*train\.bin has 10 bytes, not the [\d,]+ it was written'):
        data.check_dataset(str(tmp_path / 'd'))

# -----------------------------------------------------------------------------
# training signal: masks of the edge cases

def test_reply_starting_with_a_space_is_supervised(smol_tok):
    msgs = [{'role': 'user', 'content': 'Capital?'}, {'role': 'assistant', 'content': ' Paris is the capital.'}]
    ids, mask, text, _, cut = P.chat_to_ids(smol_tok, msgs, False)
    tokens = smol_tok.convert_ids_to_tokens(ids)
    supervised = [t for t, m in zip(tokens, mask) if m]
    assert supervised == ['ĠParis', 'Ġis', 'Ġthe', 'Ġcapital', '.', '<|im_end|>'] and not cut

def test_long_prompt_is_cut_in_the_middle_not_the_reply(tmp_path):
    prompt = 'START ' + 'blah ' * 4000 + 'the question is here'
    rec = {'messages': [{'role': 'system', 'content': 'SYS'}, {'role': 'user', 'content': prompt},
                        {'role': 'assistant', 'content': 'the answer.'}]}
    assert P.main([write_jsonl(tmp_path / 'in.jsonl', [rec]), '--tokenizer=bytes', f'--out_root={tmp_path}', '--name=x',
                   '--val_fraction=0', '--max_length=256']) == 0
    meta = json.load(open(tmp_path / 'x' / 'meta.json'))
    assert meta['records_used'] == 1 and meta['records_truncated'] == 1
    ids = np.fromfile(tmp_path / 'x' / 'train.bin', dtype=np.uint16)
    mask = np.fromfile(tmp_path / 'x' / 'train_mask.bin', dtype=np.uint8)
    text = bytes(ids[ids < 256].tolist()).decode()
    assert len(ids) <= 256 and text.startswith('System: SYS\n\nUser: START blah')
    assert 'the question is here\n\nAssistant: the answer.' in text
    assert bytes(ids[mask == 1][:-1].tolist()) == b'the answer.' and ids[mask == 1][-1] == 256  # the reply and its eot

def test_no_validation_split_trains_and_says_so_once(work):
    proc = run(work, work / 'noval', '--dataset=noval', '--max_iters=2', '--student_init=config')
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count('no validation documents') == 1 and 'val ce' not in proc.stdout
    assert 'warning: the student ships no tokenizer' in proc.stdout  # its vocabulary could not be compared: said
    assert os.path.exists(work / 'noval' / 'ckpt' / 'manifest.json')

# -----------------------------------------------------------------------------
# the catalogue of bad inputs: one line on stderr, a non-zero exit, nothing left behind

def write(path, text, mode='w'):
    with open(path, mode) as f:
        f.write(text)
    return str(path)

def made(folder, files=()):
    """Set up a folder holding files ({name: text}); no arguments (a case's argv lists it as *made(...))."""
    os.makedirs(folder)
    for name, text in dict(files).items():
        write(os.path.join(folder, name), str(text))
    return []

NOWHERE = 'is neither a local folder (no such path) nor a repository on the hub: '  # a hub id that is nowhere

PREPARE = {  # name: (arguments given the work folder, setup, the line's expected text)
    'non-UTF-8 line': (lambda d: [write(d / 'bad.jsonl', b'{"text": "ok"}\n{"text": "\xff"}\n', 'wb')],
                       'bad.jsonl:2: not UTF-8 (byte 0xff)'),
    'alpaca instruction null': (lambda d: [write_jsonl(d / 'a.jsonl', [{'instruction': None, 'output': 'x'}])],
                                "every one of the 1 records was skipped ({'unknown_shape': 1})"),
    'alpaca input 5': (lambda d: [write_jsonl(d / 'a.jsonl', [{'instruction': 'i', 'input': 5, 'output': 'x'}])],
                       "every one of the 1 records was skipped ({'unknown_shape': 1})"),
    '--format on another shape': (lambda d: [write_jsonl(d / 'a.jsonl', [{'question': 'q', 'answer': 'a'}]), '--format=alpaca'],
                                  "every one of the 1 records was skipped ({'unknown_shape': 1}); check --format"),
    'missing tokenizer folder': (lambda d: [write_jsonl(d / 'a.jsonl', [{'text': 'x y'}]), f'--tokenizer={d / "nope"}'],
                                 "is neither a local folder"),
    'tiktoken:nope': (lambda d: [write_jsonl(d / 'a.jsonl', [{'text': 'x y'}]), '--tokenizer=tiktoken:nope'],
                      "unknown tiktoken encoding 'nope'"),
    'missing .tiktoken file': (lambda d: [write_jsonl(d / 'a.jsonl', [{'text': 'x y'}]), f'--tokenizer={d / "x.tiktoken"}'],
                               'x.tiktoken does not exist'),
    '--out_root a file': (lambda d: [write_jsonl(d / 'a.jsonl', [{'text': 'x y'}]), f'--out_root={write(d / "f", "")}'],
                          'is a file: pass a folder'),
    'a folder as input': (lambda d: [str(d / 'sub')], 'sub is a folder: pass the .json / .jsonl files in it'),
    'an empty input file': (lambda d: [write(d / 'e.jsonl', '\n\n')], 'e.jsonl is empty'),
    'an empty JSON array': (lambda d: [write(d / 'e.json', '[]')], 'the input holds no records'),
    'malformed JSON': (lambda d: [write(d / 'm.jsonl', '{"text": 1}\n{oops\n')], 'm.jsonl:2: malformed JSON'),
    'missing file': (lambda d: [str(d / 'missing.jsonl')], 'missing.jsonl: no such file'),
    'everything skipped': (lambda d: [write_jsonl(d / 'a.jsonl', [{'foo': 1}])], 'every one of the 1 records was skipped'),
    '--val_fraction=1.5': (lambda d: [write_jsonl(d / 'a.jsonl', [{'text': 'x'}]), '--val_fraction=1.5'],
                           '--val_fraction must be in [0, 1), got 1.5'),
    '--name=../escape': (lambda d: [write_jsonl(d / 'a.jsonl', [{'text': 'x'}]), '--name=../escape'],
                         "--name must be one folder name inside --out_root, got '../escape'"),
    '--name of a folder it did not write': (
        lambda d: [write_jsonl(d / 'a.jsonl', [{'text': 'x'}]), '--name=x', *made(d / 'data' / 'x', {'notes': 'mine'})],
        'x is a folder holding notes, not a dataset prepare_data.py wrote: pass another --name, or remove it'),
    'the default name of a folder it did not write': (
        lambda d: [write_jsonl(d / 'in.jsonl', [{'text': 'x'}]), *made(d / 'data' / 'in', dict.fromkeys('abcd', ''))],
        'in is a folder holding a, b, c and 1 more, not a dataset prepare_data.py wrote'),
    '--name of a file': (lambda d: [write_jsonl(d / 'a.jsonl', [{'text': 'x'}]), '--name=x', *made(d / 'data', {'x': 1})
                                    ], 'x is a file, not a dataset prepare_data.py wrote'),
    '--name of a teacher cache': (lambda d: [write_jsonl(d / 'a.jsonl', [{'text': 'x'}]), '--name=x', *made(
        d / 'data' / 'x', {'meta.json': '{"teacher": "t", "splits": {}}'})], 'x is a teacher cache, not a dataset'),
    'a tokenizer that is nowhere': (lambda d: [write_jsonl(d / 'a.jsonl', [{'text': 'x'}]),
                                               '--tokenizer=distill-tests-x7/no-tokenizer'], NOWHERE),
}

@pytest.mark.parametrize('script,argv', [('prepare_data.py', ['--nope']), ('scripts/cache_teacher.py', ['--teacher=t', '--k=x']),
                                         ('eval.py', [])])
def test_command_line_mistakes_are_one_line(script, argv):
    """argparse's own errors too: one line and exit status 2, not a usage block."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and err[0].startswith('error: ') and '--help' in err[0], proc.stderr

def test_bench_without_its_data_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'bench.py'), '--part=step', f'--dataset={tmp_path / "none"}'],
                          capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and err[0].startswith('error: no prepared dataset in '), proc.stderr

@pytest.mark.parametrize('case', PREPARE)
def test_catalogue_prepare_data(tmp_path, capfd, case):
    (tmp_path / 'sub').mkdir()
    argv = PREPARE[case][0](tmp_path)
    argv = argv + (['--tokenizer=bytes'] if not any(a.startswith('--tokenizer') for a in argv) else [])
    argv = argv + ([f'--out_root={tmp_path / "data"}'] if not any(a.startswith('--out_root') for a in argv) else [])
    before = tree(tmp_path)
    assert P.main(argv + ['--val_fraction=0'] * ('--val_fraction' not in str(argv))) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and PREPARE[case][1] in err[0], err
    assert tree(tmp_path) == before

@pytest.mark.parametrize('there', ['an empty folder', 'a damaged dataset'])
def test_prepare_data_replaces_a_damaged_dataset_or_an_empty_folder(work, tmp_path, there):
    """What it may replace: a dataset of its own, complete or not (a deleted file), and an empty folder."""
    if there == 'an empty folder':
        made(tmp_path / 'data' / 'x')
    else:
        shutil.copytree(work / 'data' / 'tiny', tmp_path / 'data' / 'x')
        os.remove(tmp_path / 'data' / 'x' / 'train.bin')
    src = write_jsonl(tmp_path / 'a.jsonl', [{'text': f'text {i}'} for i in range(5)])
    assert P.main([src, '--tokenizer=bytes', f'--out_root={tmp_path / "data"}', '--name=x', '--val_fraction=0']) == 0
    assert data.check_dataset(str(tmp_path / 'data' / 'x'))['records_used'] == 5

class Payload:
    """What a tampered state.pt carries: unpickling it calls os.makedirs(path), a side effect a test can see."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.makedirs, (self.path,)

def tamper(ckpt, payload_path):
    """Add a Payload to a checkpoint's state.pt and reseal its manifest (a complete checkpoint, to all appearances)."""
    state = torch.load(os.path.join(ckpt, 'state.pt'), weights_only=True)
    state['note'] = Payload(str(payload_path))
    torch.save(state, os.path.join(ckpt, 'state.pt'))
    manifest = json.load(open(os.path.join(ckpt, 'manifest.json')))
    manifest['files']['state.pt'] = os.path.getsize(os.path.join(ckpt, 'state.pt'))
    json.dump(manifest, open(os.path.join(ckpt, 'manifest.json'), 'w'))

def plain_text(w):
    """A data root whose dataset 'tiny' is plain text alone (no prompts)."""
    if not os.path.exists(w / 'plain'):
        src = write_jsonl(w / 'plain.jsonl', [{'text': f'line {i} of a plain text'} for i in range(20)])
        assert P.main([src, '--tokenizer=bytes', f'--out_root={w / "plain"}', '--name=tiny', '--val_fraction=0.1']) == 0
    return str(w / 'plain')

def two_tokenizers(w):
    """A data root whose dataset 'tiny' pairs the bytes tokenizer with SmolLM2's (--teacher_tokenizer)."""
    if not os.path.exists(w / 'paired'):
        assert P.main([str(w / 'in.jsonl'), '--tokenizer=bytes', f'--teacher_tokenizer={models.demo_tokenizer()}',
                       f'--out_root={w / "paired"}', '--name=tiny', '--val_fraction=0.1']) == 0
    return str(w / 'paired')

def tampered_run(w):
    if not os.path.exists(w / 'tampered'):
        shutil.copytree(w / 'straight', w / 'tampered')
        tamper(w / 'tampered' / 'ckpt', w / 'payload ran')
    return str(w / 'tampered')

def test_a_checkpoint_carrying_code_is_refused_unrun(straight, work, tmp_path):
    """Resume reads state.pt with weights_only=True: a pickled call in it is refused in one line and never runs
    (the same file read the old way, weights_only=False, runs it: the payload is live)."""
    shutil.copytree(work / 'straight' / 'ckpt', tmp_path / 'ckpt')
    tamper(tmp_path / 'ckpt', tmp_path / 'ran')
    with pytest.raises(checkpoint.ConfigError, match='holds objects other than tensors and plain values, refused'):
        checkpoint.load_checkpoint(str(tmp_path / 'ckpt'), None, None, None, {}, 1)
    assert not os.path.exists(tmp_path / 'ran')
    torch.load(tmp_path / 'ckpt' / 'state.pt', weights_only=False)
    assert os.path.isdir(tmp_path / 'ran')

CONFIG = {  # distill.py: (overrides given the work folder, expected text); each runs as its own process
    'unknown key': (lambda w: ['--learning_rat=1e-3'], "unknown config key 'learning_rat' (command line); did you mean 'learning_rate'?"),
    'batch_size two': (lambda w: ['--batch_size=two'], 'batch_size must be int like its default 4'),
    'kd_kind jsdd': (lambda w: ['--kd_kind=jsdd'], "kd_kind must be one of fkl, rkl, jsd, skl, srkl, tvd, pg; got 'jsdd' (did you mean 'jsd'?)"),
    'missing dataset': (lambda w: ['--dataset=missing'], 'no prepared dataset in'),
    'resume, nothing saved': (lambda w: ['--init_from=resume'], "init_from='resume' but there is no complete checkpoint"),
    'init_from resmue': (lambda w: ['--init_from=resmue'], "init_from must be one of scratch, resume; got 'resmue' (did you mean 'resume'?)"),
    'eval_interval 0': (lambda w: ['--eval_interval=0'], 'eval_interval must be > 0, got 0'),
    'device gpu': (lambda w: ['--device=gpu'], "device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    'alpha 1.5': (lambda w: ['--alpha=1.5'], 'alpha must be in [0, 1], got 1.5'),
    'loss_chunk -1': (lambda w: ['--loss_chunk=-1'], 'loss_chunk must be >= 0, got -1'),
    'loss_chunk big': (lambda w: ['--loss_chunk=big'], "loss_chunk must be 'auto' or a number of positions (0: the plain path), got 'big'"),
    'dtype bfloat': (lambda w: ['--dtype=bfloat'], "dtype must be one of auto, float32, bfloat16, float16; got 'bfloat' (did you mean 'bfloat16'?)"),
    'max_iters abc': (lambda w: ['--max_iters=abc'], "max_iters must be int or None (its default), got 'abc'"),
    'stop_iter abc': (lambda w: ['--stop_iter=abc'], "stop_iter must be int or None (its default), got 'abc'"),
    'max_iters 2.5': (lambda w: ['--max_iters=2.5'], 'max_iters must be int or None (its default), got 2.5'),
    'max_iters -5': (lambda w: ['--max_iters=-5'], 'max_iters must be >= 0, got -5'),
    'stop_iter -1': (lambda w: ['--stop_iter=-1'], 'stop_iter must be > 0, got -1'),
    'epochs 0': (lambda w: ['--epochs=0.0'], 'epochs must be > 0, got 0.0'),
    'out_dir a file': (lambda w: [f'--out_dir={write(w / "afile", "")}'], "is a file: pass a folder"),
    'config syntax error': (lambda w: [write(w / 'c1.py', 'a = 1\nb = (\n')], 'c1.py:2: syntax error'),
    'config name error': (lambda w: [write(w / 'c2.py', 'learning_rate = lr\n')], "c2.py:1: NameError: name 'lr' is not defined"),
    'no teacher for logits': (lambda w: ['--teacher=None'], "distill='logits' needs a teacher"),
    'missing teacher .gguf': (lambda w: [f'--teacher={w / "no.gguf"}'], "model file '"),
    'a teacher that is not a model': (lambda w: [f'--teacher={w / "in.jsonl"}'], 'in.jsonl\' is not a model'),
    'dataset without train.bin': (lambda w: [f'--data_root={w / "broken"}'], 'is incomplete: '),
    'student_layers auto:9': (lambda w: ['--student_init=teacher_layers', '--student_layers=auto:9'],
                              "student_layers must be a list of teacher blocks or 'auto:N' with 0 < N <= 2"),
    'student_layers repeated': (lambda w: ['--student_init=teacher_layers', '--student_layers=[1, 1]'],
                                'student_layers must be a non-empty list of teacher blocks in [0, 2), increasing'),
    'student_layers unsorted': (lambda w: ['--student_init=teacher_layers', '--student_layers=[1, 0]', '--layer_map=kept',
                                           '--distill=hidden'], 'without repeats (the student keeps the teacher'),
    'beta2 2': (lambda w: ['--beta2=2'], 'beta2 must be in [0, 1), got 2.0'),
    'resume with another batch_size': (lambda w: [f'--out_dir={w / "straight"}', '--init_from=resume', '--batch_size=1'],
                                       'batch_size was 2 when'),
    'on_policy 1.5': (lambda w: ['--on_policy=1.5'], 'on_policy must be in [0, 1], got 1.5'),
    'max_new_tokens 0': (lambda w: ['--on_policy=1', '--max_new_tokens=0'], 'max_new_tokens must be > 0, got 0'),
    'on_policy on plain text': (lambda w: ['--on_policy=0.5', f'--data_root={plain_text(w)}'], 'no document of'),
    'on_policy without a divergence': (lambda w: ['--on_policy=1', '--distill=none'], "train on the divergence alone"),
    'on_policy with a teacher cache': (lambda w: ['--on_policy=1', f'--teacher_cache={w / "nocache"}'],
                                       'a teacher cache cannot score text the student writes'),
    'on_policy under fsdp': (lambda w: ['--on_policy=1', '--parallel=fsdp'], "sampling would gather every block"),
    'on_policy with a prompt longer than the block': (lambda w: ['--on_policy=1', '--block_size=8'],
                                                      'no room for a reply in block_size=8'),
    'on_policy across tokenizers': (lambda w: ['--on_policy=1', f'--data_root={two_tokenizers(w)}'],
                                    'pairs two tokenizers, and the teacher would have to read'),
    'student_init config of no model': (lambda w: ['--student_init=config', f'--student={w / "in.jsonl"}'],
                                        "cannot read the config of student '"),
    'sample_temperature 1e-40': (lambda w: ['--on_policy=1', '--sample_temperature=1e-40'],
                                 'sample_temperature must be in [0.01, 100], got 1e-40'),
    'temperature inf': (lambda w: [write(w / 'c3.py', "temperature = float('inf')\n")],
                        'temperature must be a finite number, got inf'),
    'a teacher cache on data of two tokenizers': (lambda w: ['--teacher_cache=cache', f'--data_root={two_tokenizers(w)}'],
                                                  'pairs two tokenizers (prepare_data.py --teacher_tokenizer), and a'),
    'a checkpoint carrying code': (lambda w: [f'--out_dir={tampered_run(w)}', '--init_from=resume'],
                                   'holds objects other than tensors and plain values, refused: reading them could run code'),
    'lora_rank -1': (lambda w: ['--lora_rank=-1'], 'lora_rank must be a positive integer (or 0: no adapters), got -1'),
    'lora_dropout 1': (lambda w: ['--lora_rank=4', '--lora_dropout=1.0'], 'lora_dropout in [0, 1), got 32.0 and 1.0'),
    'lora on a random student': (lambda w: ['--lora_rank=4', '--student_init=config'],
                                 "student_init='config' would freeze random weights"),
    'lora on a GPT-2 student': (lambda w: ['--lora_rank=4'], "has no nn.Linear layer below its head"),
    'lora_targets misspelt': (lambda w: ['--lora_rank=4', f'--student={w / "teacher"}', '--lora_targets=["q_proj", "gate_prj"]'],
                              "no linear layer named 'gate_prj'; did you mean 'gate_proj'?"),
}

@pytest.fixture(scope='module')
def distill_catalogue(work, straight):
    """Every CONFIG case as its own distill.py process, two at a time: {case: (process, out_dir)}, and the paths
    that appeared in the work folder meanwhile."""
    if not os.path.exists(work / 'broken'):
        shutil.copytree(work / 'data', work / 'broken')
        os.remove(work / 'broken' / 'tiny' / 'train.bin')
    commands = {}
    for i, (case, (make, _)) in enumerate(CONFIG.items()):
        extra, out = make(work), work / f'cat{i}'
        script, *rest = args(work, out)
        commands[case] = ([sys.executable, script, *[a for a in extra if not a.startswith('--')], *rest,
                           *[a for a in extra if a.startswith('--')]], out)
    before = tree(work)
    procs = in_pairs([(cmd, ENV, None) for cmd, _ in commands.values()])
    new = sorted(set(tree(work)) - set(before))
    return {case: (p, out) for (case, (_, out)), p in zip(commands.items(), procs)}, new

@pytest.mark.parametrize('case', CONFIG)
def test_catalogue_distill(distill_catalogue, case):
    runs, new = distill_catalogue
    proc, out = runs[case]
    err = proc.err.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and err[0].startswith('error: ') and CONFIG[case][1] in err[0], err
    others = {f'cat{i}' for i in range(len(CONFIG))} - {out.name}  # a path left under another case's out_dir is its own
    assert not os.path.exists(out) and [p for p in new if p.split(os.sep)[0] not in others] == []

EVAL = {  # eval.py: (arguments given the work folder, expected text)
    'missing --tokenizer folder': (lambda w: [str(w / 'gpt2'), f'--tokenizer={w / "nope"}'], 'is neither a local folder'),
    'truncated safetensors': (lambda w: [str(w / 'cut'), '--tokenizer=bytes'], "cannot load model '"),
    'empty validation split': (lambda w: [str(w / 'gpt2'), '--tokenizer=bytes', f'--data={w / "data" / "noval"}'],
                               'has no validation documents'),
    'data of another tokenizer': (lambda w: [str(w / 'gpt2'), f'--tokenizer={models.demo_tokenizer()}', f'--data={w / "data" / "tiny"}'],
                                  'differs from the one'),
    'an empty choice': (lambda w: [str(w / 'gpt2'), '--tokenizer=bytes', f'--tasks={write_jsonl(w / "t1.jsonl", [{"query": "q", "choices": ["a", ""], "gold": 0}])}'],
                        'document 0 has an empty choice'),
    'gold out of range': (lambda w: [str(w / 'gpt2'), '--tokenizer=bytes', f'--tasks={write_jsonl(w / "t2.jsonl", [{"query": "q", "choices": ["a", "b"], "gold": 2}])}'],
                          'document 0 has gold 2, not an index'),
    '--output into a missing folder': (lambda w: [str(w / 'gpt2'), '--tokenizer=bytes', f'--output={w / "no" / "r.json"}'],
                                       'does not exist'),
    'an incomplete dataset': (lambda w: [str(w / 'gpt2'), '--tokenizer=bytes', f'--data={w / "broken" / "tiny"}'], 'is incomplete'),
    'choices a string': (lambda w: tasks(w, {'query': 'q', 'choices': 'ab', 'gold': 0}),
                         "document 0's choices are 'ab' (str), not a list of strings"),
    'choices a number': (lambda w: tasks(w, {'query': 'q', 'choices': 5, 'gold': 0}),
                         "document 0's choices are 5 (int), not a list of strings"),
    'choices a dict': (lambda w: tasks(w, {'query': 'q', 'choices': {'a': 1}, 'gold': 0}),
                       "document 0's choices are {'a': 1} (dict), not a list of strings"),
    'a choice not a string': (lambda w: tasks(w, {'query': 'q', 'choices': ['a', 5], 'gold': 0}),
                              "document 0's choice 1 is 5 (int), not a string"),
    'gold out of range, few-shot': (lambda w: tasks(w, {'query': 'q', 'choices': ['a', 'b'], 'gold': 0},
                                                    {'query': 'q', 'choices': ['a', 'b'], 'gold': 5}, fewshot=1),
                                    'document 1 has gold 5, not an index'),
    'a model that is nowhere': (lambda w: ['distill-tests-x7/no-model', '--tokenizer=bytes'], NOWHERE),
    'a model that is nowhere, no --tokenizer': (lambda w: ['distill-tests-x7/no-model'], NOWHERE),
}

def tasks(w, *docs, fewshot=0):
    """eval.py arguments scoring the model gpt2 on a {query, choices, gold} file of docs."""
    return [str(w / 'gpt2'), '--tokenizer=bytes', f'--tasks={write_jsonl(w / "task.jsonl", docs)}',
            f'--num_fewshot={fewshot}']

@pytest.mark.parametrize('case', EVAL)
def test_catalogue_eval(work, capfd, case):
    if not os.path.exists(work / 'cut'):
        shutil.copytree(work / 'gpt2', work / 'cut')
        with open(work / 'cut' / 'model.safetensors', 'r+b') as f:
            f.truncate(1000)
    if not os.path.exists(work / 'broken'):
        shutil.copytree(work / 'data', work / 'broken')
        os.remove(work / 'broken' / 'tiny' / 'train.bin')
    argv = EVAL[case][0](work)
    argv += [] if any(a.startswith('--output') for a in argv) else [f'--output={work / "r.json"}']
    before = tree(work)
    assert ev.main(argv) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and EVAL[case][1] in err[0], err
    assert tree(work) == before

CACHE = {  # cache_teacher.py --name, inside a copy of data/tiny that holds a folder 'notes': (name, expected text)
    '..': ('..', "--name must be one folder name inside --dataset, got '..'"),
    '../noval, a sibling dataset': ('../noval', "--name must be one folder name inside --dataset, got '../noval'"),
    '.': ('.', "--name must be one folder name inside --dataset, got '.'"),
    'empty': ('', "--name must be one folder name inside --dataset, got ''"),
    'train.bin': ('train.bin', "--name=train.bin is one of the dataset's own files: pass another --name"),
    'meta.json': ('meta.json', "--name=meta.json is one of the dataset's own files: pass another --name"),
    'a folder it did not write': ('notes', 'notes is a folder holding a.txt, not a teacher cache cache_teacher.py '
                                           'wrote: pass another --name, or remove it yourself'),
}

@pytest.mark.parametrize('case', CACHE)
def test_catalogue_cache_name(work, tmp_path, case):
    """Refused before the teacher is read (there is none here), nothing written or deleted."""
    spec = importlib.util.spec_from_file_location('cache_teacher', os.path.join(ROOT, 'scripts', 'cache_teacher.py'))
    cache_teacher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cache_teacher)
    shutil.copytree(work / 'data', tmp_path / 'data')
    made(tmp_path / 'data' / 'tiny' / 'notes', {'a.txt': 'mine'})
    name, message = CACHE[case]
    before = tree(tmp_path)
    with pytest.raises(configurator.ConfigError) as e:
        cache_teacher.main([f'--teacher={tmp_path / "no teacher"}', f'--dataset={tmp_path / "data" / "tiny"}',
                            f'--name={name}', '--device=cpu', '--k=4'])
    assert message in str(e.value) and '\n' not in str(e.value), str(e.value)
    assert tree(tmp_path) == before

def test_a_model_that_is_nowhere_is_one_line(work):
    """distill.py with a teacher and student id that is neither a path nor on the hub (this machine may have no
    network: the hub unreachable and the id not cached, or the hub answering that it has no such repository): one
    line naming both readings, not transformers' retries (27 s and 12 lines here before, without a network)."""
    proc = run(work, work / 'nowhere', '--teacher=distill-tests-x7/no-model', '--student=distill-tests-x7/no-model')
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and NOWHERE in err[0], proc.stderr[-3000:]
    assert not os.path.exists(work / 'nowhere')

HUB_CACHED = """
import sys, huggingface_hub as hub
from kd import models
def offline(*a, **k):
    raise OSError('no network')  # (as on a machine without one, wherever this test runs)
hub.HfApi.model_info = offline
model, tok = models.load_model(sys.argv[1]), models.model_tokenizer(sys.argv[1])
print(type(model).__name__, models.vocab_size(tok))
"""

def test_a_hub_id_in_the_hub_cache_loads_without_the_hub(work, tmp_path, smol_tok):
    """The hub out of reach, an id in its cache is read from there, quietly and at once (before: minutes of retries,
    each printed)."""
    repo = tmp_path / 'hub' / 'models--distill-tests-x7--cached'
    shutil.copytree(work / 'teacher', repo / 'snapshots' / ('0' * 40))
    smol_tok.save_pretrained(repo / 'snapshots' / ('0' * 40))
    made(repo / 'refs', {'main': '0' * 40})
    proc = subprocess.run([sys.executable, '-c', HUB_CACHED, 'distill-tests-x7/cached'], capture_output=True,
                          text=True, cwd=ROOT, timeout=300, env=dict(ENV, HF_HUB_CACHE=str(tmp_path / 'hub')))
    assert proc.returncode == 0 and proc.stderr == '', proc.stderr[-3000:]
    assert proc.stdout.split() == ['LlamaForCausalLM', str(len(smol_tok))]

@pytest.mark.parametrize('hub_says,reading', [
    ('offline', 'HF_HUB_OFFLINE is set and the hub cache has no copy'),
    ('not found', 'https://huggingface.co has none of that name (a private one needs `hf auth login`)'),
    ('found', None),
])
def test_what_the_hub_says_decides(monkeypatch, hub_says, reading):
    """HF_HUB_OFFLINE, or the hub answering that it has no such repository: said; a repository it has is left to
    from_pretrained to read."""
    import huggingface_hub as hub
    from huggingface_hub import constants
    from huggingface_hub.errors import RepositoryNotFoundError

    def model_info(*a, **k):
        if hub_says == 'not found':
            raise RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # (its constructor wants an HTTP response)
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', hub_says == 'offline')
    monkeypatch.setattr(hub.HfApi, 'model_info', model_info)
    models.hub_status.cache_clear()
    try:
        if reading is None:
            assert models.hub_folder('distill-tests-x7/on-the-hub') == 'distill-tests-x7/on-the-hub'
        else:
            with pytest.raises(configurator.ConfigError) as e:
                models.load_model('distill-tests-x7/no-model')
            assert str(e.value) == f"model 'distill-tests-x7/no-model' {NOWHERE}{reading}"
    finally:
        models.hub_status.cache_clear()

def test_catalogue_size():
    """The README states the catalogue's size; keep them in step."""
    n = len(PREPARE) + len(CONFIG) + len(EVAL)
    assert f'{n} bad inputs' in open(os.path.join(ROOT, 'README.md')).read()
