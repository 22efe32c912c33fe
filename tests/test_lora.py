"""LoRA students (kd/lora.py, distill.py lora_*): the update against a float64 reference, value and gradient; the frozen
base in the compute dtype changes nothing under autocast; runs of every kind train the adapters alone; the merged
export is the base plus the adapters, the PEFT folder loads in peft with the same logits, eval.py scores either form;
resume after a stop and two ranks are the run itself; fsdp is refused; the memory estimate counts what a step holds."""
import json, os, re, shutil, subprocess, sys
import pytest, torch
import torch.nn as nn
from safetensors.torch import load_file
from conftest import ROOT, online, tiny_model
from test_distill import assert_same_run, command, run, train_log, weights, work  # (work: its data and models)
import distill
from kd import data, lora
from kd.configurator import ConfigError
from kd.machine import memory_estimate
from kd.models import load_model

def test_lora_linear_is_the_formula():
    """y = x W^T + b + (alpha / r) (x A^T) B^T, value and gradients (x, A, B), against float64 by hand; W and b get none."""
    torch.manual_seed(0)
    base = nn.Linear(12, 7).double()
    m = lora.LoRALinear(base.requires_grad_(False), 3, 6.0).double()
    with torch.no_grad():
        m.lora_B.weight.normal_()  # (zero at the start: the update would vanish)
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    W, b, A, B = (t.detach().clone().requires_grad_() for t in (base.weight, base.bias, m.lora_A.weight, m.lora_B.weight))
    ref = x @ W.T + b + 2.0 * (x @ A.T) @ B.T
    y = m(x)
    assert torch.allclose(y, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(y)
    gx, gA, gB = torch.autograd.grad((ref * g).sum(), (x, A, B))
    got = torch.autograd.grad((y * g).sum(), (x, m.lora_A.weight, m.lora_B.weight))
    assert all(torch.allclose(a, e, rtol=0, atol=1e-12) for a, e in zip(got, (gx, gA, gB)))
    assert m.weight.grad is None and not m.weight.requires_grad

def test_adapters_start_as_the_model_and_alone_train():
    model, X = tiny_model(hidden=32, layers=2), torch.randint(0, 259, (2, 16))
    before = model(X).logits
    line = lora.add_lora(model, 4, 8.0, 0.0, ['q_proj', 'v_proj', 'down_proj'], torch.float32)
    assert torch.equal(model(X).logits, before)  # (B = 0)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trained) == 2 * 3 * 2 and all(re.search(r'\.(q_proj|v_proj|down_proj)\.lora_[AB]\.weight$', n) for n in trained)
    per_layer = 4 * (32 + 32) + 4 * (32 + 32) + 4 * (64 + 32)  # (r (d_in + d_out) each: q, v, down)
    assert f'on 6 linear layers (q_proj, v_proj, down_proj): {2 * per_layer:,} trained parameters' in line
    assert 'model.layers.0.self_attn.q_proj.weight' in dict(model.named_parameters())  # (the base keeps its names)
    with pytest.raises(ConfigError, match=r"no linear layer named 'q_prj'; did you mean 'q_proj'\?"):
        lora.add_lora(tiny_model(), 4, 8.0, 0.0, ['q_prj'], torch.float32)
    with pytest.raises(ConfigError, match="no linear layer named 'lm_head'"):  # (the chunked loss reads its weight)
        lora.add_lora(tiny_model(), 4, 8.0, 0.0, ['lm_head'], torch.float32)

@pytest.mark.parametrize('chunk', [0, 16])
def test_frozen_base_in_the_compute_dtype_changes_nothing(chunk):
    """Under bf16 autocast, the frozen linear weights stored in bf16 give the very loss and adapter gradients of
    weights stored in fp32 (autocast casts them so at every use): an untied head, logit KD, plain and chunked."""
    teacher = tiny_model(vocab=300, hidden=32, seed=3).eval().requires_grad_(False)
    runs = []
    for dtype in (torch.float32, torch.bfloat16):
        student = tiny_model(hidden=32, seed=1)
        torch.manual_seed(5)
        lora.add_lora(student, 4, 8.0, 0.0, distill.lora_targets, dtype)
        with torch.no_grad():
            for m in lora.adapters(student).values():
                m.lora_B.weight.normal_(0, 0.02)
        model = distill.Trainable(student, 259, (0.5, 0.5, 0.0), distill.Divergence('fkl', 2.0), chunk)
        X = torch.randint(0, 259, (2, 24))
        pos = torch.arange(24).repeat(2)
        b = data.Batch(X, torch.randint(0, 259, (2, 24)), torch.ones(2, 24), data.Align(None, torch.arange(2).repeat_interleave(24), pos, pos))
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model(b, online(model, teacher)(b), 48)
        out.loss.backward()
        runs.append((out.loss, [p.grad for p in model.parameters() if p.requires_grad]))
    assert student.lm_head.weight.dtype == torch.bfloat16 and student.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(runs[0][0], runs[1][0]) and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))

