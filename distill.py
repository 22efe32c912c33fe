"""
Knowledge distillation of language models, in one file.

    python distill.py configs/tiny.py                                  # one process (CPU or one GPU)
    python distill.py configs/hermes.py --learning_rate=1e-5           # a config file, then overrides
    torchrun --standalone --nproc_per_node=8 distill.py configs/hermes.py
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 distill.py configs/hermes.py
    python distill.py --help                                           # every key, its default and comment

The loss (Trainable.forward, the one place it is assembled):
    loss = w_ce * CE + w_kd * T^2 * D(p_teacher || q_student) + w_hidden * H
- CE: cross-entropy on the data's supervised targets (the hard labels).
- D: a divergence (KD_KINDS) between the teacher's and the student's next-token distributions at temperature T.
- H: the distance between student hidden states, through trained projections, and the teacher's at mapped layers
  (make_layer_pairs); works across architectures and, with prepare_data.py --teacher_tokenizer, across tokenizers.
distill='logits' sets (w_ce, w_kd, w_hidden) = (1 - alpha, alpha, 0), 'hidden' (1 - alpha, 0, alpha), 'none' (1, 0, 0):
the SFT baseline, the same routine with no teacher; ce_weight, kd_weight, hidden_weight override them. With
loss_chunk > 0, CE and D come from the final hidden states a chunk of positions at a time (ChunkedHeadLoss), so
neither model's full logits ever exist.

Data comes from prepare_data.py: mask[i] == 1 iff token i is a supervised target. A document d is read as
X = d[:-1] and scored on Y = d[1:] where M = mask[1:]. CE and D are sums over supervised targets divided by N, the
supervised targets of the whole optimizer step (all micro-batches, all ranks); H likewise over its aligned
positions; so the result does not depend on how a step is split. Plumbing lives in configurator.py and support.py.
"""
import gc, json, math, os, re, sys, time
from contextlib import nullcontext
from typing import NamedTuple
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import prepare_data
from configurator import ConfigError, check_config, parse_config, print_help
from support import (cast_parameters, check_vocabularies, choose_blocks, choose_dtype, find_checkpoint,
                     flops_per_token, gb, keep_freed_memory, load_checkpoint, load_model, measure_matmul_flops,
                     memory_estimate, memory_line, model_tokenizer, output_rows, plain_head, rng_state,
                     save_checkpoint, set_rng_state, student_from_teacher_layers, trim_log)

# -----------------------------------------------------------------------------
# defaults (a config file and --key=value override them; `python distill.py --help` lists them)
# I/O
out_dir = 'out'  # checkpoints (ckpt/), the exported student (student/) and log.jsonl
init_from = 'scratch'  # 'scratch' or 'resume' (continue exactly from out_dir/ckpt)
eval_interval = 100  # evaluate and checkpoint every this many iterations (and at the end)
eval_docs = 64  # validation windows (documents, or block_size pieces of longer ones) per evaluation
log_interval = 1  # print a log line every this many iterations
export = True  # save out_dir/student as an HF folder at the end
checkpoint = True  # write out_dir/ckpt (fp32 weights + AdamW state: 12 bytes per parameter) to resume from; False: none
stop_iter = None  # end this run (with a checkpoint) at this iteration without changing the schedule
wandb_log = False  # also log to Weights & Biases (imported only when on)
wandb_project = 'distill'  # wandb project
wandb_run_name = None  # wandb run name
# data
dataset = 'demo'  # data/<dataset>/ written by prepare_data.py
data_root = 'data'  # folder holding the datasets
block_size = 512  # tokens per row; a longer document is read in several windows of this many targets
batch_size = 4  # documents per micro-batch (per rank)
gradient_accumulation_steps = 8  # micro-batches per optimizer step, summed over ALL ranks
# models
teacher = None  # HF hub id, local folder or .gguf file
teacher_cache = None  # instead of the teacher for logit KD: its top-k written once by cache_teacher.py (a folder, or its name in the dataset)
student = None  # HF hub id, local folder or .gguf file (for 'teacher_layers': unused)
student_init = 'pretrained'  # 'pretrained' (its weights), 'config' (random init) or 'teacher_layers'
student_layers = None  # teacher blocks kept by student_init='teacher_layers', e.g. [0, 3, 6], or 'auto:N' (by influence)
trust_remote_code = False  # let transformers run model code shipped with a checkpoint
# distillation
distill = 'logits'  # 'logits', 'hidden' or 'none' (the SFT baseline: no teacher)
alpha = 0.5  # 'logits': loss = (1 - alpha) CE + alpha T^2 D; 'hidden': (1 - alpha) CE + alpha H
ce_weight = None  # explicit weights of loss = ce_weight CE + kd_weight T^2 D + hidden_weight H override
kd_weight = None  # ... the ones distill and alpha imply; a zero weight skips its term's work
hidden_weight = None  # ... (e.g. ce_weight=0.5, kd_weight=0.5, hidden_weight=1.0 mixes all three)
kd_kind = 'fkl'  # divergence: 'fkl', 'rkl', 'jsd', 'skl', 'srkl' or 'tvd'
temperature = 2.0  # softmax temperature of both distributions in the divergence
beta = 0.5  # JSD mixture weight of the teacher; skew weight for 'skl' / 'srkl' (DistiLLM: 0.1)
layer_map = 'uniform'  # 'uniform', 'last', 'kept' or [(student, teacher), ...]; index 0 = embedding output, l = block l
hidden_loss = 'mse'  # 'mse' (squared error / d_teacher) or 'cosine' (1 - cos)
hidden_rms_norm = False  # RMS-normalise both sides first: a guard against the teacher's massive activations
proj_init = 'xavier'  # projection init: 'xavier' or 'identity' (rectangular identity)
loss_chunk = 256  # >0: CE and divergence from hidden states, this many positions at a time (no full logits); 0: plain
# optimizer
learning_rate = 2e-5  # peak learning rate
min_lr = 2e-6  # the cosine schedule ends here
warmup_frac = 0.1  # fraction of the iterations with linear warmup
max_iters = None  # optimizer steps; None: computed from epochs; 0: export the student as it starts
epochs = 1.0  # passes over the training documents (when max_iters is None)
weight_decay = 0.0  # AdamW decay, matrices only
beta1 = 0.9  # AdamW beta1
beta2 = 0.999  # AdamW beta2
grad_clip = 1.0  # clip the gradient norm at this value; 0: off
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu', 'cuda', 'cuda:1', ...
dtype = 'auto'  # 'auto' (bf16 autocast where this device's bf16 matmul is clearly fastest), 'float32', 'bfloat16', 'float16'
parallel = 'ddp'  # under torchrun: 'ddp' (every rank holds both models whole) or 'fsdp' (FSDP2: 1/world of every parameter each)
compile = False  # torch.compile both transformer stacks and the chunked loss (21-23 s at start measured on a CPU; docs/performance.md)
seed = 1337  # data order and initialisation
peak_flops = 0.0  # per-device peak FLOP/s for MFU; 0: the matmul rate of the run's dtype, measured at start
OPTIONAL_TYPES = {'teacher': str, 'teacher_cache': str, 'student': str, 'student_layers': (list, str), 'stop_iter': int, 'max_iters': int,
                  'ce_weight': float, 'kd_weight': float, 'hidden_weight': float, 'wandb_run_name': str}
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str, list, type(None)))]
# -----------------------------------------------------------------------------
# losses (all in fp32)

