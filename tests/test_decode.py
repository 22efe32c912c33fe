"""The rollout sampler (kd/decode.py): draws against the brute-force distribution, the decode step's logits against
the model's own forward, and replies replayed token by token from a full forward per token."""
import pytest, torch
import transformers as T
from conftest import BYTES_VOCAB, tiny_model
from kd import decode, lora

def nucleus(z, temperature, top_p):
    """Brute force, float64: softmax(z / T), the tokens in order of probability kept while the mass before them is
    under top_p, renormalised. Returns (the tokens in that order, their probabilities)."""
    p = torch.softmax(z.double() / temperature, -1)
    order = sorted(range(len(p)), key=lambda i: -p[i].item())
    kept, before = [], 0.0
    for i in order:
        if before < top_p:
            kept.append(i)
        before += p[i].item()
    q = p[kept] / p[kept].sum()
    return kept, q

@pytest.mark.parametrize('temperature,top_p,first_k', [(1.0, 1.0, 1024), (0.7, 1.0, 1024), (1.3, 0.8, 1024),
                                                       (1.0, 0.3, 1024), (1.0, 0.95, 2)])
def test_draws_invert_the_brute_force_cdf(monkeypatch, temperature, top_p, first_k):
    """For any u, the token drawn is the first of the brute-force nucleus (in order of probability; the vocabulary's
    own order at top_p = 1) whose cumulative mass exceeds u; 100,000 draws match the probabilities within 5 SE.
    first_k = 2: the nucleus is larger than the first top-k looked at (it grows)."""
    monkeypatch.setattr(decode, 'FIRST_K', first_k)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(9, generator=g) * 2
    kept, q = nucleus(z, temperature, top_p)
    order = kept if top_p < 1 else list(range(9))
    probs = q if top_p < 1 else torch.softmax(z.double() / temperature, -1)
    n = 100_000
    u = torch.rand((n, 1), generator=g, dtype=torch.float64)
    got = decode.draw(z.expand(n, -1), temperature, top_p, u)
    cdf = probs.cumsum(0)
    want = torch.tensor(order)[torch.searchsorted(cdf, u[:, 0].contiguous(), right=True).clamp(max=len(order) - 1)]
    assert torch.equal(got, want)
    counts = torch.bincount(got, minlength=9).double() / n
    full = torch.zeros(9, dtype=torch.float64)
    full[order] = probs
    se = (full * (1 - full) / n).sqrt()
    assert ((counts - full).abs() <= 5 * se + 1e-12).all() and (counts[full == 0] == 0).all()
    assert top_p == 1 or len(kept) < 9  # (the cut is exercised)

def qwen3(vocab=BYTES_VOCAB, hidden=32, layers=2, heads=4, seed=0):
    torch.manual_seed(seed)
    cfg = T.Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=heads // 2, head_dim=16,
                        max_position_embeddings=512)
    return T.AutoModelForCausalLM.from_config(cfg).float()

def student(arch):
    if arch == 'qwen3':
        return qwen3(seed=1).eval()
    if arch in ('lfm2', 'mamba'):  # (a hybrid with convolution layers, a recurrent one: through generate)
        torch.manual_seed(1)
        config = T.Lfm2Config(vocab_size=BYTES_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, layer_types=['conv', 'full_attention']) \
            if arch == 'lfm2' else T.MambaConfig(vocab_size=BYTES_VOCAB, hidden_size=32, num_hidden_layers=2)
        return T.AutoModelForCausalLM.from_config(config).float().eval()
    model = tiny_model(arch='llama' if arch == 'lora' else arch, hidden=32, layers=2, heads=4, seed=1).eval()
    if arch == 'lora':  # (adapters that moved: B nonzero, merged into the decode step's weights)
        lora.add_lora(model, 4, 8.0, 0.0, ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj',
                                            'down_proj'], torch.float32)
        for m in model.modules():
            if isinstance(m, lora.LoRALinear):
                torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    return model

def padded(prompts, new):
    """prompts left-padded as decode.generate lays them out: (ids, valid keys, positions)."""
    width = max(map(len, prompts))
    P = torch.zeros((len(prompts), width), dtype=torch.long)
    valid = torch.ones((len(prompts), width + new), dtype=torch.bool)
    for i, p in enumerate(prompts):
        P[i, width - len(p):], valid[i, :width - len(p)] = p, False
    return P, valid, (valid[:, :width].long().cumsum(1) - 1).clamp(min=0)

PROMPTS = [torch.tensor([72, 105, 33, 10, 97]), torch.tensor([97, 98]), torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])]

