"""Real runs of distill.py on tiny models: invariances, resume, vocabularies, export, errors."""
import json, math, os, random, subprocess, sys
import pytest, torch
from safetensors.torch import load_file
from conftest import BYTES_VOCAB, ROOT, save_tiny_model, tiny_model, tiny_work
import prepare_data
from kd.models import student_from_teacher_layers

@pytest.fixture(scope='module')
def work(tmp_path_factory):
    """A bytes-tokenized dataset of text and chat records of varied lengths, a teacher and two students."""
    rng = random.Random(0)
    words = 'the cat sat on a mat while dogs ran far away from home'.split()
    recs = [{'text': ' '.join(rng.choice(words) for _ in range(rng.randint(2, 30)))} for _ in range(60)]
    recs += [{'question': f'what is {i} plus {i}?', 'answer': f'{2 * i}, I think.'} for i in range(60)]
    return tiny_work(tmp_path_factory.mktemp('distill'), recs, gpt2=True)

def command(work, out, *overrides, nproc=1):
    args = [os.path.join(ROOT, 'distill.py'), f'--data_root={work / "data"}', '--dataset=tiny', f'--out_dir={out}',
            f'--teacher={work / "teacher"}', f'--student={work / "student"}', '--device=cpu', '--dtype=float32',
            '--block_size=48', '--learning_rate=1e-2', '--warmup_frac=0.0', '--eval_interval=1000', '--eval_docs=4',
            '--temperature=2.0', '--alpha=0.5', '--peak_flops=1e12', *overrides]
    return [sys.executable, *args] if nproc == 1 else [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                                                       f'--nproc_per_node={nproc}', *args]

def run(work, out, *overrides, nproc=1, check=True):
    proc = subprocess.run(command(work, out, *overrides, nproc=nproc), capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS='1'), cwd=work, timeout=300)  # a hang fails
    if check:
        assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[:3000]  # (the ranks' own lines come before torchrun's)
    return proc

def train_log(out):
    return [r for r in map(json.loads, open(os.path.join(out, 'log.jsonl'))) if 'loss' in r]

def weights(out):
    return load_file(os.path.join(out, 'ckpt', 'model.safetensors'))

def assert_same_run(a, b, tol=1e-6):
    la, lb = train_log(a), train_log(b)
    assert len(la) == len(lb) > 0
    for ra, rb in zip(la, lb):
        for key in ('loss', 'ce', 'kd', 'grad_norm'):
            assert ra[key] == pytest.approx(rb[key], rel=tol, abs=1e-9), (key, ra, rb)
    wa, wb = weights(a), weights(b)
    for k in wa:
        # Adam divides by sqrt(v): where a gradient element is near zero, fp32 round-off in it moves the update
        # by a few 1e-5 (lr 1e-2 here); a wrong weighting of micro-batches or ranks moves it by ~lr
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=1e-4), k

@pytest.mark.parametrize('kind', ['fkl', 'jsd'])
def test_microbatch_split_invariance(work, kind):
    """4 micro-batches of 1 document == 1 micro-batch of 4: loss, gradient norm and updated weights."""
    run(work, work / f'a{kind}', '--batch_size=1', '--gradient_accumulation_steps=4', '--max_iters=2', f'--kd_kind={kind}')
    run(work, work / f'b{kind}', '--batch_size=4', '--gradient_accumulation_steps=1', '--max_iters=2', f'--kd_kind={kind}')
    assert_same_run(work / f'a{kind}', work / f'b{kind}')
    # and the test can fail: a different batch split of the stream is a different run
    run(work, work / f'c{kind}', '--batch_size=2', '--gradient_accumulation_steps=1', '--max_iters=2', f'--kd_kind={kind}')
    assert train_log(work / f'c{kind}')[0]['loss'] != pytest.approx(train_log(work / f'a{kind}')[0]['loss'], rel=1e-6)

