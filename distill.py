"""
Knowledge distillation of language models: the settings, the losses and the run, in one file.

    python distill.py configs/tiny.py                                  # one process (CPU or one GPU)
    python distill.py configs/hermes.py --learning_rate=1e-5           # a config file, then overrides
    torchrun --standalone --nproc_per_node=8 distill.py configs/hermes.py
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 \\
        distill.py configs/hermes.py
    python distill.py --help                                           # every key, its default and comment

The loss (Trainable.forward, the one place it is assembled):
    loss = w_ce * CE + w_kd * T^2 * D(p_teacher || q_student) + w_hidden * H
- CE: cross-entropy on the data's supervised targets (the hard labels).
- D: a divergence (DIVERGENCES) between the teacher's and the student's next-token distributions at temperature T.
- H: the distance between student hidden states, through trained projections, and the teacher's at mapped layers
  (make_layer_pairs); works across architectures and, with prepare_data.py --teacher_tokenizer, across tokenizers.
distill='logits' sets (w_ce, w_kd, w_hidden) = (1 - alpha, alpha, 0), 'hidden' (1 - alpha, 0, alpha), 'none'
(1, 0, 0): the SFT baseline, the same routine with no teacher; ce_weight, kd_weight, hidden_weight override them.
With loss_chunk > 0, CE and D come from the final hidden states a chunk of positions at a time (ChunkedHeadLoss), so
neither model's full logits ever exist.

Data comes from prepare_data.py: mask[i] == 1 iff token i is a supervised target. A document d is read as
X = d[:-1] and scored on Y = d[1:] where M = mask[1:]. CE and D are sums over supervised targets divided by N, the
supervised targets of the whole optimizer step (all micro-batches, all ranks); H likewise over its aligned
positions; so the result does not depend on how a step is split. Beneath this file, in kd/: data.py (what a step
reads), models.py (models and tokenizers), machine.py (processes, dtype, memory, FSDP), checkpoint.py, sampling.py
(on-policy rows), configurator.py.
"""
import gc, json, math, os, re, statistics, sys, time
from contextlib import nullcontext
from typing import NamedTuple
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from kd.checkpoint import (content_hash, find_checkpoint, load_checkpoint, rng_states, save_checkpoint, set_aside,
                        set_rng_state, trim_log)
from kd.configurator import ConfigError, DataError, check_config, exit_on_error, parse_config, print_help
from kd.data import TopK, attach_topk, block_windows, check_dataset, load_split, make_batch, pack_rows, step_doc_ids
from kd.machine import (choose_dtype, flops_per_token, full_state, gathered, gb, init_distributed, keep_freed_memory,
                     measure_matmul_flops, memory_estimate, memory_line, shard, teacher_head)
from kd.models import (build_student, cast_parameters, check_vocabularies, load_model, load_tokenizer, model_tokenizer,
                    output_rows, packs, plain_head, special_ids, vocab_columns)
from kd.sampling import check_prompts, on_policy_rows, prompt_lengths, row_seed, sample_rows, stop_tokens

# -----------------------------------------------------------------------------
# defaults (a config file and --key=value override them; `python distill.py --help` lists them)
# I/O
out_dir = 'out'  # checkpoints (ckpt/), the exported student (student/) and log.jsonl
init_from = 'scratch'  # 'scratch' or 'resume' (continue exactly from out_dir/ckpt)
eval_interval = 100  # evaluate and checkpoint every this many iterations (and at the end)
eval_docs = 64  # validation windows (documents, or block_size pieces of longer ones) per evaluation
log_interval = 1  # print a log line every this many iterations
export = True  # save out_dir/student as an HF folder at the end
checkpoint = True  # write out_dir/ckpt (fp32 weights + AdamW state: 12 bytes per parameter) to resume from
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
teacher_cache = None  # for logit KD: the teacher's top-k by cache_teacher.py (a folder, or its name in the dataset)
student = None  # HF hub id, local folder or .gguf file (for 'teacher_layers': unused)
student_init = 'pretrained'  # 'pretrained' (its weights), 'config' (random init) or 'teacher_layers'
student_layers = None  # teacher blocks kept by student_init='teacher_layers', e.g. [0, 3, 6], or 'auto:N' (influence)
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
layer_map = 'uniform'  # 'uniform', 'last', 'kept' or [(student, teacher), ...]; 0 = embedding output, l = block l
hidden_loss = 'mse'  # 'mse' (squared error / d_teacher) or 'cosine' (1 - cos)
hidden_rms_norm = False  # RMS-normalise both sides first: a guard against the teacher's massive activations
proj_init = 'xavier'  # projection init: 'xavier' or 'identity' (rectangular identity)
loss_chunk = 'auto'  # CE and D from hidden states, this many positions at a time, no full logits (auto_chunk); 0: plain
pack = True  # a micro-batch's windows packed several to a row, each attending only to itself: the losses unchanged
on_policy = 0.0  # GKD's lambda: the share of the run's rows whose reply the student writes (divergence only); 0: none
max_new_tokens = 256  # on-policy: the longest reply the student writes (shorter where block_size ends first)
sample_temperature = 1.0  # on-policy: the student's sampling temperature
top_p = 1.0  # on-policy: nucleus sampling's mass (1: the whole distribution)
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
dtype = 'auto'  # 'auto' (bf16 where this device's bf16 matmul is clearly fastest), 'float32', 'bfloat16', 'float16'
parallel = 'ddp'  # under torchrun: 'ddp' (each rank holds both models) or 'fsdp' (FSDP2: 1/world of each parameter)
compile = False  # torch.compile both transformer stacks (minutes at start on a CPU; the loss's chunks run eagerly)
seed = 1337  # data order and initialisation
peak_flops = 0.0  # per-device peak FLOP/s for MFU; 0: the matmul rate of the run's dtype, measured at start
OPTIONAL_TYPES = {'teacher': str, 'teacher_cache': str, 'student': str, 'student_layers': (list, str), 'stop_iter': int,
                  'max_iters': int, 'ce_weight': float, 'kd_weight': float, 'hidden_weight': float,
                  'wandb_run_name': str, 'loss_chunk': (int, str)}  # (the settings whose default is None or 'auto')
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str, list, type(None)))]
# -----------------------------------------------------------------------------
# divergences (all in fp32)

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

def forward_kl(log_p, log_q, beta):
    """KL(p || q): mode-covering, the classic KD loss."""
    return _kl(log_p, log_q)

# Every divergence here is a sum over tokens, D(p || q) = sum_j d(p_j, q_j): the entry gives the terms d from log p
# (teacher) and log q (student) at temperature T, and beta. A new divergence is one more entry: kd_divergence, both
# loss paths (autograd), the teacher cache and the kd_kind setting take it from here. (chunk_loss has a shortcut for
# the gradient of forward_kl, taken only while the 'fkl' entry is that function: an edited entry is what trains.)
DIVERGENCES = {
    'fkl': forward_kl,
    'rkl': lambda log_p, log_q, beta: _kl(log_q, log_p),  # reverse KL(q || p): mode-seeking
    'jsd': _jsd,  # generalised Jensen-Shannon
    'skl': lambda log_p, log_q, beta: _kl(log_p, _log_mix(log_p, log_q, beta)),  # skew KL(p || beta p + (1 - beta) q)
    'srkl': lambda log_p, log_q, beta: _kl(log_q, _log_mix(log_q, log_p, beta)),  # skew reverse (DistiLLM: beta 0.1)
    'tvd': lambda log_p, log_q, beta: 0.5 * (log_p.exp() - log_q.exp()).abs(),  # total variation distance
}
KD_KINDS = tuple(DIVERGENCES)

