"""
Does a prepared dataset contain the benchmarks' documents? Decodes every training and validation document of
data/<name> with its own tokenizer and counts, per eval.py task, the documents (question + any answer) that share
a run of n words (13, as in GPT-3's contamination study) with it. Exits 1 when one does.

    python scripts/overlap.py data/demo-fortunes --tasks=arc_easy,arc_challenge,piqa,boolq,hellaswag
"""
import argparse, os, re, sys
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from kd.benchmarks import load_documents, task_path
from kd.configurator import ConfigError, DataError, HelpFormatter
from kd.data import check_dataset, load_split
from kd.models import load_tokenizer

def ngrams(text, n):
    words = re.findall(r'[a-z0-9]+', text.lower())
    return {' '.join(words[i:i + n]) for i in range(len(words) - n + 1)}

def overlaps(folder, tasks, n=13):
    """{task: (documents, [indices of the documents sharing an n-gram with the data])}."""
    meta = check_dataset(folder)
    tok = load_tokenizer(meta['tokenizer'])
    seen = set()
    for split in ('train', 'val'):
        data = load_split(folder, split)
        for a, b in zip(data['idx'][:-1], data['idx'][1:]):
            seen |= ngrams(tok.decode([int(t) for t in data['tokens'][a:b]]), n)
    found = {}
    for task in tasks:
        docs = load_documents(task_path(task))
        found[task] = (len(docs), [k for k, d in enumerate(docs) if any(ngrams(c + x, n) & seen for c, x in d['requests'])])
    return found

def main():
    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument('data', help='a prepared dataset folder (prepare_data.py)')
    p.add_argument('--tasks', default='arc_easy,arc_challenge,piqa,boolq,hellaswag', help="eval.py's benchmarks")
    p.add_argument('--n', type=int, default=13, help='words in a shared run')
    args = p.parse_args()
    try:
        found = overlaps(args.data, args.tasks.split(','), args.n)
    except (ConfigError, DataError) as e:
        sys.exit(f'error: {e}')
    for task, (total, hits) in found.items():
        print(f'{task}: {len(hits)} of {total} documents share a {args.n}-word run with {args.data}' + (f' (first: {hits[:5]})' if hits else ''))
    return 1 if any(hits for _, hits in found.values()) else 0

if __name__ == '__main__':
    sys.exit(main())
