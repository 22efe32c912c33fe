"""
A teacher is one interface: `teacher(batch) -> TeacherOut`, what the loss reads of it at every position of a batch
(distill.py's Trainable picks its rows). Its kinds: NoTeacher (SFT), Teacher (a model in this process, whole on every
rank) and ShardedTeacher (the same under FSDP2) here, CachedTeacher (its top-k, cut once by scripts/cache_teacher.py)
in kd/cache.py, CrossTeacher (a teacher of another tokenizer, carried onto the student's tokens) in kd/cross.py.
A new kind (a teacher served by another process, say) is one more class with this call.
"""
from typing import NamedTuple
import torch
from kd.data import TopK, top_k
from kd.machine import gathered
from kd.models import cast_parameters

class Logits:
    """A teacher's next-token logits, made when read: h @ head.T (h (..., d) its final hidden states; head None: h
    are the logits themselves), then carried onto the student's compared tokens by carry (a function of logits).
    Indexed by positions like a tensor; distribution() makes them (the chunked loss: a chunk at a time)."""
    def __init__(self, h, head=None, carry=None):
        self.h, self.head, self.carry = h, head, carry

    def __len__(self):
        return len(self.h)

    def __getitem__(self, i):
        return Logits(self.h[i], self.head, self.carry)

    def distribution(self):
        return self.carry(self.h if self.head is None else self.h @ self.head.T)

class TeacherOut(NamedTuple):
    """What the loss reads of the teacher (None where a term is off)."""
    logits: object = None  # its next-token distribution at every position: Logits, or a cached TopK (kd/data.py)
    hidden: list = None  # its hidden states at the layer map's teacher layers

class NoTeacher:
    """SFT: the loss reads nothing of a teacher."""
    model = None

    def __call__(self, batch):
        return TeacherOut()

    def release(self):
        """After the loss read this batch's outputs (ShardedTeacher frees what it kept gathered for it)."""

    def __str__(self):
        return 'none'

def frozen(model, device, dtype):
    """A teacher model on the device, in eval mode, without gradients, in the compute dtype (fp32 under float16, where
    it could overflow)."""
    model.to(device).eval().requires_grad_(False)
    cast_parameters(model, torch.float32 if dtype == torch.float16 else dtype)

class Teacher(NoTeacher):
    """A frozen model in this process (frozen). Its
    forward goes only as far as the loss needs: logits='full' its own logits (the plain loss), 'head' its final
    hidden states and its head, applied a chunk at a time by the chunked loss, None neither (hidden states alone);
    layers: the hidden states the layer map reads. vocab: its real tokens, the first vocab columns (the rows of a
    head past them are padding). topk = (k, T): the loss reads its k most likely tokens alone, the rest as one bucket
    at temperature T (as from a served teacher; kd/served.py); None: all."""
    def __init__(self, model, vocab, logits='full', layers=(), topk=None):
        self.model, self.vocab, self.logits, self.layers, self.topk = model, vocab, logits, list(layers), topk

    @torch.no_grad()
    def __call__(self, batch):
        net = self.model if self.logits == 'full' else self.model.base_model
        out = net(input_ids=batch.X, position_ids=batch.pos, use_cache=False, output_hidden_states=bool(self.layers))
        logits = None
        if self.logits == 'full':
            logits = Logits(out.logits, carry=self.carry)
        elif self.logits == 'head':  # (the head in the hidden states' dtype once, not once per chunk)
            logits = Logits(out.last_hidden_state, self.head().to(out.last_hidden_state.dtype), self.carry)
        return TeacherOut(logits, [out.hidden_states[t] for t in self.layers] if self.layers else None)

    def carry(self, z):
        if self.topk is None:
            return z[..., :self.vocab]
        (k, T), zero = self.topk, z.new_zeros(*z.shape[:-1], 0)
        ids, logp, tail = top_k(z[..., :self.vocab], k, [T])
        return TopK(ids, logp, tail[..., 0], zero)

    def head(self):
        return self.model.get_output_embeddings().weight

    def __str__(self):
        topk = f' (its top-{self.topk[0]} read, the rest as one bucket)' if self.topk else ''
        return f'{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M parameters' + topk

class ShardedTeacher(Teacher):
    """Teacher under FSDP2 (machine.shard: each rank keeps 1/world of every parameter): the head is read whole, a tied
    one as the embeddings' weight the forward gathered and kept (released after the loss), an untied one gathered."""
    def head(self):
        embeddings = self.model.get_input_embeddings()
        if getattr(embeddings, 'ties_head', False):
            return embeddings.weight
        return gathered(self.model.get_output_embeddings().weight)

    def release(self):
        self.model.get_input_embeddings().reshard()