@pytest.mark.parametrize('arch', ['llama', 'qwen2', 'qwen3', 'lora'])
def test_decode_step_equals_the_models_forward(arch):
    """Left-padded prompts of three lengths, then 4 tokens fed one at a time (a row leaving the batch after the
    second): the decode step's logits at each step equal the model's forward on the whole unpadded row in fp32, over
    the real vocabulary (the head's rows past it are never computed)."""
    model, vocab = student(arch), BYTES_VOCAB - 3
    assert decode.Decoder.reads(model, 64)
    fed = torch.tensor([[65, 66, 67, 68], [69, 70, 71, 72], [73, 74, 75, 76]])
    P, valid, pos = padded(PROMPTS, 4)
    step = decode.Decoder(model, 3, P.shape[1] + 4, vocab)
    rows, z = [0, 1, 2], step(P, pos, valid, 0)
    for t in range(5):
        for k, i in enumerate(rows):
            ids = torch.cat([PROMPTS[i], fed[i, :t]])[None]
            want = model(input_ids=ids).logits[0, -1, :vocab]
            assert torch.allclose(z[k], want, atol=1e-5, rtol=0), (arch, t, (z[k] - want).abs().max())
        if t == 4:
            break
        if t == 2:  # (row 1 finished: the batch shrinks)
            keep = torch.tensor([0, 2])
            rows, pos, valid = [0, 2], pos[keep], valid[keep]
            step.keep(keep)
        pos = pos[:, -1:] + 1
        z = step(fed[rows, t][:, None], pos, valid, P.shape[1] + t)

def test_decode_step_in_bf16():
    """Under bf16 autocast (on a CPU with bf16 kernels the matrices laid out for oneDNN once) the logits stay
    within bf16's rounding of the fp32 forward's."""
    model, vocab = student('llama'), BYTES_VOCAB
    P, valid, pos = padded(PROMPTS, 1)
    with torch.autocast('cpu', torch.bfloat16):
        z = decode.Decoder(model, 3, P.shape[1] + 1, vocab)(P, pos, valid, 0)
    want = torch.stack([model(input_ids=p[None]).logits[0, -1] for p in PROMPTS])
    assert z.dtype == torch.bfloat16 and (z.float() - want).abs().max() < 0.05 * want.abs().max()

def test_which_models_decode_here():
    """Llama-family students decode through Decoder; GPT-2, and a sliding window shorter than the rows, through
    transformers' generate."""
    assert decode.Decoder.reads(student('qwen2'), 512) and not decode.Decoder.reads(student('gpt2'), 512)
    mistral = T.AutoModelForCausalLM.from_config(T.MistralConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=16))
    assert decode.Decoder.reads(mistral, 16) and not decode.Decoder.reads(mistral, 17)

def replay(model, prompts, limits, temperature, top_p, stop, seed, vocab):
    """The replies brute force: a full forward of each row per token (no cache, no padding), the token the
    brute-force nucleus gives for that step's uniform number of the row."""
    g = torch.Generator().manual_seed(seed)
    rows, done = [p.clone() for p in prompts], [False] * len(prompts)
    for t in range(max(limits)):
        u = torch.rand((len(prompts), 1), generator=g, dtype=torch.float64)
        for i, r in enumerate(rows):
            if done[i]:
                continue
            z = model(input_ids=r[None]).logits[0, -1, :vocab]
            if top_p < 1:
                order, q = nucleus(z, temperature, top_p)
            else:
                order, q = list(range(vocab)), torch.softmax(z.double() / temperature, -1)
            j = min(int(torch.searchsorted(q.cumsum(0), u[i], right=True)), len(order) - 1)
            rows[i] = torch.cat([r, torch.tensor([order[j]])])
            done[i] = order[j] in stop or len(rows[i]) - len(prompts[i]) == limits[i]
    return [r[len(p):] for r, p in zip(rows, prompts)]

@pytest.mark.parametrize('arch,temperature,top_p', [('llama', 1.0, 1.0), ('llama', 0.8, 0.9), ('qwen2', 1.5, 1.0),
                                                    ('gpt2', 1.0, 0.9), ('lora', 1.0, 1.0), ('lfm2', 1.0, 1.0),
                                                    ('mamba', 1.0, 0.9)])
def test_replies_are_the_models_draws(arch, temperature, top_p):
    """generate's replies (each to its first stop token, kept, or its own limit; rows that finish leave the batch, or
    through transformers' generate stay in it) are, token for token, what a full forward per token and the
    brute-force distribution give for the same seed's uniform numbers; another seed, other replies."""
    model, vocab = student(arch), BYTES_VOCAB
    stop, limits = [256, 10], [12, 3, 20]
    got = decode.generate(model, PROMPTS, limits, temperature, top_p, stop, 5, vocab, torch.device('cpu'))
    want = replay(model, PROMPTS, limits, temperature, top_p, stop, 5, vocab)
    assert [r.tolist() for r in got] == [r.tolist() for r in want]
    assert len(got[1]) <= 3 and all(len(r) == n or r[-1] in stop for r, n in zip(got, limits))
    other = decode.generate(model, PROMPTS, limits, temperature, top_p, stop, 6, vocab, torch.device('cpu'))
    assert [r.tolist() for r in other] != [r.tolist() for r in got]
