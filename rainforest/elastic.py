"""Elastic training (``rainforest train --elastic``): keep going when a rank is lost or joins.

Under ``horovodrun --min-np ... --host-discovery-script ...`` (Gloo), Horovod re-forms the ring
whenever a rank dies or a host appears. :class:`ElasticTrainingState` wraps the run's
:class:`~rainforest.train.TrainingState` and the :class:`~rainforest.train.Trainer`'s
variables: every ``commit_every`` steps (and at every checkpoint) it keeps a host copy of the
weights, the optimizer slots (Keras 3 keeps ``iterations`` and the learning rate there too)
and the step, which is also the data position. A lost rank rolls every survivor back to that
copy; a reset then deals the songs out again for the new number of ranks, and the learning
rate follows the new size. Horovod's own ``TensorFlowKerasState`` fails on Keras 3 optimizers
and ``TensorFlowState`` deadlocks on a re-join, hence this class (see ARCHITECTURE.md).

``metrics.jsonl`` keeps the first record of each step: after a rollback the repeated steps
are trained again but not logged again, so its steps only ever go forward. Every rank keeps
the scalars of its recent steps (they are averaged over the ranks, so equal on all), and a rank
that has just become rank 0 first writes the steps its dead predecessor trained but did not
live to log: each step appears once.
"""

from __future__ import annotations

import hashlib
import importlib

import numpy as np
from horovod.common.elastic import State

from rainforest.errors import RainforestError
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


class SkipLoggedSteps(RankZeroLog):
    """Rank 0's log that writes each step of ``metrics.jsonl`` once, across lost ranks.

    It reads the file on creation, so a rank that has just become rank 0 (the old one died)
    continues the record where the old one stopped. ``recent`` (shared by the writers of one
    process across resets) holds every rank's scalars of the steps since the last commit and
    before it; a step the file lacks but ``recent`` holds is written before the next one.
    """

    def __init__(self, run: str, rank: int, size: int, recent: dict[int, dict], **kwargs
                 ) -> None:
        super().__init__(run, rank, **kwargs)
        self.size, self.recent = size, recent
        self.logged = last_logged_step(run) if self.active else 0

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


def train_elastic(trainer, state, dataset, *, run: str, deadline, progress: bool, log,
                  sampling):
    """Train until the last step or a stop, surviving lost and joining ranks.

    Returns ``(stopped_by, validation_bits, unigram_bits, writer)`` of the final membership.
    """
    training = importlib.import_module("rainforest.train")  # deferred: train imports this module

    hvd = trainer.hvd
    trainer.broadcast_done = True  # the first sync below is the broadcast
    elastic_state = ElasticTrainingState(state, trainer, hvd)
    outcome, recent = {}, {}

    # Horovod: elastic.run syncs from rank 0, and on a lost or added rank restores the last
    # commit, re-forms the ring and calls the function again
    @hvd.elastic.run
    def train_from_commit(elastic_state):
        rank, size = hvd.rank(), hvd.size()
        trainer.size = size  # Horovod: 3. the learning rate follows the number of ranks
        data = training.training_input(dataset, state, rank=rank, size=size)
        state.data.update(ranks=size, steps_per_epoch=data.sampler.steps_per_epoch)
        writer = SkipLoggedSteps(run, rank, size, recent, progress=progress, log=log)
        if rank == 0:
            log(f"elastic: {size} rank(s), training from step {state.step} (the last commit; "
                f"{elastic_state.repeated} step(s) after it are done again); rank 0 trains on "
                f"{len(data.sampler.songs)} of {data.training_songs} songs")
        elastic_state.repeated = 0
        unigram = None
        if data.validation is not None:
            unigram = training._unigram_bits(data.validation[0][:, trainer.receptive:], hvd)
        stopped_by, bits = training._loop(trainer, state, data, writer, unigram=unigram,
                                          deadline=deadline, audio=dataset.audio, run=run,
                                          sampling=sampling, commit=elastic_state.commit)
        outcome.update(stopped_by=stopped_by, bits=bits, unigram=unigram, writer=writer)
        return True

    # Horovod: elastic.run returns None, silently, on a TensorFlow error it cannot place
    if train_from_commit(elastic_state) is not True:
        raise RainforestError(
            f"elastic training stopped at step {state.step} on an error Horovod could not "
            "recover from (see the TensorFlow messages above); continue with --resume")
    # Every rank names its weights, so a log shows that the ranks agree after joins.
    log(f"rank {hvd.rank()}/{hvd.size()}: step {state.step}, weights sha256 "
        f"{weights_digest(trainer.model.weights)}")
    return outcome["stopped_by"], outcome["bits"], outcome["unigram"], outcome["writer"]
