"""The state of elastic training (``rainforest train --elastic``) that survives lost ranks.

The elastic training function itself lives with the training loop
(``rainforest.train._train_elastic``), as in Horovod's elastic examples; this module holds what
it keeps and logs across changes of ranks, and nothing that imports the training module.

Under ``horovodrun --min-np ... --host-discovery-script ...`` (Gloo), Horovod re-forms the ring
whenever a rank dies or a host appears. :class:`ElasticTrainingState` wraps the run's
:class:`~rainforest.train.TrainingState` and the :class:`~rainforest.train.Trainer`'s
variables: every ``commit_every`` steps (and at every checkpoint) it keeps a host copy of the
weights, the optimizer slots (Keras 3 keeps ``iterations`` and the learning rate there too)
and the step, which is also the data position. A lost rank rolls every survivor back to that
copy; a reset then deals the songs out again for the new number of ranks, and the learning
rate follows the new size. Horovod's own ``TensorFlowKerasState`` fails on Keras 3 optimizers
and ``TensorFlowState`` deadlocks on a re-join, hence this class (see ARCHITECTURE.md).

``metrics.jsonl`` follows the rule of every run (:func:`rainforest.runlog.forget_steps_after`):
a step trained again after a rollback replaces its earlier record, so the file holds each step
once, as the surviving weights went through it. Every rank keeps the scalars of its recent
steps (they are averaged over the ranks, so equal on all), and a rank that has just become
rank 0 first writes the steps up to the commit that its dead predecessor trained but did not
live to log.
"""

from __future__ import annotations

import hashlib

import numpy as np
from horovod.common.elastic import State

from rainforest.runlog import RankZeroLog, read_metrics

#: How many steps' scalars every rank keeps for a new rank 0 to log: more than any rollback.
RECENT_STEPS = 1000


class ElasticTrainingState(State):
    """The committed copy of a run that survivors roll back to and joiners receive."""

    def __init__(self, training, trainer, hvd) -> None:
        # Horovod: rank 0's Python objects reach the others by broadcast_object
        super().__init__(bcast_object=hvd.broadcast_object, get_rank=hvd.rank)
        self.training, self.trainer, self.hvd = training, trainer, hvd
        self.repeated = 0  # steps done since the last commit when a rank was lost
        self.save()

    def _variables(self) -> list:
        return [*self.trainer.model.variables, *self.trainer.optimizer.variables]

    def save(self) -> None:
        self._saved = [np.array(v.numpy()) for v in self._variables()]
        self._saved_step = self.training.step

    def restore(self) -> None:
        self.repeated = self.training.step - self._saved_step
        for variable, array in zip(self._variables(), self._saved, strict=True):
            variable.assign(array)
        self.training.step = self._saved_step

    def sync(self) -> None:
        # Horovod: every rank takes rank 0's weights, optimizer slots and step (data position)
        self.hvd.broadcast_variables([v.value for v in self._variables()], root_rank=0)
        self.training.step = int(self.hvd.broadcast_object(self.training.step, root_rank=0))
        self.save()


class ElasticLog(RankZeroLog):
    """Rank 0's log that writes each step of ``metrics.jsonl`` once, across lost ranks.

    Each membership starts one from the commit it goes on from: the records after that step
    give way to the steps trained again, and a rank that has just become rank 0 (the old one
    died) continues the record where the old one stopped. ``recent`` (shared by the writers of
    one process across resets) holds every rank's scalars of the steps since the last commit
    and before it; a step the file lacks but ``recent`` holds is written before the next one.
    """

    def __init__(self, run: str, rank: int, size: int, recent: dict[int, dict], **kwargs
                 ) -> None:
        super().__init__(run, rank, **kwargs)
        self.size, self.recent = size, recent
        self.logged = 0

    def start(self, first: int, last: int) -> None:
        super().start(first, last)
        if self.active:
            self.logged = last_logged_step(self.run)

    def record(self, step: int, scalars: dict[str, float]) -> None:
        self.recent[step] = {**scalars, "ranks": self.size}
        self.recent.pop(step - RECENT_STEPS, None)
        # Steps trained by every rank but never logged by a dead rank 0 come first.
        for missing in range(self.logged + 1, step + 1):
            if missing in self.recent:
                self._write(missing, self.recent[missing])

    def _write(self, step: int, scalars: dict[str, float]) -> None:
        super().record(step, scalars)
        self.logged = max(self.logged, step)


def last_logged_step(run: str) -> int:
    """The highest step in ``RUN/metrics.jsonl`` (0 if none); a torn line is ignored."""
    return max((int(row["step"]) for row in read_metrics(run)), default=0)


def weights_digest(weights) -> str:
    """sha256 of the weights' bytes, in order: equal on ranks that hold the same model."""
    digest = hashlib.sha256()
    for weight in weights:
        digest.update(np.ascontiguousarray(np.asarray(weight)).tobytes())
    return digest.hexdigest()
