"""
Plumbing that distill.py, eval.py and bench.py share and a reader of the training step need not study: loading
models (HF folders, hub ids, .gguf files converted once), a student cut from the teacher's blocks, FLOP counts
and the matmul rate for MFU, the CPU allocator setting, the memory estimate per rank, and crash-safe checkpoint
files.
"""
import json, os, re, shutil, time
import torch
import torch.nn.functional as F
import prepare_data
from configurator import ConfigError

# -----------------------------------------------------------------------------
# models

def model_path(spec):
    """A .gguf file is converted once to an HF folder (model and tokenizer) and cached: loading a GGUF
    dequantises every tensor, ~35 s for a 135M model."""
    if not spec.endswith('.gguf'):
        return spec
    if not os.path.isfile(spec):
        raise ConfigError(f"model file '{spec}' does not exist")
    from transformers import AutoModelForCausalLM
    folder = prepare_data.cache_dir(spec)
    prepare_data.load_tokenizer(spec)  # caches the tokenizer in the same folder
    if not os.path.exists(os.path.join(folder, 'model.safetensors')):
        gguf = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(spec)), gguf_file=os.path.basename(spec), dtype=torch.float32)
        config = gguf.config
        if hasattr(config, 'quantization_config'):
            del config.quantization_config  # the weights are dequantised now: a plain fp32 checkpoint
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # save_pretrained refuses GGUF-loaded models
        model.load_state_dict(gguf.state_dict())
        tmp = folder + f'.model{os.getpid()}'
        model.save_pretrained(tmp)
        for f in os.listdir(tmp):
            os.replace(os.path.join(tmp, f), os.path.join(folder, f))
        os.rmdir(tmp)
    return folder

def load_model(spec, trust_remote_code=False):
    import transformers
    from transformers import AutoModelForCausalLM
    transformers.utils.logging.disable_progress_bar()
    path = model_path(spec)
    if not os.path.exists(path) and (spec.startswith(('.', '/')) or spec.count('/') != 1):
        raise ConfigError(f"model '{spec}' is neither a local folder, a .gguf file nor a hub id (org/name)")
    if os.path.isfile(path) or (os.path.isdir(path) and not os.path.exists(os.path.join(path, 'config.json'))):
        raise ConfigError(f"'{spec}' is not a model: pass an HF model folder (with config.json), a .gguf file or a hub id")
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except Exception as e:  # a truncated weights file, an unknown architecture, no network for a hub id, ...
        raise ConfigError(f"cannot load model '{spec}': {(str(e).strip().splitlines() or [type(e).__name__])[0]}")

def model_tokenizer(spec):
    """The tokenizer that ships with a model, or None (e.g. a bare folder of weights)."""
    path = model_path(spec)
    files = ('tokenizer.json', 'tokenizer_config.json', 'vocab.json', 'tokenizer.model')
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in files):
        return None  # transformers would build an empty tokenizer from config.json alone
    try:
        return prepare_data.load_tokenizer(path)
    except Exception:
        return None

def check_vocabularies(meta, data_dir, student_model, student_tok, teacher_model, teacher_tok):
    """ConfigError unless each model's tokenizer is the one the dataset was prepared with for it (by fingerprint) and
    its head has a row for every token; the warnings to print where a model ships no tokenizer to compare."""
    cross = 'teacher_tokenizer' in meta
    warnings = []
    for name, model, tok, fingerprint, rows in (
            ('student', student_model, student_tok, meta['vocab_fingerprint'], meta['vocab_size']),
            ('teacher', teacher_model, teacher_tok, meta['teacher_vocab_fingerprint' if cross else 'vocab_fingerprint'],
             meta['teacher_vocab_size' if cross else 'vocab_size'])):
        if model is None:
            continue
        if tok is None:
            warnings.append(f"warning: the {name} ships no tokenizer: whether it reads {data_dir}'s tokens as they were meant "
                            f"could not be checked (only its output rows are); add the tokenizer files to its folder")
        elif prepare_data.vocab_fingerprint(tok) != fingerprint:
            raise ConfigError(f"the {name}'s tokenizer differs from the one {data_dir} was prepared with for it; logit distillation "
                              "needs one shared tokenizer, hidden-state distillation across tokenizers needs prepare_data.py --teacher_tokenizer")
        if output_rows(model) < rows:
            raise ConfigError(f'the {name} has {output_rows(model)} output rows but the tokenizer of {data_dir} has {rows} tokens')
    return warnings