def _kl(log_a, log_b):
    """The terms of KL(a || b), one per token, from log-probabilities."""
    return log_a.exp() * (log_a - log_b)

def _log_mix(log_a, log_b, w):
    """log(w * a + (1 - w) * b), computed in log space."""
    if w == 0:
        return log_b
    if w == 1:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log(1 - w))

def _jsd(log_p, log_q, beta):
    """beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q. The formula vanishes at both ends, so, as
    the limits of JSD/beta and JSD/(1 - beta), beta = 0 is forward KL and beta = 1 reverse KL."""
    if beta in (0, 1):
        return _kl(log_p, log_q) if beta == 0 else _kl(log_q, log_p)
    log_m = _log_mix(log_p, log_q, beta)
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)

# Every divergence here is a sum over tokens, D(p || q) = sum_j d(p_j, q_j): the entry gives the terms d from log p
# (teacher) and log q (student) at temperature T, and beta. A new divergence is one more entry: kd_divergence, both
# loss paths (autograd), the teacher cache and the kd_kind setting take it from here.
DIVERGENCES = {
    'fkl': lambda log_p, log_q, beta: _kl(log_p, log_q),  # forward KL(p || q): mode-covering, the classic KD loss
    'rkl': lambda log_p, log_q, beta: _kl(log_q, log_p),  # reverse KL(q || p): mode-seeking
    'jsd': _jsd,  # generalised Jensen-Shannon
    'skl': lambda log_p, log_q, beta: _kl(log_p, _log_mix(log_p, log_q, beta)),  # skew KL(p || beta p + (1 - beta) q)
    'srkl': lambda log_p, log_q, beta: _kl(log_q, _log_mix(log_q, log_p, beta)),  # skew reverse (DistiLLM: beta 0.1)
    'tvd': lambda log_p, log_q, beta: 0.5 * (log_p.exp() - log_q.exp()).abs(),  # total variation distance
}
KD_KINDS = tuple(DIVERGENCES)

class TopK:
    """A teacher's next-token distribution kept sparse (cache_teacher.py writes it): at each position the ids and
    T = 1 log-probabilities of its k most likely tokens followed by m tokens drawn from the others (the tail), log
    sum_tail p^(1/T) at the training T (-inf when k = V), and each drawn token's log weight, -log(m r) with r its
    chance of being drawn. Indexed by positions like a tensor: [keep], [a:b]."""
    def __init__(self, ids, logp, tail, logw):
        self.ids, self.logp, self.tail, self.logw = ids, logp, tail, logw  # (..., k + m), (..., k + m), (...), (..., m)

    def __getitem__(self, i):
        return TopK(self.ids[i], self.logp[i], self.tail[i], self.logw[i])

    @staticmethod
    def from_rows(ids, logp, tail, drawn_tail, samples, sample_temperature):
        """From a cache's rows: tail at the training T, drawn_tail at the temperature Ts the tokens were drawn at, where
        a drawn token's chance is r = p^(1/Ts) / sum_tail p^(1/Ts)."""
        logw = -math.log(max(samples, 1)) - (logp[..., ids.shape[-1] - samples:] / sample_temperature - drawn_tail[..., None])
        return TopK(ids, logp, tail, logw)

def kd_divergence(student_logits, teacher_logits, kind='fkl', temperature=1.0, beta=0.5):
    """Per-position divergence (DIVERGENCES[kind]) between p = softmax(teacher / T) and q = softmax(student / T).
    A TopK teacher: the exact terms of its k tokens plus the weighted terms of its drawn ones, whose expectation over
    the draws is the sum of the terms over the tail: an unbiased estimate of the full divergence (exact at k = V)."""
    if kind not in DIVERGENCES:
        raise ValueError(f"kd_kind must be one of {KD_KINDS}, got '{kind}'")
    fp = torch.float64 if student_logits.dtype == torch.float64 else torch.float32  # never below fp32
    tiny = torch.finfo(fp).min  # -inf logits (masked tokens) must not turn 0 * inf into NaN
    log_q = F.log_softmax(student_logits.to(fp) / temperature, dim=-1).clamp(min=tiny)
    if not isinstance(teacher_logits, TopK):
        log_p = F.log_softmax(teacher_logits.to(fp) / temperature, dim=-1).clamp(min=tiny)
        return DIVERGENCES[kind](log_p, log_q, beta).sum(-1)
    t = teacher_logits
    k = t.ids.shape[-1] - t.logw.shape[-1]
    zt = t.logp.to(fp) / temperature  # log p^(1/T): normalised by the k tokens' sum and the tail's
    log_p = zt - torch.logaddexp(zt[..., :k].logsumexp(-1), t.tail.to(fp))[..., None]
    weight = torch.cat([torch.ones_like(zt[..., :k]), t.logw.to(fp).exp()], -1)
    return (weight * DIVERGENCES[kind](log_p, log_q.gather(-1, t.ids.long()), beta)).sum(-1)

def loss_sums(z, y, zt, vocab, kind='fkl', temperature=1.0, beta=0.5):
    """Sums over the rows (supervised positions) of logits z (n, V) of the CE against targets y and of the divergence
    from the teacher's logits zt (a TopK: its cached distribution; None: CE alone), over the real vocabulary: rows past
    it are embedding padding and differ between models, so they are never compared. The plain path calls it on all
    rows, the chunked one per chunk."""
    ce = F.cross_entropy(z.float(), y, reduction='sum')
    if zt is None:
        return ce, torch.zeros_like(ce)
    return ce, kd_divergence(z[:, :vocab], zt if isinstance(zt, TopK) else zt[:, :vocab], kind, temperature, beta).sum()

def chunk_loss(z, y, zt, vocab, coef, kind, temperature, beta):
    """One chunk of ChunkedHeadLoss: loss_sums of fp32 logits z and, unless coef is None, the gradient of
    coef[0] CE + coef[1] D w.r.t. z, by autograd. Forward KL, the default, has a closed form that makes fewer
    passes over (n, V): d CE/dz = softmax(z) - onehot(y), d KL(p || q)/dz = (q - p) / T."""
    if coef is None:
        return *loss_sums(z, y, zt, vocab, kind, temperature, beta), None
    if kind != 'fkl' or not isinstance(zt, torch.Tensor):
        with torch.enable_grad():
            z = z.requires_grad_()
            ce, kd = loss_sums(z, y, zt, vocab, kind, temperature, beta)
            dz, = torch.autograd.grad(coef[0] * ce + coef[1] * kd, z)
        return ce.detach(), kd.detach(), dz
    dz = F.log_softmax(z, dim=-1)
    ce = -dz.gather(1, y[:, None]).sum()
    dz = dz.exp_().mul_(coef[0])
    dz[torch.arange(len(y), device=y.device), y] -= coef[0]
    log_p, log_q = F.log_softmax(zt[:, :vocab] / temperature, dim=-1), F.log_softmax(z[:, :vocab] / temperature, dim=-1)
    p = log_p.exp()
    kd = torch.sub(log_p, log_q).mul_(p).sum()
    dz[:, :vocab].add_(log_q.exp_().sub_(p), alpha=coef[1] / temperature)
    return ce, kd, dz