LORA = ['--lora_rank=4', '--lora_alpha=8', '--batch_size=2', '--gradient_accumulation_steps=2', '--max_iters=3']

@pytest.mark.parametrize('mode', ['logits', 'logits bf16', 'hidden', 'on_policy', 'cache', 'sft unpacked'])
def test_runs_train_the_adapters_alone_and_export_base_plus_adapters(work, mode):
    """Each kind of run: the checkpoint holds the adapters (and the hidden loss's projections) alone; the merged export
    is the student's own weights where nothing was adapted and W + (alpha / r) B A where something was (1e-6), with B
    trained away from 0 (bf16: the start is the fp32 student as loaded, not the frozen copy in bf16); the adapter folder
    loads (lora.load_adapter, as eval.py does) to the same model."""
    extra = {'logits': [], 'logits bf16': ['--dtype=bfloat16'], 'hidden': ['--distill=hidden'], 'on_policy': ['--on_policy=1', '--max_new_tokens=8'],
             'cache': ['--teacher_cache=k8'], 'sft unpacked': ['--distill=none', '--pack=False']}[mode]
    if mode == 'cache':
        subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'cache_teacher.py'), f'--teacher={work / "teacher"}',
                        f'--dataset={work / "data" / "tiny"}', '--device=cpu', '--dtype=float32', '--block_size=48',
                        '--k=8', '--temperatures=2', '--name=k8'], check=True, capture_output=True, cwd=work, timeout=300)
    out = work / f'run-{mode.replace(" ", "-")}'
    proc = run(work, out, *LORA, *extra)
    assert 'LoRA: rank 4, alpha 8, on 14 linear layers' in proc.stdout
    ckpt = weights(out)
    assert ckpt and all('.lora_' in k or k.startswith('proj.') for k in ckpt)
    assert any(k.startswith('proj.') for k in ckpt) == (mode == 'hidden')
    start, merged = load_file(work / 'student' / 'model.safetensors'), load_file(out / 'student' / 'model.safetensors')
    adapter = load_file(out / 'adapter' / 'adapter_model.safetensors')
    assert set(merged) == set(start)
    for k, w in start.items():
        path = k[:-len('.weight')]
        if f'base_model.model.{path}.lora_A.weight' in adapter:
            A, B = (adapter[f'base_model.model.{path}.lora_{ab}.weight'].double() for ab in 'AB')
            assert B.abs().max() > 0
            assert torch.allclose(merged[k].double(), w.double() + 2.0 * B @ A, rtol=0, atol=1e-6), k
        else:
            assert torch.equal(merged[k], w), k  # (frozen: embeddings, norms, the head)
    config = json.load(open(out / 'adapter' / 'adapter_config.json'))
    assert config['base_model_name_or_path'] == str(work / 'student') and config['r'] == 4
    X = torch.randint(0, 259, (2, 20))
    with torch.no_grad():
        assert torch.equal(lora.load_adapter(str(out / 'adapter'), load_model)(X).logits,
                           load_model(str(out / 'student'))(X).logits)

