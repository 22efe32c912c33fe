"""machine.memory_estimate, the start-up memory line, held against what runs here hold: the bytes autograd saves for
backward (counted by storage, in one process), the parameters, gradients and AdamW moments after a step, the shards
FSDP2 leaves on each of 2 ranks; and configs/llama70b_stablelm.py's figures, recomputed from the models' shapes."""
import json, os, re, subprocess, sys, weakref
import pytest, torch
import transformers as T
from conftest import ROOT, online
import distill
from kd import data, machine
from kd.chunked import auto_chunk
from kd.machine import block_activation_bytes, memory_estimate
from kd.models import cast_parameters

def llama(d, f, h, kv, layers, vocab=300, arch=T.LlamaConfig, **kw):
    torch.manual_seed(0)
    cfg = arch(vocab_size=vocab, hidden_size=d, intermediate_size=f, num_hidden_layers=layers, num_attention_heads=h,
               num_key_value_heads=kv, **kw)
    return T.AutoModelForCausalLM.from_config(cfg).float()

def saved(fn, *modules):
    """(bytes autograd holds for backward once fn has run, those of them that are weights cast to the compute dtype),
    each storage once; parameters themselves are not counted, nor what was saved and freed again within fn (weak
    references: a freed storage's address may come back for another tensor)."""
    params = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
    refs = []
    def pack(t):
        refs.append((weakref.ref(t), t.grad_fn is not None and t.grad_fn.name() == 'TBackward0'))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    acts, copies = {}, {}
    for ref, is_copy in refs:
        t = ref()
        if t is not None and t.untyped_storage().data_ptr() not in params:
            (copies if is_copy else acts)[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(acts.values()), sum(copies.values()), out

def autocast(dtype):
    return torch.autocast('cpu', dtype=getattr(torch, dtype), enabled=dtype != 'float32')

@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('arch', [T.LlamaConfig, T.Qwen2Config, T.MistralConfig, T.StableLmConfig], ids=lambda a: a.__name__[:-6])
def test_block_formula_is_what_a_block_saves(arch, dtype):
    """Per token and block, by the difference between 3 and 1 blocks: exact for the Llama family, over for StableLM."""
    for d, f, h, kv in [(64, 256, 4, 1), (96, 384, 6, 3), (128, 160, 8, 8)]:
        X = torch.randint(0, 300, (2, 64))
        per_run = []
        for layers in (1, 3):
            m = llama(d, f, h, kv, layers, arch=arch)
            with autocast(dtype):
                per_run.append(saved(lambda: m.base_model(input_ids=X), m)[0])
        measured = (per_run[1] - per_run[0]) / 2 / X.numel()
        estimate = block_activation_bytes(m.config, 2 if dtype == 'bfloat16' else 4)
        if arch is T.StableLmConfig:
            assert measured <= estimate <= 1.2 * measured, (d, f, h, kv, measured, estimate)
        else:
            assert estimate == measured, (d, f, h, kv, measured, estimate)

MODES = {'sft': ((1.0, 0.0, 0.0), 16, [], False), 'kd chunked': ((0.5, 0.5, 0.0), 16, [], False),
         'kd plain': ((0.5, 0.5, 0.0), 0, [], False), 'hidden': ((0.5, 0.0, 0.5), 16, [(1, 2), (2, 4)], False),
         'hidden rms': ((0.5, 0.0, 0.5), 16, [(1, 2), (2, 4)], True)}

def setup(mode, dtype, **teacher_config):
    weights, chunk, pairs, rms = MODES[mode]
    student, teacher = llama(64, 256, 4, 1, 2), llama(96, 192, 4, 2, 4, **teacher_config).eval().requires_grad_(False)
    cast_parameters(teacher, getattr(torch, dtype))
    model = distill.Trainable(student, 300, weights, distill.Divergence('fkl', 2.0, 0.5), chunk,
                              distill.LayerMap(pairs, 64, 96, 'mse', rms) if pairs else None)
    rows, n = 2, 128
    X = torch.randint(0, 259, (rows, n))
    pos = torch.arange(n).repeat(rows)
    align = data.Align(None, torch.arange(rows).repeat_interleave(n), pos, pos)
    b = data.Batch(X, torch.randint(0, 259, (rows, n)), torch.ones(rows, n), align)
    return model, teacher if weights[1] or pairs else None, b

@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('mode', list(MODES))
def test_activations_are_what_the_step_saves(mode, dtype):
    """The whole student forward with its loss (blocks, head, chunked or plain loss, projections): within 3% (measured:
    <= 1.7%, the plain path)."""
    model, teacher, b = setup(mode, dtype)
    with autocast(dtype):
        t_out = online(model, teacher)(b)
        model(b, t_out)  # (a first call builds what HF caches, e.g. attention masks: up to 57 KB more, once)
        acts, copies, _ = saved(lambda: model(b, t_out), model, *([teacher] if teacher else []))
    est = memory_estimate(model, teacher, b.X.numel(), dtype)
    assert abs(est['activations'] / acts - 1) < 0.03, (acts, est['activations'])
    head = model.model.get_output_embeddings().weight.numel() * 2  # (the chunked loss's copy of the head is not saved)
    assert (est['weight copies'] == copies == 0) if dtype == 'float32' else copies <= est['weight copies'] <= copies + head

@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('mode', list(MODES))
def test_step_peak_is_what_the_profiler_sees(mode, dtype):
    """A whole step (teacher forward, loss, backward, AdamW) after a first one: the peak of the tensors alive during
    it above what was alive before (the profiler's allocation record; not the allocator's RSS), against the
    estimate's peak less what was there before the step (parameters, AdamW moments): 0.9-1.25x."""
    from torch.profiler import ProfilerActivity, profile
    model, teacher, b = setup(mode, dtype)
    optimizer = distill.configure_optimizer(model, 1e-3, 0.0, (0.9, 0.95))
    def step():
        with autocast(dtype):
            out = model(b, online(model, teacher)(b))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == '[memory]'), key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    est = memory_estimate(model, teacher, b.X.numel(), dtype)
    during = est['peak'] - est['student parameters'] - est['AdamW'] - est.get('teacher parameters', 0)
    assert 0.9 < during / peak < 1.25, (peak, during)

