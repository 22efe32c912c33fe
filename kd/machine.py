"""
The machine: torchrun's processes, the compute dtype (measured where it matters), FLOP counts and the matmul rate
for MFU, the CPU allocator setting, the memory estimate per rank, and the FSDP2 helpers.
"""
import datetime, os, time
import torch
import torch.distributed as dist
from kd.models import blocks, output_rows

def init_distributed(device):
    """(ddp, rank, local_rank, world_size, this rank's device). torchrun's environment decides, so one code path
    serves one process and many; nccl on GPUs, gloo on CPUs (DDP is testable on a CPU). The timeout is generous:
    the other ranks wait while rank 0 converts a large teacher."""
    if int(os.environ.get('RANK', -1)) == -1:
        return False, 0, 0, 1, device
    dist.init_process_group(backend='nccl' if 'cuda' in device else 'gloo', timeout=datetime.timedelta(hours=2))
    rank, local_rank = dist.get_rank(), int(os.environ['LOCAL_RANK'])
    if 'cuda' in device:
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    return True, rank, local_rank, dist.get_world_size(), device

def choose_dtype(dtype, device):
    """(the compute dtype, why, the measured matmul rate of that dtype or None), the same on every rank. 'auto': on
    CUDA bf16 where supported, else fp32; on a CPU bf16 autocast when its bf16 matmul is clearly (1.5x) faster than
    fp32, both measured here: CPUs with bf16 units (AMX) run it 3-6x faster, those without emulate it, hundreds of
    times slower."""
    if dtype != 'auto':
        return dtype, 'as set', None
    if 'cuda' in device:
        bf16 = torch.cuda.is_bf16_supported()
        return ('bfloat16', 'CUDA with bf16', None) if bf16 else ('float32', 'CUDA without bf16', None)
    rates = {d: measure_matmul_flops(device, getattr(torch, d)) for d in ('float32', 'bfloat16')}
    pick = 'bfloat16' if rates['bfloat16'] > 1.5 * rates['float32'] else 'float32'
    why = f"bf16 matmul {rates['bfloat16'] / 1e9:.0f} vs fp32 {rates['float32'] / 1e9:.0f} GFLOP/s on this CPU"
    choice = [(pick, why, rates[pick])]
    if dist.is_available() and dist.is_initialized():  # decided once, by rank 0: ranks whose measurements fall on
        dist.broadcast_object_list(choice, 0)  # either side of the threshold must not train in different dtypes
    return choice[0]

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

def flops_per_token(model, seq_len, training):
    """6N (training) or 2N (forward) per token, N = non-embedding params + the output head, plus attention; a frozen
    parameter (kd/lora.py's base) trains with 4 (forward, and the gradient of its input), not 6."""
    n = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    if not model.config.tie_word_embeddings:
        n -= model.get_input_embeddings().weight.numel()
        frozen -= model.get_input_embeddings().weight.numel() * (not model.get_input_embeddings().weight.requires_grad)
    attn = 2 * model.config.num_hidden_layers * model.config.hidden_size * seq_len
    return (6 * n - 2 * frozen + 6 * attn) if training else (2 * n + 2 * attn)

def cpu_name():
    """This CPU's model name and its bf16 instructions, for benchmark headers: figures compare on one kind only."""
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

