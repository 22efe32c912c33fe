"""
The run's guards: what may be checkpointed. Weights are saved only once they passed their own validation and their
step's loss and gradient; each check that fails stops the run with one line naming the last good checkpoint, which
stays. (Why each threshold: docs/training.md.)
"""
import math, statistics
from kd.configurator import ConfigError

class Guards:
    """The checks, each raising one line (ConfigError). chance: ln of the student's output rows, the CE of uniform
    outputs (a dead student); history, val_history: the run's losses so far; last_saved: the last checkpoint's
    iteration (None: none yet)."""
    def __init__(self, ckpt_dir, chance, last_saved=None, history=(), val_history=()):
        self.ckpt_dir, self.chance, self.last_saved = ckpt_dir, chance, last_saved
        self.history, self.val_history = list(history), list(val_history)

    def last_good(self):
        if self.last_saved:
            return f'the last checkpoint ({self.ckpt_dir}, iteration {self.last_saved}) is intact'
        return 'no checkpoint was written'

    def validation(self, iter_num, ce, kd, hidden):
        """The weights about to be saved, judged by their own validation CE (the training loss sees them one step
        late; the validation windows are the same each time): not finite; diverged above twice the run's best + 1;
        dead at ln V (uniform outputs) once the run was below it."""
        if not all(map(math.isfinite, (ce, kd, hidden))):
            raise ConfigError(f'non-finite validation loss at iteration {iter_num} (ce {ce}, kd {kd}, hidden '
                              f'{hidden}): not checkpointed; {self.last_good()}; lower learning_rate or check the data')
        best = min(self.val_history, default=math.inf)
        dead = abs(ce - self.chance) < 1e-3 and best < self.chance - 0.5
        if ce > 2 * best + 1 or dead:
            raise ConfigError(f'val ce {ce:.4f} at iteration {iter_num}: the student ' + (
                f'outputs uniform distributions (ln V = {self.chance:.4f}), dead' if dead else
                f"diverged (above twice the run's best val ce, {best:.4f}, + 1)")
                + f'; not checkpointed; {self.last_good()}; lower learning_rate')
        self.val_history.append(ce)

    def loss(self, iter_num, loss, ce, kd, hidden):
        """A step's loss, before its backward's gradient is applied: not finite, or diverging (above 10x the median
        of the run's last 100 + 1, its own history, kept in checkpoints)."""
        if not math.isfinite(loss):
            raise ConfigError(f'non-finite loss at iteration {iter_num} (ce {ce}, kd {kd}, hidden {hidden}): '
                              f'{self.last_good()}; lower learning_rate, check the data, or use bfloat16 instead of '
                              'float16')
        typical = statistics.median(self.history[-100:]) if len(self.history) >= 3 else math.inf
        if loss > 10 * typical + 1:
            raise ConfigError(f'loss {loss:.4g} at iteration {iter_num} is above 10x the median of the last '
                              f'{len(self.history[-100:])} losses ({typical:.4g}) + 1: the run is diverging; the step '
                              f'was not applied; {self.last_good()}; lower learning_rate')
        self.history.append(loss)

    def weights(self, iter_num, finite):
        if not finite:
            raise ConfigError(f'non-finite weights at iteration {iter_num}: not checkpointed; {self.last_good()}')

    def gradient(self, iter_num, grad_norm, ce, labeled, scaled=False):
        """A step's gradient norm: not finite (float16's GradScaler, scaled, skips such a step itself), or 0 with the
        CE at ln V: a dead student, nothing left to learn."""
        if not math.isfinite(grad_norm) and not scaled:
            raise ConfigError(f'non-finite gradient norm at iteration {iter_num}: the step was not applied; '
                              f'{self.last_good()}; lower learning_rate or check the data')
        if grad_norm == 0 and labeled and abs(ce - self.chance) < 1e-3:
            raise ConfigError(f'the student is dead at iteration {iter_num}: its gradient is 0 and its ce {ce:.4f} is '
                              f'ln V (uniform outputs); {self.last_good()}; lower learning_rate')