def test_parameters_gradients_adamw_after_a_step():
    model, teacher, b = setup('hidden', 'float32')
    optimizer = distill.configure_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
    model(b, online(model, teacher)(b)).loss.backward()
    optimizer.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    est = memory_estimate(model, teacher, b.X.numel(), 'float32')
    assert est['student parameters'] == nbytes(model.parameters())
    assert est['gradients'] == nbytes(p.grad for p in model.parameters())
    assert est['AdamW'] == nbytes(t for s in optimizer.state.values() for t in s.values() if t.dim())  # (not the steps)
    assert est['teacher parameters'] == nbytes(teacher.parameters())
    assert memory_estimate(model, teacher, b.X.numel(), 'float32', world=2)['gradients'] == 2 * est['gradients']  # DDP's buckets

def on_two_ranks(source, tmp_path, *args):
    """Run a probe script's source under torchrun with 2 CPU ranks (gloo); it writes its findings into tmp_path."""
    (tmp_path / 'probe.py').write_text(source)
    log = open(tmp_path / 'log', 'w+')
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(tmp_path / 'probe.py'),
                           ROOT, str(tmp_path), *args], stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=300)
    assert proc.returncode == 0, open(log.name).read()[-3000:]

FSDP_PROBE = r'''
import json, os, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, os.path.join(sys.argv[1], 'tests'))
dist.init_process_group('gloo')
import distill
from kd import machine
from test_memory import setup
from conftest import online
from kd.machine import memory_estimate
mode, tied = sys.argv[3], sys.argv[4] == 'tied'  # (odd first dimensions: a vocabulary of 300 rows, 96 = 48 + 48)
model, teacher, b = setup(mode, 'float32', tie_word_embeddings=tied)
est = memory_estimate(model, teacher, b.X.numel(), 'float32', dist.get_world_size(), True)
whole = model(b, online(model, teacher)(b)).loss.item()
machine.shard(model, teacher)
optimizer = distill.configure_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
sharded = online(model, teacher, sharded=True)
out = model(b, sharded(b))
out.loss.backward()
sharded.release()  # (as distill.py does after the loss)
optimizer.step()
local = lambda ts: sum((t.to_local() if hasattr(t, 'to_local') else t).numel() * t.element_size() for t in ts)
held = {'student parameters': local(model.parameters()), 'gradients': local(p.grad for p in model.parameters()),
        'AdamW': local(t for s in optimizer.state.values() for t in s.values() if t.dim()),
        'teacher parameters': local(teacher.parameters()), 'teacher total': sum(p.numel() * 4 for p in teacher.parameters()),
        'full-size teacher tensors': sum(not hasattr(p, 'to_local') and p.dim() == 2 for p in teacher.parameters())}
json.dump({'estimate': est, 'held': held, 'loss': [whole, out.loss.item()]}, open(sys.argv[2] + f'/rank{dist.get_rank()}.json', 'w'))
del model, teacher, optimizer  # (as distill.py: nothing holds the process group when it ends)
import gc; gc.collect(); dist.barrier()
dist.destroy_process_group()
'''