class ChunkedHeadLoss(torch.autograd.Function):
    """loss_sums(h @ W.T, Y, t_h @ t_W.T) without a (positions, V) tensor of either model: a chunk of positions at a
    time. Backward would need every chunk's logits again, so each chunk's gradient is taken in forward (chunk_loss)
    for the combination coef[0] CE + coef[1] D that the caller forms from the two outputs, and only the gradients
    w.r.t. h and W (positions x d, V x d) are kept; backward checks that combination and scales them (1/N, the world
    size, the fp16 loss scale). The plain path's matmuls, none repeated. h (n, d_s): the student's final hidden states
    at supervised positions, W (V_s, d_s) its head; t_h (n, d_t), t_W (V_t, d_t) the teacher's, or None (CE alone);
    or t_h a TopK of n positions and t_W None (a cached teacher)."""
    @staticmethod
    def forward(ctx, h, W, Y, t_h, t_W, coef, vocab, kind, temperature, beta, chunk, chunk_fn=chunk_loss):
        need_grad = coef is not None  # None: values only (evaluation)
        Wc = W.to(h.dtype)  # the heads in the compute dtype once, not once per chunk (autocast)
        t_Wc = None if t_W is None else t_W.to(t_h.dtype)
        dh, dW = (torch.empty_like(h), torch.zeros_like(W, dtype=torch.float32)) if need_grad else (None, None)
        ce_sum, kd_sum = torch.zeros((), device=h.device), torch.zeros((), device=h.device)
        for a in range(0, len(h), chunk):
            hc = h[a:a + chunk]
            zt = None if t_h is None else t_h[a:a + chunk] if t_Wc is None else (t_h[a:a + chunk] @ t_Wc.T).float()
            ce, kd, dz = chunk_fn((hc @ Wc.T).float(), Y[a:a + chunk], zt, vocab, coef, kind, temperature, beta)
            ce_sum, kd_sum = ce_sum + ce, kd_sum + kd
            if need_grad:
                dz = dz.to(hc.dtype)
                dh[a:a + chunk] = dz @ Wc
                if dz.dtype == dW.dtype:
                    dW.addmm_(dz.T, hc)  # accumulated in place: no second (V, d) buffer
                else:
                    dW += dz.T @ hc
        ctx.save_for_backward(dh, dW)
        ctx.coef, ctx.head_dtype = coef, W.dtype
        return ce_sum, kd_sum

    @staticmethod
    def backward(ctx, g_ce, g_kd):
        dh, dW = ctx.saved_tensors  # scaled in place (a second backward through this graph raises, as it should)
        c_ce, c_kd = ctx.coef
        scale = g_ce / c_ce if c_ce else g_kd / c_kd
        if not torch.allclose(torch.stack([g_ce, g_kd]).float(), scale * torch.tensor([c_ce, c_kd], device=scale.device), rtol=1e-4, atol=0):
            raise RuntimeError(f'ChunkedHeadLoss computed the gradient of {c_ce:g} CE + {c_kd:g} D, but the loss weighs its outputs '
                               'otherwise: pass the weights the loss uses as coef')
        return dh.mul_(scale), dW.mul_(scale).to(ctx.head_dtype), *[None] * 10

def hidden_distance(student_h, teacher_h, kind='mse', rms_norm=False):
    """Per-position distance between projected student and teacher hidden states ([..., d_t]), in fp32."""
    fp = torch.float64 if student_h.dtype == torch.float64 else torch.float32
    hs, ht = student_h.to(fp), teacher_h.to(fp)
    if rms_norm:
        hs = hs * torch.rsqrt(hs.pow(2).mean(-1, keepdim=True) + 1e-6)
        ht = ht * torch.rsqrt(ht.pow(2).mean(-1, keepdim=True) + 1e-6)
    if kind == 'mse':
        return (hs - ht).pow(2).mean(-1)  # normalised by d_t, so widths compare
    if kind == 'cosine':
        return 1 - F.cosine_similarity(hs, ht, dim=-1, eps=1e-8)
    raise ValueError(f"hidden_loss must be 'mse' or 'cosine', got '{kind}'")

def make_layer_pairs(spec, student_layers_n, teacher_layers_n, kept=None):
    """(student, teacher) hidden-state indices; 0 is the embedding output, l the output of block l (HF's
    hidden_states[l]). 'uniform': student l <-> teacher round(l * L_t / L_s) (halves up) for l = 1..L_s;
    'last': the final ones only; 'kept' (a student of the teacher's blocks `kept`): student l <-> the teacher's
    input to the next block kept, kept[l] (the last <-> the teacher's last), so that every copied block is fed
    what it was fed in the teacher."""
    if spec == 'kept':
        if kept is None:
            raise ConfigError("layer_map='kept' maps a student made of teacher blocks: set student_init='teacher_layers'")
        return [(l, kept[l] if l < len(kept) else teacher_layers_n) for l in range(1, len(kept) + 1)]
    if spec == 'uniform':
        return [(l, int(l * teacher_layers_n / student_layers_n + 0.5)) for l in range(1, student_layers_n + 1)]
    if spec == 'last':
        return [(student_layers_n, teacher_layers_n)]
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(p, (list, tuple)) and len(p) == 2 and
                                                        all(isinstance(i, int) for i in p) for p in spec):
        for s_l, t_l in spec:
            if not (0 <= s_l <= student_layers_n and 0 <= t_l <= teacher_layers_n):
                raise ConfigError(f'layer_map pair ({s_l}, {t_l}) is out of range: the student has hidden states '
                                  f'0..{student_layers_n}, the teacher 0..{teacher_layers_n} (0 = embedding output)')
        return [tuple(p) for p in spec]
    raise ConfigError(f"layer_map must be 'uniform', 'last', 'kept' or a list of (student, teacher) pairs, got {spec!r}")

# -----------------------------------------------------------------------------
# data

def load_split(folder, split):
    """A split as a dict of arrays; with a cross-tokenizer dataset also the teacher's tokens and the aligned
    position pairs (see prepare_data.py)."""
    meta = json.load(open(os.path.join(folder, 'meta.json')))
    path = lambda name: os.path.join(folder, f'{split}{name}.bin')
    memmap = lambda f, dtype: np.memmap(f, dtype=dtype, mode='r') if os.path.getsize(f) else np.zeros(0, dtype)  # an empty split
    data = {'tokens': memmap(path(''), meta['dtype']), 'mask': memmap(path('_mask'), np.uint8),
            'idx': np.fromfile(path('_idx'), dtype=np.int64)}
    if 'teacher_tokenizer' in meta:
        data['teacher'] = memmap(path('_teacher'), meta['teacher_dtype'])
        data['teacher_idx'] = np.fromfile(path('_teacher_idx'), dtype=np.int64)
        data['align'] = np.fromfile(path('_align'), dtype=np.int32).reshape(-1, 2)
        data['align_idx'] = np.fromfile(path('_align_idx'), dtype=np.int64)
    return data

def data_hash(folder, split):
    """The fingerprint of a split's token, mask and offset arrays: what a teacher cache was computed from."""
    return prepare_data.content_hash([os.path.join(folder, f'{split}{name}.bin') for name in ('', '_mask', '_idx')])