def test_ddp_two_ranks_equal_one_process(work):
    """... also when a rank has no validation document to evaluate (eval_docs=1: once a deadlock)."""
    run(work, work / 'one', '--batch_size=1', '--gradient_accumulation_steps=4', '--max_iters=2', '--eval_docs=1')
    run(work, work / 'two', '--batch_size=1', '--gradient_accumulation_steps=4', '--max_iters=2', '--eval_docs=1', nproc=2)
    assert_same_run(work / 'one', work / 'two')
    val = lambda out: [r for r in map(json.loads, open(os.path.join(out, 'log.jsonl'))) if 'val_ce' in r]
    assert len(val(work / 'one')) == len(val(work / 'two')) == 2
    assert all(a == pytest.approx(b, rel=1e-6) for a, b in zip(val(work / 'one'), val(work / 'two')))

def test_sft_ddp_two_ranks_equal_one_process(work):
    run(work, work / 'sft1', '--distill=none', '--batch_size=2', '--gradient_accumulation_steps=2', '--max_iters=2')
    run(work, work / 'sft2', '--distill=none', '--batch_size=2', '--gradient_accumulation_steps=2', '--max_iters=2', nproc=2)
    assert_same_run(work / 'sft1', work / 'sft2')
    assert all(r['kd'] == 0 for r in train_log(work / 'sft1'))

def test_resume_is_bit_identical(work):
    """4 iterations straight == 2, stop, resume, 2 more (a GPT-2 student with dropout: RNG state matters)."""
    common = ['--batch_size=2', '--gradient_accumulation_steps=2', '--max_iters=4', f'--student={work / "gpt2"}']
    run(work, work / 'straight', *common)
    run(work, work / 'split', *common, '--stop_iter=2')
    assert json.load(open(work / 'split' / 'ckpt' / 'state.json'))['iter_num'] == 2
    run(work, work / 'split', *common, '--init_from=resume')
    ws, wr = weights(work / 'straight'), weights(work / 'split')
    assert all(torch.equal(ws[k], wr[k]) for k in ws)
    assert [r['loss'] for r in train_log(work / 'straight')] == [r['loss'] for r in train_log(work / 'split')]
    # resuming without the restored RNG would differ: dropout draws are part of the run
    run(work, work / 'fresh', *common, '--stop_iter=2')
    state = torch.load(work / 'fresh' / 'ckpt' / 'state.pt', weights_only=True)
    state['rng_states'][0]['cpu'] = torch.manual_seed(99).get_state()
    torch.save(state, work / 'fresh' / 'ckpt' / 'state.pt')
    manifest = json.load(open(work / 'fresh' / 'ckpt' / 'manifest.json'))
    manifest['files']['state.pt'] = os.path.getsize(work / 'fresh' / 'ckpt' / 'state.pt')
    json.dump(manifest, open(work / 'fresh' / 'ckpt' / 'manifest.json', 'w'))
    run(work, work / 'fresh', *common, '--init_from=resume')
    wf = weights(work / 'fresh')
    assert not all(torch.equal(ws[k], wf[k]) for k in ws)

def test_a_fresh_run_does_not_leave_an_older_checkpoint_to_resume(work):
    """A run from scratch in a used out_dir moves the earlier run's checkpoint aside (said in a note): resuming it
    later cannot continue the earlier run with the new settings (it did: the new run's iterations 0-1, then the old
    4-10)."""
    common = ['--batch_size=2', '--gradient_accumulation_steps=2', '--eval_interval=2']
    run(work, work / 'used', *common, '--max_iters=4')
    out = run(work, work / 'used', *common, '--max_iters=10', '--checkpoint=False', '--stop_iter=1').stdout
    assert "note: init_from='scratch': the earlier run's checkpoint and log are in" in out
    assert not (work / 'used' / 'ckpt').exists() and (work / 'used' / 'earlier' / 'ckpt').exists()
    again = run(work, work / 'used', *common, '--max_iters=10', '--init_from=resume', check=False)
    assert again.returncode == 2 and "no complete checkpoint in" in again.stderr