def memory_estimate(trainable, teacher, tokens, compute, world=1, fsdp=False, carried=0):
    """Bytes per rank by part, for micro-batches of `tokens` tokens (the teacher's assumed as many), and the peak.
    Kept all along: the student's (and projections') parameters, the gradients and AdamW moments of those that train
    (with LoRA, kd/lora.py: the adapters alone; the frozen base in its dtype), the teacher's
    parameters in their dtype; under fsdp each split on its first dimension (rank 0 holds the ceiling), a few units
    gathered whole at a time (two blocks with the prefetch, the root unit: the student's embeddings, head and
    projections, with its gradients; the teacher's embeddings and a head the loss reads). The teacher's forward
    (its blocks' working set, every hidden state HF returns) comes and goes before the student's step, which holds
    the teacher's outputs for the loss, what autograd saves (the blocks' by block_activation_bytes, the loss's,
    the projections': LayerMap.saved_bytes), and under autocast a copy of each student weight in the compute dtype.
    carried: across tokenizers, the teacher's logit columns carried onto the student's (its output rows)."""
    s = 2 if compute in ('bfloat16', 'float16') else 4
    size = lambda ps: sum(p.numel() * p.element_size() for p in ps)
    share = lambda ps, split=None: sum(-(-p.shape[0] // world) * p[0].numel() * p.element_size() if fsdp and p.dim() and
                                       (split is None or id(p) in split) else p.numel() * p.element_size() for p in ps)
    student, pairs = trainable.model, trainable.proj.pairs
    cs, vocab, d = student.config, output_rows(student), student.config.hidden_size
    params, trained = share(trainable.parameters()), share(p for p in trainable.parameters() if p.requires_grad)
    est = {'student parameters': params, 'gradients': trained * (2 if world > 1 and not fsdp else 1),  # (DDP: buckets)
           'AdamW': 2 * trained}
    act = tokens * (cs.num_hidden_layers * block_activation_bytes(cs, s) + 9 * d)  # (+ the embedding and final norm)
    if trainable.chunk:  # dL/dh and dL/dW (fp32); passing: a chunk's logits (both models) and their gradient in the
        rows = min(trainable.chunk, 256)  # compute dtype, and the fp32 softmaxes of a block of its rows (chunk_loss)
        act, passing = act + tokens * d * 4 + vocab * d * 4, trainable.chunk * vocab * 3 * s + rows * vocab * 4 * 6
        passing += trainable.chunk * carried * 4 * 4  # (across tokenizers: the teacher's own logits, carried)
    else:  # the logits in fp32 and the loss's softmaxes; passing: the logits in the compute dtype, their gradients, ...
        act, passing = act + tokens * vocab * 12, tokens * vocab * (s + 12)
    act += tokens * trainable.proj.saved_bytes()  # (the layer map's, per aligned position)
    # LoRA (kd/lora.py): a frozen norm keeps no normalised values for its weight's gradient; each adapter keeps A x
    frozen_norms = sum(1 for m in student.modules() if 'Norm' in type(m).__name__
                       and getattr(m, 'weight', None) is not None and not m.weight.requires_grad)
    act += tokens * (s * sum(m.lora_A.out_features for m in student.modules() if hasattr(m, 'lora_A'))
                     - 4 * d * frozen_norms)
    est['activations'] = act
    matrices = [p for p in student.parameters() if p.dim() == 2 and p is not student.get_input_embeddings().weight
                and p.dtype == torch.float32]  # (LoRA's frozen base is stored in the compute dtype: no copy)
    est['weight copies'] = 2 * sum(p.numel() for p in matrices) if s == 2 else 0
    if fsdp:
        units = blocks(student)
        biggest = max((size(b.parameters()) for b in units), default=0)
        est['gathered'] = 2 * (size(trainable.parameters()) - sum(size(b.parameters()) for b in units)) + 4 * biggest
    teacher_kept = teacher_forward = 0
    if teacher is not None:
        ct, st = teacher.config, next(teacher.parameters()).element_size()
        units = [*blocks(teacher), teacher.get_input_embeddings(), teacher.get_output_embeddings()] if fsdp else []
        sharded = {id(p) for u in units for p in u.parameters()}  # (not its norm)
        est['teacher parameters'] = share(teacher.parameters(), sharded)
        dt, ft = ct.hidden_size, getattr(ct, 'intermediate_size', None) or 4 * ct.hidden_size
        head = teacher.get_output_embeddings().weight
        reads_head = trainable.w_kd > 0 and head is not teacher.get_input_embeddings().weight
        if fsdp:
            est['teacher gathered'] = (2 * max(size(b.parameters()) for b in blocks(teacher))
                                       + size(teacher.get_input_embeddings().parameters())
                                       + (size([head]) if reads_head else 0))
        outputs = (dt if trainable.chunk else output_rows(teacher)) * (trainable.w_kd > 0) + dt * len(pairs)
        teacher_kept = tokens * st * outputs
        states = (ct.num_hidden_layers + 1) * dt if pairs else 2 * dt  # (HF returns all blocks' outputs if asked)
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
# FSDP2

def shard(model, teacher):
    """FSDP2, in place (call before the optimizer is made): each rank keeps 1/world of every parameter, gathered for
    use and freed after. The student: each block one unit (gathered for its forward, again for its backward), and
    Trainable the root unit holding the rest (embeddings, norm, head, projections: its forward runs them all). The
    frozen teacher: each block, its embeddings and an untied head a unit of their own (its model classes stay
    HF's, whose hidden-state capture depends on them); the embeddings stay gathered until the teacher's release(), as
    a tied head serves the loss after the forward; an untied head is gathered by the chunked loss (or its own
    forward). Every rank shards rank 0's weights, as DDP starts from them. Parameters stay fp32 (autocast gives the
    compute dtype, as under DDP); gradients are reduce-scattered."""
    from torch.distributed.fsdp import fully_shard
    for t in [*model.parameters(), *model.buffers()]:
        torch.distributed.broadcast(t.data, 0)
    for block in blocks(model.model):
        fully_shard(block)
    fully_shard(model)
    if teacher is not None:
        for block in blocks(teacher):
            fully_shard(block, reshard_after_forward=True)
        embeddings, head = teacher.get_input_embeddings(), teacher.get_output_embeddings()
        tied = head.weight is embeddings.weight  # (asked before sharding replaces the embeddings' parameter)
        fully_shard(embeddings, reshard_after_forward=False)
        if tied:  # the head points at the embeddings' shard (no second copy); ShardedTeacher reads them gathered
            head.weight, embeddings.ties_head = embeddings.weight, True
        else:
            fully_shard(head, reshard_after_forward=True)

def gathered(t):
    """A tensor whole on this rank: an FSDP-sharded one (a DTensor) all-gathered, any other as it is."""
    return t.full_tensor() if hasattr(t, 'full_tensor') else t

def full_state(model, optimizer=None):
    """An FSDP model's (and optimizer's) state gathered whole, in CPU memory, on rank 0 (the others get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return get_model_state_dict(model, options=options), None
    return get_state_dict(model, optimizer, options=options)
