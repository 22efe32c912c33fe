"""
What logit distillation across tokenizers compares, on a dataset prepared with --teacher_tokenizer: the share of
supervised targets aligned (both tokenizations end on one byte boundary), where the teacher's probability mass
goes on the student's tokens (models.vocab_map: the same bytes, the longest student prefix, nowhere), and how
often the student's target there is a token the map cannot reach or spans several teacher tokens (what a
chain-rule span merge would add); and the teacher's bits per byte on the same windows' text (all its tokens after
the first: about the text the students' held-out bits per byte are taken on, whose first, unsupervised tokens differ).

    python scripts/cross_vocab.py --data=data/demo-gpt2 --windows=64
"""
import argparse, json, os, sys
import numpy as np
import torch
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from kd.configurator import HelpFormatter
from kd.data import block_windows, load_split, make_batch
from kd.models import demo_tokenizer, load_model, load_tokenizer, token_strings, vocab_map

def main():
    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument('--data', default='data/demo-gpt2', help='a prepare_data.py folder with --teacher_tokenizer')
    p.add_argument('--teacher', default=None, help='the teacher model (default: the packaged SmolLM2-135M)')
    p.add_argument('--windows', type=int, default=64, help='validation windows')
    p.add_argument('--block_size', type=int, default=128)
    args = p.parse_args()
    meta = json.load(open(os.path.join(args.data, 'meta.json')))
    tok_s, tok_t = load_tokenizer(meta['tokenizer']), load_tokenizer(meta['teacher_tokenizer'])
    V_s, V_t = meta['vocab_size'], meta['teacher_vocab_size']
    s_str, t_str = token_strings(tok_s, V_s), token_strings(tok_t, V_t)
    carried = vocab_map(tok_s, tok_t, V_s, V_t, (s_str, t_str))
    same = torch.tensor([c >= 0 and t_str[j] == s_str[c] for j, c in enumerate(carried)])  # (a special: by name)
    kind = torch.where(torch.from_numpy(carried) < 0, 2, torch.where(same, 0, 1))  # 0 same bytes, 1 prefix, 2 none
    compared = np.zeros(V_s, bool)
    compared[carried[carried >= 0]] = True
    teacher = load_model(args.teacher or demo_tokenizer()).eval()
    split = load_split(args.data, 'val')
    windows = block_windows(split, args.block_size)[:args.windows]
    mass, supervised, aligned, reached, spans = torch.zeros(3, dtype=torch.float64), 0, 0, 0, 0
    t_bytes, nll, size = torch.tensor([len(b) for b in t_str]), 0.0, 0
    for k in range(0, len(windows), 8):
        b = make_batch(split, windows[k:k + 8], args.block_size, meta['pad_id'], 'cpu', meta.get('teacher_eos_id', 0))
        with torch.no_grad():
            all_logits = teacher(input_ids=b.align.XT).logits[..., :V_t].double()
        logits = all_logits[b.align.b, b.align.t]
        last = torch.zeros(len(b.X), dtype=torch.long).scatter_reduce_(0, b.align.b, b.align.t, 'amax')  # (its last)
        real = torch.arange(b.align.XT.shape[1] - 1) < last[:, None]  # (what follows is padding)
        targets = b.align.XT[:, 1:]
        ce = torch.nn.functional.cross_entropy(all_logits[:, :-1].transpose(1, 2), targets, reduction='none')
        nll, size = nll + ce[real].sum().item(), size + t_bytes[targets[real]].sum().item()
        mass += torch.zeros(3, dtype=torch.float64).index_add_(0, kind, logits.softmax(-1).sum(0))
        supervised, aligned = supervised + b.M.sum().item(), aligned + len(b.align.b)
        y = b.Y[b.align.b, b.align.s]
        reached += int(compared[y.numpy()].sum())
        # the student's target spans several teacher tokens where the next aligned pair is one student token on
        pairs = {(i, s): t for i, s, t in zip(*(x.tolist() for x in b.align[1:]))}
        spans += sum(1 for (i, s), t in pairs.items() if (i, s + 1) in pairs and pairs[i, s + 1] - t > 1)
    mass /= aligned
    print(f'{args.data}: {len(windows)} validation windows of <= {args.block_size} targets, {supervised:,} supervised')
    print(f'aligned: {aligned / supervised:.1%} of the supervised targets ({aligned:,}); CE alone at the others')
    print(f"the teacher's vocabulary: {int((kind == 0).sum()):,} tokens of the student's bytes, "
          f"{int((kind == 1).sum()):,} carried to a prefix, {int((kind == 2).sum()):,} nowhere; "
          f'{int(compared.sum()):,} of the student\'s {V_s:,} tokens receive mass')
    print(f"the teacher's probability at aligned targets (T = 1): {mass[0]:.1%} on tokens of the student's bytes, "
          f'{mass[1]:.1%} carried to a prefix, {mass[2]:.1%} nowhere')
    print(f"the teacher's bits per byte on the windows' text: {nll / np.log(2) / size:.4f} ({size:,} bytes)")
    print(f"the student's target at aligned targets: a compared token {reached / aligned:.1%}; one token over several "
          f"of the teacher's (followed by an aligned target) {spans / aligned:.1%}")

if __name__ == '__main__':
    main()
