"""Depth pruning by block influence: student_layers='auto:N' keeps the N teacher blocks that turn the hidden states
most (ShortGPT), checked against a float64 reference and on blocks that are the identity by construction."""
import json
import torch
from conftest import tiny_model
from kd import models
from kd.models import block_influence, choose_blocks
from test_distill import run, work  # noqa: F401 (the fixture)

def batches(vocab=259, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows, n in ((2, 17), (3, 9)):
        X = torch.randint(0, vocab, (rows, n), generator=g)
        M = (torch.rand(rows, n, generator=g) < 0.7).long()
        out.append((X, M))
    return out

def test_influence_is_one_minus_the_mean_cosine_float64():
    """Against the hidden states HF returns (the last block's output read where the final norm takes it: HF returns
    it normalised), the cosine written out."""
    model = tiny_model(layers=4, hidden=32).double().eval()
    got = block_influence(model, batches(), models.blocks(model))
    final = []
    model.model.norm.register_forward_hook(lambda m, args, out: final.append(args[0]))
    sums, count = torch.zeros(4, dtype=torch.float64), 0
    for X, M in batches():
        with torch.no_grad():
            hs = model(input_ids=X, output_hidden_states=True).hidden_states[:-1] + (final[-1],)
        for i in range(4):
            a, b = hs[i][M.bool()], hs[i + 1][M.bool()]
            sums[i] += (1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).sum()
        count += int(M.sum())
    assert torch.allclose(torch.tensor(got, dtype=torch.float64), sums / count, rtol=1e-12, atol=1e-15)
    assert min(got) > 1e-4  # (random blocks turn the states: a test of the identity below can fail)

def test_identity_blocks_are_the_ones_dropped():
    model = tiny_model(layers=6, hidden=32).eval()
    with torch.no_grad():
        for i in (1, 4):  # no attention output, no MLP output: the block passes its input through
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    layers, scores = choose_blocks('auto:4', model, batches(), models.blocks(model))
    assert layers == [0, 2, 3, 5]
    assert max(abs(scores[1]), abs(scores[4])) < 1e-6 < min(scores[i] for i in (0, 2, 3, 5))

def test_auto_layers_in_a_run(work):
    """distill.py prints every block's influence and builds the student from the chosen ones."""
    out = run(work, work / 'auto', '--student_init=teacher_layers', '--student_layers=auto:1', '--max_iters=1', '--distill=none')
    line = next(l for l in out.stdout.splitlines() if l.startswith("student_layers='auto:1'"))
    scores = [float(x.split()[1]) for x in line.split('): ')[1].split(';')[0].split(', ')]
    assert len(scores) == 2 and line.endswith(f'keeping [{max(range(2), key=lambda i: scores[i])}]')
    assert json.load(open(work / 'auto' / 'student' / 'config.json'))['num_hidden_layers'] == 1
