"""
Knowledge distillation of language models, in one file.

    python distill.py configs/tiny.py                                  # one process (CPU or one GPU)
    python distill.py configs/hermes.py --learning_rate=1e-5           # a config file, then overrides
    torchrun --standalone --nproc_per_node=8 distill.py configs/hermes.py
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 distill.py configs/hermes.py
    python distill.py --help                                           # every key, its default and comment

Loss families:
- logits ('logits'): the student matches the teacher's whole next-token distribution at temperature T,
  loss = (1 - alpha) * CE + alpha * T^2 * D(p_teacher || q_student), D one of KD_KINDS.
- hidden ('hidden'): student hidden states, through trained projections, pulled towards the teacher's at
  mapped layers (MSE or cosine), loss = (1 - alpha) * CE + alpha * H; works across architectures and, with
  prepare_data.py --teacher_tokenizer, across tokenizers (at positions where both tokenizations align).
- none ('none'): the SFT baseline, the same routine with the teacher never loaded.
Any mix: ce_weight, kd_weight, hidden_weight. loss_chunk > 0 computes CE and D from the final hidden states
a chunk of positions at a time, so neither model's full logits ever exist (ChunkedHeadLoss).

Data comes from prepare_data.py: mask[i] == 1 iff token i is a supervised target. A document d is read as
X = d[:-1] and scored on Y = d[1:] where M = mask[1:] (see prepare_data.py). Every loss is a sum over
supervised targets divided by N, the supervised targets of the whole optimizer step (all micro-batches,
all ranks), so the result does not depend on how a step is split.
"""
import ast, builtins, difflib, json, math, os, re, shutil, sys, time, traceback
from contextlib import nullcontext
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import prepare_data

# -----------------------------------------------------------------------------
# defaults (a config file and --key=value override them; `python distill.py --help` lists them)
# I/O
out_dir = 'out'  # checkpoints (ckpt/), the exported student (student/) and log.jsonl
init_from = 'scratch'  # 'scratch' or 'resume' (continue exactly from out_dir/ckpt)
eval_interval = 100  # evaluate and checkpoint every this many iterations (and at the end)
eval_docs = 64  # validation windows (documents, or block_size pieces of longer ones) per evaluation
log_interval = 1  # print a log line every this many iterations
export = True  # save out_dir/student as an HF folder at the end
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
student = None  # HF hub id, local folder or .gguf file (for 'teacher_layers': unused)
student_init = 'pretrained'  # 'pretrained' (its weights), 'config' (random init) or 'teacher_layers'
student_layers = None  # teacher blocks kept by student_init='teacher_layers', e.g. [0, 3, 6]
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
layer_map = 'uniform'  # 'uniform', 'last' or [(student, teacher), ...]; index 0 = embedding output, l = block l
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
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'  # autocast: 'float32', 'bfloat16' or 'float16'
compile = False  # torch.compile both transformer stacks and the chunked loss (17-63 s at start on this CPU; see README)
seed = 1337  # data order and initialisation
peak_flops = 0.0  # per-device peak FLOP/s for MFU; 0: 989e12 on CUDA (H100 bf16), else measured at start
OPTIONAL_TYPES = {'teacher': str, 'student': str, 'student_layers': list, 'stop_iter': int, 'max_iters': int,
                  'ce_weight': float, 'kd_weight': float, 'hidden_weight': float, 'wandb_run_name': str}
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str, list, type(None)))]
# -----------------------------------------------------------------------------

class ConfigError(Exception):
    pass

def default_comments():
    """key -> inline comment of its default, read from this file (what --help prints)."""
    src = open(__file__).read().split('# defaults', 1)[1].split('config_keys =')[0]
    return {m[1]: m[2] for m in re.finditer(r'^(\w+) = .*?  # (.*)$', src, re.M)}

def parse_config(argv, defaults):
    """nanoGPT-style: a config file (Python, only assignments to known keys), then --key=value overrides."""
    config = dict(defaults)

    def setkey(key, value, where):
        if key not in defaults:
            close = difflib.get_close_matches(key, defaults, n=1)
            raise ConfigError(f"unknown config key '{key}' ({where})" + (f"; did you mean '{close[0]}'?" if close else ''))
        old = defaults[key]
        kind = OPTIONAL_TYPES.get(key, type(old))  # a None default still has a type
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is list and isinstance(value, tuple):
            value = list(value)
        if key == 'layer_map' and isinstance(value, (list, tuple)):
            pass  # a name or explicit pairs
        elif value is not None and (not isinstance(value, kind) or isinstance(value, bool) != (kind is bool)):
            example = f'like its default {old!r}' if old is not None else 'or None (its default)'
            raise ConfigError(f"{key} must be {kind.__name__} {example}, got {value!r} ({where})")
        config[key] = value

    for arg in argv:
        if arg.startswith('--'):
            if '=' not in arg:
                raise ConfigError(f"malformed override '{arg}': write --key=value")
            key, val = arg[2:].split('=', 1)
            try:
                val = ast.literal_eval(val)
            except (SyntaxError, ValueError):
                pass  # a plain string
            setkey(key, val, 'command line')
        else:
            if not os.path.isfile(arg):
                raise ConfigError(f"config file '{arg}' not found")
            scope = {}
            try:
                exec(builtins.compile(open(arg).read(), arg, 'exec'), {'__file__': arg}, scope)  # (compile is a config key)
            except SyntaxError as e:
                raise ConfigError(f'{arg}:{e.lineno}: syntax error: {e.msg}')
            except Exception as e:  # a NameError, a failed import, ...: the config file's own line
                line = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == arg][-1:] or ['?']
                raise ConfigError(f'{arg}:{line[0]}: {type(e).__name__}: {e}')
            for key, val in scope.items():
                if not key.startswith('_') and not callable(val) and not isinstance(val, type(os)):
                    setkey(key, val, arg)
    return config