def student_from_teacher_layers(teacher_model, layers):
    """A smaller model of the teacher's architecture: its embedding, the chosen blocks (in order) and its
    head (DistilBERT / Minitron depth pruning)."""
    import copy
    from transformers import AutoModelForCausalLM
    n = teacher_model.config.num_hidden_layers
    if not layers or any(not isinstance(l, int) or not 0 <= l < n for l in layers):
        raise ConfigError(f'student_layers must be a non-empty list of teacher blocks in [0, {n}), got {layers}')
    config = copy.deepcopy(teacher_model.config)
    config.num_hidden_layers = len(layers)
    if getattr(config, 'layer_types', None):
        config.layer_types = [config.layer_types[l] for l in layers]
    student_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    block = re.compile(r'\.(layers|h|blocks)\.(\d+)\.')
    keep = {l: i for i, l in enumerate(layers)}
    state = {}
    for k, v in teacher_model.state_dict().items():
        m = block.search(k)
        if m is None:
            state[k] = v.clone()
        elif int(m[2]) in keep:
            state[k[:m.start()] + f'.{m[1]}.{keep[int(m[2])]}.' + k[m.end():]] = v.clone()
    student_model.load_state_dict(state)
    return student_model

@torch.no_grad()
def block_influence(model, batches, blocks):
    """ShortGPT's block influence (Men et al. 2024), per block: 1 - the mean over supervised positions of the cosine
    between the hidden states entering and leaving it. A block that barely turns them matters least. batches: (X, M)
    pairs; blocks: the model's list of blocks."""
    sums, count, pending = torch.zeros(len(blocks), dtype=torch.float64), 0, {}
    def hook(i):
        def record(module, args, kwargs, output):
            h_in = args[0] if args else kwargs['hidden_states']
            h_out = output[0] if isinstance(output, tuple) else output
            pending[i] = F.cosine_similarity(h_in.double(), h_out.double(), dim=-1)
        return record
    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for X, M in batches:
            model(input_ids=X)
            keep = M.bool()
            sums += torch.stack([(1 - pending[i][keep]).sum() for i in range(len(blocks))])
            count += int(keep.sum())
    finally:
        for h in handles:
            h.remove()
    return (sums / max(count, 1)).tolist()

def choose_blocks(spec, model, batches, blocks):
    """student_layers='auto:N': the N blocks of the highest influence (in order), and every block's influence."""
    m = re.fullmatch(r'auto:(\d+)', spec)
    if not m or not 0 < int(m[1]) <= len(blocks):
        raise ConfigError(f"student_layers must be a list of teacher blocks or 'auto:N' with 0 < N <= {len(blocks)} (keep "
                          f"the N blocks that matter most), got {spec!r}")
    scores = block_influence(model, batches, blocks)
    return sorted(sorted(range(len(scores)), key=lambda l: -scores[l])[:int(m[1])]), scores

