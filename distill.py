"""
Knowledge distillation of language models: the settings, the losses and the run, in one file.

    python distill.py configs/tiny.py                                  # one process (CPU or one GPU)
    python distill.py configs/hermes.py --learning_rate=1e-5           # a config file, then overrides
    torchrun --standalone --nproc_per_node=8 distill.py configs/hermes.py
    python distill.py --help                                           # every key, its default and comment

The loss (Trainable.forward, the one place it is assembled):
    loss = w_ce * CE + w_kd * T^2 * D(p_teacher || q_student) + w_hidden * H
- CE: cross-entropy on the data's supervised targets (the hard labels).
- D: a divergence (DIVERGENCES) between the teacher's and the student's next-token distributions at temperature T.
- H: the distance between student hidden states, through trained projections, and the teacher's at mapped layers
  (LayerMap); across architectures and, with prepare_data.py --teacher_tokenizer, across tokenizers.
distill='logits' sets (w_ce, w_kd, w_hidden) = (1 - alpha, alpha, 0), 'hidden' (1 - alpha, 0, alpha), 'none'
(1, 0, 0): the SFT baseline, the same routine with no teacher; ce_weight, kd_weight, hidden_weight override them.

Data comes from prepare_data.py: mask[i] == 1 iff token i is a supervised target. A document d is read as
X = d[:-1] and scored on Y = d[1:] where M = mask[1:]. CE and D are sums over supervised targets divided by N, the
supervised targets of the whole optimizer step (all micro-batches, all ranks); H likewise over its aligned
positions; so the result does not depend on how a step is split.

Read top to bottom: the settings, the divergences, the loss on full logits, the layer map, Trainable (the loss in one
place), then the run. Beneath, in kd/, each capability reaches the run through one hook: a teacher is called on a
batch (teacher.py: in-process or sharded; cache.py: its cached top-k; cross.py: across tokenizers), the rows come
from the data (data.py) rewritten by on-policy sampling (sampling.py) and packed; chunked.py computes CE and D a chunk
of positions at a time (loss_chunk), without either model's full logits; lora.py gives the student trained low-rank
adapters, the rest frozen (lora_rank).
"""
import gc, json, math, os, re, sys, time
from contextlib import nullcontext
from functools import partial
from typing import NamedTuple
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from kd.cache import CachedTeacher, check_weights
from kd.checkpoint import content_hash, rng_states, resume, save_checkpoint, set_aside
from kd.chunked import ChunkedHeadLoss, HeadLoss, choose_chunk
from kd.configurator import ConfigError, check_config, exit_on_error, parse_config, print_help
from kd.cross import across_tokenizers, check_cross, with_context
from kd.data import TopK, block_windows, check_dataset, load_split, make_batch, pack_rows, step_doc_ids
from kd.machine import (choose_dtype, flops_per_token, full_state, gathered, gb, init_distributed, keep_freed_memory,
                        measure_matmul_flops, memory_estimate, memory_line, shard)
from kd.guards import Guards
from kd.lora import add_lora, base_fingerprint, check_lora, export_lora, trained_state
from kd.models import (build_student, check_vocabularies, export_student, load_model, load_tokenizer, model_tokenizer,
                       output_rows, packs)
from kd.sampling import OnPolicy, check_on_policy
from kd.served import ServedTeacher, check_pg, check_served, is_served, routed_urls
from kd.teacher import NoTeacher, ShardedTeacher, Teacher, frozen

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
teacher = None  # HF hub id, local folder, .gguf file, a server 'http://HOST:PORT/v1' (kd/served.py), {route: URL}
teacher_topk = None  # the loss reads the teacher's k most likely tokens, the rest as one bucket; None: all (served: 20)
teacher_requests = 8  # a served teacher: requests in flight at once, each with several windows
teacher_timeout = 300.0  # a served teacher: seconds a request may take before it is tried again
teacher_retries = 5  # a served teacher: tries again after 1, 2, 4, ... s, then the run stops (resumable)
teacher_cache = None  # for logit KD: the teacher's top-k by cache_teacher.py (a folder, or its name in the dataset)
student = None  # HF hub id, local folder or .gguf file (for 'teacher_layers': unused)
student_init = 'pretrained'  # 'pretrained' (its weights), 'config' (random init) or 'teacher_layers'
student_layers = None  # teacher blocks kept by student_init='teacher_layers', e.g. [0, 3, 6], or 'auto:N' (influence)
trust_remote_code = False  # let transformers run model code shipped with a checkpoint
lora_rank = 0  # > 0: the student trains low-rank adapters of this rank on lora_targets, the rest frozen (kd/lora.py)
lora_alpha = 32.0  # the adapters' update is (lora_alpha / lora_rank) B A
lora_dropout = 0.0  # dropout on the adapters' input
lora_targets = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']  # linear layers, by name
# distillation
distill = 'logits'  # 'logits', 'hidden' or 'none' (the SFT baseline: no teacher)
alpha = 0.5  # 'logits': loss = (1 - alpha) CE + alpha T^2 D; 'hidden': (1 - alpha) CE + alpha H
ce_weight = None  # explicit weights of loss = ce_weight CE + kd_weight T^2 D + hidden_weight H override
kd_weight = None  # ... the ones distill and alpha imply; a zero weight skips its term's work
hidden_weight = None  # ... (e.g. ce_weight=0.5, kd_weight=0.5, hidden_weight=1.0 mixes all three)
kd_kind = 'fkl'  # divergence: 'fkl', 'rkl', 'jsd', 'skl', 'srkl', 'tvd'; 'pg': rkl's policy gradient (kd/served.py)
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
OPTIONAL_TYPES = {'teacher': (str, dict), 'teacher_cache': str, 'student': str, 'student_layers': (list, str),
                  'stop_iter': int, 'max_iters': int, 'ce_weight': float, 'kd_weight': float, 'hidden_weight': float,
                  'wandb_run_name': str, 'loss_chunk': (int, str),
                  'teacher_topk': int}  # (the settings whose default is None or 'auto')
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
# loss paths (autograd), the teacher cache and the kd_kind setting take it from here (a new knob: one more field of
# Divergence). (The chunked loss has a closed-form gradient for forward_kl, taken only while the 'fkl' entry is that
# function: an edited entry is what trains.)
DIVERGENCES = {
    'fkl': forward_kl,
    'rkl': lambda log_p, log_q, beta: _kl(log_q, log_p),  # reverse KL(q || p): mode-seeking
    'jsd': _jsd,  # generalised Jensen-Shannon
    'skl': lambda log_p, log_q, beta: _kl(log_p, _log_mix(log_p, log_q, beta)),  # skew KL(p || beta p + (1 - beta) q)
    'srkl': lambda log_p, log_q, beta: _kl(log_q, _log_mix(log_q, log_p, beta)),  # skew reverse (DistiLLM: beta 0.1)
    'tvd': lambda log_p, log_q, beta: 0.5 * (log_p.exp() - log_q.exp()).abs(),  # total variation distance
}
KD_KINDS = tuple(DIVERGENCES)  # (and 'pg': from the teacher's log-probability of each sampled token alone)

