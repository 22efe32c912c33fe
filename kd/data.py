"""
What training reads: a prepared dataset's splits (prepare_data.py), the windows and batches a step takes, and the
teacher cache (cache_teacher.py): how its rows are drawn and laid out, and how a batch reads them (TopK).
"""
import json, math, os
from typing import NamedTuple
import numpy as np
import torch
import torch.nn.functional as F
from kd.checkpoint import content_hash, verify_files
from kd.configurator import ConfigError, DataError

# -----------------------------------------------------------------------------
# datasets

KINDS = {'dataset': ('vocab_fingerprint', 'documents'), 'teacher cache': ('teacher', 'splits')}  # their meta.json's

def kind_of(folder):
    """'dataset' (prepare_data.py's), 'teacher cache' (cache_teacher.py's) or None, by the keys of its meta.json
    (complete or not: the files it lists are not checked)."""
    try:
        with open(os.path.join(folder, 'meta.json')) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return next((kind for kind, keys in KINDS.items() if isinstance(meta, dict) and all(k in meta for k in keys)), None)

def foreign(path, kind):
    """What is at path that a new `kind` (a KINDS key) must not replace, in words; None where it may: nothing, an
    empty folder, or a kind of its own, complete or damaged (what writing it again repairs)."""
    if not os.path.lexists(path):
        return None
    if os.path.islink(path) or not os.path.isdir(path):  # (swapping a link out would leave its target as it was)
        return f'a link to {os.readlink(path)}' if os.path.islink(path) else 'a file'
    found, names = kind_of(path), sorted(os.listdir(path))
    if found or not names:
        return None if found in (kind, None) else f'a {found}'
    if 'manifest.json' in names:
        return 'a checkpoint (distill.py)'
    return 'a folder holding ' + ', '.join(names[:3]) + (f' and {len(names) - 3} more' if len(names) > 3 else '')

def check_dataset(folder):
    """meta.json of a complete prepared dataset (every file it lists, at its size), else DataError in one line."""
    path = os.path.join(folder, 'meta.json')
    if not os.path.isfile(path):
        raise DataError(f'no prepared dataset in {folder}: run prepare_data.py first (python prepare_data.py for the '
                        'demo)')
    try:
        with open(path) as f:
            meta = json.load(f)
    except (ValueError, OSError) as e:
        raise DataError(f'{path} is unreadable ({e}): run prepare_data.py again')
    problem = verify_files(folder, meta['files']) if 'files' in meta else f'{path} lists no files'
    if problem:
        raise DataError(f'{folder} is incomplete: {problem}; run prepare_data.py again')
    return meta


def load_split(folder, split):
    """A split as a dict of arrays; with a cross-tokenizer dataset, or one with a teacher context, also the teacher's
    tokens and the aligned position pairs (see prepare_data.py)."""
    meta = json.load(open(os.path.join(folder, 'meta.json')))
    path = lambda name: os.path.join(folder, f'{split}{name}.bin')
    memmap = lambda f, dtype: np.memmap(f, dtype=dtype, mode='r') if os.path.getsize(f) else np.zeros(0, dtype)
    data = {'tokens': memmap(path(''), meta['dtype']), 'mask': memmap(path('_mask'), np.uint8),
            'idx': np.fromfile(path('_idx'), dtype=np.int64), 'bos': meta.get('bos_id'),
            'teacher_bos': meta.get('teacher_bos_id')}
    if 'routes' in meta:  # each document's teacher (prepare_data.py --route)
        data['route'] = np.fromfile(path('_route'), dtype=np.uint8)
    if 'teacher_tokenizer' in meta or 'teacher_context' in meta:  # (the teacher reads its own rows)
        data['teacher'] = memmap(path('_teacher'), meta['teacher_dtype'])
        data['teacher_idx'] = np.fromfile(path('_teacher_idx'), dtype=np.int64)
        data['align'] = np.fromfile(path('_align'), dtype=np.int32).reshape(-1, 2)
        data['align_idx'] = np.fromfile(path('_align_idx'), dtype=np.int64)
    return data