def test_resume_says_what_changed_and_refuses_another_run(work):
    common = ['--batch_size=2', '--gradient_accumulation_steps=2', '--eval_interval=2']
    run(work, work / 'changed', *common, '--max_iters=2')
    out = run(work, work / 'changed', *common, '--max_iters=4', '--learning_rate=3e-3', '--init_from=resume').stdout
    assert 'note: resuming with settings changed since the checkpoint: learning_rate 0.01 -> 0.003, max_iters 2 -> 4' in out
    other = run(work, work / 'changed', *common, '--max_iters=6', '--kd_kind=rkl', '--init_from=resume', check=False)
    err = other.stderr.strip().splitlines()
    assert other.returncode == 2 and len(err) == 1 and "kd_kind was 'fkl' when" in err[0] and 'another run' in err[0]

def test_a_diverging_run_never_saves_over_the_last_good_checkpoint(work):
    """Resumed with learning_rate=1e6, the loss leaves the run's own history (kept in the checkpoint) far behind: the
    run stops before applying that step, and the checkpoint it resumed from stays as it was (it was overwritten by
    one with a loss of ~1e12)."""
    common = ['--batch_size=2', '--gradient_accumulation_steps=2', '--eval_interval=3']
    run(work, work / 'good', *common, '--max_iters=6')
    before = weights(work / 'good')
    out = run(work, work / 'good', *common, '--max_iters=12', '--learning_rate=30.0', '--warmup_frac=0',
              '--init_from=resume', check=False)
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(err) == 1 and 'the run is diverging' in err[0], out.stderr[-2000:]
    after = weights(work / 'good')
    assert json.load(open(work / 'good' / 'ckpt' / 'manifest.json'))['iter_num'] == 6
    assert all(torch.equal(before[k], after[k]) for k in before)

