"""
The student's replies, token by token (on-policy rows, eval.py's own samples). A Llama-family student (Llama, Qwen2,
Qwen3, Mistral: RMSNorm, rotary attention with grouped key/value heads, a SwiGLU MLP) decodes through its own loop
here: its weights taken once per call in the compute dtype (q, k, v one matrix, gate and up another; LoRA adapters
merged in; on a CPU in bf16, laid out once for oneDNN's kernels rather than at every product), a key/value cache
allocated once for the longest reply, and finished rows dropped from the batch. Any other model decodes through
transformers' generate, greedy over what draw() leaves. Both draw with draw(): exactly softmax(z / T) over the real
vocabulary, cut to its top_p nucleus, one uniform number per row and step from a generator of the caller's seed.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from kd.lora import LoRALinear

FAST = ('llama', 'qwen2', 'qwen3', 'mistral')  # the architectures Decoder reads (others: transformers' generate)
FIRST_K = 1024  # top_p < 1: the nucleus is looked for among the k most likely tokens first (k x 4 until it fits)

def draw(z, temperature, top_p, u):
    """One token per row of the logits z (rows, V) from softmax(z / T) restricted to its top_p nucleus (the most
    likely tokens, fewest first, whose mass reaches top_p; 1: every token), by inverting the CDF in float64: u (rows,
    1) uniform in [0, 1) scaled to the row's mass, the first token whose cumulative mass exceeds it."""
    z = z.double() if temperature == 1 else z.double() / temperature
    index = None
    if top_p < 1:
        lse, k = torch.logsumexp(z, -1, keepdim=True), min(FIRST_K, z.shape[-1])
        while True:  # (the nucleus of a peaked distribution is a few tokens: a full sort of V would cost more)
            top, index = z.topk(k, -1)
            p = (top - lse).exp()
            mass = p.cumsum(-1)
            if k == z.shape[-1] or (mass[:, -1] >= top_p).all():
                break
            k = min(4 * k, z.shape[-1])
        z = top.masked_fill(mass - p >= top_p, float('-inf'))  # (kept: the mass before the token is under top_p)
    c = (z - z.max(-1, keepdim=True).values).exp_().cumsum_(-1)
    j = torch.searchsorted(c, u * c[:, -1:], right=True).clamp_(max=c.shape[-1] - 1)
    return (j if index is None else index.gather(-1, j))[:, 0]

def generate(model, prompts, limits, temperature, top_p, stop, seed, vocab, device):
    """The replies to prompts (a list of 1-d token tensors): row i samples until a token of stop (kept) or limits[i]
    tokens, from the model in the caller's autocast dtype (else its own), seeded by seed alone: each step draws one
    uniform number per row, written or finished, so a row's tokens do not depend on when the others stop. Returns a
    list of 1-d tensors on the CPU."""
    B, width, new = len(prompts), max(map(len, prompts)), max(limits)
    P = torch.zeros((B, width), dtype=torch.long)
    valid = torch.ones((B, width + new), dtype=torch.bool)  # the keys each row attends to (not its left padding)
    for i, p in enumerate(prompts):
        P[i, width - len(p):], valid[i, :width - len(p)] = p, False
    P, valid = P.to(device), valid.to(device)
    generator = torch.Generator(device).manual_seed(seed)
    numbers = lambda: torch.rand((B, 1), generator=generator, dtype=torch.float64, device=device)  # (a step's)
    if Decoder.reads(model, width + new):
        out = decode_loop(Decoder(model, B, width + new, vocab), P, valid, limits, temperature, top_p, stop, numbers)
    else:
        out = by_generate(model, P, valid[:, :width], new, temperature, top_p, stop, numbers, vocab)
    replies = []
    for r, n in zip(out.cpu(), limits):
        stops = torch.isin(r[:n], torch.tensor(stop, dtype=torch.long)).nonzero()
        replies.append(r[:int(stops[0]) + 1 if len(stops) else n])
    return replies