# -----------------------------------------------------------------------------
# losses (all in fp32)

KD_KINDS = ('fkl', 'rkl', 'jsd', 'skl', 'srkl', 'tvd')

def _kl(log_a, log_b):
    """KL(a || b) over the last dim, from log-probabilities."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)

def _log_mix(log_a, log_b, w):
    """log(w * a + (1 - w) * b), computed in log space."""
    if w == 0:
        return log_b
    if w == 1:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log(1 - w))

def kd_divergence(student_logits, teacher_logits, kind='fkl', temperature=1.0, beta=0.5):
    """Per-position divergence between p = softmax(teacher / T) and q = softmax(student / T) (shape [...]).

    jsd: beta * KL(p || M) + (1 - beta) * KL(q || M), M = beta * p + (1 - beta) * q. The formula vanishes at
    both ends, so, as the limits of JSD/beta and JSD/(1 - beta), beta = 0 is forward KL and beta = 1 reverse KL.
    skl: KL(p || beta p + (1 - beta) q); srkl: KL(q || beta q + (1 - beta) p) (DistiLLM's skew, beta = 0.1 there).
    """
    if kind not in KD_KINDS:
        raise ValueError(f"kd_kind must be one of {KD_KINDS}, got '{kind}'")
    fp = torch.float64 if student_logits.dtype == torch.float64 else torch.float32  # never below fp32
    tiny = torch.finfo(fp).min  # -inf logits (masked tokens) must not turn 0 * inf into NaN
    log_p = F.log_softmax(teacher_logits.to(fp) / temperature, dim=-1).clamp(min=tiny)
    log_q = F.log_softmax(student_logits.to(fp) / temperature, dim=-1).clamp(min=tiny)
    if kind == 'fkl' or (kind == 'jsd' and beta == 0):
        return _kl(log_p, log_q)
    if kind == 'rkl' or (kind == 'jsd' and beta == 1):
        return _kl(log_q, log_p)
    if kind == 'jsd':
        log_m = _log_mix(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    if kind == 'skl':
        return _kl(log_p, _log_mix(log_p, log_q, beta))
    if kind == 'srkl':
        return _kl(log_q, _log_mix(log_q, log_p, beta))
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)  # tvd

def kd_loss(student_logits, teacher_logits, mask, kind='fkl', temperature=1.0, beta=0.5):
    """Mean over masked positions of kd_divergence (logits [..., V], mask [...])."""
    keep = mask.bool()  # only supervised positions are computed: whatever sits elsewhere cannot leak in
    return kd_divergence(student_logits[keep], teacher_logits[keep], kind, temperature, beta).sum() / keep.sum().clamp(min=1)

def total_loss(ce, kd, hidden, weights, temperature):
    """w_ce CE + w_kd T^2 D + w_hidden H. T^2 keeps the gradient scale of D comparable across temperatures
    (Hinton et al. 2015): the gradient of D itself shrinks like 1/T^2."""
    w_ce, w_kd, w_hidden = weights
    return w_ce * ce + w_kd * temperature ** 2 * kd + w_hidden * hidden

def loss_sums(logits, Y, M, teacher_logits, vocab, kind='fkl', temperature=1.0, beta=0.5):
    """Sums over supervised targets of the CE and of the divergence (over the shared real vocabulary): the
    plain path, which holds the full logits of both models."""
    keep = M.bool()
    logits = logits[keep]  # (supervised positions, V): prompt and padding rows are never computed
    ce_sum = F.cross_entropy(logits.float(), Y[keep], reduction='sum')
    if teacher_logits is None:
        return ce_sum, torch.zeros_like(ce_sum)
    # rows past the tokenizer's vocabulary are embedding padding and differ between models: never compared
    kd = kd_divergence(logits[:, :vocab], teacher_logits[keep][:, :vocab], kind, temperature, beta)
    return ce_sum, kd.sum()

def kd_divergence_grad(student_logits, teacher_logits, kind='fkl', temperature=1.0, beta=0.5):
    """kd_divergence (fp32 logits [n, V]) and its gradient w.r.t. the student logits in closed form, with
    fewer passes over (n, V) than autograd makes. With q = softmax(z / T) and r_i = q_i dD/dq_i, the softmax
    gives dD/dz = (r - q sum(r)) / T; for forward KL r = -p, so dD/dz = (q - p) / T."""
    T = temperature
    log_q, log_p = F.log_softmax(student_logits / T, dim=-1), F.log_softmax(teacher_logits / T, dim=-1)
    q, p = log_q.exp(), log_p.exp()
    if kind == 'fkl' or (kind == 'jsd' and beta == 0):
        return torch.sub(log_p, log_q).mul_(p).sum(-1), q.sub_(p).div_(T)
    if kind == 'rkl' or (kind == 'jsd' and beta == 1):
        d = (q * (log_q - log_p)).sum(-1)
        return d, (log_q - log_p - d[:, None]).mul_(q).div_(T)
    if kind == 'jsd':  # dD/dq = (1 - beta) log(q / m)
        log_m = _log_mix(log_p, log_q, beta)
        d = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
        r = (1 - beta) * q * (log_q - log_m)
    elif kind == 'skl':  # m = beta p + (1 - beta) q: dD/dq = -(1 - beta) p / m
        log_m = _log_mix(log_p, log_q, beta)
        d = (p * (log_p - log_m)).sum(-1)
        r = -(1 - beta) * torch.exp(log_p + log_q - log_m)
    elif kind == 'srkl':  # m = beta q + (1 - beta) p: dD/dq = log(q / m) + 1 - beta q / m
        log_m = _log_mix(log_q, log_p, beta)
        d = (q * (log_q - log_m)).sum(-1)
        r = q * (log_q - log_m + 1) - beta * torch.exp(2 * log_q - log_m)
    elif kind == 'tvd':
        d = 0.5 * (p - q).abs().sum(-1)
        r = 0.5 * q * torch.sign(q - p)
    else:
        raise ValueError(f"kd_kind must be one of {KD_KINDS}, got '{kind}'")
    return d, (r - q * r.sum(-1, keepdim=True)) / T

def chunk_loss_grad(z, zt, y, vocab, w_ce, w_kd, kind, temperature, beta):
    """One chunk of the chunked loss: the CE sum, the divergence sum and d(w_ce CE + w_kd D)/dz, in closed form:
    softmax - onehot for CE, kd_divergence_grad for D. z, zt: fp32 student and teacher logits (zt None: CE only)."""
    dz = F.log_softmax(z, dim=-1)
    ce = -dz.gather(1, y[:, None]).sum()
    dz = dz.exp_().mul_(w_ce)
    dz[torch.arange(len(y), device=y.device), y] -= w_ce
    kd = torch.zeros_like(ce)
    if zt is not None:
        d, g = kd_divergence_grad(z[:, :vocab], zt[:, :vocab], kind, temperature, beta)
        kd = d.sum()
        dz[:, :vocab].add_(g, alpha=w_kd)
    return ce, kd, dz

class ChunkedHeadLoss(torch.autograd.Function):
    """w_ce * CE_sum + w_kd * D_sum straight from the final hidden states and the output heads, a chunk of
    positions at a time, so that no (positions, V) tensor of either model ever exists. Each chunk's logits,
    loss and gradient (chunk_loss_grad) are computed in forward, and only the gradients w.r.t. the hidden
    states and the head (small: positions x d and V x d) are kept; backward scales them. The same matmuls as
    the plain path, none repeated. Inputs: h (n, d_s) student states at supervised positions, W (V_s, d_s) its
    head, Y (n,) targets, t_h (n, d_t) / t_W (V_t, d_t) the teacher's, or None for CE alone; optionally the
    chunk function (a compiled chunk_loss_grad)."""
    @staticmethod
    def forward(ctx, h, W, Y, t_h, t_W, vocab, w_ce, w_kd, kind, temperature, beta, chunk, chunk_fn=chunk_loss_grad):
        Wc = W.to(h.dtype)  # the heads in the compute dtype once, not once per chunk (autocast)
        t_Wc = None if t_h is None else t_W.to(t_h.dtype)
        dh, dW = torch.empty_like(h), torch.zeros_like(W, dtype=torch.float32)
        ce_sum, kd_sum = torch.zeros((), device=h.device), torch.zeros((), device=h.device)
        for a in range(0, len(h), chunk):
            hc = h[a:a + chunk]
            zt = None if t_h is None else (t_h[a:a + chunk] @ t_Wc.T).float()
            ce, kd, dz = chunk_fn((hc @ Wc.T).float(), zt, Y[a:a + chunk], vocab, w_ce, w_kd, kind, temperature, beta)
            ce_sum, kd_sum = ce_sum + ce, kd_sum + kd
            dz = dz.to(hc.dtype)
            dh[a:a + chunk] = dz @ Wc
            if dz.dtype == dW.dtype:
                dW.addmm_(dz.T, hc)  # accumulated in place: no second (V, d) buffer
            else:
                dW += dz.T @ hc
        ctx.save_for_backward(dh, dW)
        ctx.head_dtype = W.dtype
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return w_ce * ce_sum + w_kd * kd_sum, ce_sum, kd_sum

    @staticmethod
    def backward(ctx, grad, *_):
        dh, dW = ctx.saved_tensors  # scaled in place (a second backward through this graph raises, as it should)
        return dh.mul_(grad), dW.mul_(grad).to(ctx.head_dtype), *[None] * 11

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

def make_layer_pairs(spec, student_layers_n, teacher_layers_n):
    """(student, teacher) hidden-state indices; 0 is the embedding output, l the output of block l (HF's
    hidden_states[l]). 'uniform': student l <-> teacher round(l * L_t / L_s) (halves up) for l = 1..L_s;
    'last': the final ones only."""
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
    raise ConfigError(f"layer_map must be 'uniform', 'last' or a list of (student, teacher) pairs, got {spec!r}")

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

def make_batch(split, windows, block_size, pad_id, device, teacher_pad_id=0):
    """Right-padded X, Y, M for some (document, start) windows (block_windows), and H: where the hidden-state
    loss is taken. No attention mask is needed: causal attention never lets a real token see the padding after
    it, and M is 0 on padding. H = (XT, b, s, t): student position s of row b pairs with teacher position t, at
    the supervised positions only; XT is the teacher's own input across tokenizers, else None (it reads X)."""
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
        H = (XT.to(device), b.to(device), s.to(device), t.to(device))
    else:
        b, s = M.nonzero(as_tuple=True)
        H = (None, b.to(device), s.to(device), s.to(device))
    return X.to(device), Y.to(device), M.to(device), H

def step_doc_ids(iter_num, batch_size, grad_accum, rank, world, n_docs, seed):
    """This rank's micro-batches of step iter_num: the step takes batch_size * grad_accum documents of the
    stream, micro-batch j of them goes to rank j % world."""
    step = doc_order(iter_num * batch_size * grad_accum, batch_size * grad_accum, n_docs, seed)
    return [step[j * batch_size:(j + 1) * batch_size] for j in range(rank, grad_accum, world)]

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
    from transformers import AutoModelForCausalLM
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

def measure_matmul_flops(device, dtype=torch.float32, n=1024, seconds=1.0):
    """This device's sustained matmul rate (FLOP/s): the MFU denominator on a CPU."""
    a = torch.rand(n, n, generator=torch.Generator().manual_seed(0)).to(device, dtype)  # own generator: the
    b = a.T.contiguous()                                                                  # run's RNG stays untouched
    a @ b
    count, t0 = 0, time.time()
    while time.time() - t0 < seconds:
        a @ b
        count += 1
    if 'cuda' in str(device):
        torch.cuda.synchronize()
    return 2 * n ** 3 * count / (time.time() - t0)

# -----------------------------------------------------------------------------
# training state

def keep_freed_memory():
    """On a CPU, PyTorch has no caching allocator: glibc returns every freed block above 32 MB to the OS, and
    each fresh (chunk, V) tensor of the chunked loss is paged in again (measured: ~14% of a KD step here, at
    ~0.5 GB more peak memory when kept). Keep freed memory in the process for reuse, as CUDA's allocator does."""
    try:
        import ctypes
        libc = ctypes.CDLL('libc.so.6')
        libc.mallopt(-4, 0)  # M_MMAP_MAX: large blocks come from the heap, not from fresh mmaps
        libc.mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: and the heap is never trimmed back
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do

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

class Trainable(nn.Module):
    """Everything that trains (the student and any hidden-state projections) in one module, so that DDP,
    the optimizer and checkpoints see the same parameters. Only .model is exported. forward returns the
    loss sums over supervised targets; loss settings: vocab, weights (w_ce, w_kd * T^2), kind, temperature,
    beta, chunk (0: the plain path with full logits) and compile (compile the chunked loss's arithmetic)."""
    def __init__(self, model, loss, layer_pairs=(), teacher_width=0, proj_init='xavier', hidden_loss='mse', rms_norm=False):
        super().__init__()
        self.model, self.loss = model, loss
        self.chunk_fn = torch.compile(chunk_loss_grad, dynamic=True) if loss.get('compile') else chunk_loss_grad
        self.layer_pairs, self.hidden_loss, self.rms_norm = list(layer_pairs), hidden_loss, rms_norm
        self.proj = nn.ModuleList(nn.Linear(model.config.hidden_size, teacher_width, bias=False) for _ in self.layer_pairs)
        for p in self.proj:
            if proj_init == 'identity':
                nn.init.eye_(p.weight)
            elif proj_init == 'xavier':
                nn.init.xavier_uniform_(p.weight)
            else:
                raise ConfigError(f"proj_init must be 'xavier' or 'identity', got '{proj_init}'")

    def forward(self, X, Y, M, teacher=None, H=None):
        """(w_ce CE_sum + w_kd D_sum, CE_sum, D_sum, hidden-loss sum over the positions of H averaged over the
        layer pairs). teacher: (its logits, or its final hidden states for the chunked path; its output head
        weight; its hidden states at the mapped layers), any of them None."""
        t_final, t_head, t_hidden = teacher or (None, None, None)
        cfg, keep = self.loss, M.bool()
        w_ce, w_kd = cfg['weights']
        if cfg['chunk']:
            out = self.model.base_model(input_ids=X, output_hidden_states=t_hidden is not None)
            weighted, ce, kd = ChunkedHeadLoss.apply(
                out.last_hidden_state[keep], self.model.get_output_embeddings().weight, Y[keep],
                None if t_final is None else t_final[keep], t_head, cfg['vocab'], w_ce, w_kd, cfg['kind'],
                cfg['temperature'], cfg['beta'], cfg['chunk'], self.chunk_fn)
        else:
            out = self.model(input_ids=X, output_hidden_states=t_hidden is not None)
            ce, kd = loss_sums(out.logits, Y, M, t_final, cfg['vocab'], cfg['kind'], cfg['temperature'], cfg['beta'])
            weighted = w_ce * ce + w_kd * kd
        if t_hidden is None:
            return weighted, ce.detach(), kd.detach(), torch.zeros_like(ce)
        _, b, s, t = H
        total = 0.0
        with torch.autocast(X.device.type, enabled=False):  # projections and distances in fp32
            for (ls, _), proj, ht in zip(self.layer_pairs, self.proj, t_hidden):
                hs = proj(out.hidden_states[ls][b, s].float())
                total = total + hidden_distance(hs, ht[b, t], self.hidden_loss, self.rms_norm).sum()
        return weighted, ce.detach(), kd.detach(), total / len(self.layer_pairs)

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

def swap_in(tmp, folder):
    """folder <- tmp (a complete checkpoint): the old one moves aside and is deleted only once the new one is in place."""
    old = folder + '.old'
    if os.path.exists(folder):
        if os.path.exists(old):
            shutil.rmtree(old)  # left by a kill; tmp, complete and newer, is findable meanwhile
        os.replace(folder, old)
    os.replace(tmp, folder)
    if os.path.exists(old):
        shutil.rmtree(old)

def save_checkpoint(folder, raw_model, optimizer, scaler, iter_num, data_position, rng_states, config):
    """Weights as safetensors, the rest as a torch file, written into folder.tmp; a manifest of their sizes, written
    last, marks it complete; then it is swapped in. A kill at any instant leaves at least one complete checkpoint
    among folder, folder.tmp and folder.old, and find_checkpoint picks the newest; the next save tidies up."""
    from safetensors.torch import save_model
    tmp = folder + '.tmp'
    done = checkpoint_iter(tmp)[0]
    if done is not None and done > (checkpoint_iter(folder)[0] or 0):
        swap_in(tmp, folder)  # a kill came between a complete save and its swap: finish that swap first
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    save_model(raw_model, os.path.join(tmp, 'model.safetensors'))
    torch.save({'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(), 'iter_num': iter_num,
                'data_position': data_position, 'rng_states': rng_states, 'config': config},
               os.path.join(tmp, 'state.pt'))
    files = {}
    for name in sorted(os.listdir(tmp)):
        with open(os.path.join(tmp, name), 'rb') as f:
            os.fsync(f.fileno())  # on disk before the manifest says so (a power cut, not only a kill)
        files[name] = os.path.getsize(os.path.join(tmp, name))
    with open(os.path.join(tmp, 'manifest.part'), 'w') as f:
        json.dump({'iter_num': iter_num, 'files': files}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(os.path.join(tmp, 'manifest.part'), os.path.join(tmp, 'manifest.json'))
    swap_in(tmp, folder)

def find_checkpoint(folder):
    """The newest complete checkpoint among folder and what an interrupted save left (folder.tmp, folder.old):
    (its path, its iteration, what was wrong with the others)."""
    found, problems = [], []
    for path in (folder, folder + '.tmp', folder + '.old'):
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

def load_checkpoint(folder, raw_model, optimizer, scaler):
    from safetensors.torch import load_model as load_weights
    try:
        load_weights(raw_model, os.path.join(folder, 'model.safetensors'))
    except Exception as e:  # another model than the one saved (changed student, layer_map, ...)
        raise ConfigError(f"cannot load {os.path.join(folder, 'model.safetensors')} into this run's model: "
                          f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}")
    state = torch.load(os.path.join(folder, 'state.pt'), weights_only=False)
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

def fail(message):
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)

# -----------------------------------------------------------------------------

if __name__ == '__main__':
    if '--help' in sys.argv[1:] or '-h' in sys.argv[1:]:
        comments = default_comments()
        print(__doc__)
        for k in config_keys:
            print(f'  --{k}={globals()[k]!r}'.ljust(44) + f'  {comments.get(k, "")}')
        sys.exit(0)
    try:
        config = parse_config(sys.argv[1:], {k: globals()[k] for k in config_keys})
    except ConfigError as e:
        fail(e)
    globals().update(config)
    choices = {'distill': ('logits', 'hidden', 'none'), 'kd_kind': KD_KINDS, 'hidden_loss': ('mse', 'cosine'),
               'proj_init': ('xavier', 'identity'), 'student_init': ('pretrained', 'config', 'teacher_layers'),
               'init_from': ('scratch', 'resume'), 'dtype': ('float32', 'bfloat16', 'float16')}
    for key, allowed in choices.items():
        if config[key] not in allowed:
            close = difflib.get_close_matches(str(config[key]), allowed, n=1)
            fail(f"{key} must be one of {', '.join(allowed)}; got {config[key]!r}" + (f" (did you mean '{close[0]}'?)" if close else ''))
    for key in ('block_size', 'batch_size', 'gradient_accumulation_steps', 'eval_interval', 'log_interval', 'temperature',
                'epochs', 'stop_iter'):
        if config[key] is not None and config[key] <= 0:
            fail(f'{key} must be > 0, got {config[key]}')
    for key in ('alpha', 'beta', 'warmup_frac'):
        if not 0 <= config[key] <= 1:
            fail(f'{key} must be in [0, 1], got {config[key]}')
    for key in ('loss_chunk', 'eval_docs', 'learning_rate', 'min_lr', 'weight_decay', 'grad_clip', 'max_iters'):
        if config[key] is not None and config[key] < 0:  # (max_iters=0 exports the student as it starts)
            fail(f'{key} must be >= 0, got {config[key]}')
    if not re.fullmatch(r'cpu|cuda(:\d+)?', device):
        fail(f"device must be 'cpu', 'cuda' or 'cuda:N', got '{device}'")
    if 'cuda' in device and not torch.cuda.is_available():
        fail(f"device='{device}' but this torch sees no CUDA device: pass --device=cpu, or install a CUDA build of torch")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        fail(f"out_dir '{out_dir}' is a file: pass a folder (it holds ckpt/, student/ and log.jsonl)")
    import transformers
    transformers.utils.logging.disable_progress_bar()
    # the loss: w_ce CE + w_kd T^2 D + w_hidden H; distill and alpha imply the weights, explicit ones override
    implied = {'none': (1.0, 0.0, 0.0), 'logits': (1 - alpha, alpha, 0.0), 'hidden': (1 - alpha, 0.0, alpha)}[distill]
    w_ce, w_kd, w_hidden = (implied[i] if w is None else float(w) for i, w in enumerate((ce_weight, kd_weight, hidden_weight)))
    use_teacher = w_kd > 0 or w_hidden > 0 or student_init == 'teacher_layers'
    if use_teacher and teacher is None:
        fail(f"distill='{distill}' needs a teacher" + (" (student_init='teacher_layers' copies its blocks)" if student_init == 'teacher_layers'
             else '') + ": set teacher (an HF hub id, a local folder or a .gguf file), or distill='none' for SFT")

    # DDP: torchrun's environment decides; nccl on GPUs, gloo on CPUs
    ddp = int(os.environ.get('RANK', -1)) != -1
    if ddp:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP
        import datetime  # generous: the other ranks wait while rank 0 downloads and converts a large teacher
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
    torch_device = f'cuda:{local_rank}' if ddp and device_type == 'cuda' else device  # (config values stay as given)
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')

    # data
    data_dir = os.path.join(data_root, dataset)
    try:
        meta = prepare_data.check_dataset(data_dir)
    except prepare_data.DataError as e:
        fail(e)
    vocab = meta['vocab_size']
    cross_tokenizer = 'teacher_tokenizer' in meta
    if cross_tokenizer and w_kd > 0:
        fail(f"{data_dir} pairs two tokenizers: logit distillation compares distributions token by token and needs one "
             "shared tokenizer; use distill='hidden' (or kd_weight=0)")
    train_data, val_data = load_split(data_dir, 'train'), load_split(data_dir, 'val')
    train_windows, val_windows = block_windows(train_data, block_size), block_windows(val_data, block_size)[:eval_docs]
    n_train_docs, n_val_docs = len(train_windows), len(val_windows)  # (a document longer than block_size gives several)
    steps_per_epoch = n_train_docs / (batch_size * gradient_accumulation_steps)
    iterations = max_iters if max_iters is not None else math.ceil(epochs * steps_per_epoch)
    warmup_iters = int(warmup_frac * iterations)

    # models; a .gguf is converted once, by rank 0, while the others wait
    if ddp and not master_process:
        dist.barrier()
    try:
        teacher_model = load_model(teacher, trust_remote_code) if use_teacher else None
        if student_init == 'teacher_layers':
            student_model = student_from_teacher_layers(teacher_model, student_layers)
            student_tok = model_tokenizer(teacher)
        else:
            if student is None:
                fail('set student (an HF hub id, a local folder or a .gguf file)')
            student_model = load_model(student, trust_remote_code)
            if student_init == 'config':
                from transformers import AutoModelForCausalLM
                student_model = AutoModelForCausalLM.from_config(student_model.config, dtype=torch.float32)
            student_tok = model_tokenizer(student)
        teacher_tok = model_tokenizer(teacher) if use_teacher else None
    except ConfigError as e:
        fail(e)
    if ddp and master_process:
        dist.barrier()
    if w_kd == 0 and w_hidden == 0:
        teacher_model = None  # 'teacher_layers' needed it only to build the student
    # vocabularies: the data's tokenizer(s) (compared by fingerprint) and enough output rows for them
    teacher_fingerprint = meta['teacher_vocab_fingerprint'] if cross_tokenizer else meta['vocab_fingerprint']
    for name, tok, expected in (('student', student_tok, meta['vocab_fingerprint']),
                                ('teacher', teacher_tok if teacher_model is not None else None, teacher_fingerprint)):
        if tok is None and (name == 'student' or teacher_model is not None) and master_process:
            print(f"warning: the {name} ships no tokenizer: whether it reads {data_dir}'s tokens as they were meant could "
                  f"not be checked (only its output rows are); add the tokenizer files to its folder")
        if tok is not None and prepare_data.vocab_fingerprint(tok) != expected:
            fail(f"the {name}'s tokenizer differs from the one {data_dir} was prepared with for it; logit distillation needs "
                 "one shared tokenizer, hidden-state distillation across tokenizers needs prepare_data.py --teacher_tokenizer")
    for name, m, rows in (('student', student_model, vocab),
                          ('teacher', teacher_model, meta.get('teacher_vocab_size', vocab))):
        if m is not None and output_rows(m) < rows:
            fail(f'the {name} has {output_rows(m)} output rows but the tokenizer of {data_dir} has {rows} tokens')
    if teacher_model is not None:
        cast_parameters(teacher_model.to(torch_device).eval().requires_grad_(False), torch.float32 if dtype == 'float16' else ptdtype)

    probe = torch.arange(1, 17)[None]  # 16 tokens every vocabulary has
    heads = [m for m in (student_model, teacher_model if w_kd else None) if m is not None]  # those the loss applies
    chunk = loss_chunk if not loss_chunk or all(plain_head(m, probe.to(m.device)) for m in heads) else 0
    if chunk != loss_chunk and master_process:
        print("note: a model's logits are not its final hidden states times its head (a bias, a logit scale or "
              'multiplier, soft-capping): using the plain loss path (loss_chunk=0)')
    if chunk and device_type == 'cpu':
        keep_freed_memory()  # the chunk loop reallocates the same few (chunk, V) blocks; the plain path would fragment
    loss_settings = {'vocab': vocab, 'weights': (w_ce, w_kd * temperature ** 2), 'kind': kd_kind,
                     'temperature': temperature, 'beta': beta, 'chunk': chunk, 'compile': compile}
    layer_pairs = []
    try:
        if w_hidden > 0:
            layer_pairs = make_layer_pairs(layer_map, student_model.config.num_hidden_layers, teacher_model.config.num_hidden_layers)
        model = Trainable(student_model, loss_settings, layer_pairs, teacher_model.config.hidden_size if layer_pairs else 0,
                          proj_init, hidden_loss, hidden_rms_norm)
    except ConfigError as e:
        fail(e)
    model = model.to(torch_device).train()  # from_pretrained returns models in eval mode
    raw_model = model
    optimizer = configure_optimizer(model, learning_rate, weight_decay, (beta1, beta2))
    iter_num, last_saved, ckpt_dir = 0, None, os.path.join(out_dir, 'ckpt')
    if init_from == 'resume':
        try:
            path, iter_num, problems = find_checkpoint(ckpt_dir)
            state = load_checkpoint(path, raw_model, optimizer, scaler)
        except ConfigError as e:
            fail(e)
        for key in ('batch_size', 'gradient_accumulation_steps', 'seed', 'dataset'):  # they decide the data stream
            if state['config'][key] != config[key]:
                fail(f"{key} was {state['config'][key]!r} when {path} was written, now {config[key]!r}: resume with "
                     f"--{key}={state['config'][key]!r} (the data order depends on it), or start a new out_dir")
        if len(state['rng_states']) != world_size:
            fail(f"the checkpoint was written by {len(state['rng_states'])} ranks; resume with the same number")
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
    if ddp:
        # an MoE student whose experts are separate modules (remote code): an expert that gets no token in a step has no
        # gradient, and DDP must look for such parameters (transformers' own MoE models batch their experts in one)
        per_expert = any(re.search(r'\.experts\.\d+\.', name) for name, _ in student_model.named_parameters())
        model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None, find_unused_parameters=per_expert)

    def all_reduce(*values):
        t = torch.tensor(values, dtype=torch.float64, device=torch_device)
        if ddp:
            dist.all_reduce(t)
        return t.tolist()

    # the teacher's forward: its logits on the plain path, else its final hidden states (the chunked loss
    # applies its head a chunk at a time; hidden-state distillation needs no head at all)
    teacher_head = teacher_model.get_output_embeddings().weight if teacher_model is not None and w_kd > 0 and chunk else None
    teacher_net = None if teacher_model is None else teacher_model if w_kd > 0 and not chunk else teacher_model.base_model

    def run_teacher(X, H):
        """What the loss needs of the teacher: (its logits or final hidden states when w_kd > 0, its head weight
        on the chunked path, its hidden states at the mapped layers when w_hidden > 0)."""
        if teacher_model is None:
            return None
        with torch.no_grad(), ctx:
            out = teacher_net(input_ids=X if H[0] is None else H[0], output_hidden_states=w_hidden > 0)
        final = (out.last_hidden_state if chunk else out.logits) if w_kd > 0 else None
        return final, teacher_head, [out.hidden_states[lt] for _, lt in layer_pairs] if w_hidden > 0 else None

    def batch(split, windows):
        return make_batch(split, windows, block_size, meta['pad_id'], torch_device, meta.get('teacher_eos_id', 0))

    @torch.no_grad()
    def evaluate():  # (through raw_model: DDP's forward would wait for ranks that have no documents to evaluate)
        model.eval()
        docs = val_windows[rank::world_size]
        ce = kd = hid = n = n_hidden = 0.0
        for k in range(0, len(docs), batch_size):
            X, Y, M, H = batch(val_data, docs[k:k + batch_size])
            with ctx:
                _, c, d, h = raw_model(X, Y, M, run_teacher(X, H), H)

            ce, kd, n = ce + c.item(), kd + d.item(), n + M.sum().item()
            hid, n_hidden = hid + h.item(), n_hidden + len(H[1])
        model.train()
        ce, kd, hid, n, n_hidden = all_reduce(ce, kd, hid, n, n_hidden)
        return ce / max(n, 1), kd / max(n, 1), hid / max(n_hidden, 1)

    def last_good():
        return f'the last checkpoint ({ckpt_dir}, iteration {last_saved}) is intact' if last_saved else 'no checkpoint was written'

    def save(iter_num):
        """A checkpoint, unless something in it is not finite (then stop, keeping the last good one)."""
        if not all(torch.isfinite(p).all() for p in raw_model.parameters()):
            fail(f'non-finite weights at iteration {iter_num}: not checkpointed; {last_good()}')
        states = [None] * world_size
        if ddp:
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if master_process:
            save_checkpoint(os.path.join(out_dir, 'ckpt'), raw_model, optimizer, scaler, iter_num,
                            iter_num * batch_size * gradient_accumulation_steps, states, run_config)

    flops_peak = peak_flops or (989e12 if device_type == 'cuda' else measure_matmul_flops(torch_device))
    run_config = {**config, 'max_iters': iterations, 'loss_chunk': chunk, 'peak_flops': flops_peak}  # what this run used
    if master_process:
        os.makedirs(out_dir, exist_ok=True)
        n_params = sum(p.numel() for p in raw_model.model.parameters())
        print(f'student: {n_params / 1e6:.2f}M parameters; teacher: '
              + (f'{sum(p.numel() for p in teacher_model.parameters()) / 1e6:.2f}M parameters' if teacher_model is not None else 'none'))
        print(f'loss = {w_ce:g} CE' + (f' + {w_kd:g} T^2 {kd_kind} (T={temperature:g})' if w_kd else '')
              + (f' + {w_hidden:g} hidden {hidden_loss}' if w_hidden else '') + (' [across tokenizers]' if cross_tokenizer else ''))
        if layer_pairs:
            print('layer map (student <- teacher, 0 = embedding output, l = block l): '
                  + ', '.join(f'{a}<-{b}' for a, b in layer_pairs)
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
    last_iter = iterations if stop_iter is None else min(stop_iter, iterations)

    while True:  # (the checkpoint a run resumed from was evaluated and written already)
        if (iter_num % eval_interval == 0 or iter_num == last_iter) and iter_num != last_saved:
            if n_val_docs:
                val_ce, val_kd, val_hidden = evaluate()
                if master_process:
                    print(f'iter {iter_num}: val ce {val_ce:.4f}, val kd {val_kd:.4f}, val hidden {val_hidden:.4f}')
                    log_file.write(json.dumps({'iter': iter_num, 'val_ce': val_ce, 'val_kd': val_kd, 'val_hidden': val_hidden}) + '\n')
                    log_file.flush()
                    if wandb_log:
                        wandb.log({'iter': iter_num, 'val/ce': val_ce, 'val/kd': val_kd, 'val/hidden': val_hidden})
                if not all(map(math.isfinite, (val_ce, val_kd, val_hidden))):
                    fail(f'non-finite validation loss at iteration {iter_num} (ce {val_ce}, kd {val_kd}, hidden {val_hidden}): '
                         f'not checkpointed; {last_good()}; lower learning_rate or check the data')
            if iter_num > 0:
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
        # N: supervised targets of the whole step, over every micro-batch and rank (and the hidden-loss positions)
        supervised_tokens, hidden_positions, step_tokens = all_reduce(
            sum(M.sum().item() for _, _, M, _ in micro_batches), sum(len(H[1]) for *_, H in micro_batches),
            sum(X.numel() for X, *_ in micro_batches))
        ce_total = kd_total = hidden_total = 0.0
        for micro_step, (X, Y, M, H) in enumerate(micro_batches):
            if ddp:
                model.require_backward_grad_sync = micro_step == len(micro_batches) - 1
            with ctx:
                weighted, ce_sum, kd_sum, h_sum = model(X, Y, M, run_teacher(X, H), H)
            loss = weighted / max(supervised_tokens, 1) + w_hidden * h_sum / max(hidden_positions, 1)
            scaler.scale(loss * world_size).backward()  # DDP averages gradients over ranks; the sum is wanted
            ce_total, kd_total, hidden_total = ce_total + ce_sum, kd_total + kd_sum, hidden_total + h_sum.detach()
        ce_total, kd_total, hidden_total = all_reduce(float(ce_total), float(kd_total), float(hidden_total))
        ce_mean, kd_mean = ce_total / max(supervised_tokens, 1), kd_total / max(supervised_tokens, 1)
        hidden_mean = hidden_total / max(hidden_positions, 1)
        loss_value = total_loss(ce_mean, kd_mean, hidden_mean, (w_ce, w_kd, w_hidden), temperature)
        if not math.isfinite(loss_value):
            fail(f'non-finite loss at iteration {iter_num} (ce {ce_mean}, kd {kd_mean}, hidden {hidden_mean}): {last_good()}; '
                 'lower learning_rate, check the data, or use bfloat16 instead of float16')
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float('inf')).item()
        if not math.isfinite(grad_norm) and not scaler.is_enabled():  # (float16's GradScaler skips such a step itself)
            fail(f'non-finite gradient norm at iteration {iter_num}: the step was not applied; {last_good()}; '
                 'lower learning_rate or check the data')
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if device_type == 'cuda':
            torch.cuda.synchronize()
        dt = time.time() - t0
        if master_process and iter_num % log_interval == 0:
            seq = step_tokens / (batch_size * gradient_accumulation_steps)
            flops = flops_per_token(raw_model.model, seq, True) + (flops_per_token(teacher_model, seq, False) if teacher_model is not None else 0)
            tok_s = step_tokens / dt
            mfu = flops * tok_s / (flops_peak * world_size)
            print(f'iter {iter_num}: loss {loss_value:.4f}, ce {ce_mean:.4f}, kd {kd_mean:.4f}, hidden {hidden_mean:.4f}, '
                  f'lr {lr:.2e}, grad norm {grad_norm:.3f}, {dt * 1000:.0f} ms, {tok_s:,.0f} tok/s, mfu {mfu * 100:.1f}%')
            record = {'iter': iter_num, 'loss': loss_value, 'ce': ce_mean, 'kd': kd_mean, 'hidden': hidden_mean, 'lr': lr,
                      'grad_norm': grad_norm, 'ms': dt * 1000, 'tokens_per_s': tok_s, 'mfu': mfu}
            log_file.write(json.dumps(record) + '\n')
            log_file.flush()
            if wandb_log:
                wandb.log(record)
        iter_num += 1

    if master_process and export:
        folder = os.path.join(out_dir, 'student')
        raw_model.model.save_pretrained(folder)  # the student alone: projections are training machinery
        export_tok = student_tok or model_tokenizer(meta['tokenizer'])
        if export_tok is not None and hasattr(export_tok, 'save_pretrained'):
            export_tok.save_pretrained(folder)
        print(f'exported the student to {folder}')
    if ddp:  # tear down together, after rank 0's export: a rank that exited while a peer still ran its
        dist.barrier()  # gloo connections once aborted at exit in CI ('terminate called without an active exception')
        dist.destroy_process_group()