def test_padded_vocabulary_and_export(work):
    """Teacher 300 rows, student 280 rows, 259 real tokens; the export loads, generates, holds only the student."""
    run(work, work / 'exp', '--batch_size=2', '--gradient_accumulation_steps=1', '--max_iters=3')
    assert all(r['kd'] > 0 for r in train_log(work / 'exp'))
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(work / 'exp' / 'student')
    ref = tiny_model(vocab=280, hidden=16, layers=2, heads=2)
    assert set(model.state_dict()) == set(ref.state_dict())
    ckpt = weights(work / 'exp')
    assert all(torch.equal(v, ckpt['model.' + k]) for k, v in model.state_dict().items() if 'model.' + k in ckpt)
    out = model.generate(torch.tensor([[72, 105]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 7)

def test_teacher_layers_copies_exactly_the_chosen_blocks():
    for arch in ('llama', 'gpt2'):
        teacher = tiny_model(arch=arch, layers=4, seed=3)
        student = student_from_teacher_layers(teacher, [0, 2, 3])
        t, s = teacher.state_dict(), student.state_dict()
        prefix = 'model.layers.' if arch == 'llama' else 'transformer.h.'
        for k, v in s.items():
            src = k
            if k.startswith(prefix):
                i, rest = k[len(prefix):].split('.', 1)
                src = f'{prefix}{[0, 2, 3][int(i)]}.{rest}'
            assert torch.equal(v, t[src]), k
        assert student.config.num_hidden_layers == 3 and len(s) < len(t)
        every = student_from_teacher_layers(teacher, [0, 1, 2, 3]).eval()
        X = torch.randint(0, BYTES_VOCAB, (2, 9))
        assert torch.allclose(every(X).logits, teacher.eval()(X).logits, atol=1e-6)
    with pytest.raises(Exception, match='student_layers'):
        student_from_teacher_layers(tiny_model(layers=2), [0, 5])

def test_tokenizer_mismatch_is_refused(work, smol_tok):
    """A student whose tokenizer is not the data's: one clear line, exit code 2."""
    folder = work / 'smolvocab'
    save_tiny_model(folder, vocab=49152, hidden=16, layers=1, heads=2)
    smol_tok.save_pretrained(folder)
    proc = run(work, work / 'mm', f'--student={folder}', '--max_iters=1', check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: the student's tokenizer differs")

def test_too_few_output_rows_is_refused(work):
    save_tiny_model(work / 'small_vocab', vocab=200, hidden=16, layers=1, heads=2)
    proc = run(work, work / 'sv', f'--student={work / "small_vocab"}', '--max_iters=1', check=False)
    assert proc.returncode == 2 and 'has 200 output rows but the tokenizer' in proc.stderr

def test_non_finite_loss_stops_naming_the_iteration(work):
    model = tiny_model(vocab=280, hidden=16, layers=2, heads=2, seed=1)
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float('inf')
    model.save_pretrained(work / 'broken')
    proc = run(work, work / 'nan', f'--student={work / "broken"}', '--max_iters=3', '--eval_docs=0', check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith('error: non-finite loss at iteration 0')
    proc = run(work, work / 'nan', f'--student={work / "broken"}', '--max_iters=3', check=False)  # evaluated first
    assert proc.stderr.strip().splitlines()[-1].startswith('error: non-finite validation loss at iteration 0')

def test_config_file_int_for_float_and_none(work, tmp_path):
    cfg = tmp_path / 'c.py'
    cfg.write_text('learning_rate = 1  # an int for a float\nmax_iters = None\nepochs = 1\nwandb_run_name = "x"\n')
    from kd.configurator import parse_config, ConfigError
    import distill
    defaults = {k: getattr(distill, k) for k in distill.config_keys}
    config = parse_config([str(cfg), '--stop_iter=3', '--student_layers=[0, 2]'], defaults, distill.OPTIONAL_TYPES)
    assert config['learning_rate'] == 1.0 and isinstance(config['learning_rate'], float)
    assert config['max_iters'] is None and config['stop_iter'] == 3 and config['student_layers'] == [0, 2]
    cfg.write_text('temprature = 2\n')
    with pytest.raises(ConfigError, match="did you mean 'temperature'"):
        parse_config([str(cfg)], defaults)

def test_help_lists_every_key():
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'distill.py'), '--help'], capture_output=True, text=True).stdout
    import distill
    for k in distill.config_keys:
        assert f'--{k}=' in out
    assert "--kd_kind='fkl'" in out and "divergence: 'fkl', 'rkl'" in out

@pytest.mark.real
def test_end_to_end_packaged_teacher_kd_falls(tmp_path):
    """configs/tiny.py: SmolLM2-135M-Instruct -> its 3-block copy on the demo data; the held-out KD falls."""
    data = tmp_path / 'data'
    assert prepare_data.main(['--demo', '--out_root', str(data)]) == 0
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'distill.py'), os.path.join(ROOT, 'configs', 'tiny.py'),
                           f'--data_root={data}', f'--out_dir={tmp_path / "out"}'],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    val = [r for r in map(json.loads, open(tmp_path / 'out' / 'log.jsonl')) if 'val_kd' in r]
    assert val[0]['iter'] == 0 and val[-1]['iter'] == 8
    assert val[-1]['val_kd'] < 0.7 * val[0]['val_kd'] and val[-1]['val_ce'] < val[0]['val_ce']
    # the export is a plain HF folder with the tokenizer: it loads (no GGUF leftovers) and chats
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tmp_path / 'out' / 'student')
    tok = AutoTokenizer.from_pretrained(tmp_path / 'out' / 'student')
    assert model.config.num_hidden_layers == 3 and getattr(model.config, 'quantization_config', None) is None
    ids = tok.apply_chat_template([{'role': 'user', 'content': 'Hi'}], add_generation_prompt=True, return_tensors='pt')
    ids = ids['input_ids'] if hasattr(ids, 'keys') else ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3