def kd_divergence(student_logits, teacher_logits, kind='fkl', temperature=1.0, beta=0.5):
    """Per-position divergence (DIVERGENCES[kind]) between p = softmax(teacher / T) and q = softmax(student / T).
    A TopK teacher (data.py, a cached one): the exact terms of its k tokens plus the weighted terms of its drawn ones,
    whose expectation over the draws is the sum of the terms over the tail: an unbiased estimate of the full
    divergence (exact at k = V)."""
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

# -----------------------------------------------------------------------------
# logits across tokenizers

def to_student_vocab(zt, cols, n, temperature):
    """The teacher's logits zt (rows, V_t) as logits over n student tokens: each one's probability at temperature T is
    the sum of those of the teacher tokens carried onto it, cols[j] for teacher token j (n: none, dropped; the rest
    renormalised), returned as T log-probabilities, so that softmax(. / T) gives them and every divergence applies
    unchanged. cols comes from models.vocab_map: a token of the same bytes (the shared vocabulary) or the longest
    student token the teacher's begins with; identical tokenizers give the identity, a byte-level student each
    next byte's probability."""
    z = (zt if zt.dtype == torch.float64 else zt.float()) / temperature
    cols = cols.expand(len(z), -1)
    top = z.new_full((len(z), n + 1), -math.inf).scatter_reduce_(1, cols, z, 'amax')  # a log-sum-exp per student token
    total = torch.zeros_like(top).scatter_add_(1, cols, (z - top.gather(1, cols)).exp())
    return (top + total.log())[:, :n] * temperature

# -----------------------------------------------------------------------------
# the head loss, plain and chunked

def loss_sums(z, y, zt, vocab, kind='fkl', temperature=1.0, beta=0.5, weight=None):
    """Sums over the rows (supervised positions) of logits z (n, V) of the CE against targets y and of the divergence
    from the teacher's logits zt (a TopK: its cached distribution; None: CE alone) at the first len(zt) rows, over
    the real vocabulary: rows past it are embedding padding and differ between models, so they are never compared.
    Across tokenizers vocab is the student's compared tokens (a tensor of ids) and zt already over them
    (to_student_vocab). weight: each row's weight in the divergence's sum (None: 1; on-policy's mixture, Trainable).
    The plain path calls it on all rows, the chunked one per chunk."""
    ce = F.cross_entropy(z if z.dtype == torch.float64 else z.float(), y, reduction='sum')  # (fp32 at least)
    if zt is None:
        return ce, torch.zeros_like(ce)
    z = z[:len(zt)]
    if isinstance(vocab, torch.Tensor):
        d = kd_divergence(z[:, vocab], zt, kind, temperature, beta)
    else:
        d = kd_divergence(z[:, :vocab], zt if isinstance(zt, TopK) else zt[:, :vocab], kind, temperature, beta)
    return ce, (d if weight is None else d * weight[:len(d)].to(d.dtype)).sum()

def chunk_loss(z, y, zt, vocab, coef, kind, temperature, beta, weight=None, rows=8):
    """One chunk of ChunkedHeadLoss: loss_sums of logits z (in the compute dtype, read in fp32) and, unless coef is
    None, the gradient of coef[0] CE + coef[1] D w.r.t. z in z's dtype, by autograd. Forward KL as shipped has a
    closed form, d CE/dz = softmax(z) - onehot(y), d KL(p || q)/dz = (q - p) / T, taken a few rows at a time so
    that its fp32 temporaries stay in the CPU's cache: one read of z and zt from memory, one write of the gradient,
    three exponentials per logit (the whole chunk at once made some twenty passes over (n, V) in memory, six exps).
    On a GPU, 256 rows at a time: no cache to fit, a launch per op, and the fp32 temporaries bounded."""
    fp = torch.float64 if z.dtype == torch.float64 else torch.float32  # never below fp32
    if coef is None:
        return *loss_sums(z.to(fp), y, zt, vocab, kind, temperature, beta, weight), None
    if DIVERGENCES[kind] is not forward_kl or not isinstance(zt, torch.Tensor) or isinstance(vocab, torch.Tensor):
        with torch.enable_grad():
            z_fp = z.to(fp).requires_grad_()
            ce, kd = loss_sums(z_fp, y, zt, vocab, kind, temperature, beta, weight)
            dz, = torch.autograd.grad(coef[0] * ce + coef[1] * kd, z_fp)
        return ce.detach(), kd.detach(), dz.to(z.dtype)
    T, tiny = temperature, torch.finfo(fp).min
    ce, kd, dz = z.new_zeros((), dtype=fp), z.new_zeros((), dtype=fp), torch.empty_like(z)
    rows = rows if z.device.type == 'cpu' else 256
    for a in range(0, len(z), rows):
        zr, yr = z[a:a + rows].to(fp), y[a:a + rows]
        labeled = (yr >= 0)[:, None].to(fp)  # 0 where y = -100 (a token the student sampled: no hard label)
        yr = yr.clamp(min=0)[:, None]
        m = zr.amax(1, keepdim=True)
        e = torch.sub(zr, m).exp_()  # softmax(z) = e / s
        s = e.sum(1, keepdim=True)
        ce += ((m + s.log() - zr.gather(1, yr)) * labeled).sum()
        g = e.mul_(labeled * coef[0] / s).scatter_add_(1, yr, labeled * -coef[0])  # the CE part of the gradient
        log_q = zr[:, :vocab] / T
        log_q -= log_q.amax(1, keepdim=True)
        q = log_q.exp()
        s_q = q.sum(1, keepdim=True)
        log_q -= s_q.log()
        log_p = zt[a:a + rows, :vocab].to(fp) / T
        log_p -= log_p.amax(1, keepdim=True)
        p = log_p.exp()
        s_p = p.sum(1, keepdim=True)
        log_p -= s_p.log()
        p /= s_p
        d = (p * log_p.clamp_(min=tiny).sub_(log_q)).sum(1)  # (a -inf teacher logit: p = 0, and no 0 * -inf)
        dq = q.div_(s_q).sub_(p)  # d KL/dz = (q - p) / T
        if weight is not None:  # (on-policy's mixture: each row's weight)
            d, dq = d * weight[a:a + rows].to(fp), dq.mul_(weight[a:a + rows, None].to(fp))
        kd += d.sum()
        g[:, :vocab].add_(dq, alpha=coef[1] / T)
        dz[a:a + rows] = g
    return ce, kd, dz

def auto_chunk(vocab_rows, compute_dtype):
    """loss_chunk='auto': 1,024 positions; in fp32 the most, a power of two from 256, whose logits stay within 2^26 per
    model. Measured on a 2-core CPU (docs/performance.md): 1,024 beat 256 in bf16 at V = 49,152 and 151,936, in fp32 at
    49,152, and lost in fp32 at 151,936 (256 fastest there, and a quarter of the memory)."""
    if compute_dtype != 'float32':
        return 1024
    return min(1024, max(256, 2 ** int(math.log2(2 ** 26 / vocab_rows))))