def kd_divergence(student_logits, teacher_logits, kind='fkl', temperature=1.0, beta=0.5):
    """Per-position divergence (DIVERGENCES[kind]) between p = softmax(teacher / T) and q = softmax(student / T).
    A TopK teacher (kd/data.py): the exact terms of its k tokens, then either the weighted terms of tokens drawn from
    the rest (a cache), whose expectation over the draws is the sum over the rest (an unbiased estimate, exact at k =
    V), or, with no draws (a served teacher), the rest as one token of mass 1 - sum over the k on both sides: a lower
    bound of D whose forward-KL gradient is exact on the k tokens (docs/served.md). kind='pg': a teacher that gave
    only the log-probability of the token x the student sampled from q (a TopK of width 1, x itself): the value is
    log q(x) - log p(x), whose mean over x ~ q is reverse KL, and the gradient (log q(x) - log p(x)) d log q(x), whose
    mean is reverse KL's gradient (the score function: E_q[d log q] = 0)."""
    if kind not in KD_KINDS and kind != 'pg':
        raise ValueError(f"kd_kind must be one of {(*KD_KINDS, 'pg')}, got '{kind}'")
    fp = torch.float64 if student_logits.dtype == torch.float64 else torch.float32  # never below fp32
    tiny = torch.finfo(fp).min  # -inf logits (masked tokens) must not turn 0 * inf into NaN
    log_q = F.log_softmax(student_logits.to(fp) / temperature, dim=-1).clamp(min=tiny)
    if not isinstance(teacher_logits, TopK):
        if kind == 'pg':
            raise ValueError("kd_kind='pg' reads the teacher's log-probability of the sampled token alone (a TopK of "
                             "width 1); with its whole distribution, 'rkl' is exact")
        log_p = F.log_softmax(teacher_logits.to(fp) / temperature, dim=-1).clamp(min=tiny)
        return DIVERGENCES[kind](log_p, log_q, beta).sum(-1)
    t = teacher_logits
    if kind == 'pg':
        log_q_x = log_q.gather(-1, t.ids[..., :1].long()).squeeze(-1)
        advantage = (log_q_x - t.logp[..., 0].to(fp)).detach()
        return advantage + advantage * (log_q_x - log_q_x.detach())
    k = t.ids.shape[-1] - t.logw.shape[-1]
    zt = t.logp.to(fp) / temperature  # log p^(1/T): normalised by the k tokens' sum and the tail's
    norm = torch.logaddexp(zt[..., :k].logsumexp(-1), t.tail.to(fp))
    log_p = zt - norm[..., None]
    weight = torch.cat([torch.ones_like(zt[..., :k]), t.logw.to(fp).exp()], -1)
    d = (weight * DIVERGENCES[kind](log_p, log_q.gather(-1, t.ids.long()), beta)).sum(-1)
    if t.logw.shape[-1] == 0 and k < log_q.shape[-1]:  # the rest as one bucket
        log_rest = log_q.scatter(-1, t.ids.long(), -math.inf).logsumexp(-1, keepdim=True).clamp(min=tiny)
        d = d + DIVERGENCES[kind]((t.tail.to(fp) - norm).clamp(min=tiny)[..., None], log_rest, beta)[..., 0]
    return d


