"""
On-policy rows: the student writes the replies (GKD's lambda, distill.py on_policy). A document's prompt is its
tokens before its first supervised target (chat data: the conversation before the first assistant turn); the student
samples a continuation of it, and the sampled tokens, up to and including the stop token, become the row's targets:
the divergence is taken there (M = 1) and no hard label (Batch.sampled marks them). Multi-turn records: the student
writes the first reply, and the conversation after it is not used in that row. Plain text (supervised from its first
token) has no prompt: its rows stay the data's. OnPolicy is the hook the run calls:
on_policy(batches, iter_num) -> batches.
"""
import zlib
from collections import Counter
import numpy as np
import torch
from kd import decode
from kd.configurator import ConfigError, DataError
from kd.data import Align, Batch
from kd.models import load_tokenizer, special_ids

class OnPolicy:
    """GKD's on-policy rows as a hook on the data's: on_policy(batches, iter_num) gives the step's micro-batches (this
    rank's, batch_size rows each) with the student's share of the rows rewritten as prompt + the student's reply
    (sample_rows), seeded by the micro-batch's number over every rank, so that any split over ranks and a resume draw
    the same. Checks at start that the data has prompts and where replies stop (tokenizers: the first that exists
    gives the special tokens); .generated counts the last step's sampled tokens."""
    def __init__(self, student, split, fraction, settings, block_size, seed, pad_id, vocab, data_dir, eos_id,
                 tokenizers, rank=0, world_size=1, accumulation=1):
        self.student, self.split, self.fraction, self.block_size, self.seed = student, split, fraction, block_size, seed
        self.pad_id, self.vocab = pad_id, vocab
        self.rank, self.world, self.accumulation = rank, world_size, accumulation
        self.prompts = prompt_lengths(split)
        self.with_prompt = check_prompts(split, self.prompts, block_size, data_dir)
        try:
            specials = special_ids(next((t for t in tokenizers[:-1] if t is not None), None)
                                   or load_tokenizer(tokenizers[-1]))
        except DataError as e:
            raise ConfigError(f"on_policy: neither model ships a tokenizer, and the data's ({e}) is needed for its "
                              'special tokens (where a reply stops): add the tokenizer files to the student folder')
        self.stops = stop_tokens(split, self.prompts, eos_id, specials, data_dir)
        self.settings, self.generated = (*settings, self.stops), 0  # (max_new_tokens, temperature, top_p, stops)

    def __call__(self, batches, iter_num):
        self.generated = 0
        for k, b in enumerate(batches):
            j = self.rank + k * self.world  # (the micro-batch's number in the step, over every rank)
            rows = on_policy_rows((iter_num * self.accumulation + j) * len(b.X), len(b.X), self.fraction)
            batches[k], n = sample_rows(self.student, b, self.split, b.docs, rows, self.prompts, self.block_size,
                                        self.settings, row_seed(self.seed, iter_num, j), self.pad_id, self.vocab)
            self.generated += n
        return batches

    def __str__(self):
        max_new, temperature, top_p, stops = self.settings
        return (f'on-policy: the student writes {self.fraction:g} of the rows (up to {max_new} tokens at T='
                f'{temperature:g}, top_p {top_p:g}, stopping at token ids {stops}); no CE on its tokens; '
                f"{self.with_prompt:.0%} of the training documents have a prompt (the others' rows stay the data's)")

def check_on_policy(teacher_cache, w_kd, parallel):
    """What on-policy rows need of the run's settings: else one line."""
    if teacher_cache is not None:
        raise ConfigError('on_policy: a teacher cache cannot score text the student writes: unset teacher_cache')
    if w_kd == 0:
        raise ConfigError("on_policy: the student's replies train on the divergence alone: set distill='logits' (or "
                          'kd_weight > 0)')
    if parallel == 'fsdp':
        raise ConfigError("on_policy: under parallel='fsdp' sampling would gather every block for every token: use "
                          "parallel='ddp'")

def prompt_lengths(split):
    """Per document, the length of its prompt: the tokens before its first supervised target (0: no target)."""
    idx, supervised = split['idx'], np.flatnonzero(np.asarray(split['mask']))
    k = np.searchsorted(supervised, idx[:-1] + 1)  # the first target after each document's first token
    first = supervised[np.minimum(k, max(len(supervised) - 1, 0))] if len(supervised) else idx[:-1]
    return np.where((k < len(supervised)) & (first < idx[1:]), first - idx[:-1], 0)

def check_prompts(split, lengths, block_size, data_dir):
    """On-policy needs prompt/reply documents (a plain-text one, supervised from its first token, has no prompt: its
    rows stay the data's) whose prompts leave room for a reply in block_size: else one line. Returns the share of
    the documents with a prompt."""
    if not (lengths >= 2).any():
        raise ConfigError(f'on_policy: no document of {data_dir} has a prompt (each is supervised from its first '
                          'token: plain text): on-policy sampling needs prompt/reply data (chat or instruction '
                          'records)')
    long = np.flatnonzero(lengths >= block_size)
    if len(long):
        raise ConfigError(f'on_policy: the prompt of document {long[0]} of {data_dir} is {lengths[long[0]]} tokens, '
                          f'no room for a reply in block_size={block_size}: raise block_size or shorten the prompts '
                          '(prepare_data.py --max_length)')
    return (lengths >= 2).sum() / max((lengths > 0).sum(), 1)