def cast_parameters(model, dtype):
    """The parameters in dtype, the buffers left as they are, as from_pretrained(dtype=) does: RoPE's inv_freq
    cast to bf16 loses 3 digits (cos off by 0.5 at position 4,000), model.to(dtype) would cast it too."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model

def output_rows(model):
    return model.get_output_embeddings().weight.shape[0]

def flops_per_token(model, seq_len, training):
    """6N (training) or 2N (forward) per token, N = non-embedding params + the output head, plus attention."""
    n = sum(p.numel() for p in model.parameters())
    if not model.config.tie_word_embeddings:
        n -= model.get_input_embeddings().weight.numel()
    attn = 2 * model.config.num_hidden_layers * model.config.hidden_size * seq_len
    return (6 * n + 6 * attn) if training else (2 * n + 2 * attn)

def measure_matmul_flops(device, dtype=torch.float32, seconds=1.0):
    """This device's sustained matmul rate (FLOP/s) in dtype: the MFU denominator. Square matmuls of 2048 on a CPU
    (1024 reads low on a loaded machine) and 8192 on a GPU, smaller where one already takes 0.05 s (bf16 emulated)."""
    sync = torch.cuda.synchronize if 'cuda' in str(device) else lambda: None
    g, n = torch.Generator().manual_seed(0), 256  # its own generator: the run's RNG stays untouched
    while True:
        a = torch.rand(n, n, generator=g).to(device, dtype)
        b = a.T.contiguous()
        t0 = time.time()
        a @ b  # (the first one also warms up)
        sync()
        if n >= (8192 if 'cuda' in str(device) else 2048) or time.time() - t0 > 0.05:
            break
        n *= 2
    count, t0 = 0, time.time()
    while time.time() - t0 < seconds:
        a @ b
        sync()
        count += 1
    return 2 * n ** 3 * count / (time.time() - t0)

# -----------------------------------------------------------------------------
# the machine

def choose_dtype(dtype, device):
    """(the compute dtype, why, the measured matmul rate of that dtype or None). 'auto': on CUDA bf16 where supported,
    else fp32; on a CPU bf16 autocast when its bf16 matmul is clearly (1.5x) faster than fp32, both measured here:
    CPUs with bf16 units (AMX) run it 3-4x faster, those without emulate it, hundreds of times slower."""
    if dtype != 'auto':
        return dtype, 'as set', None
    if 'cuda' in device:
        bf16 = torch.cuda.is_bf16_supported()
        return ('bfloat16', 'CUDA with bf16', None) if bf16 else ('float32', 'CUDA without bf16', None)
    rates = {d: measure_matmul_flops(device, getattr(torch, d)) for d in ('float32', 'bfloat16')}
    pick = 'bfloat16' if rates['bfloat16'] > 1.5 * rates['float32'] else 'float32'
    return pick, (f"bf16 matmul {rates['bfloat16'] / 1e9:.0f} vs fp32 {rates['float32'] / 1e9:.0f} GFLOP/s on this CPU"), rates[pick]

def cpu_name():
    """This CPU's model name and its bf16 instructions, for benchmark headers: figures are only comparable on one kind."""
    info = ''
    if os.path.exists('/proc/cpuinfo'):  # Linux
        with open('/proc/cpuinfo') as f:
            info = f.read()
    name = next((l.split(':', 1)[1].strip() for l in info.splitlines() if l.startswith('model name')), 'unknown CPU')
    units = [f for f in ('amx_bf16', 'avx512_bf16') if f in info.split()]
    return f'{name}, bf16 instructions: {", ".join(units) or "none"}'

def keep_freed_memory():
    """On a CPU, PyTorch has no caching allocator: glibc returns every freed block above 32 MB to the OS, and
    each fresh (chunk, V) tensor of the chunked loss is paged in again (measured: ~14% of a KD step here).
    Keep freed memory in the process for reuse within a step, as CUDA's allocator does, and return the function
    to call between steps, which hands the free pages back (malloc_trim): batches of other lengths would otherwise
    fragment the never-trimmed heap and grow it without bound (measured: +58 MB per step, 6.5 GB after 60 steps)."""
    try:
        import ctypes
        libc = ctypes.CDLL('libc.so.6')
        libc.mallopt(-4, 0)  # M_MMAP_MAX: large blocks come from the heap, not from fresh mmaps
        libc.mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: and the heap is not trimmed on every free
        def trim():  # every 10th call: each trim costs the next step its page faults again
            trim.calls += 1
            if trim.calls % 10 == 0:
                libc.malloc_trim(0)
        trim.calls = 0
        return trim
    except (OSError, AttributeError):
        return lambda: None  # not glibc: nothing to do