def decode_loop(step, P, valid, limits, temperature, top_p, stop, numbers):
    """Decoder's replies (rows, max(limits)): the prompts' forward, then a token at a time; finished rows leave."""
    B, width = P.shape
    rows = torch.arange(B, device=P.device)  # the rows still writing
    stop, limits = torch.tensor(stop, dtype=torch.long, device=P.device), torch.tensor(limits, device=P.device)
    out = torch.zeros((B, int(limits.max())), dtype=torch.long, device=P.device)
    pos = (valid[:, :width].long().cumsum(1) - 1).clamp(min=0)  # (each row's positions count from its first token)
    z = step(P, pos, valid, 0)
    for t in range(out.shape[1]):
        out[rows, t] = token = draw(z, temperature, top_p, numbers()[rows])
        done = torch.isin(token, stop) | (t + 1 >= limits[rows])
        if done.all():
            break
        if done.any():  # (finished rows leave the batch)
            keep = (~done).nonzero()[:, 0]
            rows, token, pos, valid = rows[keep], token[keep], pos[keep], valid[keep]
            step.keep(keep)
        pos = pos[:, -1:] + 1
        z = step(token[:, None], pos, valid, width + t)
    return out

def by_generate(model, P, mask, new, temperature, top_p, stop, numbers, vocab):
    """Any other model's replies (rows, <= new): transformers' generate, which knows each architecture's cache and
    masks (recurrent and convolutional layers too), greedy over the scores draw() leaves at each step: 0 for the
    token it drew, -inf elsewhere."""
    from transformers import GenerationConfig, LogitsProcessor
    class Drawn(LogitsProcessor):
        def __call__(self, ids, scores):
            token = draw(scores[:, :vocab], temperature, top_p, numbers())
            return torch.full_like(scores, float('-inf')).scatter_(1, token[:, None], 0.0)
    shipped = model.generation_config
    model.generation_config = GenerationConfig()  # (else generate adds what generation_config.json sets: a
    try:                                          # repetition penalty, min_p, ...)
        out = model.generate(input_ids=P, attention_mask=mask.long(), do_sample=False, max_new_tokens=new,
                             eos_token_id=list(stop) or None, pad_token_id=0, logits_processor=[Drawn()])
    finally:
        model.generation_config = shipped
    return out[:, P.shape[1]:]