def window_bos(split, block_size):
    """The BOS id that begins every later window of a document, or None: datasets whose tokenizer puts BOS before
    each sequence (Llama, Gemma: prepare_data.py's bos_id) get it, as a model that needs BOS reads a window without
    it off-distribution."""
    return split.get('bos') if block_size > 1 else None

def block_windows(split, block_size):
    """(document, start) of every window that holds a supervised target. A document d of n tokens is read in
    windows X = d[s:s + B], Y = d[s + 1:s + B + 1], s = 0, B, 2B, ..., so every target is trained on once and
    no window crosses a document boundary (a later window's first targets see less context than one long pass).
    With a BOS (window_bos) a later window is X = [BOS] + d[s:s + B - 1], Y = d[s:s + B] with d[s] (the previous
    window's last target) unsupervised: B - 1 new targets, s = 0, B, 2B - 1, 3B - 2, ..."""
    idx, B = split['idx'], block_size
    later = B - (window_bos(split, B) is not None)  # targets of each window after the first
    n = np.diff(idx)
    count = np.where(n > 1, 1 + np.maximum(0, -(-(n - 1 - B) // later)), 0)
    doc = np.repeat(np.arange(len(count)), count)
    k = np.arange(len(doc)) - np.repeat(np.cumsum(count) - count, count)  # the window's number in its document
    start = np.where(k > 0, B + (k - 1) * later, 0)
    if not len(doc):
        return np.zeros((0, 2), np.int64)
    # supervised targets per window: its targets idx[d] + s + 1 .. run up to the next window's (the gap between
    # documents is a first token, never a target)
    supervised = np.add.reduceat(np.asarray(split['mask']), idx[doc] + start + 1, dtype=np.int64)
    return np.stack([doc, start], 1)[supervised > 0]

def doc_order(position, count, n_docs, seed):
    """Document ids at [position, position + count) of the stream: epoch e is a permutation seeded by seed + e."""
    out = []
    while len(out) < count:
        epoch, k = divmod(position + len(out), n_docs)
        out.extend(np.random.default_rng(seed + epoch).permutation(n_docs)[k:k + count - len(out)].tolist())
    return out

def step_doc_ids(iter_num, batch_size, grad_accum, rank, world, n_docs, seed):
    """This rank's micro-batches of step iter_num: the step takes batch_size * grad_accum documents of the
    stream, micro-batch j of them goes to rank j % world."""
    step = doc_order(iter_num * batch_size * grad_accum, batch_size * grad_accum, n_docs, seed)
    return [step[j * batch_size:(j + 1) * batch_size] for j in range(rank, grad_accum, world)]

class TopK:
    """A teacher's next-token distribution kept sparse (cache_teacher.py writes it): at each position the ids and
    T = 1 log-probabilities of its k most likely tokens followed by m tokens drawn from the others (the tail), log
    sum_tail p^(1/T) at the training T (-inf when k = V), and each drawn token's log weight, -log(m r) with r its
    chance of being drawn. Indexed by positions like a tensor: [keep], [a:b]."""
    def __init__(self, ids, logp, tail, logw):
        self.ids, self.logp, self.tail, self.logw = ids, logp, tail, logw  # (..., k + m), (..., k + m), (...), (..., m)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return TopK(self.ids[i], self.logp[i], self.tail[i], self.logw[i])

    def distribution(self):  # (what the loss reads, as of kd/teacher.py's Logits: itself, sparse)
        return self

    @staticmethod
    def from_rows(ids, logp, tail, drawn_tail, samples, sample_temperature):
        """From a cache's rows: tail at the training T, drawn_tail at the temperature Ts the tokens were drawn at, where
        a drawn token's chance is r = p^(1/Ts) / sum_tail p^(1/Ts)."""
        log_r = logp[..., ids.shape[-1] - samples:] / sample_temperature - drawn_tail[..., None]
        logw = -math.log(max(samples, 1)) - log_r
        return TopK(ids, logp, tail, logw)

class Align(NamedTuple):
    """Where the hidden-state loss is taken: student position s of row b pairs with teacher position t, at supervised
    positions only. XT is the teacher's own input across tokenizers, else None (it reads X)."""
    XT: torch.Tensor
    b: torch.Tensor
    s: torch.Tensor
    t: torch.Tensor

class Batch(NamedTuple):
    X: torch.Tensor  # (rows, L) input tokens, right-padded
    Y: torch.Tensor  # (rows, L) targets
    M: torch.Tensor  # (rows, L) 1 where Y is a supervised target
    align: Align
    topk: TopK = None  # the teacher's cached distribution at the supervised targets (teacher_cache), else None
    pos: torch.Tensor = None  # (rows, L) position ids of packed rows (pack): each window counts from 0; None: 0, 1, ...
    teacher_pos: torch.Tensor = None  # the same for XT (packed across tokenizers)
    sampled: torch.Tensor = None  # (rows, L) True where the target is a token the student wrote (on-policy); None: none
    docs: np.ndarray = None  # each row's document (make_batch; None once packed)
    route: torch.Tensor = None  # (rows, L) the teacher of each position's document (data with routes), else None

    def labeled(self):
        """True at the supervised targets that have a hard label: the data's own tokens, not the student's."""
        return self.M.bool() if self.sampled is None else self.M.bool() & ~self.sampled

def make_batch(split, windows, block_size, pad_id, device, teacher_pad_id=0):
    """A Batch of some (document, start) windows (block_windows). No attention mask is needed: causal attention
    never lets a real token see the padding after it, and M is 0 on padding."""
    idx, bos = split['idx'], window_bos(split, block_size)
    docs, lead = [], []  # lead: 1 where a later window begins with BOS (block_windows)
    for d, s in windows:
        lead.append(int(s > 0 and bos is not None))
        a, b = idx[d] + s, min(idx[d] + s + block_size + 1 - lead[-1], idx[d + 1])
        t, m = np.asarray(split['tokens'][a:b], dtype=np.int64), np.asarray(split['mask'][a:b], dtype=np.int64)
        docs.append((np.concatenate([[bos], t]), np.concatenate([[0, 0], m[1:]])) if lead[-1] else (t, m))
    L = max(len(t) for t, _ in docs) - 1
    X = torch.full((len(docs), L), pad_id, dtype=torch.long)
    Y = torch.zeros((len(docs), L), dtype=torch.long)
    M = torch.zeros((len(docs), L), dtype=torch.long)
    for i, (t, m) in enumerate(docs):
        n = len(t) - 1
        X[i, :n], Y[i, :n], M[i, :n] = torch.from_numpy(t[:-1]), torch.from_numpy(t[1:]), torch.from_numpy(m[1:])
    if 'teacher' in split:
        pairs, rows, ti, tbos = [], [], split['teacher_idx'], split.get('teacher_bos')
        for i, (d, s) in enumerate(windows):
            p = split['align'][split['align_idx'][d]:split['align_idx'][d + 1]].astype(np.int64)
            # the teacher starts where the student's window does, or at the last shared boundary before it, each
            # after its own BOS when it begins a later window
            before = p[p[:, 0] < s]
            t0 = int(before[-1, 1]) + 1 if s and len(before) else 0
            t_lead = int(t0 > 0 and tbos is not None)
            p = p[(p[:, 0] >= s) & (p[:, 0] < s + len(docs[i][0]) - 1 - lead[i])] - [s - lead[i], t0 - t_lead]
            p = p[M[i, p[:, 0]].numpy() == 1]
            pairs.append(np.column_stack([np.full(len(p), i), p]))
            length = int(p[:, 1].max()) + 1 if len(p) else 1
            own = np.asarray(split['teacher'][ti[d] + t0:ti[d] + t0 + length - t_lead], dtype=np.int64)
            rows.append(np.concatenate([[tbos], own]) if t_lead else own)
        XT = torch.full((len(docs), max(len(r) for r in rows)), teacher_pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            XT[i, :len(r)] = torch.from_numpy(r)
        b, s, t = torch.from_numpy(np.concatenate(pairs)).T
        align = Align(XT.to(device), b.to(device), s.to(device), t.to(device))
    else:
        b, s = M.nonzero(as_tuple=True)
        align = Align(None, b.to(device), s.to(device), s.to(device))
    topk = None
    if 'topk' in split:  # a teacher cache: its rows are the split's supervised targets in order, a window's consecutive
        c = split['topk']
        rows = np.concatenate([c['first'][np.searchsorted(c['starts'], idx[d] + s)] + np.arange(n)
                               for (d, s), n in zip(windows, M.sum(1).tolist())])
        keep, ids = M.bool(), c['ids'][rows].astype(np.int64)
        if ids.size and not 0 <= ids.min() <= ids.max() < c['vocab']:  # (a file changed in place at its size)
            raise DataError(f"{c['ids_file']} holds token id {ids.max()} for a vocabulary of {c['vocab']}: the cache "
                            'is damaged; write it again with scripts/cache_teacher.py')
        t = TopK.from_rows(torch.from_numpy(ids),
                           torch.from_numpy(c['logp'][rows].astype(np.float32)), torch.from_numpy(c['tail'][rows]),
                           torch.from_numpy(c['drawn_tail'][rows]), c['samples'], c['sample_temperature'])
        laid_out = lambda x: torch.zeros(*M.shape, *x.shape[1:], dtype=x.dtype).index_put_((keep,), x).to(device)
        topk = TopK(*map(laid_out, (t.ids, t.logp, t.tail, t.logw)))
    docs = np.asarray(windows)[:, 0]
    route = None if 'route' not in split else \
        torch.from_numpy(split['route'][docs].astype(np.int64))[:, None].expand(M.shape).contiguous().to(device)
    return Batch(X.to(device), Y.to(device), M.to(device), align, topk, docs=docs, route=route)

def kept_lengths(M):
    """Each row's positions up to and including its last supervised target (0 for a row with none): what a causal
    model's losses read, so what packing keeps and what counts as real tokens."""
    return (M.shape[1] - M.flip(1).argmax(1)) * M.any(1)

def pack_rows(batch, block_size, pad_id, teacher_pad_id=0):
    """The batch with its rows packed several to a row of <= block_size positions, each window attending only to
    itself: its position ids restart at 0 (Batch.pos), from which the model's attention builds the block-diagonal
    causal mask (HF transformers does so when there is no attention mask and no KV cache; models.packs checks that a
    model does). A row is kept up to its last supervised target (a causal model's outputs there never depend on the
    tokens after it) and placed by first fit, longest first; its teacher row (XT, across tokenizers) goes into the
    same packed row after those of the rows before it. Every (rows, L, ...) tensor moves with its positions, so the
    losses are the unpacked batch's. The batch comes back unchanged when no two rows fit in one."""
    M, align = batch.M, batch.align
    n = kept_lengths(M).tolist()
    place, fill = {}, []  # row -> (packed row, offset); the packed rows' lengths
    for i in sorted((i for i in range(len(n)) if n[i]), key=lambda i: -n[i]):
        r = next((r for r, f in enumerate(fill) if f + n[i] <= block_size), len(fill))
        fill += [0] * (r == len(fill))
        place[i], fill[r] = (r, fill[r]), fill[r] + n[i]
    if len(fill) >= len(n):
        return batch
    order = sorted(place, key=place.get)  # (packed row, offset) order: the supervised targets' order in the packed M
    cross = align.XT is not None
    if cross:  # the teacher's own row lengths, and its offsets in the packed rows
        m = torch.zeros(len(n), dtype=torch.long, device=M.device).scatter_reduce_(0, align.b, align.t + 1, 'amax')
        t_place, t_fill = {}, [0] * len(fill)
        for i in order:
            t_place[i], t_fill[place[i][0]] = (place[i][0], t_fill[place[i][0]]), t_fill[place[i][0]] + m[i].item()

    def move(t, where, lengths, width, value):
        """t (rows, L, ...) laid out as (packed rows, width, ...): row i's first lengths[i] positions at where[i]."""
        src = torch.cat([i * t.shape[1] + torch.arange(lengths[i]) for i in order]).to(t.device)
        dst = torch.cat([where[i][0] * width + where[i][1] + torch.arange(lengths[i]) for i in order]).to(t.device)
        out = torch.full((len(fill) * width, *t.shape[2:]), value, dtype=t.dtype, device=t.device)
        out[dst] = t.flatten(0, 1)[src]
        return out.view(len(fill), width, *t.shape[2:])

    def positions(where, width):  # each window counts from 0; a packed row's padding counts on from its last window
        pos = torch.arange(width, device=M.device).repeat(len(fill), 1)
        for i in order:
            pos[where[i][0], where[i][1]:] -= pos[where[i][0], where[i][1]].clone()
        return pos

    width = max(fill)
    X, Y, M = (move(t, place, n, width, v) for t, v in zip(batch[:3], (pad_id, 0, 0)))
    lookup = lambda where, k: torch.tensor([where.get(i, (0, 0))[k] for i in range(len(n))], device=M.device)
    b, s = lookup(place, 0)[align.b], lookup(place, 1)[align.b] + align.s
    XT = teacher_pos = None
    t = s
    if cross:
        t_width = max(max(t_fill), 1)
        XT, teacher_pos = move(align.XT, t_place, m.tolist(), t_width, teacher_pad_id), positions(t_place, t_width)
        t = lookup(t_place, 1)[align.b] + align.t
    topk = None if batch.topk is None else TopK(*(move(x, place, n, width, 0) for x in (batch.topk.ids, batch.topk.logp,
                                                                         batch.topk.tail, batch.topk.logw)))
    sampled = None if batch.sampled is None else move(batch.sampled, place, n, width, False)
    route = None if batch.route is None else move(batch.route, place, n, width, 0)
    return Batch(X, Y, M, Align(XT, b, s, t), topk, positions(place, width), teacher_pos, sampled, route=route)


# -----------------------------------------------------------------------------
# the teacher cache


def top_k(logits, k, temperatures, samples=0, generator=None):
    """(ids (n, k + samples), their T = 1 log-probabilities, (n, len(temperatures)) log sum_tail p^(1/T)) from logits
    (n, V) of the real vocabulary, in fp32 (fp64 stays): the k most likely tokens, then samples tokens drawn from the
    tail (the others) with probabilities proportional to p^(1/T) at the highest T. The draws invert the tail's CDF in
    float64: torch.multinomial sums fp32 chances, so tokens below its precision (~6e-8 of the running sum) were
    never drawn, while their weights 1/(m r) assume they are."""
    logp = F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
    values, ids = logp.topk(k, dim=-1)
    tail = logp.scatter(-1, ids, -float('inf'))
    if samples:
        cdf = F.softmax(tail.double() / max(temperatures), dim=-1).cumsum(-1)
        u = torch.rand(len(cdf), samples, dtype=torch.float64, generator=generator, device=cdf.device) * cdf[:, -1:]
        drawn = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)  # (a top-k token: never)
        ids, values = torch.cat([ids, drawn], -1), torch.cat([values, logp.gather(-1, drawn)], -1)
    return ids, values, torch.stack([torch.logsumexp(tail / t, dim=-1) for t in temperatures], -1)


def data_hash(folder, split):
    """The fingerprint of a split's token, mask and offset arrays: what a teacher cache was computed from."""
    return content_hash([os.path.join(folder, f'{split}{name}.bin') for name in ('', '_mask', '_idx')])

def cache_rows(split, block_size):
    """A teacher cache's row layout: the split's windows, each one's first token position, first row and row count
    (its supervised targets; rows follow the split's order)."""
    windows = block_windows(split, block_size)
    starts = split['idx'][windows[:, 0]] + windows[:, 1]
    counts = np.add.reduceat(np.asarray(split['mask']), starts + 1, dtype=np.int64) if len(starts) else \
        np.zeros(0, np.int64)
    return windows, starts, np.cumsum(counts) - counts, counts

def attach_topk(split, name, folder, data_dir, block_size, temperature):
    """Add a teacher cache's rows (cache_teacher.py) to a split loaded by load_split, after checking that they were
    written for this split, its windows and this temperature; make_batch then reads them (Batch.topk)."""
    cache = os.path.join(folder, 'meta.json')
    try:
        with open(cache) as f:
            m = json.load(f)
        problem = verify_files(folder, m['files'])
    except (OSError, ValueError, KeyError) as e:
        problem = f'{cache} is missing or unreadable ({type(e).__name__})'
    if problem:
        raise ConfigError(f'teacher_cache {folder} is not a complete cache: {problem}; write it with scripts/cache_teacher.py')
    fix = f'write a cache for it with scripts/cache_teacher.py --dataset={data_dir} --block_size={block_size}'
    if name not in m['splits']:
        raise ConfigError(f'teacher_cache {folder} has no {name} split: {fix}')
    if m['splits'][name]['data_hash'] != data_hash(data_dir, name):
        raise ConfigError(f'teacher_cache {folder} was written for other data than {data_dir} ({name} split '
                          f'differs): {fix}')
    if m.get('bos_windows', False) != (window_bos(split, block_size) is not None):
        raise ConfigError(f'teacher_cache {folder} was written before later windows began with BOS: {fix}')
    if m['block_size'] != block_size:
        raise ConfigError(f"teacher_cache {folder} was written for block_size={m['block_size']}, not {block_size} "
                          f"(the teacher's context differs): set block_size={m['block_size']} or {fix}")
    if temperature not in m['temperatures']:
        raise ConfigError(f"teacher_cache {folder} holds the tail for temperatures {m['temperatures']}, not "
                          f"{temperature:g}: {fix} --temperatures="
                          + ','.join(f'{t:g}' for t in m['temperatures'] + [temperature]))
    rows, width, tails = m['splits'][name]['rows'], m['k'] + m['samples'], m['temperatures']
    memmap = lambda f, dtype, shape: np.memmap(os.path.join(folder, f'{name}_{f}.bin'), dtype=dtype, mode='r',
                                               shape=shape) if rows else np.zeros(shape, dtype)
    _, starts, first, counts = cache_rows(split, block_size)
    if counts.sum() != rows:
        raise ConfigError(f'teacher_cache {folder} has {rows:,} rows for the {name} split, which has '
                          f'{counts.sum():,} supervised targets: {fix}')
    tail = memmap('tail', np.float32, (rows, len(tails)))
    split['topk'] = dict(ids=memmap('ids', m['ids_dtype'], (rows, width)),
                         logp=memmap('logp', m['values_dtype'], (rows, width)), tail=tail[:, tails.index(temperature)],
                         drawn_tail=tail[:, tails.index(m['sample_temperature'])],
                         samples=m['samples'], sample_temperature=m['sample_temperature'], starts=starts, first=first,
                         vocab=json.load(open(os.path.join(data_dir, 'meta.json')))['vocab_size'],
                         ids_file=os.path.join(folder, f'{name}_ids.bin'))
    return m
