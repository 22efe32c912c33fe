"""
A cached teacher (distill.py's teacher_cache): the teacher's next-token distribution at every supervised target of
the data, kept sparse (its top-k and tokens drawn from its tail, kd/data.py's TopK), written once by
scripts/cache_teacher.py, then read with each batch instead of running the teacher: logit distillation alone.
"""
import os
from kd.configurator import ConfigError
from kd.data import attach_topk
from kd.teacher import NoTeacher, TeacherOut

def check_weights(weights):
    """A cache serves logit distillation alone (weights: w_ce, w_kd, w_hidden): else one line."""
    if weights[1] == 0 or weights[2] > 0:
        raise ConfigError("teacher_cache holds the teacher's next-token distribution for logit distillation alone: "
                          "use distill='logits' (hidden-state distillation needs the teacher itself), or unset "
                          'teacher_cache')

class CachedTeacher(NoTeacher):
    """The teacher's cached rows, attached to the splits (a folder, or its name inside the dataset's); each batch
    then carries them (Batch.topk, read by make_batch). Checks that the cache was written for this data, block_size
    and temperature, and that the loss is logit distillation alone."""
    def __init__(self, teacher_cache, data_dir, splits, block_size, temperature, weights):
        check_weights(weights)
        self.dir = teacher_cache if os.path.isdir(teacher_cache) else os.path.join(data_dir, teacher_cache)
        for name, split in splits.items():
            self.meta = attach_topk(split, name, self.dir, data_dir, block_size, temperature)

    def __call__(self, batch):
        return TeacherOut(logits=batch.topk)

    def note(self, kd_kind):
        """From drawn tokens a cache estimates forward KL's gradient well, the other kinds' poorly or not at all
        (docs/performance.md); a cache of the whole vocabulary (k = V) draws nothing and is exact."""
        if self.meta['samples'] and kd_kind != 'fkl':
            return (f"note: from a teacher cache, {kd_kind}'s gradient is mostly the draws' noise (its cosine with the "
                    'online gradient measured 0.47 for skl, about 0 for rkl, jsd, srkl and tvd, 0.88 for fkl): use '
                    "kd_kind='fkl', or the teacher online")
        return None

    def __str__(self):
        m = self.meta
        return f"its cache {self.dir}: top-{m['k']} + {m['samples']} drawn ({m['teacher']})"