@torch.no_grad()
def plain_head(model, probe):
    """True when the model's logits are its final hidden states times its head's weight, what the chunked path
    computes. Checked on a probe batch, in the model's own dtype and device: a logit scale or multiplier, or
    hidden states scaled before the head, all differ; a head bias and soft-capping (small at small logits) are
    read from the model."""
    head = model.get_output_embeddings()
    if getattr(head, 'bias', None) is not None or getattr(model.config, 'final_logit_softcapping', None):
        return False
    training = model.training
    model.eval()
    z = model(input_ids=probe).logits.float()
    z_chunked = head(model.base_model(input_ids=probe).last_hidden_state).float()
    model.train(training)
    tol = 4 * torch.finfo(head.weight.dtype).eps
    return torch.allclose(z, z_chunked, rtol=tol, atol=tol * z.abs().max().item())

# -----------------------------------------------------------------------------
# memory

def block_activation_bytes(config, s):
    """Bytes a decoder block saves for backward per token, with compute dtype size s (4 fp32, 2 bf16 autocast), for
    HF's Llama-style blocks (tests/test_memory.py: exact for Llama, Qwen2 and Mistral, StableLM over by 4-17%): the
    fp32 residual stream and the two norms' normalised values (16d), the norms' outputs as the linears read them
    (fp32 once each, 8d, or a bf16 copy per linear, 10d), the rotated queries and the attention output (2d), the
    rotated keys and the values (2 kv), the MLP's four f-wide tensors (4f) and the attention's log-sum-exp (4h)."""
    d, h = config.hidden_size, config.num_attention_heads
    f = getattr(config, 'intermediate_size', None) or 4 * d
    kv = d // h * (getattr(config, 'num_key_value_heads', None) or h)
    return 16 * d + (8 * d if s == 4 else 10 * d) + s * (2 * d + 4 * f + 2 * kv) + 4 * h + 8