@pytest.mark.parametrize('mode,tied', [('hidden', 'untied'), ('kd chunked', 'tied')])
def test_fsdp_shards_are_the_estimate(tmp_path, mode, tied):
    """2 ranks: what each holds after a step; rank 0 (the ceiling of every split) exactly as estimated, the teacher's
    parameters about half of the whole on each, none of its matrices whole (a head tied to the embeddings is one
    shard, not a second copy of them), the loss as before sharding."""
    on_two_ranks(FSDP_PROBE, tmp_path, mode, tied)
    ranks = [json.load(open(tmp_path / f'rank{r}.json')) for r in (0, 1)]
    est, held = ranks[0]['estimate'], ranks[0]['held']
    for part in ('student parameters', 'gradients', 'AdamW', 'teacher parameters'):
        assert held[part] == est[part], part
        assert ranks[1]['held'][part] <= held[part]
    assert all(abs(r['held']['teacher parameters'] / (held['teacher total'] / 2) - 1) < 0.02 for r in ranks)
    assert all(r['held']['full-size teacher tensors'] == 0 for r in ranks)
    assert all(r['loss'][1] == pytest.approx(r['loss'][0], rel=1e-5) for r in ranks)

DDP_PROBE = r'''
import json, os, sys, torch.distributed as dist
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, os.path.join(sys.argv[1], 'tests'))
dist.init_process_group('gloo')
import distill
from torch.nn.parallel import DistributedDataParallel as DDP
from test_memory import setup
from conftest import online
from kd.machine import memory_estimate
model, teacher, b = setup('hidden', 'float32')
est = memory_estimate(model, teacher, b.X.numel(), 'float32', dist.get_world_size(), False)
ddp = DDP(model)
ddp(b, online(model, teacher)(b)).loss.backward()
held = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()) + int(ddp._get_ddp_logging_data()['bucket_sizes'])
json.dump({'estimate': est['gradients'], 'held': held}, open(sys.argv[2] + f'/ddp{dist.get_rank()}.json', 'w'))
del ddp, model, teacher
import gc; gc.collect(); dist.barrier()
dist.destroy_process_group()
'''

def test_ddp_gradients_and_buckets_are_the_estimate(tmp_path):
    """2 DDP ranks: the gradients and DDP's all-reduce buckets (its own record of their sizes) = the estimate's."""
    on_two_ranks(DDP_PROBE, tmp_path)
    for r in (0, 1):
        got = json.load(open(tmp_path / f'ddp{r}.json'))
        assert got['held'] == got['estimate']

CHUNK = auto_chunk(100352, 'bfloat16')  # the config's loss_chunk ('auto', bf16)

def big_pair(world_pairs=((4, 13), (8, 27), (12, 40), (16, 53), (20, 67), (24, 80))):
    """configs/llama70b_stablelm.py's models, by their published shapes, on the meta device (no memory)."""
    with torch.device('meta'):
        teacher = T.AutoModelForCausalLM.from_config(T.LlamaConfig(
            vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
            num_key_value_heads=8, tie_word_embeddings=False), dtype=torch.bfloat16)
        student = T.AutoModelForCausalLM.from_config(T.StableLmConfig(
            vocab_size=100352, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=32,
            num_key_value_heads=32, use_qkv_bias=True, partial_rotary_factor=0.25, tie_word_embeddings=False), dtype=torch.float32)
        model = distill.Trainable(student, 100352, (0.5, 0.0, 0.5), distill.Divergence('fkl', 1.0, 0.5), CHUNK,
                                  distill.LayerMap(world_pairs, 2048, 8192, 'cosine', True))
    return model, teacher