class ChunkedHeadLoss(torch.autograd.Function):
    """loss_sums(h @ W.T, Y, t_h @ t_W.T) without a (positions, V) tensor of either model: a chunk of positions at a
    time. Backward would need every chunk's logits again, so each chunk's gradient is taken in forward (chunk_loss)
    for the combination coef[0] CE + coef[1] D that the caller forms from the two outputs, and only the gradients
    w.r.t. h and W (positions x d, V x d) are kept; backward checks that combination and scales them (1/N, the world
    size, the fp16 loss scale). The plain path's matmuls, none repeated. h (n, d_s): the student's final hidden
    states at supervised positions, W (V_s, d_s) its head; t_h (n, d_t), t_W (V_t, d_t) the teacher's, or None (CE
    alone); or t_h a TopK of n positions and t_W None (a cached teacher). The teacher may have fewer rows than h:
    they are h's first (across tokenizers, the aligned positions; the others have CE alone), and t_cols carries its
    distribution onto the student's compared tokens, vocab (to_student_vocab)."""
    @staticmethod
    def forward(ctx, h, W, Y, t_h, t_W, coef, vocab, kind, temperature, beta, chunk, t_cols=None, weight=None):
        need_grad = coef is not None  # None: values only (evaluation)
        Wc = W.to(h.dtype)  # the heads in the compute dtype once, not once per chunk (autocast)
        t_Wc = None if t_W is None else t_W.to(t_h.dtype)
        acc = torch.promote_types(W.dtype, torch.float32)  # the head's gradient accumulated in fp32 at least
        dh, dW = (torch.empty_like(h), torch.zeros_like(W, dtype=acc)) if need_grad else (None, None)
        ce_sum, kd_sum = torch.zeros((), device=h.device), torch.zeros((), device=h.device)
        for a in range(0, len(h), chunk):
            hc = h[a:a + chunk]
            zt = None if t_h is None else t_h[a:a + chunk] if t_Wc is None else t_h[a:a + chunk] @ t_Wc.T
            if t_cols is not None:  # across tokenizers: the teacher's distribution on the student's tokens
                zt = to_student_vocab(zt, t_cols, len(vocab), temperature)
            ce, kd, dz = chunk_loss(hc @ Wc.T, Y[a:a + chunk], zt, vocab, coef, kind, temperature, beta,
                                    None if weight is None else weight[a:a + chunk])
            ce_sum, kd_sum = ce_sum + ce, kd_sum + kd
            if need_grad:
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
        if not (c_ce or c_kd):  # (hidden states alone: the loss does not read the head)
            return dh.zero_(), dW.zero_().to(ctx.head_dtype), *[None] * 11
        scale = g_ce / c_ce if c_ce else g_kd / c_kd
        wanted = scale * torch.tensor([c_ce, c_kd], device=scale.device)
        if not torch.allclose(torch.stack([g_ce, g_kd]).float(), wanted, rtol=1e-4, atol=0):
            raise RuntimeError(f'ChunkedHeadLoss computed the gradient of {c_ce:g} CE + {c_kd:g} D, but the loss '
                               'weighs its outputs otherwise: pass the weights the loss uses as coef')
        return dh.mul_(scale), dW.mul_(scale).to(ctx.head_dtype), *[None] * 11

# -----------------------------------------------------------------------------
# hidden states: the distance and the layer map

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
            raise ConfigError("layer_map='kept' maps a student made of teacher blocks: "
                              "set student_init='teacher_layers'")
        return [(l, kept[l] if l < len(kept) else teacher_layers_n) for l in range(1, len(kept) + 1)]
    if spec == 'uniform':
        return [(l, int(l * teacher_layers_n / student_layers_n + 0.5)) for l in range(1, student_layers_n + 1)]
    if spec == 'last':
        return [(student_layers_n, teacher_layers_n)]
    pair = lambda p: isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(i, int) for i in p)
    if isinstance(spec, (list, tuple)) and spec and all(map(pair, spec)):
        for s_l, t_l in spec:
            if not (0 <= s_l <= student_layers_n and 0 <= t_l <= teacher_layers_n):
                raise ConfigError(f'layer_map pair ({s_l}, {t_l}) is out of range: the student has hidden states '
                                  f'0..{student_layers_n}, the teacher 0..{teacher_layers_n} (0 = embedding output)')
        return [tuple(p) for p in spec]
    raise ConfigError(f"layer_map must be 'uniform', 'last', 'kept' or a list of (student, teacher) pairs, "
                      f"got {spec!r}")

# -----------------------------------------------------------------------------
# the student with its loss

class TeacherOut(NamedTuple):
    """What the loss reads of the teacher (None where a term is off or a path does not need it)."""
    logits: torch.Tensor = None  # its logits (the plain path)
    last_hidden: torch.Tensor = None  # its final hidden states (the chunked path: the head applied a chunk at a time)
    head: torch.Tensor = None  # its output head's weight (the chunked path)
    topk: TopK = None  # its cached distribution at the supervised targets (teacher_cache: no teacher in memory)
    hidden: list = None  # its hidden states at the mapped layers

class Losses(NamedTuple):
    loss: torch.Tensor  # this micro-batch's share of the step's loss, to differentiate
    ce: torch.Tensor  # the sums over its supervised targets (detached)
    kd: torch.Tensor
    hidden: torch.Tensor  # the sum over its aligned positions, averaged over the layer pairs (detached)