class Divergence(NamedTuple):
    """D chosen once with its settings, then passed down as a function: divergence(student_logits, teacher) is
    kd_divergence's per-position terms."""
    kind: str = 'fkl'
    temperature: float = 1.0
    beta: float = 0.5

    def __call__(self, student_logits, teacher_logits):
        return kd_divergence(student_logits, teacher_logits, self.kind, self.temperature, self.beta)

    def closed_form(self):  # (asked at each call: an edited DIVERGENCES entry is what trains)
        return DIVERGENCES.get(self.kind) is forward_kl

# -----------------------------------------------------------------------------
# the loss on full logits

def loss_sums(z, y, zt, divergence, compared, weight=None):
    """Sums over the rows (supervised positions) of logits z (n, V) of the CE against targets y (-100: none, a token
    the student wrote) and of the divergence from the teacher's distribution zt (logits over the compared tokens, or a
    cached TopK; None: CE alone) at the first len(zt) rows, over the student's compared tokens: compared is its real
    vocabulary (a slice: the rows of a head past it are padding, never compared), or across tokenizers the ids the
    teacher's tokens are carried onto (a tensor). weight: each row's weight in the divergence's sum (None: 1;
    on-policy's mixture). The plain path calls it on all rows, the chunked one (kd/chunked.py) per chunk."""
    ce = F.cross_entropy(z if z.dtype == torch.float64 else z.float(), y, reduction='sum')  # (fp32 at least)
    if zt is None:
        return ce, torch.zeros_like(ce)
    d = divergence(z[:len(zt), compared], zt)
    return ce, (d if weight is None else d * weight[:len(d)].to(d.dtype)).sum()

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

class LayerMap(nn.ModuleList):
    """Hidden-state distillation's layer map: its (student, teacher) pairs (make_layer_pairs) and a trained projection
    per pair, student width -> teacher width (the module list itself). Called on both models' hidden states and the
    aligned positions, it gives H: the distance summed over the positions, averaged over the pairs, in fp32."""
    def __init__(self, pairs=(), student_width=0, teacher_width=0, loss='mse', rms_norm=False, init='xavier'):
        super().__init__(nn.Linear(student_width, teacher_width, bias=False) for _ in pairs)
        self.pairs, self.loss, self.rms_norm, self.init = list(pairs), loss, rms_norm, init
        for p in self:
            if init == 'identity':
                nn.init.eye_(p.weight)
            elif init == 'xavier':
                nn.init.xavier_uniform_(p.weight)
            else:
                raise ConfigError(f"proj_init must be 'xavier' or 'identity', got '{init}'")

    def teacher_layers(self):
        return [t for _, t in self.pairs]

    def forward(self, student_states, teacher_states, align):
        with torch.autocast(align.b.device.type, enabled=False):  # projections and distances in fp32
            h = sum(hidden_distance(proj(student_states[ls][align.b, align.s].float()), ht[align.b, align.t],
                                    self.loss, self.rms_norm).sum()
                    for (ls, _), proj, ht in zip(self.pairs, self, teacher_states))
        return h / len(self.pairs)

    def describe(self):
        return ('layer map (student <- teacher, 0 = embedding output, l = block l): '
                + ', '.join(f'{a}<-{b}' for a, b in self.pairs)
                + f'; projections {self[0].in_features} -> {self[0].out_features} ({self.init})')

    def saved_bytes(self):
        """Per aligned position, what autograd keeps of the map (machine.memory_estimate): each projection's fp32 input
        and output (and the RMS-normalised one), and the indices."""
        return sum(4 * (p.in_features + p.out_features * (1 + self.rms_norm)) + 24 for p in self)

# -----------------------------------------------------------------------------
# the student with its loss

class Losses(NamedTuple):
    loss: torch.Tensor  # this micro-batch's share of the step's loss, to differentiate
    ce: torch.Tensor  # the sums over its supervised targets (detached)
    kd: torch.Tensor
    hidden: torch.Tensor  # the sum over its aligned positions, averaged over the layer pairs (detached)