def attach_topk(split, name, folder, data_dir, block_size, temperature):
    """Add a teacher cache's rows (cache_teacher.py) to a split loaded by load_split, after checking that they were
    written for this split, its windows and this temperature; make_batch then reads them (Batch.topk)."""
    cache = os.path.join(folder, 'meta.json')
    try:
        with open(cache) as f:
            m = json.load(f)
        problem = prepare_data.verify_files(folder, m['files']) or ('samples' not in m and 'it has no drawn tokens (an older format)')
    except (OSError, ValueError, KeyError) as e:
        problem = f'{cache} is missing or unreadable ({type(e).__name__})'
    if problem:
        raise ConfigError(f'teacher_cache {folder} is not a complete cache: {problem}; write it with cache_teacher.py')
    fix = f'write a cache for it with cache_teacher.py --dataset={data_dir} --block_size={block_size}'
    if name not in m['splits']:
        raise ConfigError(f'teacher_cache {folder} has no {name} split: {fix}')
    if m['splits'][name]['data_hash'] != data_hash(data_dir, name):
        raise ConfigError(f'teacher_cache {folder} was written for other data than {data_dir} ({name} split differs): {fix}')
    if m['block_size'] != block_size:
        raise ConfigError(f"teacher_cache {folder} was written for block_size={m['block_size']}, not {block_size} (the teacher's "
                          f'context differs): set block_size={m["block_size"]} or {fix}')
    if temperature not in m['temperatures']:
        raise ConfigError(f"teacher_cache {folder} holds the tail for temperatures {m['temperatures']}, not {temperature:g}: "
                          f"{fix} --temperatures={','.join(f'{t:g}' for t in m['temperatures'] + [temperature])}")
    rows, width, tails = m['splits'][name]['rows'], m['k'] + m['samples'], m['temperatures']
    memmap = lambda f, dtype, shape: np.memmap(os.path.join(folder, f'{name}_{f}.bin'), dtype=dtype, mode='r', shape=shape) if rows else np.zeros(shape, dtype)
    _, starts, first, counts = cache_rows(split, block_size)
    if counts.sum() != rows:
        raise ConfigError(f'teacher_cache {folder} has {rows:,} rows for the {name} split, which has {counts.sum():,} supervised targets: {fix}')
    tail = memmap('tail', np.float32, (rows, len(tails)))
    split['topk'] = dict(ids=memmap('ids', m['ids_dtype'], (rows, width)), logp=memmap('logp', m['values_dtype'], (rows, width)),
                         tail=tail[:, tails.index(temperature)], drawn_tail=tail[:, tails.index(m['sample_temperature'])],
                         samples=m['samples'], sample_temperature=m['sample_temperature'], starts=starts, first=first)
    return m

def cache_rows(split, block_size):
    """A teacher cache's row layout: the split's windows, each one's first token position, first row and row count
    (its supervised targets; rows follow the split's order)."""
    windows = block_windows(split, block_size)
    starts = split['idx'][windows[:, 0]] + windows[:, 1]
    counts = np.add.reduceat(np.asarray(split['mask']), starts + 1, dtype=np.int64) if len(starts) else np.zeros(0, np.int64)
    return windows, starts, np.cumsum(counts) - counts, counts

def doc_order(position, count, n_docs, seed):
    """Document ids at [position, position + count) of the stream: epoch e is a permutation seeded by seed + e."""
    out = []
    while len(out) < count:
        epoch, k = divmod(position + len(out), n_docs)
        out.extend(np.random.default_rng(seed + epoch).permutation(n_docs)[k:k + count - len(out)].tolist())
    return out