def test_peft_loads_the_adapter_with_the_same_logits(work):
    """peft (a test-only dependency) puts the exported adapters on the base: the logits of the LoRA student as it
    trained (unmerged, fp32) within 1e-5; adapters peft wrote load here with peft's logits; eval.py scores the adapter
    folder as the merged student."""
    import peft  # (requirements-dev.txt)
    out = work / 'peft'
    run(work, out, *LORA, '--lora_dropout=0.1', '--lora_targets=["q_proj", "o_proj", "up_proj"]')
    base = load_model(str(work / 'student'))
    model = peft.PeftModel.from_pretrained(base, str(out / 'adapter')).eval()
    ours = load_model(str(work / 'student'))
    lora.add_lora(ours, 4, 8.0, 0.1, ['q_proj', 'o_proj', 'up_proj'], torch.float32)
    adapter = load_file(out / 'adapter' / 'adapter_model.safetensors')
    missing, unexpected = ours.load_state_dict({k[len('base_model.model.'):]: v for k, v in adapter.items()}, strict=False)
    assert not unexpected and not [k for k in missing if '.lora_' in k]
    X = torch.randint(0, 259, (3, 40))
    with torch.no_grad():
        z_peft, z_ours = model(X).logits, ours.eval()(X).logits
    assert (z_peft - z_ours).abs().max() < 1e-5
    assert (z_ours - load_model(str(out / 'student'))(X).logits).abs().max() < 1e-4  # (merged: the same up to round-off)
    # adapters peft itself wrote: rsLoRA's scale alpha / sqrt(r), targets as a regular expression or names
    for i, kw in enumerate(({'use_rslora': True, 'target_modules': r'.*\.(q_proj|down_proj)'},
                            {'target_modules': ['v_proj', 'gate_proj'], 'lora_alpha': 3})):
        torch.manual_seed(i)
        written = peft.get_peft_model(load_model(str(work / 'student')), peft.LoraConfig(
            r=4, lora_alpha=kw.pop('lora_alpha', 8), init_lora_weights=False, **kw))  # (B random: not the identity)
        written.save_pretrained(out / f'written{i}')
        with torch.no_grad():
            z = written.eval()(X).logits
            assert (lora.load_adapter(str(out / f'written{i}'), load_model)(X).logits - z).abs().max() < 1e-5
    config = json.load(open(out / 'written1' / 'adapter_config.json'))
    json.dump({**config, 'rank_pattern': {'v_proj': 2}}, open(out / 'written1' / 'adapter_config.json', 'w'))
    with pytest.raises(ConfigError, match="only plain LoRA adapters are read .*none of rank_pattern"):
        lora.load_adapter(str(out / 'written1'), load_model)
    scores = []
    for spec in (out / 'adapter', out / 'student'):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, 'eval.py'), str(spec), f'--data={work / "data" / "tiny"}',
                               '--tokenizer=bytes', '--device=cpu', '--dtype=float32', '--block_size=48',
                               f'--output={out / "eval.json"}'], capture_output=True, text=True, cwd=work, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        scores.append(next(iter(json.load(open(out / 'eval.json'))['results'].values()))['val_loss'])
    assert scores[0] == scores[1]

def tied_student(work):
    """A llama student whose head is its embedding (as SmolLM2's, Qwen2.5-0.5B's)."""
    import transformers as T
    if not (work / 'tied').exists():
        torch.manual_seed(4)
        T.AutoModelForCausalLM.from_config(T.LlamaConfig(vocab_size=280, hidden_size=16, intermediate_size=32,
                                                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                                          max_position_embeddings=512, tie_word_embeddings=True)).save_pretrained(work / 'tied')
    return work / 'tied'