def stop_tokens(split, lengths, eos_id, specials, data_dir):
    """The tokens a sampled reply stops at: the data's EOS and the special token (a chat template's end of turn, e.g.
    <|im_end|>; EOS in the fallback template) that most often ends the first reply of a document with a prompt, so the
    student stops where the data's replies do. Plain text (no prompt, ending in EOS) has no vote, and a reply cut short
    ends in an ordinary token, which never stops one: when no first reply ends in a special token, one line."""
    mask = np.asarray(split['mask'], dtype=np.int8)
    ends = np.flatnonzero(np.diff(np.append(mask, 0)) == -1)  # the last target of each supervised run
    prompted = np.flatnonzero(lengths >= 2)[:100_000]
    first_ends = ends[np.searchsorted(ends, split['idx'][prompted] + lengths[prompted])]  # each first reply's last
    votes = Counter(t for t in np.asarray(split['tokens'])[first_ends].tolist() if t in specials)
    if not votes:
        raise ConfigError(f'on_policy: no first reply of {data_dir} ends in a special token (an end of turn or EOS): '
                          'were the replies cut short (prepare_data.py --max_length)? The student would not know '
                          'where to stop; prepare the data with whole replies')
    return sorted({int(eos_id), votes.most_common(1)[0][0]})

def on_policy_rows(first_row, rows, fraction):
    """Which of a micro-batch's rows the student writes: row j of the run (counted over every step and micro-batch,
    whatever rank it runs on) when floor((j + 1) fraction) > floor(j fraction), so that the first n rows of the run
    hold floor(n fraction) of them (the share to within one row, where a step's own count would round it down every
    step), a resume chooses as the run did, and 2 ranks choose what 1 process with 2x accumulation chooses."""
    j = np.arange(first_row, first_row + rows)
    return np.flatnonzero(np.floor((j + 1) * fraction) > np.floor(j * fraction)).tolist()

@torch.no_grad()
def sample_rows(model, batch, split, docs, rows, lengths, block_size, settings, seed, pad_id, vocab):
    """batch with its rows `rows` (of documents docs; plain-text ones stay) replaced by prompt + the student's reply.
    settings: max_new_tokens, temperature, top_p, stop ids. Returns (the batch, tokens generated)."""
    rows = [i for i in rows if lengths[docs[i]] >= 2]  # (plain text has no prompt: its rows stay the data's)
    if not rows:
        return batch, 0
    prompts = [torch.from_numpy(np.asarray(split['tokens'][split['idx'][d]:split['idx'][d] + lengths[d]],
                                           dtype=np.int64)) for d in (docs[i] for i in rows)]
    replies = generate(model, prompts, block_size, settings, seed, vocab, batch.X.device)
    return lay_out(batch, rows, prompts, replies, pad_id), sum(map(len, replies))

def generate(model, prompts, block_size, settings, seed, vocab, device):
    """The student's replies to prompts, each up to and including its first stop token and within block_size
    (kd/decode.py: the model in eval mode, the caller's autocast, the real vocabulary, draws seeded by seed alone, so
    a resume and any split over ranks draw the same)."""
    max_new, temperature, top_p, stop = settings
    training = model.training
    model.eval()
    try:
        return decode.generate(model, prompts, [min(max_new, block_size + 1 - len(p)) for p in prompts], temperature,
                               top_p, stop, seed, vocab, device)
    finally:
        model.train(training)

def lay_out(batch, rows, prompts, replies, pad_id):
    """The batch with rows `rows` re-laid right-padded as prompt + reply: M = 1 exactly on the reply's tokens as
    targets (the stop included), and sampled there too; the other rows as they were."""
    keep = [i for i in range(len(batch.X)) if i not in rows]
    width = batch.X.shape[1]
    L = max([len(p) + len(r) - 1 for p, r in zip(prompts, replies)] + ([width] if keep else []))
    X = torch.full((len(batch.X), L), pad_id, dtype=torch.long)
    Y, M, sampled = torch.zeros_like(X), torch.zeros_like(X), torch.zeros_like(X, dtype=torch.bool)
    if keep:
        X[keep, :width], Y[keep, :width], M[keep, :width] = (t[keep].cpu() for t in batch[:3])
        if batch.sampled is not None:
            sampled[keep, :width] = batch.sampled[keep].cpu()
    for i, p, r in zip(rows, prompts, replies):
        tokens = torch.cat([p, r])
        X[i, :len(tokens) - 1], Y[i, :len(tokens) - 1] = tokens[:-1], tokens[1:]
        M[i, len(p) - 1:len(tokens) - 1] = sampled[i, len(p) - 1:len(tokens) - 1] = 1  # (the divergence only)
    b, s = M.nonzero(as_tuple=True)
    device = batch.X.device
    route = None if batch.route is None else batch.route[:, :1].expand(-1, L).contiguous()  # (a row's document's)
    return Batch(X.to(device), Y.to(device), M.to(device), Align(None, b.to(device), s.to(device), s.to(device)),
                 sampled=sampled.to(device), docs=batch.docs, route=route)

def row_seed(seed, iter_num, micro_step):
    """The draws of a micro-batch: (seed, step, micro-step of the step, counted over every rank)."""
    return zlib.crc32(f'{seed} {iter_num} {micro_step}'.encode())