@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_mixed_precision_paths(work, dtype):
    """The autocast (and, for float16, GradScaler) path on tiny shapes: the same first loss as fp32 within
    the dtype's precision, then training proceeds with finite values and a falling loss."""
    common = ['--batch_size=2', '--gradient_accumulation_steps=2', '--max_iters=6', '--learning_rate=3e-3']
    run(work, work / f'mp32{dtype}', *common)
    run(work, work / f'mp{dtype}', *common, f'--dtype={dtype}')
    ref, low = train_log(work / f'mp32{dtype}'), train_log(work / f'mp{dtype}')
    assert low[0]['loss'] == pytest.approx(ref[0]['loss'], rel=2e-2) and low[0]['loss'] != ref[0]['loss']
    assert all(math.isfinite(r['loss']) for r in low) and low[-1]['loss'] < low[0]['loss']

def test_every_config_parses_and_documents_itself():
    import glob, distill
    from kd.configurator import parse_config
    defaults = {k: getattr(distill, k) for k in distill.config_keys}
    for path in glob.glob(os.path.join(ROOT, 'configs', '*.py')):
        config = parse_config([path], defaults, distill.OPTIONAL_TYPES)
        header = open(path).read().split('\n\n')[0]
        assert 'distill.py' in header and 'Sized for' in header and 'Batch' in header, path
        lines = len(open(path).read().splitlines())
        assert config['distill'] in ('logits', 'hidden', 'none') and lines <= 40
        assert lines >= 10 or 'exec(' in open(path).read()  # a variant of another config