@pytest.mark.parametrize('student', ['untied fp32', 'tied bf16'])
def test_resume_with_adapters_is_bit_identical_and_their_settings_are_the_run(work, student):
    """4 iterations straight == 2, stop, resume, 2 more, with adapter dropout (its RNG draws are part of the run); a
    resume with another alpha, or without adapters, or onto a student whose files changed, is refused in one line."""
    if student == 'tied bf16':
        shutil.copytree(tied_student(work), work / 'copy', dirs_exist_ok=True)
    else:
        shutil.copytree(work / 'student', work / 'copy', dirs_exist_ok=True)
    common = [*LORA[:4], '--max_iters=4', '--lora_dropout=0.2', '--eval_interval=2', f'--student={work / "copy"}',
              *(['--dtype=bfloat16'] if 'bf16' in student else [])]
    run(work, work / 'straight', *common)
    run(work, work / 'split', *common, '--stop_iter=2')
    assert json.load(open(work / 'split' / 'ckpt' / 'state.json'))['iter_num'] == 2
    run(work, work / 'split', *common, '--init_from=resume')
    ws, wr = weights(work / 'straight'), weights(work / 'split')
    assert ws.keys() == wr.keys() and all(torch.equal(ws[k], wr[k]) for k in ws)
    assert [r['loss'] for r in train_log(work / 'straight')] == [r['loss'] for r in train_log(work / 'split')]
    assert load_file(work / 'straight' / 'student' / 'model.safetensors').keys() == \
        load_file(work / 'split' / 'student' / 'model.safetensors').keys()
    for other, said in ((['--lora_alpha=16'], 'were [4, 8.0, 0.2,'), (['--lora_rank=0'], 'now off'),
                        ([], "the student's frozen weights are not those")):
        run(work, work / 'again', *common, '--stop_iter=2')
        if not other:  # the student's files replaced by another model's
            shutil.rmtree(work / 'copy')
            shutil.copytree(work / 'student' if student == 'tied bf16' else tied_student(work), work / 'copy')
        proc = run(work, work / 'again', *common, *other, '--init_from=resume', check=False)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1 and said in err[0], proc.stderr[-800:]

def test_killed_then_resumed_with_adapters_is_bit_identical(work):
    """Real SIGKILLs inside the second and the third checkpoint's save (test_robust's hook: at the n-th file operation),
    then resume: the adapters and the log's losses equal the uninterrupted run's, bit for bit."""
    from test_robust import KILL
    common = [*LORA[:4], '--max_iters=6', '--lora_dropout=0.2', '--eval_interval=2']
    run(work, work / 'whole', *common)
    whole = weights(work / 'whole')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    for n in (14, 17, 24):
        out = work / f'kill{n}'
        python, *rest = command(work, out, *common)
        killed = subprocess.run([python, '-c', KILL, *rest], env=dict(env, KILL_AT=str(n)), cwd=ROOT, capture_output=True)
        assert killed.returncode == -9 and (out / 'ckpt').exists(), killed.stderr[-1000:]
        run(work, out, *common, '--init_from=resume')
        got = weights(out)
        assert got.keys() == whole.keys() and all(torch.equal(got[k], whole[k]) for k in whole), n
        assert [r['loss'] for r in train_log(out)] == [r['loss'] for r in train_log(work / 'whole')]

def test_two_ranks_equal_one_process_and_fsdp_is_refused(work):
    run(work, work / 'one', *LORA[:2], '--batch_size=1', '--gradient_accumulation_steps=4', '--max_iters=2')
    run(work, work / 'two', *LORA[:2], '--batch_size=1', '--gradient_accumulation_steps=4', '--max_iters=2', nproc=2)
    assert_same_run(work / 'one', work / 'two')
    proc = run(work, work / 'fsdp', *LORA, '--parallel=fsdp', nproc=2, check=False)
    assert proc.returncode != 0 and "lora_rank > 0 under parallel='fsdp' is refused" in proc.stderr
    assert not (work / 'fsdp' / 'ckpt').exists()