class Trainable(nn.Module):
    """The student and its loss. Everything that trains (the student and the hidden-state projections) sits in this
    one module, so that DDP, the optimizer and checkpoints see the same parameters; only .model is exported.
    chunk > 0: CE and D by ChunkedHeadLoss, this many positions at a time; 0: from the full logits. cross: logit
    distillation across tokenizers, (the student ids compared, each teacher id's column among them) (vocab_columns)."""
    def __init__(self, model, vocab, weights=(1.0, 0.0, 0.0), kind='fkl', temperature=1.0, beta=0.5, chunk=0,
                 layer_pairs=(), teacher_width=0, hidden_loss='mse', rms_norm=False, proj_init='xavier', cross=None):
        super().__init__()
        self.model, self.vocab, (self.w_ce, self.w_kd, self.w_hidden) = model, vocab, weights
        self.compared, self.t_cols = cross or (vocab, None)
        self.kind, self.temperature, self.beta, self.chunk = kind, temperature, beta, chunk
        self.layer_pairs, self.hidden_loss, self.rms_norm = list(layer_pairs), hidden_loss, rms_norm
        width = model.config.hidden_size
        self.proj = nn.ModuleList(nn.Linear(width, teacher_width, bias=False) for _ in self.layer_pairs)
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
            return TeacherOut(topk=batch.topk)
        kd, hidden = self.w_kd > 0, self.w_hidden > 0
        net = teacher if kd and not self.chunk else teacher.base_model
        X, pos = (batch.X, batch.pos) if batch.align.XT is None else (batch.align.XT, batch.teacher_pos)
        out = net(input_ids=X, position_ids=pos, use_cache=False, output_hidden_states=hidden)
        return TeacherOut(logits=out.logits if kd and not self.chunk else None,
                          last_hidden=out.last_hidden_state if kd and self.chunk else None,
                          head=teacher_head(teacher) if kd and self.chunk else None,
                          hidden=[out.hidden_states[t] for _, t in self.layer_pairs] if hidden else None)

    def coefficients(self, n_targets, n_hidden=1, n_labeled=None):
        """The weights of the sums CE, D and H in the loss: the step's counts of supervised targets, of those with a
        hard label (all but the student's own samples) and of aligned positions divide them, so that the micro-batches'
        losses add up to the step's. T^2 keeps the gradient of D comparable across temperatures (Hinton et al. 2015):
        D's own gradient shrinks like 1/T^2."""
        c_kd = self.w_kd * self.temperature ** 2 / n_targets
        return self.w_ce / (n_labeled or n_targets), c_kd, self.w_hidden / n_hidden

    def forward(self, batch, teacher, n_targets=1, n_hidden=1, n_labeled=None, mix=None):
        """The loss: c_ce CE + c_kd D + c_hidden H (coefficients); CE only where Y has a label (not -100). The rows: the
        supervised positions (b, s), whose teacher rows are (tb, tt): the same positions, or across tokenizers the
        aligned pairs, first (then the student's other supervised positions, CE alone). mix (on-policy): the weights
        (w_student, w_data) of D's terms on the student's own tokens (Y = -100) and on the data's, so that the two
        sources are mixed by rows, as GKD and TRL mix them by batch, not by tokens (mixing_weights)."""
        X, Y, M, align = batch.X, batch.Y, batch.M, batch.align
        b, s = M.nonzero(as_tuple=True)
        tb, tt = b, s
        if self.t_cols is not None:
            rest = M.bool().index_put((align.b, align.s), torch.zeros_like(align.s, dtype=torch.bool))
            (rb, rs), tb, tt = rest.nonzero(as_tuple=True), align.b, align.t
            b, s = torch.cat([align.b, rb]), torch.cat([align.s, rs])
        c_ce, c_kd, c_hidden = self.coefficients(n_targets, n_hidden, n_labeled)
        settings = (self.compared, self.kind, self.temperature, self.beta)
        weight = None  # (on-policy: each row's weight in D, by who wrote its token)
        if mix is not None:
            weight = torch.tensor(mix, dtype=torch.float64, device=Y.device)[(Y[b, s] >= 0).long()]
        if self.chunk:
            t_h = teacher.topk if teacher.topk is not None else teacher.last_hidden
            out = self.model.base_model(input_ids=X, position_ids=batch.pos, use_cache=False,
                                        output_hidden_states=teacher.hidden is not None)
            coef = (c_ce, c_kd) if torch.is_grad_enabled() else None  # (evaluation: values alone)
            ce, kd = ChunkedHeadLoss.apply(out.last_hidden_state[b, s], self.model.get_output_embeddings().weight,
                                           Y[b, s], None if t_h is None else t_h[tb, tt], teacher.head, coef,
                                           *settings, self.chunk, self.t_cols, weight)
        else:
            zt = teacher.topk if teacher.topk is not None else teacher.logits
            out = self.model(input_ids=X, position_ids=batch.pos, use_cache=False,
                             output_hidden_states=teacher.hidden is not None)
            zt = None if zt is None else zt[tb, tt]
            if self.t_cols is not None:
                zt = to_student_vocab(zt, self.t_cols, len(self.compared), self.temperature)
            ce, kd = loss_sums(out.logits[b, s], Y[b, s], zt, *settings, weight)
        hidden = torch.zeros_like(ce)
        if teacher.hidden is not None:
            with torch.autocast(X.device.type, enabled=False):  # projections and distances in fp32
                for (ls, _), proj, ht in zip(self.layer_pairs, self.proj, teacher.hidden):
                    hs = proj(out.hidden_states[ls][align.b, align.s].float())
                    hidden = hidden + hidden_distance(hs, ht[align.b, align.t], self.hidden_loss, self.rms_norm).sum()
            hidden = hidden / len(self.layer_pairs)
        loss = c_ce * ce + c_kd * kd + c_hidden * hidden
        return Losses(loss, ce.detach(), kd.detach(), hidden.detach())

def mixing_weights(rows, student_rows, n_targets, student_targets):
    """On-policy's mixture (GKD's lambda) by rows: D = (R_s / R) mean_student + (1 - R_s / R) mean_data, each source's
    terms averaged over its own tokens, for a step of R rows, R_s of them the student's. Returned as the weights of
    the two sources' terms in D's sum over all N targets, (R_s / R) N / N_s and (1 - R_s / R) N / (N - N_s), so that
    D / N is that mixture (D = the plain mean when the replies are as long as the data's). By tokens instead, the
    source with the longer replies takes more than its share (docs/experiments.md: 41% for the student at 0.5)."""
    if student_rows == 0 or student_targets == 0 or student_targets == n_targets:
        return None  # one source: the plain mean
    share = student_rows / rows
    return share * n_targets / student_targets, (1 - share) * n_targets / (n_targets - student_targets)

def get_lr(it, max_iters, warmup_iters, lr, min_lr):
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    ratio = (it - warmup_iters) / max(1, max_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(ratio, 1.0))) * (lr - min_lr)

def configure_optimizer(module, lr, weight_decay, betas):
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)  # one kernel per step (CPU too: ~4x faster here)

# -----------------------------------------------------------------------------