class Decoder:
    """A Llama-family student's decode step (reads(model) says which): the blocks as the model computes them, from
    weights taken once in the compute dtype, with a preallocated key/value cache of T positions for B rows."""
    @staticmethod
    def reads(model, T):
        c, base = model.config, getattr(model, 'model', None)
        window = getattr(c, 'sliding_window', None) if getattr(c, 'use_sliding_window', True) else None
        return (c.model_type in FAST and getattr(c, 'hidden_act', None) == 'silu' and (window is None or T <= window)
                and hasattr(base, 'layers') and hasattr(base, 'rotary_emb') and hasattr(base.norm, 'variance_epsilon')
                and all(isinstance(m, (nn.Linear, LoRALinear)) for n, m in model.named_modules()
                        if n.endswith(('_proj', 'lm_head'))))

    @torch.no_grad()
    def __init__(self, model, B, T, vocab):
        head = model.lm_head.weight
        on = torch.is_autocast_enabled(head.device.type)
        self.dtype = torch.get_autocast_dtype(head.device.type) if on else head.dtype
        pack = head.device.type == 'cpu' and self.dtype == torch.bfloat16 and \
            torch.ops.mkldnn._is_mkldnn_bf16_supported()
        def linear(weights, biases=None):  # these layers' products side by side, one matrix in the compute dtype
            w = (torch.cat(weights) if len(weights) > 1 else weights[0]).to(self.dtype)
            b = None if biases is None else torch.cat(biases).to(self.dtype)
            if pack:  # (oneDNN would lay out a bf16 matrix again at every product: here once)
                w = torch.ops.mkldnn._reorder_linear_weight(w, B)
                return lambda x: torch.ops.mkldnn._linear_pointwise(x, w, b, 'none', [], '')
            return lambda x: F.linear(x, w, b)
        def fused(*layers):
            return linear([weight(m) for m in layers], None if layers[0].bias is None else [m.bias for m in layers])
        self.base, c = model.model, model.config
        self.blocks = [(l.input_layernorm, fused(l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj),
                        getattr(l.self_attn, 'q_norm', None), getattr(l.self_attn, 'k_norm', None),
                        fused(l.self_attn.o_proj), l.post_attention_layernorm, fused(l.mlp.gate_proj, l.mlp.up_proj),
                        fused(l.mlp.down_proj)) for l in self.base.layers]
        self.head = linear([head[:vocab]])  # (the rows past the real vocabulary are padding: never drawn)
        attention = self.base.layers[0].self_attn
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim, self.scaling = attention.head_dim, attention.scaling
        shape = (len(self.blocks), B, self.kv_heads, T, self.head_dim)
        self.k, self.v = (torch.zeros(shape, dtype=self.dtype, device=head.device) for _ in range(2))

    def keep(self, rows):
        self.k, self.v = self.k[:, rows], self.v[:, rows]

    @torch.no_grad()
    def __call__(self, ids, pos, valid, t0):
        """The logits (rows, vocab) after ids (rows, S), written at cache positions t0..t0+S, at rotary positions
        pos; valid (rows, T): the keys that count."""
        with torch.autocast(ids.device.type, enabled=False):  # (the dtypes are set here, one by one)
            return self.forward(ids, pos, valid, t0)

    def forward(self, ids, pos, valid, t0):
        B, S = ids.shape
        t1, hd, H, KV = t0 + S, self.head_dim, self.heads, self.kv_heads
        x = self.base.embed_tokens(ids)
        cos, sin = (c[:, :, None] for c in self.base.rotary_emb(x.to(self.dtype), pos))  # (rows, S, 1, head_dim)
        keys = valid[:, None, None, :t1]
        if S > 1:  # (the prompts: causal, and a padding position attends to itself alone, so no row is empty)
            causal = torch.ones(S, t1, dtype=torch.bool, device=ids.device).tril(t0)
            keys = keys & causal | causal.triu(t0)
        mask = torch.zeros(keys.shape, dtype=self.dtype, device=ids.device).masked_fill_(~keys, float('-inf'))
        for i, (norm1, qkv, q_norm, k_norm, o, norm2, gate_up, down) in enumerate(self.blocks):
            qkv_x = qkv(rms(norm1, x).to(self.dtype)).view(B, S, H + 2 * KV, hd)
            qk, v = qkv_x[:, :, :H + KV], qkv_x[:, :, H + KV:]
            if q_norm is not None:  # (Qwen3: each head normalised before the rotation)
                qk = torch.cat([rms(q_norm, qk[:, :, :H]), rms(k_norm, qk[:, :, H:])], 2)
            qk = rotate(qk, cos, sin).transpose(1, 2)  # (q and k rotated together)
            self.k[i, :, :, t0:t1], self.v[i, :, :, t0:t1] = qk[:, H:], v.transpose(1, 2)
            y = F.scaled_dot_product_attention(qk[:, :H], self.k[i, :, :, :t1], self.v[i, :, :, :t1], attn_mask=mask,
                                               scale=self.scaling, enable_gqa=H != KV)
            x = x + o(y.transpose(1, 2).reshape(B, S, -1))
            g, u = gate_up(rms(norm2, x).to(self.dtype)).chunk(2, -1)
            x = x + down(F.silu(g) * u)
        return self.head(rms(self.base.norm, x[:, -1]).to(self.dtype))

def weight(linear):
    """A linear layer's weight as its forward applies it (a LoRA layer's with its update merged, in float32)."""
    if isinstance(linear, LoRALinear):
        return linear.weight.float() + linear.scale * linear.lora_B.weight.float() @ linear.lora_A.weight.float()
    return linear.weight

def rms(norm, x):
    """An RMSNorm module's output in one kernel (in float32, as the module computes it)."""
    return F.rms_norm(x.float(), (x.shape[-1],), norm.weight.float(), norm.variance_epsilon).to(x.dtype)

def rotate(x, cos, sin):
    """Rotary embedding: x cos + rotate_half(x) sin."""
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), -1) * sin