def test_llama70b_config_figures():
    """The per-GPU figures in the config's header are the estimate's, for the config's own settings."""
    header = open(os.path.join(ROOT, 'configs', 'llama70b_stablelm.py')).read()
    config = {}
    exec(header, config)
    model, teacher = big_pair(config['layer_map'])
    assert sum(p.numel() for p in teacher.parameters()) == 70_553_706_496 and model.model.num_parameters() == 1_644_515_328
    tokens = config['batch_size'] * config['block_size']
    carried = 0  # (across tokenizers: the teacher's columns carried onto the student's)
    peak = lambda world, n=tokens: memory_estimate(model, teacher, n, config['dtype'], world, True, carried)['peak']
    fits = lambda world: max(n for n in range(1024, 200_000, 1024) if peak(world, n) <= 80e9)  # tokens per micro-batch
    text = ' '.join(line[1:].strip() for line in header.splitlines() if line.startswith('#'))
    figures = re.search(r'peak ~([\d.]+) GB per GPU at ([\d,]+) tokens on 8 GPUs \(~([\d.]+) GB on 16\); a micro-batch of up to '
                        r'~([\d,]+) tokens fits 8 x 80 GB, ~([\d,]+) on 16', text)
    assert figures, 'the header states the estimate'
    assert float(figures[1]) == round(peak(8) / 1e9, 1) and int(figures[2].replace(',', '')) == tokens
    assert float(figures[3]) == round(peak(16) / 1e9, 1)
    assert int(figures[4].replace(',', '')) == fits(8) and int(figures[5].replace(',', '')) == fits(16)
    # the logit route across the tokenizers (and both terms): the teacher's 128,256 columns carried onto the student's
    for weights, pattern in (((0.5, 0.5, 0.0), r'logit route: peak ~([\d.]+) GB per GPU at [\d,]+ tokens on 8 GPUs \(~([\d.]+) '
                              r'GB on 16\); a micro-batch of up to ~([\d,]+) tokens fits 8 x 80 GB, ~([\d,]+) on 16'),
                             ((0.5, 0.5, 0.5), r'Both terms .{,40}: peak ~([\d.]+) GB at [\d,]+ tokens on 8 GPUs')):
        with torch.device('meta'):
            model = distill.Trainable(model.model, torch.arange(100352), weights, distill.Divergence('fkl', 2.0, 0.5),
                                      CHUNK, distill.LayerMap(config['layer_map'], 2048, 8192, 'cosine', True)
                                      if weights[2] else None)
        carried = 128256
        figures = re.search(pattern, text)
        assert figures, 'the header states the estimate of the logit route'
        assert float(figures[1]) == round(peak(8) / 1e9, 1)
        if not weights[2]:
            assert float(figures[2]) == round(peak(16) / 1e9, 1)
            assert int(figures[3].replace(',', '')) == fits(8) and int(figures[4].replace(',', '')) == fits(16)

KEEP_AND_TRIM = r'''
import os, sys, torch
sys.path.insert(0, sys.argv[1])
from kd import machine
rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
trim = machine.keep_freed_memory()
base = rss()
x = torch.ones(256 * 2 ** 20 // 4)  # 256 MB, touched
del x
kept = rss() - base
for _ in range(9):
    trim()
nine = rss() - base
trim()  # the 10th call hands the free pages back
print(kept, nine, rss() - base)
'''

def test_freed_memory_is_kept_then_trimmed():
    """On a CPU distill.py keeps freed blocks for reuse (a freed 256 MB block stays in the process) and hands the
    free pages back every 10th call of the trim it gets: without that, batches of varied lengths grew the heap by
    ~58 MB a step (6.5 GB after 60 steps of the CPU experiment; bounded since)."""
    out = subprocess.run([sys.executable, '-c', KEEP_AND_TRIM, ROOT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    kept, nine, after = map(int, out.stdout.split())
    assert kept > 200 * 2 ** 20 and nine > 200 * 2 ** 20 and after < 50 * 2 ** 20, (kept, nine, after)