class Trainable(nn.Module):
    """The student and its loss. Everything that trains (the student and the layer map's projections) sits in this
    one module, so that DDP, the optimizer and checkpoints see the same parameters; only .model is exported.
    compared: the student's tokens D compares, its first `compared` (an int: its real vocabulary) or, across
    tokenizers, the ids the teacher's tokens are carried onto (kd/cross.py). chunk > 0: CE and D by the chunked loss
    (kd/chunked.py), this many positions at a time; 0: from the full logits."""
    def __init__(self, model, compared, weights=(1.0, 0.0, 0.0), divergence=Divergence(), chunk=0, layer_map=None):
        super().__init__()
        self.model, (self.w_ce, self.w_kd, self.w_hidden) = model, weights
        self.vocab = compared if isinstance(compared, int) else None  # (its first tokens: a slice, a view)
        self.compared = slice(0, compared) if self.vocab else compared
        self.divergence, self.chunk = divergence, chunk
        self.proj = layer_map if layer_map is not None else LayerMap()  # (named proj: its weights' names, proj.0...)

    def coefficients(self, n_targets, n_hidden=1, n_labeled=None):
        """The weights of the sums CE, D and H in the loss: the step's counts of supervised targets, of those with a
        hard label (all but the student's own samples) and of aligned positions divide them, so that the micro-batches'
        losses add up to the step's. T^2 keeps the gradient of D comparable across temperatures (Hinton et al. 2015):
        D's own gradient shrinks like 1/T^2."""
        c_kd = self.w_kd * self.divergence.temperature ** 2 / n_targets
        return self.w_ce / (n_labeled or n_targets), c_kd, self.w_hidden / n_hidden

    def forward(self, batch, teacher, n_targets=1, n_hidden=1, n_labeled=None, mix=None):
        """The loss: c_ce CE + c_kd D + c_hidden H (coefficients), teacher the TeacherOut of this batch. The rows: the
        aligned pairs (b, s) <-> (b, t) first, in the targets' order, where D is taken (with one tokenizer, every
        supervised target and t = s), then the student's other supervised targets, CE alone. CE only where the data
        wrote the target (Batch.sampled: the student did). mix (on-policy): the weights (w_student, w_data) of D's
        terms on the student's own tokens and on the data's, so that the two sources mix by rows (mixing_weights)."""
        X, align, labeled = batch.X, batch.align, batch.labeled()
        zt = None
        if teacher.logits is None:  # (no D: the supervised targets in their order)
            b, s = batch.M.nonzero(as_tuple=True)
        else:
            first = (align.b * X.shape[1] + align.s).argsort()  # (the aligned pairs in M's order: the targets')
            rest = batch.M.bool().index_put((align.b, align.s), torch.zeros_like(align.s, dtype=torch.bool))
            b, s = (torch.cat(x) for x in zip((align.b[first], align.s[first]), rest.nonzero(as_tuple=True)))
            zt = teacher.logits[align.b[first], align.t[first]]
        y = batch.Y[b, s].masked_fill(~labeled[b, s], -100)  # (cross-entropy's ignore index)
        weight = None if mix is None else torch.tensor(mix, dtype=torch.float64, device=X.device)[labeled[b, s].long()]
        c_ce, c_kd, c_hidden = self.coefficients(n_targets, n_hidden, n_labeled)
        sums = partial(loss_sums, divergence=self.divergence, compared=self.compared)
        if self.chunk:
            out = self.model.base_model(input_ids=X, position_ids=batch.pos, use_cache=False,
                                        output_hidden_states=teacher.hidden is not None)
            coef = (c_ce, c_kd) if torch.is_grad_enabled() else None  # (evaluation: values alone)
            closed = (self.divergence.temperature, self.vocab) if self.vocab and self.divergence.closed_form() else None
            ce, kd = ChunkedHeadLoss.apply(out.last_hidden_state[b, s], self.model.get_output_embeddings().weight,
                                           HeadLoss(y, zt, sums, coef, self.chunk, weight, closed))
        else:
            out = self.model(input_ids=X, position_ids=batch.pos, use_cache=False,
                             output_hidden_states=teacher.hidden is not None)
            ce, kd = sums(out.logits[b, s], y, None if zt is None else zt.distribution(), weight=weight)
        hidden = torch.zeros_like(ce) if teacher.hidden is None else self.proj(out.hidden_states, teacher.hidden, align)
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
    check_config(config, {'distill': ('logits', 'hidden', 'none'), 'kd_kind': (*KD_KINDS, 'pg'),
                          'hidden_loss': ('mse', 'cosine'), 'proj_init': ('xavier', 'identity'),
                          'init_from': ('scratch', 'resume'),
                          'dtype': ('auto', 'float32', 'bfloat16', 'float16'), 'parallel': ('ddp', 'fsdp'),
                          'student_init': ('pretrained', 'config', 'teacher_layers')}, torch.cuda.is_available())
    globals().update(config)  # read-only from here: what the run derives gets its own name, and goes in run_config
    implied = {'none': (1.0, 0.0, 0.0), 'logits': (1 - alpha, alpha, 0.0), 'hidden': (1 - alpha, 0.0, alpha)}[distill]
    weights = w_ce, w_kd, w_hidden = tuple(implied[i] if w is None else float(w)
                                           for i, w in enumerate((ce_weight, kd_weight, hidden_weight)))
    if teacher_cache is not None:
        check_weights(weights)
    if on_policy > 0:
        check_on_policy(teacher_cache, w_kd, parallel)
    served = is_served(teacher)  # (a server's URL: the teacher is another process's, kd/served.py)
    use_teacher = ((w_kd > 0 and teacher_cache is None) or w_hidden > 0 or student_init == 'teacher_layers') \
        and not served
    if use_teacher and teacher is None:
        why = " (student_init='teacher_layers' copies its blocks)" if student_init == 'teacher_layers' else ''
        raise ConfigError(f"distill='{distill}' needs a teacher{why}: set teacher (an HF hub id, a local folder or a "
                          ".gguf file), or distill='none' for SFT")

    # processes and precision: torchrun's environment decides (one code path for 1 process and N)
    ddp, rank, local_rank, world_size, torch_device = init_distributed(device)
    master_process = rank == 0  # only it prints and writes
    say = lambda line: print(line) if master_process and line else None  # (a hook with nothing to say: None)
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
    fsdp = ddp and parallel == 'fsdp'  # (one process has nothing to shard)
    check_lora(lora_rank, lora_alpha, lora_dropout, lora_targets, fsdp, student_init)

    # data: token and mask arrays, read in windows of block_size (kd/data.py); a teacher cache rides with each split
    data_dir = os.path.join(data_root, dataset)
    meta = check_dataset(data_dir)
    vocab, cross_tokenizer = meta['vocab_size'], 'teacher_tokenizer' in meta
    if cross_tokenizer:
        check_cross(meta, data_dir, teacher_cache, on_policy)
    check_served(teacher, teacher_topk, weights, kd_kind, temperature, (on_policy, sample_temperature, top_p),
                 student_init, teacher_cache, cross_tokenizer, vocab,
                 (teacher_requests, teacher_timeout, teacher_retries))
    urls = served and routed_urls(teacher, meta, data_dir)  # (several teachers: one per route of the data)
    train_data, val_data = load_split(data_dir, 'train'), load_split(data_dir, 'val')
    data_fingerprint = content_hash([os.path.join(data_dir, f) for f in sorted(meta['files'])])  # (resumes read it)
    cache = teacher_cache and CachedTeacher(teacher_cache, data_dir, {'train': train_data, 'val': val_data},
                                            block_size, temperature, weights)
    train_windows, val_windows = block_windows(train_data, block_size), block_windows(val_data, block_size)[:eval_docs]
    iterations = max_iters if max_iters is not None else \
        math.ceil(epochs * len(train_windows) / (batch_size * gradient_accumulation_steps))
    warmup_iters = int(warmup_frac * iterations)

    # models; a .gguf is converted once, by rank 0, while the others wait
    if ddp and not master_process:
        dist.barrier()
    teacher_model = load_model(teacher, trust_remote_code) if use_teacher else None
    def probes():  # student_layers='auto:N' keeps the blocks that turn the hidden states most, on 32 training windows
        sample = train_windows[torch.linspace(0, len(train_windows) - 1, min(32, len(train_windows))).long()]
        teacher_model.to(torch_device)
        return [(b.X, b.M) for b in (make_batch(train_data, sample[a:a + batch_size], block_size, meta['pad_id'],
                                                torch_device) for a in range(0, len(sample), batch_size))]
    with ctx:
        student_model, student_tok, layers, line = build_student(student, student_init, student_layers, teacher_model,
                                                                 teacher, probes, trust_remote_code)
    say(line)
    teacher_tok = model_tokenizer(teacher) if use_teacher else None
    if ddp and master_process:
        dist.barrier()
    if (w_kd == 0 or cache) and w_hidden == 0:
        teacher_model = None  # 'teacher_layers' needed it only to build the student
    # the data's tokenizer(s) are the models' (compared by fingerprint), and the models have enough output rows
    for note in check_vocabularies(meta, data_dir, student_model, student_tok, teacher_model, teacher_tok):
        say(note)
    if teacher_model is not None:  # frozen, never wrapped, in the compute dtype (fp32 under fp16: it could overflow)
        frozen(teacher_model, torch_device, ptdtype)
    student_model.to(torch_device)  # (the probes below run both models on the device)

    # the loss path and packing, where probes show the models allow them: the chunked path computes logits = final
    # hidden states @ head; packed rows need attention that keeps windows apart given restarting position ids
    models = [m for m in (student_model, teacher_model) if m is not None]
    probe = torch.arange(1, 17, device=torch_device)[None]
    chunk, note = choose_chunk(loss_chunk, models[:1 + (w_kd > 0)], compute_dtype, probe)
    say(note)
    packing = pack and all(packs(m, probe) for m in models)
    if pack and not packing:
        say("note: a model's attention does not keep packed windows apart (position ids restarting per window): rows "
            'are not packed (pack=False)')
    if lora_rank:  # adapters on the student's chosen linear layers, the rest frozen in the compute dtype (after the
        say(add_lora(student_model, lora_rank, lora_alpha, lora_dropout, lora_targets, ptdtype))  # probes: the same)
    # the chunk loop reallocates the same few (chunk, V) blocks: on a CPU they are kept within a step, trimmed between
    trim = keep_freed_memory() if chunk and device_type == 'cpu' else lambda: None  # (the plain path would fragment)
    hidden_map = LayerMap(make_layer_pairs(layer_map, student_model.config.num_hidden_layers,
                                          teacher_model.config.num_hidden_layers,
                                          layers if student_init == 'teacher_layers' else None),
                         student_model.config.hidden_size, teacher_model.config.hidden_size, hidden_loss,
                         hidden_rms_norm, proj_init) if w_hidden else None

    # the teacher as one function of a batch, what the loss reads of it (kd/teacher.py), whatever its kind
    reads = None if w_kd == 0 else 'head' if chunk else 'full'  # (of its logits: the chunked loss applies its head)
    if served and w_kd > 0:
        teacher_fn = ServedTeacher(urls, student_tok or load_tokenizer(meta['tokenizer']), vocab,
                                   0 if kd_kind == 'pg' else teacher_topk or 20, block_size, teacher_requests,
                                   teacher_timeout, teacher_retries)
    elif teacher_model is None:
        teacher_fn = cache or NoTeacher()
    else:
        teacher_fn = (ShardedTeacher if fsdp else Teacher)(teacher_model, vocab, reads,
                                                           hidden_map.teacher_layers() if hidden_map else (),
                                                           teacher_topk and (teacher_topk, temperature))
    compared = vocab
    if cross_tokenizer:  # across tokenizers: each teacher token's mass goes to a student token (kd/cross.py)
        teacher_fn, line = across_tokenizers(teacher_fn, meta, student_tok, teacher_tok, temperature, torch_device,
                                             w_kd > 0)
        compared = vocab if teacher_fn.compared is None else teacher_fn.compared
        say(line)
    elif 'teacher_context' in meta and (w_kd > 0 or w_hidden > 0):  # the teacher reads more than the student
        teacher_fn, line = with_context(teacher_fn, meta, data_dir, teacher_cache, on_policy, isinstance(teacher, dict))
        say(line)
    model = Trainable(student_model, compared, weights, Divergence(kd_kind, temperature, beta), chunk, hidden_map)
    raw_model = model = model.to(torch_device).train()  # from_pretrained returns models in eval mode

    # the rows: the data's windows, rewritten by the student's samples (on-policy), then packed
    sampler = on_policy and OnPolicy(
        raw_model.model, train_data, on_policy, (max_new_tokens, sample_temperature, top_p), block_size, seed,
        meta['pad_id'], vocab, data_dir, meta['eos_id'], [student_tok, teacher_tok, meta['tokenizer']], rank,
        world_size, gradient_accumulation_steps)
    check_pg(kd_kind, sampler)
    teacher_pad_id = meta.get('teacher_eos_id', 0)
    packed = partial(pack_rows, block_size=block_size, pad_id=meta['pad_id'], teacher_pad_id=teacher_pad_id) \
        if packing else lambda b: b
    batch = lambda split, windows: make_batch(split, windows, block_size, meta['pad_id'], torch_device, teacher_pad_id)

    # across processes: FSDP2 shards before the optimizer is made (it must hold the shards), DDP wraps after the
    # resume (the checkpoint holds raw_model's names); the teacher is never wrapped, only sharded under fsdp
    if w_hidden == 0 and layer_map != 'uniform':  # (a setting that changes nothing is said)
        say(f'note: layer_map={layer_map!r} is unused: this loss has no hidden-state term')
    if parallel == 'fsdp' and not ddp:
        say("note: parallel='fsdp' is unused: one process has nothing to shard")
    say(cache and cache.note(kd_kind))
    memory = memory_estimate(raw_model, teacher_model, batch_size * block_size, compute_dtype, world_size, fsdp,
                             output_rows(teacher_model) if cross_tokenizer and w_kd else 0)
    if fsdp:
        if compute_dtype == 'float16':
            raise ConfigError("parallel='fsdp' trains in float32 or bfloat16: set dtype='bfloat16' (float16 needs a "
                              'loss scaler per shard)')
        shard(model, teacher_model)
    optimizer = configure_optimizer(model, learning_rate, weight_decay, (beta1, beta2))

    # resume: weights, AdamW's moments, every rank's RNG state; the data position follows from iter_num
    flops_peak = peak_flops or dtype_rate or measure_matmul_flops(torch_device, ptdtype)  # the MFU denominator
    run_config = {**config, 'max_iters': iterations, 'loss_chunk': chunk, 'peak_flops': flops_peak,
                  'dtype': compute_dtype, 'data_fingerprint': data_fingerprint,  # what the run resolved: kept
                  **({'base_fingerprint': base_fingerprint(student_model)} if lora_rank else {})}  # (LoRA's base)
    ckpt_dir, iter_num, history, val_history = os.path.join(out_dir, 'ckpt'), 0, [], []
    if init_from == 'resume':  # (refused for another run or another data stream)
        iter_num, history, val_history = resume(out_dir, raw_model, optimizer, scaler, config, run_config, world_size,
                                                rank, fsdp, say)
    elif master_process and set_aside(out_dir):  # (a resume must not take the earlier run's for this run's)
        say(f"note: init_from='scratch': the earlier run's checkpoint and log are in {out_dir}/earlier until this run "
            'writes its first checkpoint')
    guards = Guards(ckpt_dir, math.log(output_rows(student_model)), iter_num or None, history, val_history)
    if compile:  # the transformer stacks, in place (parameter names unchanged); not the loss's chunks, whose weights
        for m in models:  # and number of positions change every batch (each a recompile)
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

    @torch.no_grad()
    def evaluate():  # (through raw_model: DDP's forward would wait for ranks that have no documents to evaluate)
        model.eval()
        sums = [0.0] * 5  # ce, kd, hidden, supervised targets, aligned positions
        docs = val_windows[rank::world_size]
        for k in range(0, len(val_windows[::world_size]) if fsdp else len(docs), batch_size):  # (fsdp: all gather:
            b = packed(batch(val_data, docs[k:k + batch_size] if k < len(docs) else val_windows[:1]))  # a spare batch)
            with ctx:
                out = raw_model(b, teacher_fn(b))
            teacher_fn.release()
            if k < len(docs):
                counts = (out.ce.item(), out.kd.item(), out.hidden.item(), b.M.sum().item(), len(b.align.b))
                sums = [a + v for a, v in zip(sums, counts)]
            trim()
        model.train()
        if fsdp:  # (with no backward to follow, the root's forward left its parameters gathered)
            model.reshard()
        ce, kd, hidden, n, n_hidden = all_reduce(*sums)
        return ce / max(n, 1), kd / max(n, 1), hidden / max(n_hidden, 1)

    def save(iter_num, states, losses):
        """A checkpoint of the weights of iteration iter_num, with every rank's RNG states and the training losses as
        they were before its step, unless something in it is not finite (then stop, keeping the last good one)."""
        local = lambda p: p.to_local() if hasattr(p, 'to_local') else p  # (fsdp: its shard)
        guards.weights(iter_num, not all_reduce(float(not all(torch.isfinite(local(p)).all()
                                                              for p in raw_model.parameters())))[0])
        weights, optimizer_state = full_state(model, optimizer) if fsdp else (  # (LoRA: what trains; the frozen base
            trained_state(raw_model) if lora_rank else raw_model, optimizer.state_dict())  # is rebuilt on resuming)
        if master_process:
            save_checkpoint(ckpt_dir, weights, optimizer_state, scaler, iter_num,
                            iter_num * batch_size * gradient_accumulation_steps, states, run_config, losses,
                            guards.val_history[-100:])
        guards.last_saved = iter_num

    # what this run is, in a few lines (each hook says its own), and its log
    say(f'student: {sum(p.numel() for p in student_model.parameters()) / 1e6:.2f}M parameters; teacher: {teacher_fn}')
    say(f'dtype: {compute_dtype} ({why}); MFU against its matmul rate, {flops_peak / 1e9:,.0f} GFLOP/s'
        + (' (peak_flops)' if peak_flops else ' measured at start'))
    say(f'loss = {w_ce:g} CE' + (f' + {w_kd:g} T^2 {kd_kind} (T={temperature:g})' if w_kd else '')
        + (f' + {w_hidden:g} hidden {hidden_loss}' + ' (RMS-normalised)' * hidden_rms_norm if w_hidden else '')
        + ' [across tokenizers]' * cross_tokenizer
        + (f'; {chunk} positions a chunk' if chunk else '; from the full logits'))
    say(memory_line(memory))
    say(sampler and str(sampler))
    say(hidden_map and hidden_map.describe())
    say(f"{len(train_data['idx']) - 1:,} training documents in {len(train_windows):,} windows of <= {block_size} "
        f'targets; {iterations} iterations of {batch_size} x {gradient_accumulation_steps} windows '
        f'({world_size} rank(s))')
    if len(val_windows) == 0:
        say(f'note: no validation documents ({data_dir} has none, or eval_docs=0): no evaluation; checkpoints every '
            f'{eval_interval} iterations all the same')
    if master_process:
        os.makedirs(out_dir, exist_ok=True)
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
        if (iter_num % eval_interval == 0 or iter_num == last_iter) and iter_num != guards.last_saved:
            if len(val_windows):
                val_ce, val_kd, val_hidden = evaluate()
                log({'iter': iter_num, 'val_ce': val_ce, 'val_kd': val_kd, 'val_hidden': val_hidden},
                    f'iter {iter_num}: val ce {val_ce:.4f}, val kd {val_kd:.4f}, val hidden {val_hidden:.4f}')
                guards.validation(iter_num, val_ce, val_kd, val_hidden)
            pending = (rng_states(world_size), guards.history[-100:]) if iter_num > 0 and checkpoint else None
        if iter_num >= last_iter:
            if pending:
                save(iter_num, *pending)
            break
        lr = get_lr(iter_num, iterations, warmup_iters, learning_rate, min_lr)
        for group in optimizer.param_groups:
            group['lr'] = lr
        t0 = time.time()

        # the step's rows: the data's, the student's share rewritten by its own replies (on-policy), then packed
        step_ids = step_doc_ids(iter_num, batch_size, gradient_accumulation_steps, rank, world_size,
                                len(train_windows), seed)
        micro_batches = [batch(train_data, train_windows[ids]) for ids in step_ids]
        t_sample = time.time()
        if sampler:
            with ctx:
                micro_batches = sampler(micro_batches, iter_num)
        student_rows = sum(b.sampled.any(1).sum().item() for b in micro_batches if b.sampled is not None)
        micro_batches = [packed(b) for b in micro_batches]
        t_sample, t_teacher = time.time() - t_sample, 0.0
        # the step's counts over every micro-batch and rank divide its sums: the loss does not depend on the split
        n_targets, n_hidden, n_labeled, step_tokens, generated, student_rows = all_reduce(
            sum(b.M.sum().item() for b in micro_batches), sum(len(b.align.b) for b in micro_batches),
            sum(b.labeled().sum().item() for b in micro_batches), sum(b.X.numel() for b in micro_batches),
            sampler.generated if sampler else 0, student_rows)
        mix = mixing_weights(batch_size * gradient_accumulation_steps, student_rows, n_targets, n_targets - n_labeled)

        # forward and backward, micro-batch by micro-batch: the teacher's outputs, then the student's loss on them
        sums = torch.zeros(4, dtype=torch.float64, device=torch_device)  # loss, ce, kd, hidden
        for micro_step, b in enumerate(micro_batches):
            if fsdp:  # gradients are reduced over ranks once per step, after its last micro-batch
                model.set_requires_gradient_sync(micro_step == len(micro_batches) - 1)
            elif ddp:
                model.require_backward_grad_sync = micro_step == len(micro_batches) - 1
            with ctx:
                t = time.time()
                teacher_out = teacher_fn(b)
                t_teacher += time.time() - t
                out = model(b, teacher_out, max(n_targets, 1), max(n_hidden, 1), max(n_labeled, 1), mix)
            teacher_fn.release()
            scaler.scale(out.loss * world_size).backward()  # DDP averages gradients over ranks; the sum is wanted
            sums += torch.stack([out.loss.detach(), out.ce, out.kd, out.hidden]).double()
        loss_value, ce_mean, kd_mean, hidden_mean = all_reduce(*sums.tolist())
        ce_mean, kd_mean = ce_mean / max(n_labeled, 1), kd_mean / max(n_targets, 1)
        hidden_mean = hidden_mean / max(n_hidden, 1)

        # the guards, then the step: a checkpoint of the weights it started from once their loss and gradient passed
        guards.loss(iter_num, loss_value, ce_mean, kd_mean, hidden_mean)
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float('inf'))
        grad_norm = gathered(grad_norm).item()
        guards.gradient(iter_num, grad_norm, ce_mean, n_labeled, scaler.is_enabled())
        if pending:
            save(iter_num, *pending)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        trim()
        if device_type == 'cuda':
            torch.cuda.synchronize()
        dt = time.time() - t0
        if iter_num % log_interval == 0:
            seq = step_tokens / (batch_size * gradient_accumulation_steps)
            flops = sum(flops_per_token(m, seq, m is student_model) for m in models)
            tok_s = step_tokens / dt
            if flops * tok_s > flops_peak * world_size and not peak_flops:  # the rate at start read low (a loaded
                flops_peak = max(measure_matmul_flops(torch_device, ptdtype), flops * tok_s / world_size)  # machine)
            mfu = flops * tok_s / (flops_peak * world_size)
            peak = torch.cuda.max_memory_allocated() if device_type == 'cuda' else None  # (beside the estimate)
            split = {'sample_ms': t_sample * 1000, 'teacher_ms': t_teacher * 1000, 'generated': int(generated),
                     'generated_per_s': generated / max(t_sample, 1e-9), 'student_rows': int(student_rows),
                     'student_targets': int(n_targets - n_labeled), 'targets': int(n_targets),
                     } if sampler else {}  # where the time went, and what the student wrote
            log({'iter': iter_num, 'loss': loss_value, 'ce': ce_mean, 'kd': kd_mean, 'hidden': hidden_mean, 'lr': lr,
                 'grad_norm': grad_norm, 'ms': dt * 1000, 'tokens_per_s': tok_s, 'mfu': mfu, 'peak_memory': peak,
                 **split},
                f'iter {iter_num}: loss {loss_value:.4f}, ce {ce_mean:.4f}, kd {kd_mean:.4f}, '
                f'hidden {hidden_mean:.4f}, lr {lr:.2e}, grad norm {grad_norm:.3f}, {dt * 1000:.0f} ms, '
                f'{tok_s:,.0f} tok/s, mfu {mfu * 100:.1f}%'
                + (f', peak memory {gb(peak)}' if peak else '')
                + (f" (sampling {t_sample * 1000:.0f} ms: {generated:.0f} tokens, {split['generated_per_s']:,.0f}/s; "
                   f'teacher {t_teacher * 1000:.0f} ms; student {(dt - t_sample - t_teacher) * 1000:.0f} ms)'
                   if sampler else ''))
        iter_num += 1

    # export: the student alone, as an HF folder with its tokenizer (the projections are training machinery)
    weights = None  # (fsdp: gathered whole, on rank 0)
    if fsdp and export:
        weights = {k[len('model.'):]: v for k, v in full_state(model)[0].items() if k.startswith('model.')}
    if master_process and export:
        tok = student_tok or model_tokenizer(meta['tokenizer'])
        if lora_rank:  # merged onto the student as loaded (fp32: its frozen copy may be in the compute dtype), and
            pretrained = student_init == 'pretrained'  # the adapters alone in PEFT's format (the weights below)
            weights = export_lora(student_model, out_dir, tok, (lora_rank, lora_alpha, lora_dropout, lora_targets),
                                  export_student, student if pretrained else None,
                                  load_model(student, trust_remote_code).state_dict()
                                  if pretrained and compute_dtype != 'float32' else None)
        export_student(student_model, os.path.join(out_dir, 'student'), weights, tok)
        print(f"exported the student to {os.path.join(out_dir, 'student')}")
    if ddp:  # tear down together, after rank 0's export, once nothing holds the process group (DDP's reducer, FSDP's
        del model, raw_model, student_model, teacher_model, teacher_fn, optimizer  # sharded tensors): gloo's threads,
        gc.collect()  # left to the interpreter's exit, aborted a rank in CI twice ('terminate called without an
        dist.barrier()  # active exception')
        dist.destroy_process_group()