def test_no_config_key_is_reassigned_after_parsing():
    """What a run derives from its settings (iterations, the loss path it fell back to, the measured peak) gets its
    own name, so the config the checkpoint records is what was asked and run_config what was used."""
    import ast
    tree = ast.parse(open(os.path.join(ROOT, 'distill.py')).read())
    keys = {n.targets[0].id for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)}
    main = [n for n in tree.body if isinstance(n, ast.If)][-1]
    stored = {n.id for n in ast.walk(main) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    stored |= {a.arg for n in ast.walk(main) if isinstance(n, (ast.FunctionDef, ast.Lambda)) for a in n.args.args}
    assert 'iterations' in stored and 'max_iters' in keys  # (the test can see both sides)
    assert not stored & keys, stored & keys

def test_auto_dtype_rule(monkeypatch):
    """'auto': bf16 autocast only where this CPU's bf16 matmul is clearly (1.5x) faster than fp32, as measured."""
    from kd import machine
    for rates, expected in (({'float32': 2e11, 'bfloat16': 8e11}, 'bfloat16'),   # AMX: 3-4x
                            ({'float32': 2e11, 'bfloat16': 3e11}, 'float32'),    # not clearly faster
                            ({'float32': 2e11, 'bfloat16': 3e8}, 'float32')):    # emulated: hundreds of times slower
        monkeypatch.setattr(machine, 'measure_matmul_flops', lambda device, dtype: rates[str(dtype)[6:]])
        dtype, why, rate = machine.choose_dtype('auto', 'cpu')
        assert (dtype, rate) == (expected, rates[expected]) and 'GFLOP/s' in why
    assert machine.choose_dtype('float16', 'cpu') == ('float16', 'as set', None)

DTYPE_PROBE = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
from kd import machine
rank = int(os.environ['RANK'])  # rank 0 measures bf16 clearly faster, rank 1 not: near the threshold, ranks differ
rates = [{'float32': 2e11, 'bfloat16': 4e11}, {'float32': 2e11, 'bfloat16': 2.5e11}][rank]
machine.measure_matmul_flops = lambda device, dtype: rates[str(dtype)[6:]]
machine.init_distributed('cpu')
dtype, _, rate = machine.choose_dtype('auto', 'cpu')
with open(os.path.join(sys.argv[2], f'rank{rank}.txt'), 'w') as f:  # (a file each: two ranks' prints can interleave)
    f.write(f'rank {rank} chose {dtype} {rate}')
machine.dist.barrier()  # (as distill.py ends: together, then the group torn down; without it gloo may abort at exit)
machine.dist.destroy_process_group()
"""

def test_auto_dtype_is_decided_once_for_all_ranks(tmp_path):
    """Each rank measures its own matmul rates; rank 0's choice (and rate) is every rank's."""
    (tmp_path / 'probe.py').write_text(DTYPE_PROBE)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           str(tmp_path / 'probe.py'), ROOT, str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[:3000]  # (the ranks' own lines come before torchrun's)
    chose = [(tmp_path / f'rank{r}.txt').read_text() for r in (0, 1)]
    assert chose == ['rank 0 chose bfloat16 400000000000.0', 'rank 1 chose bfloat16 400000000000.0']

def test_settings_that_change_nothing_are_said(work):
    """layer_map without a hidden-state term, parallel='fsdp' in one process: a note each, and the run as without them."""
    out = run(work, work / 'unused', '--layer_map=last', '--parallel=fsdp', '--max_iters=1').stdout
    assert "note: layer_map='last' is unused: this loss has no hidden-state term" in out
    assert "note: parallel='fsdp' is unused: one process has nothing to shard" in out
    assert 'is unused' not in run(work, work / 'used', '--max_iters=1').stdout

def test_auto_dtype_run_says_what_it_chose(work):
    """The default dtype on this machine, whichever kind it is: the start line names the choice and the measured rates
    behind it, the choice follows the rule from those rates, and the run trains in it."""
    import re
    out = run(work, work / 'auto', '--dtype=auto', '--peak_flops=0', '--max_iters=3', '--learning_rate=3e-3').stdout
    m = re.search(r'dtype: (\w+) \(bf16 matmul (\d+) vs fp32 (\d+) GFLOP/s on this CPU\); MFU against its matmul rate, ([\d,]+) GFLOP/s', out)
    assert m, out[:2000]
    bf16, fp32 = int(m[2]), int(m[3])
    assert m[1] == ('bfloat16' if bf16 > 1.5 * fp32 else 'float32')
    assert int(m[4].replace(',', '')) == pytest.approx(bf16 if m[1] == 'bfloat16' else fp32, rel=0.01, abs=1)
    log = train_log(work / 'auto')
    assert len(log) == 3 and all(math.isfinite(r['loss']) for r in log)
    config = json.load(open(work / 'auto' / 'ckpt' / 'state.json'))['config']  # what ran: loss_chunk='auto' resolved
    assert config['dtype'] == m[1] and config['loss_chunk'] == 1024 and '; 1024 positions a chunk' in out

def test_mfu_never_above_one(work, tmp_path):
    """The matmul rate measured at start can read low (a loaded machine): a step faster than it raises the MFU
    denominator to at least what the step achieved, so MFU never prints above 100%. Here the measurement is made
    absurdly low (1 kFLOP/s) in the subprocess."""
    (tmp_path / 'sitecustomize.py').write_text('from kd import machine\nmachine.measure_matmul_flops = lambda *a, **k: 1e3\n')
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    proc = subprocess.run(command(work, work / 'mfu', '--peak_flops=0', '--max_iters=3'), capture_output=True,
                          text=True, env=env, cwd=work, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'MFU against its matmul rate, 0 GFLOP/s measured at start' in proc.stdout  # (the patch took effect)
    mfu = [r['mfu'] for r in train_log(work / 'mfu')]
    assert len(mfu) == 3 and all(0 < m <= 1 for m in mfu) and mfu[0] == pytest.approx(1.0)

def test_no_checkpoint_still_evaluates_and_exports(work):
    out = work / 'nockpt'
    run(work, out, '--checkpoint=False', '--max_iters=2', '--eval_interval=1')
    assert sorted(os.listdir(out)) == ['log.jsonl', 'student']  # (no ckpt/: nothing to resume from, by request)
    assert [r['iter'] for r in map(json.loads, open(out / 'log.jsonl')) if 'val_ce' in r] == [0, 1, 2]
