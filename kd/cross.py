"""
Logit distillation across tokenizers (a dataset of prepare_data.py --teacher_tokenizer): the teacher reads its own
tokens of the same text, and its next-token distribution is carried onto the student's tokens by their bytes, at the
positions where both tokenizations end on one byte boundary (the dataset's aligned pairs; the student's other
supervised targets get CE alone). CrossTeacher wraps any in-process teacher (kd/teacher.py).
"""
import math
from functools import partial
import torch
from kd.configurator import ConfigError
from kd.models import load_tokenizer, output_rows, vocab_columns
from kd.teacher import Logits

def to_student_vocab(zt, cols, n, temperature):
    """The teacher's logits zt (rows, V_t) as logits over n student tokens: each one's probability at temperature T is
    the sum of those of the teacher tokens carried onto it, cols[j] for teacher token j (n: none, dropped; the rest
    renormalised), returned as T log-probabilities, so that softmax(. / T) gives them and every divergence applies
    unchanged. cols comes from models.vocab_map: a token of the same bytes (the shared vocabulary) or the longest
    student token the teacher's begins with; identical tokenizers give the identity, a byte-level student each
    next byte's probability."""
    z = (zt if zt.dtype == torch.float64 else zt.float()) / temperature
    cols = cols.expand(len(z), -1)
    top = z.new_full((len(z), n + 1), -math.inf).scatter_reduce_(1, cols, z, 'amax')  # a log-sum-exp per student token
    total = torch.zeros_like(top).scatter_add_(1, cols, (z - top.gather(1, cols)).exp())
    return (top + total.log())[:, :n] * temperature

class CrossTeacher:
    """A teacher (kd/teacher.py) that reads the batch's teacher tokens (Batch.align.XT and their positions), its logits
    carried onto the student's compared tokens (to_student_vocab): the ids compared, ascending, and each teacher
    id's column among them (None: the teacher's own, one vocabulary: a teacher that reads a context). hidden: its
    hidden states, in its own positions (the loss reads the aligned pairs)."""
    def __init__(self, teacher, compared=None, cols=None, temperature=1.0):
        self.teacher, self.model, self.compared = teacher, teacher.model, compared
        self.carry = None if cols is None else partial(to_student_vocab, cols=cols, n=len(compared),
                                                       temperature=temperature)

    def __call__(self, batch):
        """Its outputs on its own rows: XT, their positions, and, for a teacher that reads targets (kd/served.py), the
        next tokens and a mask of the positions the loss reads (the aligned ones)."""
        XT, align = batch.align.XT, batch.align
        need = torch.zeros_like(XT).index_put_((align.b, align.t), torch.ones_like(align.t))
        out = self.teacher(batch._replace(X=XT, Y=torch.cat([XT[:, 1:], XT[:, -1:]], 1), M=need, pos=batch.teacher_pos))
        if out.logits is None or self.carry is None:  # (no carry: one vocabulary, a teacher that reads a context)
            return out
        return out._replace(logits=Logits(out.logits.h, out.logits.head, self.carry))

    def release(self):
        self.teacher.release()

    def __str__(self):
        return str(self.teacher)

def check_cross(meta, data_dir, teacher_cache, on_policy):
    """Across tokenizers, the teacher must read its own tokens online: else one line."""
    if teacher_cache is not None:
        raise ConfigError(f"teacher_cache: {data_dir} pairs two tokenizers (prepare_data.py --teacher_tokenizer), "
                          "and a cache holds a teacher's distribution over the student's own tokens: distill across "
                          'tokenizers online (unset teacher_cache), or prepare the data with one tokenizer')
    if on_policy:
        raise ConfigError(f"on_policy: {data_dir} pairs two tokenizers, and the teacher would have to read the "
                          "student's replies in its own tokens (not built): prepare the data with one tokenizer")

def across_tokenizers(teacher, meta, student_tok, teacher_tok, temperature, device, logits=True):
    """teacher as a CrossTeacher, and its start-up line: how the teacher's tokens go to the student's, and at which
    share of the training targets D is taken (logits=False: hidden states alone, nothing carried, no line)."""
    if not logits:
        return CrossTeacher(teacher), None
    vocab = meta['vocab_size']
    compared, cols, counts = vocab_columns(student_tok or load_tokenizer(meta['tokenizer']),
                                           teacher_tok or load_tokenizer(meta['teacher_tokenizer']), vocab,
                                           output_rows(teacher.model))
    train = meta['splits']['train']  # (counted by prepare_data.py)
    aligned = train['aligned_supervised_fraction']
    alone = round((1 - aligned) * train['supervised_tokens'])
    line = (f'across tokenizers: the divergence at the {aligned:.1%} of supervised training targets where both '
            f'tokenizations end on one byte boundary, CE alone at the other {1 - aligned:.1%} ({alone:,}); the '
            f"teacher's tokens go to the student's {counts['same']:,} of the same bytes, {counts['prefix']:,} to "
            f"the longest student token they begin with, {counts['none']:,} nowhere; {len(compared):,} of the "
            f"student's {vocab:,} tokens are compared")
    to = lambda a: torch.from_numpy(a).to(device)
    return CrossTeacher(teacher, to(compared), to(cols), temperature), line

def with_context(teacher, meta, data_dir, teacher_cache, on_policy, routed):
    """A teacher that reads each record's teacher_context before the student's tokens (prepare_data.py
    --teacher_context; self-distillation when it is the student's own starting weights): teacher as a CrossTeacher of
    one vocabulary, and its start-up line. Else one line."""
    field = meta['teacher_context']
    for bad, what in ((teacher_cache is not None, 'a teacher cache holds what the teacher read without it'),
                      (on_policy, "the teacher would read the student's replies after the context (not built)"),
                      (routed, 'several teachers with a context (not built)')):
        if bad:
            raise ConfigError(f"{data_dir} gives the teacher each record's '{field}' to read (prepare_data.py "
                              f'--teacher_context), and {what}: prepare the data without it, or drop the setting')
    train = meta['splits']['train']
    return CrossTeacher(teacher), (f"the teacher reads each record's '{field}' before the student's tokens: D at the "
                                   f"{train['aligned_supervised_fraction']:.1%} of supervised training targets it "
                                   'shares with the student (the reply), CE alone elsewhere')