def block_windows(split, block_size):
    """(document, start) of every window that holds a supervised target. A document d of n tokens is read in
    windows X = d[s:s + B], Y = d[s + 1:s + B + 1], s = 0, B, 2B, ..., so every target is trained on once and
    no window crosses a document boundary (a later window's first targets see less context than one long pass)."""
    idx = split['idx']
    count = np.maximum(0, -(-(np.diff(idx) - 1) // block_size))  # ceil((n - 1) / B) windows per document
    doc = np.repeat(np.arange(len(count)), count)
    start = (np.arange(len(doc)) - np.repeat(np.cumsum(count) - count, count)) * block_size
    if not len(doc):
        return np.zeros((0, 2), np.int64)
    # supervised targets per window: its targets idx[d] + s + 1 .. run up to the next window's (the gap between
    # documents is a first token, never a target)
    supervised = np.add.reduceat(np.asarray(split['mask']), idx[doc] + start + 1, dtype=np.int64)
    return np.stack([doc, start], 1)[supervised > 0]

class Align(NamedTuple):
    """Where the hidden-state loss is taken: student position s of row b pairs with teacher position t, at supervised
    positions only. XT is the teacher's own input across tokenizers, else None (it reads X)."""
    XT: torch.Tensor
    b: torch.Tensor
    s: torch.Tensor
    t: torch.Tensor

class Batch(NamedTuple):
    X: torch.Tensor  # (rows, L) input tokens, right-padded
    Y: torch.Tensor  # (rows, L) targets
    M: torch.Tensor  # (rows, L) 1 where Y is a supervised target
    align: Align
    topk: TopK = None  # the teacher's cached distribution at the supervised targets (teacher_cache), else None

def make_batch(split, windows, block_size, pad_id, device, teacher_pad_id=0):
    """A Batch of some (document, start) windows (block_windows). No attention mask is needed: causal attention
    never lets a real token see the padding after it, and M is 0 on padding."""
    idx = split['idx']
    spans = [(idx[d] + s, min(idx[d] + s + block_size + 1, idx[d + 1])) for d, s in windows]
    docs = [(np.asarray(split['tokens'][a:b], dtype=np.int64), np.asarray(split['mask'][a:b], dtype=np.int64)) for a, b in spans]
    L = max(len(t) for t, _ in docs) - 1
    X = torch.full((len(docs), L), pad_id, dtype=torch.long)
    Y = torch.zeros((len(docs), L), dtype=torch.long)
    M = torch.zeros((len(docs), L), dtype=torch.long)
    for i, (t, m) in enumerate(docs):
        n = len(t) - 1
        X[i, :n], Y[i, :n], M[i, :n] = torch.from_numpy(t[:-1]), torch.from_numpy(t[1:]), torch.from_numpy(m[1:])
    if 'teacher' in split:
        pairs, rows, ti = [], [], split['teacher_idx']
        for i, (d, s) in enumerate(windows):
            p = split['align'][split['align_idx'][d]:split['align_idx'][d + 1]].astype(np.int64)
            # the teacher starts where the student's window does, or at the last shared boundary before it
            before = p[p[:, 0] < s]
            t0 = int(before[-1, 1]) + 1 if s and len(before) else 0
            p = p[(p[:, 0] >= s) & (p[:, 0] < s + len(docs[i][0]) - 1)] - [s, t0]  # positions the student reads
            p = p[M[i, p[:, 0]].numpy() == 1]
            pairs.append(np.column_stack([np.full(len(p), i), p]))
            rows.append(np.asarray(split['teacher'][ti[d] + t0:ti[d] + t0 + (int(p[:, 1].max()) + 1 if len(p) else 1)], dtype=np.int64))
        XT = torch.full((len(docs), max(len(r) for r in rows)), teacher_pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            XT[i, :len(r)] = torch.from_numpy(r)
        b, s, t = torch.from_numpy(np.concatenate(pairs)).T
        align = Align(XT.to(device), b.to(device), s.to(device), t.to(device))
    else:
        b, s = M.nonzero(as_tuple=True)
        align = Align(None, b.to(device), s.to(device), s.to(device))
    topk = None
    if 'topk' in split:  # a teacher cache: its rows are the split's supervised targets in order, a window's consecutive
        c = split['topk']
        rows = np.concatenate([c['first'][np.searchsorted(c['starts'], idx[d] + s)] + np.arange(n) for (d, s), n in zip(windows, M.sum(1).tolist())])
        keep = M.bool()
        t = TopK.from_rows(torch.from_numpy(c['ids'][rows].astype(np.int64)), torch.from_numpy(c['logp'][rows].astype(np.float32)),
                           torch.from_numpy(c['tail'][rows]), torch.from_numpy(c['drawn_tail'][rows]), c['samples'], c['sample_temperature'])
        topk = TopK(*[torch.zeros(*M.shape, *x.shape[1:], dtype=x.dtype).index_put_((keep,), x).to(device) for x in (t.ids, t.logp, t.tail, t.logw)])
    return Batch(X.to(device), Y.to(device), M.to(device), align, topk)

def step_doc_ids(iter_num, batch_size, grad_accum, rank, world, n_docs, seed):
    """This rank's micro-batches of step iter_num: the step takes batch_size * grad_accum documents of the
    stream, micro-batch j of them goes to rank j % world."""
    step = doc_order(iter_num * batch_size * grad_accum, batch_size * grad_accum, n_docs, seed)
    return [step[j * batch_size:(j + 1) * batch_size] for j in range(rank, grad_accum, world)]

# -----------------------------------------------------------------------------
# the student with its loss

class TeacherOut(NamedTuple):
    """What the loss reads of the frozen teacher (None where a term is off)."""
    final: torch.Tensor = None  # its logits on the plain path, its final hidden states on the chunked one
    head: torch.Tensor = None  # its output head's weight (chunked path: applied a chunk at a time)
    hidden: list = None  # its hidden states at the mapped layers

class Losses(NamedTuple):
    loss: torch.Tensor  # this micro-batch's share of the step's loss, to differentiate
    ce: torch.Tensor  # the sums over its supervised targets (detached)
    kd: torch.Tensor
    hidden: torch.Tensor  # the sum over its aligned positions, averaged over the layer pairs (detached)

class Trainable(nn.Module):
    """The student and its loss. Everything that trains (the student and the hidden-state projections) sits in this
    one module, so that DDP, the optimizer and checkpoints see the same parameters; only .model is exported.
    chunk > 0: CE and D by ChunkedHeadLoss, this many positions at a time; 0: from the full logits."""
    def __init__(self, model, vocab, weights=(1.0, 0.0, 0.0), kind='fkl', temperature=1.0, beta=0.5, chunk=0,
                 layer_pairs=(), teacher_width=0, hidden_loss='mse', rms_norm=False, proj_init='xavier', compile=False):
        super().__init__()
        self.model, self.vocab, (self.w_ce, self.w_kd, self.w_hidden) = model, vocab, weights
        self.kind, self.temperature, self.beta, self.chunk = kind, temperature, beta, chunk
        self.layer_pairs, self.hidden_loss, self.rms_norm = list(layer_pairs), hidden_loss, rms_norm
        self.chunk_fn = torch.compile(chunk_loss, dynamic=True) if compile else chunk_loss
        self.proj = nn.ModuleList(nn.Linear(model.config.hidden_size, teacher_width, bias=False) for _ in self.layer_pairs)
        for p in self.proj:
            if proj_init == 'identity':
                nn.init.eye_(p.weight)
            elif proj_init == 'xavier':
                nn.init.xavier_uniform_(p.weight)
            else:
                raise ConfigError(f"proj_init must be 'xavier' or 'identity', got '{proj_init}'")

    @torch.no_grad()
    def teacher_forward(self, teacher, batch):
        """The teacher's forward, only as far as the loss needs it: no head on the chunked path (it is applied a chunk
        at a time) nor for hidden states alone. Across tokenizers it reads its own tokens. No teacher: its cached
        top-k came with the batch (teacher_cache), or there is none (SFT)."""
        if teacher is None:
            return TeacherOut(final=batch.topk)
        net = teacher if self.w_kd and not self.chunk else teacher.base_model
        X = batch.X if batch.align.XT is None else batch.align.XT
        out = net(input_ids=X, output_hidden_states=self.w_hidden > 0)
        return TeacherOut(final=None if not self.w_kd else out.last_hidden_state if self.chunk else out.logits,
                          head=gathered(teacher.get_output_embeddings().weight) if self.w_kd and self.chunk else None,
                          hidden=[out.hidden_states[t] for _, t in self.layer_pairs] if self.w_hidden else None)

    def forward(self, batch, teacher, n_targets=1, n_hidden=1):
        """The loss: (w_ce CE + w_kd T^2 D) / n_targets + w_hidden H / n_hidden, with the step's counts of supervised
        targets and aligned positions, so that the micro-batches' losses add up to the step's. T^2 keeps the gradient
        of D comparable across temperatures (Hinton et al. 2015): D's own gradient shrinks like 1/T^2."""
        X, Y, M, align = batch.X, batch.Y, batch.M, batch.align
        keep = M.bool()
        c_ce, c_kd, c_hidden = self.w_ce / n_targets, self.w_kd * self.temperature ** 2 / n_targets, self.w_hidden / n_hidden
        settings = (self.vocab, self.kind, self.temperature, self.beta)
        if self.chunk:
            out = self.model.base_model(input_ids=X, output_hidden_states=teacher.hidden is not None)
            ce, kd = ChunkedHeadLoss.apply(out.last_hidden_state[keep], self.model.get_output_embeddings().weight, Y[keep],
                                           None if teacher.final is None else teacher.final[keep], teacher.head,
                                           (c_ce, c_kd) if torch.is_grad_enabled() else None, *settings, self.chunk, self.chunk_fn)
        else:
            out = self.model(input_ids=X, output_hidden_states=teacher.hidden is not None)
            ce, kd = loss_sums(out.logits[keep], Y[keep], None if teacher.final is None else teacher.final[keep], *settings)
        hidden = torch.zeros_like(ce)
        if teacher.hidden is not None:
            with torch.autocast(X.device.type, enabled=False):  # projections and distances in fp32
                for (ls, _), proj, ht in zip(self.layer_pairs, self.proj, teacher.hidden):
                    hs = proj(out.hidden_states[ls][align.b, align.s].float())
                    hidden = hidden + hidden_distance(hs, ht[align.b, align.t], self.hidden_loss, self.rms_norm).sum()
            hidden = hidden / len(self.layer_pairs)
        loss = c_ce * ce + c_kd * kd + c_hidden * hidden
        return Losses(loss, ce.detach(), kd.detach(), hidden.detach())

def get_lr(it, max_iters, warmup_iters, lr, min_lr):
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    ratio = (it - warmup_iters) / max(1, max_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(ratio, 1.0))) * (lr - min_lr)

def blocks(model):
    """A transformer's blocks: the longest ModuleList of its base model (Llama's layers, GPT-2's h, ...)."""
    return max((m for m in model.base_model.children() if isinstance(m, nn.ModuleList)), key=len)

def shard(model, teacher):
    """FSDP2, in place (call before the optimizer is made): each rank keeps 1/world of every parameter, gathered for
    use and freed after. The student: each block one unit (gathered for its forward, again for its backward), and
    Trainable the root unit holding the rest (embeddings, norm, head, projections: its forward runs them all). The
    frozen teacher: each block, its embeddings and an untied head a unit of their own (its model classes stay
    HF's, whose hidden-state capture depends on them); the embeddings stay gathered until release_teacher, as a tied
    head serves the loss after the forward; an untied head is gathered by the chunked loss (or its own forward).
    Parameters stay fp32 (autocast gives the compute dtype, as under DDP); gradients are reduce-scattered."""
    from torch.distributed.fsdp import fully_shard
    for block in blocks(model.model):
        fully_shard(block)
    fully_shard(model)
    if teacher is not None:
        for block in blocks(teacher):
            fully_shard(block, reshard_after_forward=True)
        fully_shard(teacher.get_input_embeddings(), reshard_after_forward=False)
        if teacher.get_output_embeddings().weight is not teacher.get_input_embeddings().weight:
            fully_shard(teacher.get_output_embeddings(), reshard_after_forward=True)

def gathered(t):
    """A tensor whole on this rank: an FSDP-sharded one (a DTensor) all-gathered, any other as it is."""
    return t.full_tensor() if hasattr(t, 'full_tensor') else t

def full_state(model, optimizer=None):
    """An FSDP model's (and optimizer's) state gathered whole, in CPU memory, on rank 0 (the others get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=options) if optimizer else (get_model_state_dict(model, options=options), None)

def configure_optimizer(module, lr, weight_decay, betas):
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)  # one kernel per step (CPU too: ~4x faster here)

def fail(message):
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)

# -----------------------------------------------------------------------------

if __name__ == '__main__':
    defaults = {k: globals()[k] for k in config_keys}
    if '--help' in sys.argv[1:] or '-h' in sys.argv[1:]:
        print_help(__doc__, __file__, defaults)
        sys.exit(0)
    try:
        config = parse_config(sys.argv[1:], defaults, OPTIONAL_TYPES)
        check_config(config, {'distill': ('logits', 'hidden', 'none'), 'kd_kind': KD_KINDS, 'hidden_loss': ('mse', 'cosine'),
                              'proj_init': ('xavier', 'identity'), 'init_from': ('scratch', 'resume'), 'dtype': ('auto', 'float32', 'bfloat16', 'float16'),
                              'student_init': ('pretrained', 'config', 'teacher_layers'), 'parallel': ('ddp', 'fsdp')}, torch.cuda.is_available())
    except ConfigError as e:
        fail(e)
    globals().update(config)  # read-only from here: what the run derives gets its own name, and goes in run_config
    implied = {'none': (1.0, 0.0, 0.0), 'logits': (1 - alpha, alpha, 0.0), 'hidden': (1 - alpha, 0.0, alpha)}[distill]
    w_ce, w_kd, w_hidden = (implied[i] if w is None else float(w) for i, w in enumerate((ce_weight, kd_weight, hidden_weight)))
    if teacher_cache is not None and (w_kd == 0 or w_hidden > 0):
        fail("teacher_cache holds the teacher's next-token distribution for logit distillation alone: use distill='logits' "
             '(hidden-state distillation needs the teacher itself), or unset teacher_cache')
    use_teacher = (w_kd > 0 and teacher_cache is None) or w_hidden > 0 or student_init == 'teacher_layers'
    if use_teacher and teacher is None:
        fail(f"distill='{distill}' needs a teacher" + (" (student_init='teacher_layers' copies its blocks)" if student_init == 'teacher_layers'
             else '') + ": set teacher (an HF hub id, a local folder or a .gguf file), or distill='none' for SFT")

    # DDP: torchrun's environment decides; nccl on GPUs, gloo on CPUs
    ddp = int(os.environ.get('RANK', -1)) != -1
    if ddp:
        import datetime
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP
        # generous timeout: the other ranks wait while rank 0 downloads and converts a large teacher
        dist.init_process_group(backend='nccl' if 'cuda' in device else 'gloo', timeout=datetime.timedelta(hours=2))
        rank, local_rank, world_size = dist.get_rank(), int(os.environ['LOCAL_RANK']), dist.get_world_size()
        if 'cuda' in device:
            torch.cuda.set_device(local_rank)
    else:
        rank, local_rank, world_size = 0, 0, 1
    master_process = rank == 0
    if gradient_accumulation_steps % world_size:
        fail(f'gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of the world size {world_size}')
    torch.manual_seed(seed + rank)
    device_type = 'cuda' if 'cuda' in device else 'cpu'
    torch_device = f'cuda:{local_rank}' if ddp and device_type == 'cuda' else device
    compute_dtype, why, dtype_rate = choose_dtype(dtype, torch_device)  # 'auto' resolved (the matmul rates measured)
    ptdtype = getattr(torch, compute_dtype)
    ctx = nullcontext() if compute_dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)
    scaler = torch.amp.GradScaler(device_type, enabled=compute_dtype == 'float16')

    # data
    data_dir = os.path.join(data_root, dataset)
    try:
        meta = prepare_data.check_dataset(data_dir)
    except prepare_data.DataError as e:
        fail(e)
    vocab, cross_tokenizer = meta['vocab_size'], 'teacher_tokenizer' in meta
    if cross_tokenizer and w_kd > 0:
        fail(f"{data_dir} pairs two tokenizers: logit distillation compares distributions token by token and needs one "
             "shared tokenizer; use distill='hidden' (or kd_weight=0)")
    train_data, val_data = load_split(data_dir, 'train'), load_split(data_dir, 'val')
    if teacher_cache is not None:  # a folder, or its name inside the dataset's
        cache_dir = teacher_cache if os.path.isdir(teacher_cache) else os.path.join(data_dir, teacher_cache)
        try:
            for split, name in ((train_data, 'train'), (val_data, 'val')):
                cache = attach_topk(split, name, cache_dir, data_dir, block_size, temperature)
        except ConfigError as e:
            fail(e)
    train_windows, val_windows = block_windows(train_data, block_size), block_windows(val_data, block_size)[:eval_docs]
    n_train_docs, n_val_docs = len(train_windows), len(val_windows)  # (a document longer than block_size gives several)
    iterations = max_iters if max_iters is not None else math.ceil(epochs * n_train_docs / (batch_size * gradient_accumulation_steps))
    warmup_iters = int(warmup_frac * iterations)

    # models; a .gguf is converted once, by rank 0, while the others wait
    if ddp and not master_process:
        dist.barrier()
    try:
        teacher_model = load_model(teacher, trust_remote_code) if use_teacher else None
        if student_init == 'teacher_layers':
            layers = student_layers
            if isinstance(student_layers, str):  # 'auto:N': the blocks that turn the hidden states most, on 32 windows
                sample = train_windows[np.linspace(0, n_train_docs - 1, min(32, n_train_docs)).astype(int)]
                batches = [make_batch(train_data, sample[a:a + batch_size], block_size, meta['pad_id'], torch_device)
                           for a in range(0, len(sample), batch_size)]
                with ctx:
                    layers, scores = choose_blocks(student_layers, teacher_model.to(torch_device), [(b.X, b.M) for b in batches],
                                                   blocks(teacher_model))
                if master_process:
                    print(f"student_layers='{student_layers}': block influence (1 - cos(in, out), {len(sample)} training windows): "
                          + ', '.join(f'{l} {v:.4f}' for l, v in enumerate(scores)) + f'; keeping {layers}')
            student_model, student_tok = student_from_teacher_layers(teacher_model, layers), model_tokenizer(teacher)
        else:
            if student is None:
                fail('set student (an HF hub id, a local folder or a .gguf file)')
            student_model, student_tok = load_model(student, trust_remote_code), model_tokenizer(student)
            if student_init == 'config':
                from transformers import AutoModelForCausalLM
                student_model = AutoModelForCausalLM.from_config(student_model.config, dtype=torch.float32)
        teacher_tok = model_tokenizer(teacher) if use_teacher else None
    except ConfigError as e:
        fail(e)
    if ddp and master_process:
        dist.barrier()
    if (w_kd == 0 or teacher_cache is not None) and w_hidden == 0:
        teacher_model = None  # 'teacher_layers' needed it only to build the student
    try:  # the data's tokenizer(s) are the models' (compared by fingerprint), and the models have enough output rows
        notes = check_vocabularies(meta, data_dir, student_model, student_tok, teacher_model, teacher_tok)
    except ConfigError as e:
        fail(e)
    if master_process and notes:
        print('\n'.join(notes))
    if teacher_model is not None:  # frozen, in the compute dtype (fp32 under float16: its activations could overflow)
        cast_parameters(teacher_model.to(torch_device).eval().requires_grad_(False), torch.float32 if compute_dtype == 'float16' else ptdtype)

    # the chunked loss computes logits = final hidden states @ head: only where a probe batch shows that is what they are
    heads = [m for m in (student_model, teacher_model if w_kd else None) if m is not None]
    chunk = loss_chunk if not loss_chunk or all(plain_head(m, torch.arange(1, 17, device=m.device)[None]) for m in heads) else 0
    if chunk != loss_chunk and master_process:
        print("note: a model's logits are not its final hidden states times its head (a bias, a logit scale or "
              'multiplier, soft-capping): using the plain loss path (loss_chunk=0)')
    # the chunk loop reallocates the same few (chunk, V) blocks: on a CPU they are kept within a step, trimmed between
    trim = keep_freed_memory() if chunk and device_type == 'cpu' else lambda: None  # (the plain path would fragment)
    try:
        layer_pairs = make_layer_pairs(layer_map, student_model.config.num_hidden_layers, teacher_model.config.num_hidden_layers,
                                       layers if student_init == 'teacher_layers' else None) if w_hidden > 0 else []
        model = Trainable(student_model, vocab, (w_ce, w_kd, w_hidden), kd_kind, temperature, beta, chunk, layer_pairs,
                          teacher_model.config.hidden_size if layer_pairs else 0, hidden_loss, hidden_rms_norm, proj_init, compile)
    except ConfigError as e:
        fail(e)
    raw_model = model = model.to(torch_device).train()  # from_pretrained returns models in eval mode
    fsdp = ddp and parallel == 'fsdp'  # (one process has nothing to shard)
    memory = memory_estimate(raw_model, teacher_model, batch_size * block_size, compute_dtype, world_size, fsdp, blocks)
    if fsdp:
        if compute_dtype == 'float16':
            fail("parallel='fsdp' trains in float32 or bfloat16: set dtype='bfloat16' (float16 needs a loss scaler per shard)")
        for t in [*model.parameters(), *model.buffers()]:  # every rank shards the same weights: rank 0's, as DDP does
            dist.broadcast(t.data, 0)
        shard(model, teacher_model)
    optimizer = configure_optimizer(model, learning_rate, weight_decay, (beta1, beta2))
    iter_num, last_saved, ckpt_dir = 0, None, os.path.join(out_dir, 'ckpt')
    if init_from == 'resume':
        try:
            path, iter_num, problems = find_checkpoint(ckpt_dir)
            state = load_checkpoint(path, raw_model, optimizer, scaler, config, world_size, fsdp)  # (refuses a changed data stream)
        except ConfigError as e:
            fail(e)
        set_rng_state(state['rng_states'][rank])
        last_saved = iter_num
        if master_process:
            for problem in problems:  # e.g. a truncated file, or the leftovers of a killed save
                print(f'note: {problem}; resuming from {path} (iteration {iter_num})')
            trim_log(os.path.join(out_dir, 'log.jsonl'), iter_num)
    if compile:  # the transformer stacks, in place (parameter names unchanged), apart from the loss, whose number of
        for m in (student_model, teacher_model):  # positions changes every batch (Trainable compiles its chunk arithmetic)
            if m is not None:
                m.base_model.compile()
    if ddp and not fsdp:
        # an MoE student whose experts are separate modules (remote code): an expert that gets no token in a step has no
        # gradient, and DDP must look for such parameters (transformers' own MoE models batch their experts in one)
        per_expert = any(re.search(r'\.experts\.\d+\.', name) for name, _ in student_model.named_parameters())
        model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None, find_unused_parameters=per_expert)

    def all_reduce(*values):
        t = torch.tensor(values, dtype=torch.float64, device=torch_device)
        if ddp:
            dist.all_reduce(t)
        return t.tolist()

    def batch(split, windows):
        return make_batch(split, windows, block_size, meta['pad_id'], torch_device, meta.get('teacher_eos_id', 0))

    @torch.no_grad()
    def evaluate():  # (through raw_model: DDP's forward would wait for ranks that have no documents to evaluate)
        model.eval()
        sums = [0.0] * 5  # ce, kd, hidden, supervised targets, aligned positions
        docs = val_windows[rank::world_size]
        for k in range(0, len(val_windows[::world_size]) if fsdp else len(docs), batch_size):  # (fsdp: every rank gathers
            b = batch(val_data, docs[k:k + batch_size] if k < len(docs) else val_windows[:1])  # together: a spare batch, unused)
            with ctx:
                out = raw_model(b, raw_model.teacher_forward(teacher_model, b))
            release_teacher()
            if k < len(docs):
                sums = [a + v for a, v in zip(sums, (out.ce.item(), out.kd.item(), out.hidden.item(), b.M.sum().item(), len(b.align.b)))]
            trim()
        model.train()
        if fsdp:  # (with no backward to follow, the root's forward left its parameters gathered)
            model.reshard()
        ce, kd, hidden, n, n_hidden = all_reduce(*sums)
        return ce / max(n, 1), kd / max(n, 1), hidden / max(n_hidden, 1)

    def release_teacher():  # fsdp: free the teacher's gathered embeddings and head once the loss has read them
        if fsdp and teacher_model is not None:
            teacher_model.get_input_embeddings().reshard()

    def last_good():
        return f'the last checkpoint ({ckpt_dir}, iteration {last_saved}) is intact' if last_saved else 'no checkpoint was written'

    def save(iter_num):
        """A checkpoint, unless something in it is not finite (then stop, keeping the last good one)."""
        finite = all(torch.isfinite(p.to_local() if hasattr(p, 'to_local') else p).all() for p in raw_model.parameters())  # (fsdp: its shard)
        if all_reduce(float(not finite))[0]:
            fail(f'non-finite weights at iteration {iter_num}: not checkpointed; {last_good()}')
        weights, optimizer_state = full_state(model, optimizer) if fsdp else (raw_model, optimizer.state_dict())
        states = [None] * world_size
        if ddp:
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if master_process:
            save_checkpoint(ckpt_dir, weights, optimizer_state, scaler, iter_num,
                            iter_num * batch_size * gradient_accumulation_steps, states, run_config)

    flops_peak = peak_flops or dtype_rate or measure_matmul_flops(torch_device, ptdtype)  # the MFU denominator: measured
    run_config = {**config, 'max_iters': iterations, 'loss_chunk': chunk, 'peak_flops': flops_peak, 'dtype': compute_dtype}
    if master_process:
        os.makedirs(out_dir, exist_ok=True)
        print(f'student: {sum(p.numel() for p in student_model.parameters()) / 1e6:.2f}M parameters; teacher: '
              + (f'{sum(p.numel() for p in teacher_model.parameters()) / 1e6:.2f}M parameters' if teacher_model is not None else
                 f"its cache {cache_dir}: top-{cache['k']} + {cache['samples']} drawn ({cache['teacher']})" if teacher_cache is not None else 'none'))
        print(f'dtype: {compute_dtype} ({why}); MFU against its matmul rate, {flops_peak / 1e9:,.0f} GFLOP/s' +
              (' (peak_flops)' if peak_flops else ' measured at start'))
        print(f'loss = {w_ce:g} CE' + (f' + {w_kd:g} T^2 {kd_kind} (T={temperature:g})' if w_kd else '')
              + (f' + {w_hidden:g} hidden {hidden_loss}' + (' (RMS-normalised)' if hidden_rms_norm else '') if w_hidden else '')
              + (' [across tokenizers]' if cross_tokenizer else ''))
        print(memory_line(memory))
        if layer_pairs:
            print('layer map (student <- teacher, 0 = embedding output, l = block l): ' + ', '.join(f'{a}<-{b}' for a, b in layer_pairs)
                  + f'; projections {student_model.config.hidden_size} -> {teacher_model.config.hidden_size} ({proj_init})')
        print(f"{len(train_data['idx']) - 1:,} training documents in {n_train_docs:,} windows of <= {block_size} targets; "
              f'{iterations} iterations of {batch_size} x {gradient_accumulation_steps} windows ({world_size} rank(s))')
        if n_val_docs == 0:
            print(f'note: no validation documents ({data_dir} has none, or eval_docs=0): no evaluation; checkpoints '
                  f'every {eval_interval} iterations all the same')
        if wandb_log:
            import wandb
            wandb.init(project=wandb_project, name=wandb_run_name, config=run_config)
        log_file = open(os.path.join(out_dir, 'log.jsonl'), 'a' if init_from == 'resume' else 'w')  # a new run, a new log

    def log(record, text):
        if master_process:
            print(text)
            log_file.write(json.dumps(record) + '\n')
            log_file.flush()
            if wandb_log:
                wandb.log(record)

    last_iter = iterations if stop_iter is None else min(stop_iter, iterations)
    while True:  # (the checkpoint a run resumed from was evaluated and written already)
        if (iter_num % eval_interval == 0 or iter_num == last_iter) and iter_num != last_saved:
            if n_val_docs:
                val_ce, val_kd, val_hidden = evaluate()
                log({'iter': iter_num, 'val_ce': val_ce, 'val_kd': val_kd, 'val_hidden': val_hidden},
                    f'iter {iter_num}: val ce {val_ce:.4f}, val kd {val_kd:.4f}, val hidden {val_hidden:.4f}')
                if not all(map(math.isfinite, (val_ce, val_kd, val_hidden))):
                    fail(f'non-finite validation loss at iteration {iter_num} (ce {val_ce}, kd {val_kd}, hidden {val_hidden}): '
                         f'not checkpointed; {last_good()}; lower learning_rate or check the data')
            if iter_num > 0 and checkpoint:
                save(iter_num)
                last_saved = iter_num
        if iter_num >= last_iter:
            break
        lr = get_lr(iter_num, iterations, warmup_iters, learning_rate, min_lr)
        for group in optimizer.param_groups:
            group['lr'] = lr
        t0 = time.time()
        micro_batches = [batch(train_data, train_windows[ids]) for ids in
                         step_doc_ids(iter_num, batch_size, gradient_accumulation_steps, rank, world_size, n_train_docs, seed)]
        # the step's counts over every micro-batch and rank: supervised targets, aligned positions, tokens
        n_targets, n_hidden, step_tokens = all_reduce(sum(b.M.sum().item() for b in micro_batches),
                                                      sum(len(b.align.b) for b in micro_batches), sum(b.X.numel() for b in micro_batches))
        sums = torch.zeros(4, dtype=torch.float64, device=torch_device)  # loss, ce, kd, hidden
        for micro_step, b in enumerate(micro_batches):
            if fsdp:  # gradients are reduced over ranks once per step, after its last micro-batch
                model.set_requires_gradient_sync(micro_step == len(micro_batches) - 1)
            elif ddp:
                model.require_backward_grad_sync = micro_step == len(micro_batches) - 1
            with ctx:
                out = model(b, raw_model.teacher_forward(teacher_model, b), max(n_targets, 1), max(n_hidden, 1))
            release_teacher()
            scaler.scale(out.loss * world_size).backward()  # DDP averages gradients over ranks; the sum is wanted
            sums += torch.stack([out.loss.detach(), out.ce, out.kd, out.hidden]).double()
        loss_value, ce_mean, kd_mean, hidden_mean = all_reduce(*sums.tolist())
        ce_mean, kd_mean, hidden_mean = ce_mean / max(n_targets, 1), kd_mean / max(n_targets, 1), hidden_mean / max(n_hidden, 1)
        if not math.isfinite(loss_value):
            fail(f'non-finite loss at iteration {iter_num} (ce {ce_mean}, kd {kd_mean}, hidden {hidden_mean}): {last_good()}; '
                 'lower learning_rate, check the data, or use bfloat16 instead of float16')
        scaler.unscale_(optimizer)
        grad_norm = gathered(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float('inf'))).item()
        if not math.isfinite(grad_norm) and not scaler.is_enabled():  # (float16's GradScaler skips such a step itself)
            fail(f'non-finite gradient norm at iteration {iter_num}: the step was not applied; {last_good()}; '
                 'lower learning_rate or check the data')
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        trim()
        if device_type == 'cuda':
            torch.cuda.synchronize()
        dt = time.time() - t0
        if iter_num % log_interval == 0:
            seq = step_tokens / (batch_size * gradient_accumulation_steps)
            flops = flops_per_token(student_model, seq, True) + (flops_per_token(teacher_model, seq, False) if teacher_model is not None else 0)
            tok_s = step_tokens / dt
            if flops * tok_s > flops_peak * world_size and not peak_flops:  # the rate measured at start read low (a loaded
                flops_peak = max(measure_matmul_flops(torch_device, ptdtype), flops * tok_s / world_size)  # machine): never > 100%
            mfu = flops * tok_s / (flops_peak * world_size)
            peak = torch.cuda.max_memory_allocated() if device_type == 'cuda' else None  # (beside the estimate at start)
            log({'iter': iter_num, 'loss': loss_value, 'ce': ce_mean, 'kd': kd_mean, 'hidden': hidden_mean, 'lr': lr,
                 'grad_norm': grad_norm, 'ms': dt * 1000, 'tokens_per_s': tok_s, 'mfu': mfu, 'peak_memory': peak},
                f'iter {iter_num}: loss {loss_value:.4f}, ce {ce_mean:.4f}, kd {kd_mean:.4f}, hidden {hidden_mean:.4f}, '
                f'lr {lr:.2e}, grad norm {grad_norm:.3f}, {dt * 1000:.0f} ms, {tok_s:,.0f} tok/s, mfu {mfu * 100:.1f}%'
                + (f', peak memory {gb(peak)}' if peak else ''))
        iter_num += 1

    weights = {k[len('model.'):]: v for k, v in full_state(model)[0].items() if k.startswith('model.')} if fsdp and export else None
    if master_process and export:
        folder = os.path.join(out_dir, 'student')
        student_model.save_pretrained(folder, state_dict=weights)  # the student alone: projections are training machinery
        export_tok = student_tok or model_tokenizer(meta['tokenizer'])
        if export_tok is not None and hasattr(export_tok, 'save_pretrained'):
            export_tok.save_pretrained(folder)
        print(f'exported the student to {folder}')
    if ddp:  # tear down together, after rank 0's export, once nothing holds the process group any more (DDP's reducer,
        del model, raw_model, student_model, teacher_model, optimizer  # FSDP's sharded tensors): gloo's threads, left
        gc.collect()  # to the interpreter's exit, aborted a rank in CI twice ('terminate called without an active exception')
        dist.barrier()
        dist.destroy_process_group()