if __name__ == '__main__':
    exit_on_error()  # a ConfigError or DataError anywhere below: one line `error: ...` on stderr, exit status 2
    defaults = {k: globals()[k] for k in config_keys}
    if '--help' in sys.argv[1:] or '-h' in sys.argv[1:]:
        print_help(__doc__, __file__, defaults)
        sys.exit(0)
    config = parse_config(sys.argv[1:], defaults, OPTIONAL_TYPES)
    check_config(config, {'distill': ('logits', 'hidden', 'none'), 'kd_kind': KD_KINDS,
                          'hidden_loss': ('mse', 'cosine'), 'proj_init': ('xavier', 'identity'),
                          'init_from': ('scratch', 'resume'),
                          'dtype': ('auto', 'float32', 'bfloat16', 'float16'), 'parallel': ('ddp', 'fsdp'),
                          'student_init': ('pretrained', 'config', 'teacher_layers')}, torch.cuda.is_available())
    globals().update(config)  # read-only from here: what the run derives gets its own name, and goes in run_config
    implied = {'none': (1.0, 0.0, 0.0), 'logits': (1 - alpha, alpha, 0.0), 'hidden': (1 - alpha, 0.0, alpha)}[distill]
    w_ce, w_kd, w_hidden = (implied[i] if w is None else float(w)
                            for i, w in enumerate((ce_weight, kd_weight, hidden_weight)))
    if teacher_cache is not None and (w_kd == 0 or w_hidden > 0):
        raise ConfigError("teacher_cache holds the teacher's next-token distribution for logit distillation alone: "
                          "use distill='logits' (hidden-state distillation needs the teacher itself), or unset "
                          "teacher_cache")
    if on_policy > 0 and (teacher_cache is not None or w_kd == 0 or parallel == 'fsdp'):
        raise ConfigError('on_policy: ' + ('a teacher cache cannot score text the student writes: unset teacher_cache'
                                           if teacher_cache is not None else "the student's replies train on the "
                                           "divergence alone: set distill='logits' (or kd_weight > 0)" if w_kd == 0
                                           else "under parallel='fsdp' sampling would gather every block for every "
                                           "token: use parallel='ddp'"))
    use_teacher = (w_kd > 0 and teacher_cache is None) or w_hidden > 0 or student_init == 'teacher_layers'
    if use_teacher and teacher is None:
        why = " (student_init='teacher_layers' copies its blocks)" if student_init == 'teacher_layers' else ''
        raise ConfigError(f"distill='{distill}' needs a teacher{why}: set teacher (an HF hub id, a local folder or a "
                          ".gguf file), or distill='none' for SFT")

    # processes and precision: torchrun's environment decides (one code path for 1 process and N)
    ddp, rank, local_rank, world_size, torch_device = init_distributed(device)
    master_process = rank == 0  # only it prints and writes
    if gradient_accumulation_steps % world_size:
        raise ConfigError(f'gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of the world '
                          f'size {world_size}')
    torch.manual_seed(seed + rank)
    device_type = 'cuda' if 'cuda' in device else 'cpu'
    compute_dtype, why, dtype_rate = choose_dtype(dtype, torch_device)  # 'auto' resolved (the matmul rates measured)
    ptdtype = getattr(torch, compute_dtype)
    # autocast: matmuls in the compute dtype, weights and optimizer state in fp32; the divergences cast up themselves
    ctx = nullcontext() if compute_dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)
    scaler = torch.amp.GradScaler(device_type, enabled=compute_dtype == 'float16')  # fp16 alone needs loss scaling

    # data: token and mask arrays, read in windows of block_size (data.py); a teacher cache rides with each split
    data_dir = os.path.join(data_root, dataset)
    meta = check_dataset(data_dir)
    vocab, cross_tokenizer = meta['vocab_size'], 'teacher_tokenizer' in meta
    if cross_tokenizer and teacher_cache is not None:
        raise ConfigError(f"teacher_cache: {data_dir} pairs two tokenizers (prepare_data.py --teacher_tokenizer), "
                          "and a cache holds a teacher's distribution over the student's own tokens: distill across "
                          'tokenizers online (unset teacher_cache), or prepare the data with one tokenizer')
    if cross_tokenizer and on_policy:
        raise ConfigError(f"on_policy: {data_dir} pairs two tokenizers, and the teacher would have to read the "
                          "student's replies in its own tokens (not built): prepare the data with one tokenizer")
    train_data, val_data = load_split(data_dir, 'train'), load_split(data_dir, 'val')
    data_fingerprint = content_hash([os.path.join(data_dir, f) for f in sorted(meta['files'])])  # (resumes read it)
    if teacher_cache is not None:  # a folder, or its name inside the dataset's
        cache_dir = teacher_cache if os.path.isdir(teacher_cache) else os.path.join(data_dir, teacher_cache)
        for split, name in ((train_data, 'train'), (val_data, 'val')):
            cache = attach_topk(split, name, cache_dir, data_dir, block_size, temperature)
    train_windows, val_windows = block_windows(train_data, block_size), block_windows(val_data, block_size)[:eval_docs]
    if on_policy:  # the student writes replies to the documents' prompts: their lengths, and where replies stop
        prompts = prompt_lengths(train_data)
        with_prompt = check_prompts(train_data, prompts, block_size, data_dir)
    n_train_docs, n_val_docs = len(train_windows), len(val_windows)  # (a document longer than block_size gives several)
    iterations = max_iters if max_iters is not None else \
        math.ceil(epochs * n_train_docs / (batch_size * gradient_accumulation_steps))
    warmup_iters = int(warmup_frac * iterations)

    # models; a .gguf is converted once, by rank 0, while the others wait
    if ddp and not master_process:
        dist.barrier()
    teacher_model = load_model(teacher, trust_remote_code) if use_teacher else None

    def probes():  # student_layers='auto:N' keeps the blocks that turn the hidden states most, on 32 training windows
        sample = train_windows[np.linspace(0, n_train_docs - 1, min(32, n_train_docs)).astype(int)]
        batches = (make_batch(train_data, sample[a:a + batch_size], block_size, meta['pad_id'], torch_device)
                   for a in range(0, len(sample), batch_size))
        teacher_model.to(torch_device)
        return [(b.X, b.M) for b in batches]
    with ctx:
        student_model, student_tok, layers, scores = build_student(student, student_init, student_layers, teacher_model,
                                                                   teacher, probes, trust_remote_code)
    if master_process and scores:
        print(f"student_layers='{student_layers}': block influence (1 - cos(in, out), {min(32, n_train_docs)} training "
              "windows): " + ', '.join(f'{l} {v:.4f}' for l, v in enumerate(scores)) + f'; keeping {layers}')
    teacher_tok = model_tokenizer(teacher) if use_teacher else None
    if ddp and master_process:
        dist.barrier()
    if (w_kd == 0 or teacher_cache is not None) and w_hidden == 0:
        teacher_model = None  # 'teacher_layers' needed it only to build the student
    # the data's tokenizer(s) are the models' (compared by fingerprint), and the models have enough output rows
    notes = check_vocabularies(meta, data_dir, student_model, student_tok, teacher_model, teacher_tok)
    if master_process and notes:
        print('\n'.join(notes))
    if on_policy:  # where a sampled reply stops: an end of turn, one of the tokenizer's special tokens
        try:
            specials = special_ids(student_tok or teacher_tok or load_tokenizer(meta['tokenizer']))
        except DataError as e:
            raise ConfigError(f"on_policy: neither model ships a tokenizer, and the data's ({e}) is needed for its "
                              'special tokens (where a reply stops): add the tokenizer files to the student folder')
        stops = stop_tokens(train_data, prompts, meta['eos_id'], specials, data_dir)
    cross = None  # logits across tokenizers: each teacher token's mass goes to a student token (models.vocab_map)
    if cross_tokenizer and w_kd > 0:
        compared, cols, counts = vocab_columns(student_tok or load_tokenizer(meta['tokenizer']),
                                               teacher_tok or load_tokenizer(meta['teacher_tokenizer']), vocab,
                                               output_rows(teacher_model))
        cross = (torch.from_numpy(compared).to(torch_device), torch.from_numpy(cols).to(torch_device))
        if master_process:
            train = meta['splits']['train']  # (counted by prepare_data.py)
            aligned, alone = train['aligned_supervised_fraction'], round(
                (1 - train['aligned_supervised_fraction']) * train['supervised_tokens'])
            print(f'across tokenizers: the divergence at the {aligned:.1%} of supervised training targets where both '
                  f'tokenizations end on one byte boundary, CE alone at the other {1 - aligned:.1%} ({alone:,}); the '
                  f"teacher's tokens go to the student's {counts['same']:,} of the same bytes, {counts['prefix']:,} to "
                  f"the longest student token they begin with, {counts['none']:,} nowhere; {len(compared):,} of the "
                  f"student's {vocab:,} tokens are compared")
    if teacher_model is not None:  # frozen, never wrapped, in the compute dtype (fp32 under fp16: it could overflow)
        teacher_model.to(torch_device).eval().requires_grad_(False)
        cast_parameters(teacher_model, torch.float32 if compute_dtype == 'float16' else ptdtype)

    student_model.to(torch_device)  # (the probes below run both models on the device)

    # the loss: the chunked path computes logits = final hidden states @ head, so only where a probe shows that is so
    heads = [m for m in (student_model, teacher_model if w_kd else None) if m is not None]
    probe = torch.arange(1, 17, device=torch_device)[None]
    chunk = auto_chunk(output_rows(student_model), compute_dtype) if loss_chunk == 'auto' else loss_chunk
    if chunk and not all(plain_head(m, probe) for m in heads):
        chunk = 0
        if master_process:
            print("note: a model's logits are not its final hidden states times its head (a bias, a logit scale or "
                  'multiplier, soft-capping): using the plain loss path (loss_chunk=0)')
    # packed rows need a model whose attention keeps each window to itself given restarting position ids: probed too
    packing = pack and all(packs(m, probe) for m in (student_model, teacher_model) if m is not None)
    if pack and not packing and master_process:
        print("note: a model's attention does not keep packed windows apart (position ids restarting per window): "
              'rows are not packed (pack=False)')
    # the chunk loop reallocates the same few (chunk, V) blocks: on a CPU they are kept within a step, trimmed between
    trim = keep_freed_memory() if chunk and device_type == 'cpu' else lambda: None  # (the plain path would fragment)
    layer_pairs = [] if w_hidden == 0 else make_layer_pairs(
        layer_map, student_model.config.num_hidden_layers, teacher_model.config.num_hidden_layers,
        layers if student_init == 'teacher_layers' else None)
    model = Trainable(student_model, vocab, (w_ce, w_kd, w_hidden), kd_kind, temperature, beta, chunk, layer_pairs,
                      teacher_model.config.hidden_size if layer_pairs else 0, hidden_loss, hidden_rms_norm, proj_init,
                      cross)
    raw_model = model = model.to(torch_device).train()  # from_pretrained returns models in eval mode

    # across processes: FSDP2 shards before the optimizer is made (it must hold the shards), DDP wraps after the
    # resume (the checkpoint holds raw_model's names); the teacher is never wrapped, only sharded under fsdp
    fsdp = ddp and parallel == 'fsdp'  # (one process has nothing to shard)
    if master_process and w_hidden == 0 and layer_map != 'uniform':  # (a setting that changes nothing is said)
        print(f'note: layer_map={layer_map!r} is unused: this loss has no hidden-state term')
    if master_process and parallel == 'fsdp' and not ddp:
        print("note: parallel='fsdp' is unused: one process has nothing to shard")
    # from drawn tokens a cache estimates forward KL's gradient well, the other kinds' poorly or not at all
    # (docs/performance.md); a cache of the whole vocabulary (k = V) draws nothing and is exact
    if master_process and teacher_cache is not None and cache['samples'] and kd_kind != 'fkl':
        print(f"note: from a teacher cache, {kd_kind}'s gradient is mostly the draws' noise (its cosine with the "
              'online gradient measured 0.47 for skl, about 0 for rkl, jsd, srkl and tvd, 0.88 for fkl): use '
              "kd_kind='fkl', or the teacher online")
    memory = memory_estimate(raw_model, teacher_model, batch_size * block_size, compute_dtype, world_size, fsdp)
    if fsdp:
        if compute_dtype == 'float16':
            raise ConfigError("parallel='fsdp' trains in float32 or bfloat16: set dtype='bfloat16' (float16 needs a "
                              'loss scaler per shard)')
        for t in [*model.parameters(), *model.buffers()]:  # every rank shards the same weights: rank 0's, as DDP does
            dist.broadcast(t.data, 0)
        shard(model, teacher_model)
    optimizer = configure_optimizer(model, learning_rate, weight_decay, (beta1, beta2))

    # resume: weights, AdamW's moments, every rank's RNG state; the data position follows from iter_num
    iter_num, last_saved, ckpt_dir = 0, None, os.path.join(out_dir, 'ckpt')
    history, val_history = [], []  # the training losses, the validation CEs
    if init_from == 'resume':  # (refused for another run or another data stream)
        path, iter_num, problems = find_checkpoint(ckpt_dir)
        resolved = {**config, 'max_iters': iterations, 'loss_chunk': chunk, 'dtype': compute_dtype,
                    'data_fingerprint': data_fingerprint}
        state = load_checkpoint(path, raw_model, optimizer, scaler, resolved, world_size, fsdp)
        set_rng_state(state['rng_states'][rank])
        for group, decay in zip(optimizer.param_groups, (weight_decay, 0.0)):  # (the saved groups' settings came back
            group.update(weight_decay=decay, betas=(beta1, beta2))  # with them: a changed one is said, so applied)
        same_windows = all(state['config'].get(k) == config[k] for k in ('eval_docs', 'block_size'))
        last_saved, history = iter_num, state['loss_history']
        val_history = state.get('val_history', []) if same_windows else []  # (other windows: not comparable)
        if master_process:
            for problem in problems:  # e.g. a truncated file, or the leftovers of a killed save
                print(f'note: {problem}; resuming from {path} (iteration {iter_num})')
            if state['changed']:
                print(f"note: resuming with settings changed since the checkpoint: {', '.join(state['changed'])}")
            trim_log(os.path.join(out_dir, 'log.jsonl'), iter_num)
    elif master_process and set_aside(out_dir):  # (a resume must not take the earlier run's for this run's)
        print(f"note: init_from='scratch': the earlier run's checkpoint and log are in {out_dir}/earlier until this "
              'run writes its first checkpoint')
    if compile:  # the transformer stacks, in place (parameter names unchanged); not the loss's chunks, whose weights
        for m in (student_model, teacher_model):  # and number of positions change every batch (each a recompile)
            if m is not None:
                m.base_model.compile()
    if ddp and not fsdp:
        # an MoE student whose experts are separate modules (remote code): an expert that gets no token in a step has no
        # gradient, and DDP must look for such parameters (transformers' own MoE models batch their experts in one)
        per_expert = any(re.search(r'\.experts\.\d+\.', name) for name, _ in student_model.named_parameters())
        model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None,
                    find_unused_parameters=per_expert)

    def all_reduce(*values):
        t = torch.tensor(values, dtype=torch.float64, device=torch_device)
        if ddp:
            dist.all_reduce(t)
        return t.tolist()

    def batch(split, windows):
        return make_batch(split, windows, block_size, meta['pad_id'], torch_device, meta.get('teacher_eos_id', 0))

    def packed(b):  # (after sampling, which writes into the rows of the windows)
        return pack_rows(b, block_size, meta['pad_id'], meta.get('teacher_eos_id', 0)) if packing else b

    def release_teacher():  # fsdp: free the teacher's gathered embeddings (a tied head's) once the loss read them
        if fsdp and teacher_model is not None:
            teacher_model.get_input_embeddings().reshard()

    @torch.no_grad()
    def evaluate():  # (through raw_model: DDP's forward would wait for ranks that have no documents to evaluate)
        model.eval()
        sums = [0.0] * 5  # ce, kd, hidden, supervised targets, aligned positions
        docs = val_windows[rank::world_size]
        for k in range(0, len(val_windows[::world_size]) if fsdp else len(docs), batch_size):  # (fsdp: all gather:
            b = packed(batch(val_data, docs[k:k + batch_size] if k < len(docs) else val_windows[:1]))  # a spare batch)
            with ctx:
                out = raw_model(b, raw_model.teacher_forward(teacher_model, b))
            release_teacher()
            if k < len(docs):
                counts = (out.ce.item(), out.kd.item(), out.hidden.item(), b.M.sum().item(), len(b.align.b))
                sums = [a + v for a, v in zip(sums, counts)]
            trim()
        model.train()
        if fsdp:  # (with no backward to follow, the root's forward left its parameters gathered)
            model.reshard()
        ce, kd, hidden, n, n_hidden = all_reduce(*sums)
        return ce / max(n, 1), kd / max(n, 1), hidden / max(n_hidden, 1)

    chance = math.log(output_rows(student_model))  # the CE of uniform outputs over the head's rows

    def last_good():
        if last_saved:
            return f'the last checkpoint ({ckpt_dir}, iteration {last_saved}) is intact'
        return 'no checkpoint was written'

    def save(iter_num, states, losses):
        """A checkpoint of the weights of iteration iter_num, with every rank's RNG states and the training losses as
        they were before its step, unless something in it is not finite (then stop, keeping the last good one)."""
        local = lambda p: p.to_local() if hasattr(p, 'to_local') else p  # (fsdp: its shard)
        if all_reduce(float(not all(torch.isfinite(local(p)).all() for p in raw_model.parameters())))[0]:
            raise ConfigError(f'non-finite weights at iteration {iter_num}: not checkpointed; {last_good()}')
        weights, optimizer_state = full_state(model, optimizer) if fsdp else (raw_model, optimizer.state_dict())
        if master_process:
            save_checkpoint(ckpt_dir, weights, optimizer_state, scaler, iter_num,
                            iter_num * batch_size * gradient_accumulation_steps, states, run_config, losses,
                            val_history[-100:])

    flops_peak = peak_flops or dtype_rate or measure_matmul_flops(torch_device, ptdtype)  # the MFU denominator
    run_config = {**config, 'max_iters': iterations, 'loss_chunk': chunk, 'peak_flops': flops_peak,
                  'dtype': compute_dtype, 'data_fingerprint': data_fingerprint}  # what the run resolved: kept
    if master_process:
        os.makedirs(out_dir, exist_ok=True)
        n_params = lambda m: f'{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M parameters'
        source = n_params(teacher_model) if teacher_model is not None else 'none' if teacher_cache is None else \
            f"its cache {cache_dir}: top-{cache['k']} + {cache['samples']} drawn ({cache['teacher']})"
        print(f'student: {n_params(student_model)}; teacher: {source}')
        print(f'dtype: {compute_dtype} ({why}); MFU against its matmul rate, {flops_peak / 1e9:,.0f} GFLOP/s'
              + (' (peak_flops)' if peak_flops else ' measured at start'))
        print(f'loss = {w_ce:g} CE' + (f' + {w_kd:g} T^2 {kd_kind} (T={temperature:g})' if w_kd else '')
              + (f' + {w_hidden:g} hidden {hidden_loss}' if w_hidden else '')
              + (' (RMS-normalised)' if w_hidden and hidden_rms_norm else '')
              + (' [across tokenizers]' if cross_tokenizer else '')
              + (f'; {chunk} positions a chunk' if chunk else '; from the full logits'))
        print(memory_line(memory))
        if on_policy:
            print(f'on-policy: the student writes {on_policy:g} of the rows (up to {max_new_tokens} tokens at T='
                  f'{sample_temperature:g}, top_p {top_p:g}, stopping at token ids {stops}); no CE on its tokens; '
                  f"{with_prompt:.0%} of the training documents have a prompt (the others' rows stay the data's)")
        if layer_pairs:
            print('layer map (student <- teacher, 0 = embedding output, l = block l): '
                  + ', '.join(f'{a}<-{b}' for a, b in layer_pairs) + f'; projections '
                  f'{student_model.config.hidden_size} -> {teacher_model.config.hidden_size} ({proj_init})')
        print(f"{len(train_data['idx']) - 1:,} training documents in {n_train_docs:,} windows of <= {block_size} "
              f'targets; {iterations} iterations of {batch_size} x {gradient_accumulation_steps} windows '
              f'({world_size} rank(s))')
        if n_val_docs == 0:
            print(f'note: no validation documents ({data_dir} has none, or eval_docs=0): no evaluation; checkpoints '
                  f'every {eval_interval} iterations all the same')
        if wandb_log:
            import wandb
            wandb.init(project=wandb_project, name=wandb_run_name, config=run_config)
        log_file = open(os.path.join(out_dir, 'log.jsonl'), 'a' if init_from == 'resume' else 'w')  # new run, new log

    def log(record, text):
        if master_process:
            print(text)
            log_file.write(json.dumps(record) + '\n')
            log_file.flush()
            if wandb_log:
                wandb.log(record)

    # the loop: evaluate, then one optimizer step of gradient_accumulation_steps micro-batches; a checkpoint of the
    # weights evaluated is written once the step's loss and gradient on them passed the guards, before it is applied
    # (at the last iteration, after the evaluation): weights that diverged, or killed the student, are never saved
    last_iter = iterations if stop_iter is None else min(stop_iter, iterations)
    while True:  # (the checkpoint a run resumed from was evaluated and written already)
        pending = None  # (every rank's RNG states and the losses so far, as the checkpoint will hold them)
        if (iter_num % eval_interval == 0 or iter_num == last_iter) and iter_num != last_saved:
            if n_val_docs:
                val_ce, val_kd, val_hidden = evaluate()
                log({'iter': iter_num, 'val_ce': val_ce, 'val_kd': val_kd, 'val_hidden': val_hidden},
                    f'iter {iter_num}: val ce {val_ce:.4f}, val kd {val_kd:.4f}, val hidden {val_hidden:.4f}')
                if not all(map(math.isfinite, (val_ce, val_kd, val_hidden))):
                    raise ConfigError(f'non-finite validation loss at iteration {iter_num} (ce {val_ce}, kd {val_kd}, '
                                      f'hidden {val_hidden}): not checkpointed; {last_good()}; lower learning_rate or '
                                      'check the data')
                # the weights about to be saved, judged by their own validation CE (the training loss sees them one
                # step late; the validation windows are the same each time): diverged above twice the run's best + 1,
                # dead at ln V (uniform outputs) once the run was below it; either way the last good checkpoint stays
                best = min(val_history, default=math.inf)
                dead = abs(val_ce - chance) < 1e-3 and best < chance - 0.5
                if val_ce > 2 * best + 1 or dead:
                    raise ConfigError(f'val ce {val_ce:.4f} at iteration {iter_num}: the student ' + (
                        f'outputs uniform distributions (ln V = {chance:.4f}), dead' if dead else
                        f"diverged (above twice the run's best val ce, {best:.4f}, + 1)")
                        + f'; not checkpointed; {last_good()}; lower learning_rate')
                val_history.append(val_ce)
            pending = (rng_states(world_size), history[-100:]) if iter_num > 0 and checkpoint else None
        if iter_num >= last_iter:
            if pending:
                save(iter_num, *pending)
            break
        lr = get_lr(iter_num, iterations, warmup_iters, learning_rate, min_lr)
        for group in optimizer.param_groups:
            group['lr'] = lr
        t0 = time.time()
        step_ids = step_doc_ids(iter_num, batch_size, gradient_accumulation_steps, rank, world_size, n_train_docs, seed)
        micro_batches = [batch(train_data, train_windows[ids]) for ids in step_ids]
        generated, t_sample = 0, time.time()
        if on_policy:  # the student writes its share of the rows' replies (sampling.py), seeded by the micro-batch's
            for k, ids in enumerate(step_ids):  # number in the step, j, over every rank: any split draws the same
                j = rank + k * world_size
                rows = on_policy_rows((iter_num * gradient_accumulation_steps + j) * batch_size, len(ids), on_policy)
                with ctx:
                    micro_batches[k], n = sample_rows(raw_model.model, micro_batches[k], train_data,
                                                      train_windows[ids][:, 0], rows, prompts, block_size,
                                                      (max_new_tokens, sample_temperature, top_p, stops),
                                                      row_seed(seed, iter_num, j), meta['pad_id'], vocab)
                generated += n
        student_rows = sum(((b.Y < 0) & b.M.bool()).any(1).sum().item() for b in micro_batches)  # (before packing)
        micro_batches = [packed(b) for b in micro_batches]
        t_sample, t_teacher = time.time() - t_sample, 0.0
        # the step's counts over every micro-batch and rank divide its sums: the loss does not depend on the split
        n_targets, n_hidden, n_labeled, step_tokens, generated, student_rows = all_reduce(
            sum(b.M.sum().item() for b in micro_batches), sum(len(b.align.b) for b in micro_batches),
            sum((b.Y[b.M.bool()] >= 0).sum().item() for b in micro_batches), sum(b.X.numel() for b in micro_batches),
            generated, student_rows)
        mix = mixing_weights(batch_size * gradient_accumulation_steps, student_rows, n_targets, n_targets - n_labeled)
        sums = torch.zeros(4, dtype=torch.float64, device=torch_device)  # loss, ce, kd, hidden
        for micro_step, b in enumerate(micro_batches):
            if fsdp:  # gradients are reduced over ranks once per step, after its last micro-batch
                model.set_requires_gradient_sync(micro_step == len(micro_batches) - 1)
            elif ddp:
                model.require_backward_grad_sync = micro_step == len(micro_batches) - 1
            with ctx:
                t = time.time()
                teacher_out = raw_model.teacher_forward(teacher_model, b)
                t_teacher += time.time() - t
                out = model(b, teacher_out, max(n_targets, 1), max(n_hidden, 1), max(n_labeled, 1), mix)
            release_teacher()
            scaler.scale(out.loss * world_size).backward()  # DDP averages gradients over ranks; the sum is wanted
            sums += torch.stack([out.loss.detach(), out.ce, out.kd, out.hidden]).double()
        loss_value, ce_mean, kd_mean, hidden_mean = all_reduce(*sums.tolist())
        ce_mean, kd_mean = ce_mean / max(n_labeled, 1), kd_mean / max(n_targets, 1)
        hidden_mean = hidden_mean / max(n_hidden, 1)
        if not math.isfinite(loss_value):
            raise ConfigError(f'non-finite loss at iteration {iter_num} (ce {ce_mean}, kd {kd_mean}, hidden '
                              f'{hidden_mean}): {last_good()}; lower learning_rate, check the data, or use bfloat16 '
                              'instead of float16')
        # diverging: a loss above 10x the median of the run's last 100 plus 1 (its own history, kept in checkpoints)
        # stops the run before the step is applied, so that no checkpoint is written over the last good one
        typical = statistics.median(history[-100:]) if len(history) >= 3 else math.inf
        if loss_value > 10 * typical + 1:
            raise ConfigError(f'loss {loss_value:.4g} at iteration {iter_num} is above 10x the median of the last '
                              f'{len(history[-100:])} losses ({typical:.4g}) + 1: the run is diverging; the step was '
                              f'not applied; {last_good()}; lower learning_rate')
        history.append(loss_value)
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float('inf'))
        grad_norm = gathered(grad_norm).item()
        if not math.isfinite(grad_norm) and not scaler.is_enabled():  # (float16's GradScaler skips such a step itself)
            raise ConfigError(f'non-finite gradient norm at iteration {iter_num}: the step was not applied; '
                              f'{last_good()}; lower learning_rate or check the data')
        if grad_norm == 0 and n_labeled and abs(ce_mean - chance) < 1e-3:  # (no gradient at chance: nothing to learn)
            raise ConfigError(f'the student is dead at iteration {iter_num}: its gradient is 0 and its ce '
                              f'{ce_mean:.4f} is ln V (uniform outputs); {last_good()}; lower learning_rate')
        if pending:  # (the step's loss and gradient passed)
            save(iter_num, *pending)
            last_saved = iter_num
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        trim()
        if device_type == 'cuda':
            torch.cuda.synchronize()
        dt = time.time() - t0
        if iter_num % log_interval == 0:
            seq = step_tokens / (batch_size * gradient_accumulation_steps)
            flops = flops_per_token(student_model, seq, True)
            flops += flops_per_token(teacher_model, seq, False) if teacher_model is not None else 0
            tok_s = step_tokens / dt
            if flops * tok_s > flops_peak * world_size and not peak_flops:  # the rate at start read low (a loaded
                flops_peak = max(measure_matmul_flops(torch_device, ptdtype), flops * tok_s / world_size)  # machine)
            mfu = flops * tok_s / (flops_peak * world_size)
            peak = torch.cuda.max_memory_allocated() if device_type == 'cuda' else None  # (beside the estimate)
            split = {'sample_ms': t_sample * 1000, 'teacher_ms': t_teacher * 1000, 'generated': int(generated),
                     'generated_per_s': generated / max(t_sample, 1e-9), 'student_rows': int(student_rows),
                     'student_targets': int(n_targets - n_labeled), 'targets': int(n_targets),
                     } if on_policy else {}  # where the time went, and what the student wrote
            log({'iter': iter_num, 'loss': loss_value, 'ce': ce_mean, 'kd': kd_mean, 'hidden': hidden_mean, 'lr': lr,
                 'grad_norm': grad_norm, 'ms': dt * 1000, 'tokens_per_s': tok_s, 'mfu': mfu, 'peak_memory': peak,
                 **split},
                f'iter {iter_num}: loss {loss_value:.4f}, ce {ce_mean:.4f}, kd {kd_mean:.4f}, '
                f'hidden {hidden_mean:.4f}, lr {lr:.2e}, grad norm {grad_norm:.3f}, {dt * 1000:.0f} ms, '
                f'{tok_s:,.0f} tok/s, mfu {mfu * 100:.1f}%'
                + (f', peak memory {gb(peak)}' if peak else '')
                + (f" (sampling {t_sample * 1000:.0f} ms: {generated:.0f} tokens, {split['generated_per_s']:,.0f}/s; "
                   f'teacher {t_teacher * 1000:.0f} ms; student {(dt - t_sample - t_teacher) * 1000:.0f} ms)'
                   if on_policy else ''))
        iter_num += 1

    # export: the student alone, as an HF folder with its tokenizer (projections are training machinery)
    weights = None  # (fsdp: gathered whole, on rank 0)
    if fsdp and export:
        weights = {k[len('model.'):]: v for k, v in full_state(model)[0].items() if k.startswith('model.')}
    if master_process and export:
        folder = os.path.join(out_dir, 'student')
        student_model.save_pretrained(folder, state_dict=weights)
        export_tok = student_tok or model_tokenizer(meta['tokenizer'])
        if export_tok is not None and hasattr(export_tok, 'save_pretrained'):
            export_tok.save_pretrained(folder)
        print(f'exported the student to {folder}')
    if ddp:  # tear down together, after rank 0's export, once nothing holds the process group (DDP's reducer, FSDP's
        del model, raw_model, student_model, teacher_model, optimizer  # sharded tensors): gloo's threads, left to the
        gc.collect()  # interpreter's exit, aborted a rank in CI twice ('terminate called without an active exception')
        dist.barrier()
        dist.destroy_process_group()