def memory_estimate(trainable, teacher, tokens, compute, world=1, fsdp=False, blocks=None):
    """Bytes per rank by part, for micro-batches of `tokens` tokens (the teacher's assumed as many), and the peak.
    Kept all along: the student's (and projections') fp32 parameters, gradients and AdamW moments, the teacher's
    parameters in their dtype; under fsdp each split on its first dimension (rank 0 holds the ceiling), a few units
    gathered whole at a time (two blocks with the prefetch, the root unit: the student's embeddings, head and
    projections, with its gradients; the teacher's embeddings and a head the loss reads). The teacher's forward
    (its blocks' working set, every hidden state HF returns) comes and goes before the student's step, which holds
    the teacher's outputs for the loss, what autograd saves (the blocks' by block_activation_bytes, the loss's,
    the projections'), and under autocast a copy of each student weight in the compute dtype."""
    s = 2 if compute in ('bfloat16', 'float16') else 4
    size = lambda ps: sum(p.numel() * p.element_size() for p in ps)
    share = lambda ps, split=None: sum(-(-p.shape[0] // world) * p[0].numel() * p.element_size() if fsdp and p.dim() and
                                       (split is None or id(p) in split) else p.numel() * p.element_size() for p in ps)
    student, pairs = trainable.model, trainable.layer_pairs
    cs, vocab, d = student.config, output_rows(student), student.config.hidden_size
    params = share(trainable.parameters())
    est = {'student parameters': params, 'gradients': params * (2 if world > 1 and not fsdp else 1),  # (DDP: + its buckets)
           'AdamW': 2 * params}
    act = tokens * (cs.num_hidden_layers * block_activation_bytes(cs, s) + 9 * d)  # (+ the embedding and final norm)
    if trainable.chunk:  # dL/dh and dL/dW (fp32); passing: a chunk's logits, teacher logits, softmaxes and gradient
        act, passing = act + tokens * d * 4 + vocab * d * 4, trainable.chunk * vocab * 4 * 6
    else:  # the logits in fp32 and the loss's softmaxes; passing: the logits in the compute dtype, their gradients, ...
        act, passing = act + tokens * vocab * 12, tokens * vocab * (s + 12)
    if pairs:  # per pair and position: the projection's fp32 input and output (and the RMS-normalised one), indices
        act += len(pairs) * tokens * (4 * (d + trainable.proj[0].out_features * (1 + trainable.rms_norm)) + 24)
    est['activations'] = act
    matrices = [p for p in student.parameters() if p.dim() == 2 and p is not student.get_input_embeddings().weight]
    est['weight copies'] = 2 * sum(p.numel() for p in matrices) if s == 2 else 0
    if fsdp:
        units = blocks(student) if blocks else []
        biggest = max((size(b.parameters()) for b in units), default=0)
        est['gathered'] = 2 * (size(trainable.parameters()) - sum(size(b.parameters()) for b in units)) + 4 * biggest
    teacher_kept = teacher_forward = 0
    if teacher is not None:
        ct, st = teacher.config, next(teacher.parameters()).element_size()
        units = [*blocks(teacher), teacher.get_input_embeddings(), teacher.get_output_embeddings()] if fsdp else []
        est['teacher parameters'] = share(teacher.parameters(), {id(p) for u in units for p in u.parameters()})  # (not its norm)
        dt, ft = ct.hidden_size, getattr(ct, 'intermediate_size', None) or 4 * ct.hidden_size
        head = teacher.get_output_embeddings().weight
        reads_head = trainable.w_kd > 0 and head is not teacher.get_input_embeddings().weight
        if fsdp:
            est['teacher gathered'] = (2 * max(size(b.parameters()) for b in blocks(teacher))
                                       + size(teacher.get_input_embeddings().parameters()) + (size([head]) if reads_head else 0))
        outputs = (dt if trainable.chunk else output_rows(teacher)) * (trainable.w_kd > 0) + dt * len(pairs)
        teacher_kept = tokens * st * outputs
        states = (ct.num_hidden_layers + 1) * dt if pairs else 2 * dt  # (HF returns every block's output if asked for one)
        teacher_forward = tokens * st * (states + 3 * ft + 4 * dt) + teacher_kept
    steady = sum(v for k, v in est.items() if k not in ('activations', 'weight copies'))
    est['peak'] = steady + max(teacher_forward, teacher_kept + est['activations'] + est['weight copies'] + passing)
    return est

def gb(n):
    return f'{n / 1e9:.3g} GB' if n >= 1e9 else f'{n / 1e6:.3g} MB'

def memory_line(est):
    parts = ', '.join(f'{k} {gb(v)}' for k, v in est.items() if v and k != 'peak')
    return f"memory per rank (estimate): {parts}; peak ~{gb(est['peak'])}"

# -----------------------------------------------------------------------------
# checkpoints

def checkpoint_iter(folder):
    """(iteration, None) for a complete checkpoint, else (None, what is wrong). Complete: its manifest, written
    last, is there and every file it lists has the size it records."""
    try:
        with open(os.path.join(folder, 'manifest.json')) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None, f'{folder} has no manifest (a save that did not finish)'
    problem = prepare_data.verify_files(folder, manifest['files'])
    return (None, problem) if problem else (manifest['iter_num'], None)

def save_checkpoint(folder, weights, optimizer_state, scaler, iter_num, data_position, rng_states, config):
    """Weights (a model, or under fsdp its gathered state dict) as safetensors, the rest (the optimizer's state dict,
    ...) as a torch file, written into folder.tmp, sealed and swapped in as the datasets
    are (prepare_data.seal, swap_in). A kill at any instant leaves at least one complete checkpoint among folder,
    folder.tmp and folder.tmp.old, and find_checkpoint picks the newest; the next save tidies up."""
    from safetensors.torch import save_file, save_model
    tmp = folder + '.tmp'
    done = checkpoint_iter(tmp)[0]
    if done is not None and done > (checkpoint_iter(folder)[0] or 0):
        prepare_data.swap_in(tmp, folder)  # a kill came between a complete save and its swap: finish that swap first
    for leftover in (tmp, tmp + '.old'):
        if os.path.exists(leftover):
            shutil.rmtree(leftover)
    os.makedirs(tmp)
    (save_model if isinstance(weights, torch.nn.Module) else save_file)(weights, os.path.join(tmp, 'model.safetensors'))
    torch.save({'optimizer': optimizer_state, 'scaler': scaler.state_dict(), 'iter_num': iter_num,
                'data_position': data_position, 'rng_states': rng_states, 'config': config},
               os.path.join(tmp, 'state.pt'))
    prepare_data.seal(tmp, 'manifest.json', {'iter_num': iter_num})
    prepare_data.swap_in(tmp, folder)

def find_checkpoint(folder):
    """The newest complete checkpoint among folder and what an interrupted save left (folder.tmp, folder.tmp.old):
    (its path, its iteration, what was wrong with the others)."""
    found, problems = [], []
    for path in (folder, folder + '.tmp', folder + '.tmp.old'):
        if os.path.isdir(path):
            it, problem = checkpoint_iter(path)
            legacy = [os.path.join(path, f) for f in ('model.safetensors', 'state.pt', 'manifest.json')]
            if it is None and path == folder and all(map(os.path.isfile, legacy[:2])) and not os.path.exists(legacy[2]):
                try:  # saved before manifests existed, when only a finished save was renamed into place
                    it = torch.load(legacy[1], weights_only=False)['iter_num']
                except Exception:
                    pass
            if it is None:
                problems.append(problem)
            else:
                found.append((it, path))
    if not found:
        raise ConfigError(f"init_from='resume' but there is no complete checkpoint in {folder}" +
                          (f' ({problems[0]})' if problems else '') + "; start again with init_from='scratch'")
    it, path = max(found, key=lambda f: f[0])  # the first of equals: folder itself
    return path, it, problems

def load_checkpoint(folder, raw_model, optimizer, scaler, config, world_size, sharded=False):
    """Weights and optimizer state into this run's, if it reads the same data stream: the data order depends on
    batch_size, gradient_accumulation_steps, seed and dataset, and each rank's RNG state on the number of ranks.
    sharded (fsdp): every rank reads the whole state and keeps its shard (the files must be on a shared filesystem)."""
    from safetensors.torch import load_file, load_model as load_weights
    state = torch.load(os.path.join(folder, 'state.pt'), weights_only=False)
    state['config'].setdefault('parallel', 'ddp')  # (written before fsdp existed)
    for key in ('batch_size', 'gradient_accumulation_steps', 'seed', 'dataset', 'parallel'):
        if state['config'][key] != config[key]:
            raise ConfigError(f"{key} was {state['config'][key]!r} when {folder} was written, now {config[key]!r}: resume with "
                              f"--{key}={state['config'][key]!r} (the data order depends on it), or start a new out_dir")
    if len(state['rng_states']) != world_size:
        raise ConfigError(f"the checkpoint was written by {len(state['rng_states'])} ranks; resume with the same number")
    try:
        if sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
            set_state_dict(raw_model, optimizer, model_state_dict=load_file(os.path.join(folder, 'model.safetensors')),
                           optim_state_dict=state['optimizer'], options=StateDictOptions(full_state_dict=True))
        else:
            load_weights(raw_model, os.path.join(folder, 'model.safetensors'))
    except Exception as e:  # another model than the one saved (changed student, layer_map, ...)
        raise ConfigError(f"cannot load {os.path.join(folder, 'model.safetensors')} into this run's model: "
                          f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}")
    if not sharded:
        optimizer.load_state_dict(state['optimizer'])
    scaler.load_state_dict(state['scaler'])
    return state

def trim_log(path, iter_num):
    """After a resume from iteration iter_num, the log holds what came before it: lines of the lost iterations
    (and a line a kill cut short) go."""
    if not os.path.exists(path):
        return
    keep = []
    for line in open(path):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and (r.get('iter', iter_num) < iter_num or (r.get('iter') == iter_num and 'val_ce' in r)):
            keep.append(line)
    with open(path + '.tmp', 'w') as f:
        f.writelines(keep)
    os.replace(path + '.tmp', path)

def rng_state():
    return {'cpu': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state() if torch.cuda.is_available() else None}

def set_rng_state(state):
    torch.set_rng_state(state['cpu'])
    if state['cuda'] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])
