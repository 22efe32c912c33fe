"""
The head loss a chunk of positions at a time (distill.py's loss_chunk): CE and D from the final hidden states, so that
neither model's (positions, V) logits ever exist. What the loss is comes from distill.py, bound once and passed in:
`sums(z, y, zt, weight=...) -> (ce, kd)` is loss_sums with its divergence and compared tokens.
"""
import math
from typing import Callable, NamedTuple
import torch
from kd.models import output_rows, plain_head

def auto_chunk(vocab_rows, compute_dtype):
    """loss_chunk='auto': 1,024 positions; in fp32 the most, a power of two from 256, whose logits stay within 2^26 per
    model. Measured on a 2-core CPU (docs/performance.md): 1,024 beat 256 in bf16 at V = 49,152 and 151,936, in fp32 at
    49,152, and lost in fp32 at 151,936 (256 fastest there, and a quarter of the memory)."""
    if compute_dtype != 'float32':
        return 1024
    return min(1024, max(256, 2 ** int(math.log2(2 ** 26 / vocab_rows))))

def choose_chunk(loss_chunk, models, compute_dtype, probe):
    """The positions per chunk (0: the plain path) and a note where it differs from the setting: the chunked path
    computes logits = final hidden states @ head, so it is taken only where a probe shows that each model whose logits
    the loss reads (models: the student's, the teacher's) computes them so."""
    chunk = auto_chunk(output_rows(models[0]), compute_dtype) if loss_chunk == 'auto' else loss_chunk
    if chunk and not all(plain_head(m, probe) for m in models):
        return 0, ("note: a model's logits are not its final hidden states times its head (a bias, a logit scale or "
                   'multiplier, soft-capping): using the plain loss path (loss_chunk=0)')
    return chunk, None

def chunk_loss(z, y, zt, sums, coef, weight=None, closed_form=None, rows=8):
    """One chunk: sums(z, y, zt, weight=weight) of logits z (in the compute dtype, read in fp32) and, unless coef is
    None, the gradient of coef[0] CE + coef[1] D w.r.t. z in z's dtype, by autograd. closed_form = (T, V) when D is
    forward KL as shipped on z's first V columns: then d CE/dz = softmax(z) - onehot(y), d KL(p || q)/dz = (q - p) / T,
    taken a few rows at a time so that the fp32 temporaries stay in the CPU's cache: one read of z and zt from memory,
    one write of the gradient, three exponentials per logit (autograd on the whole chunk made some twenty passes over
    (n, V) in memory, six exps). On a GPU, 256 rows at a time: no cache to fit, a launch per op, fp32 bounded."""
    fp = torch.float64 if z.dtype == torch.float64 else torch.float32  # never below fp32
    if coef is None:
        return *sums(z.to(fp), y, zt, weight=weight), None
    if closed_form is None or not isinstance(zt, torch.Tensor):  # (any divergence, a cached teacher, a carried one)
        with torch.enable_grad():
            z_fp = z.to(fp).requires_grad_()
            ce, kd = sums(z_fp, y, zt, weight=weight)
            dz, = torch.autograd.grad(coef[0] * ce + coef[1] * kd, z_fp)
        return ce.detach(), kd.detach(), dz.to(z.dtype)
    (T, vocab), tiny = closed_form, torch.finfo(fp).min
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

class HeadLoss(NamedTuple):
    """What ChunkedHeadLoss computes, bound by the caller (distill.py's Trainable)."""
    y: torch.Tensor  # the targets at the rows (-100: none, a token the student wrote)
    teacher: object  # its distribution at the first len(teacher) rows, made a chunk at a time
    # (teacher[a:b].distribution(): kd/teacher.py's Logits, or a cached TopK), or None (CE alone)
    sums: Callable  # sums(z, y, zt, weight=...) -> (ce, kd): distill.py's loss_sums, bound to D and the compared tokens
    coef: tuple  # (c_ce, c_kd): the loss's weights of the two sums, whose gradient is taken; None: values only
    chunk: int  # rows per chunk
    weight: torch.Tensor = None  # each row's weight in D's sum (on-policy's mixture)
    closed_form: tuple = None  # (T, V): forward KL as shipped on the first V columns (chunk_loss)

class ChunkedHeadLoss(torch.autograd.Function):
    """loss.sums(h @ W.T, y, teacher) without a (positions, V) tensor of either model: a chunk of positions at a time.
    Backward would need every chunk's logits again, so each chunk's gradient is taken in forward (chunk_loss) for the
    combination coef[0] CE + coef[1] D that the caller forms from the two outputs, and only the gradients w.r.t. h
    and W (positions x d, V x d) are kept; backward checks that combination and scales them (1/N, the world size,
    the fp16 loss scale). The plain path's matmuls, none repeated. h (n, d): the student's final hidden states at
    the rows (supervised positions), W (V, d) its head, loss a HeadLoss."""
    @staticmethod
    def forward(ctx, h, W, loss):
        y, teacher, sums, coef, chunk, weight, closed_form = loss
        need_grad = coef is not None  # None: values only (evaluation)
        Wc = W.to(h.dtype)  # the head in the compute dtype once, not once per chunk (autocast)
        acc = torch.promote_types(W.dtype, torch.float32)  # the head's gradient accumulated in fp32 at least
        dh, dW = (torch.empty_like(h), torch.zeros_like(W, dtype=acc)) if need_grad else (None, None)
        ce_sum, kd_sum = torch.zeros((), device=h.device), torch.zeros((), device=h.device)
        for a in range(0, len(h), chunk):
            hc = h[a:a + chunk]
            zt = None if teacher is None or a >= len(teacher) else teacher[a:a + chunk].distribution()
            ce, kd, dz = chunk_loss(hc @ Wc.T, y[a:a + chunk], zt, sums, coef,
                                    None if weight is None else weight[a:a + chunk], closed_form)
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
            return dh.zero_(), dW.zero_().to(ctx.head_dtype), None
        scale = g_ce / c_ce if c_ce else g_kd / c_kd
        wanted = scale * torch.tensor([c_ce, c_kd], device=scale.device)
        if not torch.allclose(torch.stack([g_ce, g_kd]).float(), wanted, rtol=1e-4, atol=0):
            raise RuntimeError(f'ChunkedHeadLoss computed the gradient of {c_ce:g} CE + {c_kd:g} D, but the loss '
                               'weighs its outputs otherwise: pass the weights the loss uses as coef')
        return dh.mul_(scale), dW.mul_(scale).to(ctx.head_dtype), None