@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_memory_estimate_counts_the_frozen_base_and_the_adapters(dtype):
    """After a step: the parameters (the frozen base in its dtype), gradients and AdamW moments (the adapters'
    alone) are the estimate's; the weight copies are the adapters' (bf16, within 10%); the activations within 5% of what
    autograd saves."""
    from test_memory import saved
    student = tiny_model(hidden=64, layers=2, seed=1)
    lora.add_lora(student, 8, 16.0, 0.0, distill.lora_targets, getattr(torch, dtype))
    model = distill.Trainable(student, 259, (1.0, 0.0, 0.0), distill.Divergence(), 16)
    X = torch.randint(0, 259, (2, 128))
    pos = torch.arange(128).repeat(2)
    b = data.Batch(X, torch.randint(0, 259, (2, 128)), torch.ones(2, 128), data.Align(None, torch.arange(2).repeat_interleave(128), pos, pos))
    optimizer = distill.configure_optimizer(model, 1e-3, 0.0, (0.9, 0.95))
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == 'bfloat16'):
        model(b, online(model, None)(b))
        acts, copies, out = saved(lambda: model(b, online(model, None)(b)), model)
    out.loss.backward()
    optimizer.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    est = memory_estimate(model, None, X.numel(), dtype)
    assert est['student parameters'] == nbytes(model.parameters())
    assert est['gradients'] == nbytes(p.grad for p in model.parameters() if p.grad is not None)
    assert est['AdamW'] == nbytes(t for s in optimizer.state.values() for t in s.values() if t.dim())
    assert est['AdamW'] == 8 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    # (the first block's A of q, k, v are not kept: nothing before them trains, so their input needs no gradient)
    assert est['weight copies'] == copies == 0 if dtype == 'float32' else copies <= est['weight copies'] <= 1.1 * copies
    assert abs(est['activations'] / acts - 1) < 0.05, (acts, est['activations'])

def test_qwen7b_lora_config_figures():
    """configs/qwen7b_lora.py's header states the estimate for Qwen2-7B's shape (built on the meta device) with its
    own settings, and for full fine-tuning of the same student."""
    import transformers as T
    path = os.path.join(ROOT, 'configs', 'qwen7b_lora.py')
    config = {}
    exec(open(path).read(), config)
    text = ' '.join(line[1:].strip() for line in open(path).read().splitlines() if line.startswith('#'))
    shape = T.Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                          num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)
    tokens, est = config['batch_size'] * config['block_size'], {}
    for rank in (config['lora_rank'], 0):
        with torch.device('meta'):
            student = T.AutoModelForCausalLM.from_config(shape)
        assert student.num_parameters() == 7_615_616_512
        if rank:
            lora.add_lora(student, rank, config['lora_alpha'], 0.0, distill.lora_targets, torch.bfloat16)
            trained = sum(p.numel() for p in student.parameters() if p.requires_grad)
        with torch.device('meta'):
            model = distill.Trainable(student, 152064, (0.5, 0.5, 0.0), distill.Divergence('fkl', 1.0), 1024)
        est[rank] = {k: v / 1e9 for k, v in memory_estimate(model, None, tokens, config['dtype']).items()}
    lora_est, full = est[config['lora_rank']], est[0]
    figures = re.search(r'([\d,]+) trained parameters; parameters ([\d.]+) GB .{,60}, gradients ([\d.]+) GB, AdamW ([\d.]+) GB, '
                        r'activations ([\d.]+) GB: peak ~([\d.]+) GB at ([\d,]+) tokens', text)
    assert figures, 'the header states the estimate'
    assert int(figures[1].replace(',', '')) == trained and int(figures[7].replace(',', '')) == tokens
    assert [float(figures[i]) for i in range(2, 7)] == [round(lora_est[k], 2 if lora_est[k] < 10 else 1) for k in
                                                         ('student parameters', 'gradients', 'AdamW', 'activations', 'peak')]
    assert lora_est['peak'] < 80 and f"~{80 - lora_est['peak']:.0f} GB of the GPU to spare" in text
    figures = re.search(r'parameters ([\d.]+) GB \+ gradients ([\d.]+) GB \+ AdamW ([\d.]+) GB before activations: peak ~(\d+) GB', text)
    assert [float(f) for f in figures.groups()] == [round(full[k], 1) if k != 'peak' else round(full[k]) for k in
                                                    ('student parameters', 'gradients', 'AdamW', 'peak')]
