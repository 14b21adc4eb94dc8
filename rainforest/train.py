"""Data-parallel training with Horovod ring allreduce (``rainforest train``).

The same code runs as one process, under ``horovodrun -np N`` (Gloo or MPI), under
``mpirun -np N`` and under Slurm's ``srun``. Every Horovod line is tagged ``# Horovod:`` and
they come in Horovod's own order: init, pin the device, scale the learning rate, wrap the
gradient tape, broadcast after the first step, average metrics, and let rank 0 alone write.
Keras 3 variables are passed to Horovod as ``v.value`` (``horovod.tensorflow.keras`` does not
work with Keras 3).

Learning rate: ``lr * size`` after a linear warm-up from ``lr`` (Goyal et al., "Accurate,
Large Minibatch SGD", 2017, section 2.2), so step 0 uses the single-worker rate.

Everything a resume needs is one :class:`TrainingState`: the configs, the step (which is also
the data position, since windows are a pure function of it) and where the run resumed from.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rainforest import checkpoint, storage
from rainforest.config import Config, documented, setting
from rainforest.dataset import MANIFEST_NAME, Dataset
from rainforest.errors import CheckpointError, ParameterError, RainforestError
from rainforest.model_config import ModelConfig, multiply_adds_per_sample, receptive_field
from rainforest.runlog import RankZeroLog
from rainforest.sampling import WindowSampler, rank_share, split_songs, validation_windows
from rainforest.signals import StopRequest, graceful_stop
from rainforest.step_choice import StepChoice, choose, gpu_present, rule
from rainforest.training_samples import Snapshot, TrainingSampler
from rainforest.watchdog import arm_watchdog

COMPILE_MODES = ("auto", "eager", "graph", "xla", "fused")
#: `train --precision`: the Keras dtype policy of the compute (weights stay float32).
TRAINING_PRECISIONS = ("auto", "float32", "mixed_bfloat16")
LR_SCHEDULES = ("constant", "cosine")
#: Where ``--lr-schedule cosine`` ends, as a share of the rate after the warm-up.
COSINE_FLOOR = 0.1


def network_layout(compile_mode: str, precision: str) -> str:
    """The network layout a step runs (see ``rainforest.network.LAYOUTS``).

    ``--compile fused`` runs the residual stack in rainforest's own kernels (a graph-mode step
    around them). Graph mode in bfloat16 runs the causal layout, its fastest by far. Float32
    keeps the sliced one: its products give the same bits on any number of threads, which lets
    two ranks on two nodes match two ranks on one host exactly; the causal layout's oneDNN
    convolutions split their weight-gradient sums by thread (measured: different weights after
    3 steps on 1 and 2 cores). XLA fuses the slices, so it gains nothing from the causal layout.
    """
    if compile_mode == "fused":
        return "fused"
    return "causal" if (compile_mode, precision) == ("graph", "mixed_bfloat16") else "sliced"


@documented
@dataclass(frozen=True)
class TrainConfig(Config):
    """How to train. Saved in every checkpoint next to the model and audio configs."""

    steps: int = setting(1000, "total optimizer steps of the run (a resumed run continues to "
                         "this number)")
    batch_size: int = setting(4, "windows per step on each rank; the global batch is "
                              "batch_size x ranks")
    target_length: int = setting(4096, "predicted codes per window (a window is the receptive "
                                 "field + this)")
    learning_rate: float = setting(1e-3, "Adam learning rate of one rank; scaled by the number "
                                   "of ranks after the warm-up", flag="--lr")
    warmup_steps: int = setting(100, "steps of linear learning-rate warm-up")
    lr_schedule: str = setting("constant", "the learning rate after the warm-up: constant, or "
                               f"cosine: down to {COSINE_FLOOR:g} of it at --steps (so --steps "
                               "sets the decay; a resume that raises --steps reshapes the rest "
                               "of it)",
                               choices=LR_SCHEDULES)
    clip_norm: float = setting(1.0, "clip gradients to this global norm (after averaging "
                               "across ranks)")
    validation_fraction: float = setting(0.1, "share of songs held out for validation, by song "
                                         "(0: none)", flag="--val-fraction")
    validation_every: int = setting(100, "measure held-out bits per sample every N steps",
                                    flag="--val-every")
    validation_windows: int = setting(64, "fixed held-out windows to measure on (0: never)",
                                      flag="--val-windows")
    checkpoint_every: int = setting(500, "checkpoint period in steps (there is always one at "
                                    "the end)")
    keep_checkpoints: int = setting(3, "checkpoints kept", flag="--keep")
    seed: int = setting(0, "seed of the weights and of the data order")
    compile: str = setting("auto", "eager, tf.function graph, XLA (jit_compile) steps, or "
                           "fused: a graph step whose residual stack runs in rainforest's own "
                           "CPU kernels; auto: a run of 300+ steps times a few steps of each "
                           "and takes the fastest, a shorter one takes fused on a CPU and graph "
                           "on a GPU", choices=COMPILE_MODES)
    precision: str = setting("auto", "compute dtype (weights stay float32); auto: a run of "
                             "300+ steps on a machine with native bfloat16 (GPU, AVX512_BF16, "
                             "AMX) also times mixed_bfloat16 and takes it when faster; "
                             "otherwise bfloat16 on a GPU, float32 on a CPU",
                             choices=TRAINING_PRECISIONS)
    log_every: int = setting(10, "metrics period in steps")
    stall_timeout: float = setting(600.0, "end a rank when, after its first step, no step has "
                                   "finished for this many seconds, so a hung rank cannot "
                                   "hang the job (MPI has no collective timeout); 0: never")
    commit_every: int = setting(10, "with --elastic: keep a copy of the state in memory every N "
                                "steps (and at each checkpoint); a lost rank costs the steps "
                                "since the last one")
    sample_every: int = setting(0, "every N steps, rank 0 generates audio from the current "
                                "weights into RUN/samples and TensorBoard, in a process of "
                                "its own beside training (0: never)")
    sample_seconds: float = setting(2.0, "seconds of audio per training sample (one per label "
                                    "for a --condition model)")
    sample_temperature: float = setting(1.0, "softmax temperature of the training samples "
                                        "(their seed is --seed)")
    verify_shards: bool = setting(False, "hash every shard against the manifest before "
                                  "training, even one the hash cache knows unchanged (it "
                                  "cannot see bit rot below the file system)",
                                  flag="--verify-shards")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "target_length", "checkpoint_every",
                     "keep_checkpoints", "log_every", "commit_every"):
            if getattr(self, name) < 1:
                raise ParameterError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "validation_every", "validation_windows", "seed",
                     "stall_timeout", "sample_every", "sample_temperature"):
            if getattr(self, name) < 0:
                raise ParameterError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0 or not self.clip_norm > 0:
            raise ParameterError("learning_rate and clip_norm must be positive")
        if not (math.isfinite(self.sample_seconds) and self.sample_seconds > 0
                and math.isfinite(self.sample_temperature)):
            raise ParameterError(
                f"sample_seconds must be positive and sample_temperature finite, got "
                f"{self.sample_seconds} and {self.sample_temperature}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ParameterError(
                f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        self.check_choices()


#: Settings a resume takes from the command line: they change neither the model nor the data.
RESUME_MAY_CHANGE = ("steps", "verify_shards", "sample_every", "sample_seconds",
                     "sample_temperature")


def learning_rate_at(step: int, config: TrainConfig, size: int) -> float:
    """Linear warm-up from the one-rank rate to ``size`` times it; then constant, or with
    ``lr_schedule="cosine"`` half a cosine from there down to :data:`COSINE_FLOOR` of it at
    the run's last step (``step`` counts from 0).

    Examples
    --------
    >>> config = TrainConfig(steps=1101, warmup_steps=100, lr_schedule="cosine")
    >>> [round(learning_rate_at(step, config, 2) / config.learning_rate, 3)
    ...  for step in (0, 50, 100, 600, 1100)]
    [1.0, 1.5, 2.0, 1.1, 0.2]
    """
    ramp = 1.0 if config.warmup_steps == 0 else min(1.0, step / config.warmup_steps)
    rate = config.learning_rate * (1.0 + (size - 1) * ramp)
    decaying = config.steps - 1 - config.warmup_steps  # the last step runs at the floor
    if config.lr_schedule == "constant" or step <= config.warmup_steps or decaying <= 0:
        return rate
    progress = min(1.0, (step - config.warmup_steps) / decaying)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return rate * (COSINE_FLOOR + (1.0 - COSINE_FLOOR) * cosine)


def split_window(windows, receptive):
    """Inputs and targets of ``(batch, receptive + T)`` windows: all but the last code,
    and the ``T`` codes each output position predicts."""
    return windows[:, :-1], windows[:, receptive:]


def nll_nats(logits, targets):
    """Mean negative log-likelihood in nats per target code."""
    import tensorflow as tf

    targets = tf.cast(targets, tf.int32)
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits))


def init_horovod():
    """Start Horovod, pin this rank's device and share the CPU cores between local ranks."""
    import horovod.tensorflow as hvd
    import tensorflow as tf

    hvd.init()  # Horovod: 1. initialise
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        # Horovod: 2. pin one GPU per process, by local rank
        tf.config.experimental.set_memory_growth(gpus[hvd.local_rank()], True)
        tf.config.set_visible_devices(gpus[hvd.local_rank()], "GPU")
    else:
        # Horovod: 2. on CPU, give each local rank its share of the cores (no oversubscription)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        try:
            tf.config.threading.set_intra_op_parallelism_threads(
                max(1, cores // hvd.local_size()))
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # TensorFlow already started in this process: keep its pools
            pass
    return hvd


class Trainer:
    """A model, its optimizer and the compiled distributed step, for one rank.

    ``rainforest.train.train`` drives it; tests drive it directly with chosen batches.
    """

    def __init__(self, model_config: ModelConfig, config: TrainConfig, hvd) -> None:
        import keras
        import tensorflow as tf

        from rainforest.network import build_model

        self.hvd, self.config, self.model_config = hvd, config, model_config
        self.size = hvd.size()
        # "auto" left in a config (the API, or a checkpoint older than --compile auto) takes
        # the rule's choice; `train` resolves it before building a Trainer.
        compile_mode, precision = rule(config.compile, config.precision, gpu_present())
        keras.mixed_precision.set_dtype_policy(precision)
        self.receptive = receptive_field(model_config)
        # Every rank builds the same initial weights from the seed; the broadcast after the
        # first step makes that a guarantee rather than an assumption.
        self.model = build_model(model_config, seed=config.seed,
                                 layout=network_layout(compile_mode, precision))
        # Named, as the model is: its variables' names are checked when a checkpoint loads.
        self.optimizer = keras.optimizers.Adam(learning_rate=config.learning_rate, name="adam")
        self.optimizer.build(self.model.trainable_variables)
        self.broadcast_done = False
        model, optimizer, receptive = self.model, self.optimizer, self.receptive
        conditioned = model_config.conditioned

        def local_loss(inputs, targets, labels):
            logits = model(inputs, labels) if conditioned else model(inputs)
            return nll_nats(logits, targets)

        eager = compile_mode == "eager"
        forward = local_loss if eager else tf.function(local_loss,
                                                       jit_compile=compile_mode == "xla")

        def step(windows, labels, learning_rate, stop_requested):
            inputs, targets = split_window(windows, receptive)
            with tf.GradientTape() as tape:
                loss = forward(inputs, targets, labels)
            # Horovod: 4. average gradients across ranks with ring allreduce
            tape = hvd.DistributedGradientTape(tape)
            grads = tape.gradient(loss, [v.value for v in model.trainable_variables])
            grads, norm = tf.clip_by_global_norm(grads, config.clip_norm)
            optimizer.learning_rate.assign(learning_rate)
            optimizer.apply(grads, model.trainable_variables)
            # Horovod: 6. average the metric across ranks; any rank's stop request stops all
            mean_loss = hvd.allreduce(loss, op=hvd.Average)
            stop = hvd.allreduce(stop_requested, op=hvd.Max)
            return mean_loss, norm, stop

        def summed_nll(windows, labels):
            inputs, targets = split_window(windows, receptive)
            count = tf.cast(tf.size(targets), tf.float64)
            return tf.cast(forward(inputs, targets, labels), tf.float64) * count, count

        self._step = step if eager else tf.function(step)
        self._summed_nll = summed_nll if eager else tf.function(summed_nll)

    def train_step(self, windows, labels, step: int, *, stop_requested: bool = False):
        """One optimizer step on this rank's batch; returns (mean loss in nats, grad norm, stop)."""
        import tensorflow as tf

        rate = learning_rate_at(step, self.config, self.size)
        loss, norm, stop = self._step(
            tf.convert_to_tensor(windows), tf.convert_to_tensor(labels),
            tf.constant(rate, tf.float32), tf.constant(int(stop_requested), tf.int32))
        if not self.broadcast_done:
            # Horovod: 5. broadcast rank 0's model and optimizer state after the first step
            self.hvd.broadcast_variables([v.value for v in self.model.variables], root_rank=0)
            self.hvd.broadcast_variables([v.value for v in self.optimizer.variables],
                                         root_rank=0)
            self.broadcast_done = True
        return float(loss), float(norm), bool(stop)

    def validation_bits(self, windows: np.ndarray, labels: np.ndarray) -> float:
        """Held-out bits per sample over every rank's windows (NaN when nobody has any)."""
        import tensorflow as tf

        total, count = 0.0, 0.0
        batch = self.config.batch_size
        for first in range(0, windows.shape[0], batch):
            nll, n = self._summed_nll(tf.convert_to_tensor(windows[first:first + batch]),
                                      tf.convert_to_tensor(labels[first:first + batch]))
            total, count = total + float(nll), count + float(n)
        # Horovod: 6. sum the held-out likelihood over ranks
        summed = self.hvd.allreduce(tf.constant([total, count], tf.float64), op=self.hvd.Sum)
        total, count = (float(x) for x in summed.numpy())
        return total / count / math.log(2.0) if count else float("nan")

    def weights(self) -> list[np.ndarray]:
        return [np.array(v.numpy()) for v in self.model.weights]

    def save(self, folder: str) -> None:
        self.model.save_weights(os.path.join(folder, checkpoint.WEIGHTS_NAME))
        checkpoint.save_arrays(
            os.path.join(folder, checkpoint.OPTIMIZER_NAME),
            [(v.path, np.asarray(v.numpy())) for v in self.optimizer.variables])

    def load(self, folder: str) -> None:
        try:
            self.model.load_weights(os.path.join(folder, checkpoint.WEIGHTS_NAME))
        except Exception as error:  # Keras raises ValueError/OSError/KeyError by case
            raise CheckpointError(
                f"cannot load the weights of {folder} into this model: {error}") from None
        saved = checkpoint.load_arrays(os.path.join(folder, checkpoint.OPTIMIZER_NAME))
        variables = self.optimizer.variables
        if len(saved) != len(variables):
            raise CheckpointError(
                f"{folder} holds {len(saved)} optimizer variables, this optimizer has "
                f"{len(variables)}")
        for (name, array), variable in zip(saved, variables, strict=True):
            if name != variable.path or tuple(array.shape) != tuple(variable.shape):
                raise CheckpointError(
                    f"optimizer variable {name} {array.shape} in {folder} does not match "
                    f"{variable.path} {tuple(variable.shape)}")
            variable.assign(array)


def check_fit(dataset: Dataset, model_config: ModelConfig) -> None:
    """Refuse a model config that does not fit the dataset, before any heavy work."""
    classes = dataset.audio.mu + 1
    if model_config.classes != classes:
        raise ParameterError(
            f"the model predicts {model_config.classes} classes but the dataset's codes take "
            f"{classes} values; set \"classes\": {classes} in the model config"
        )
    if model_config.conditioned:
        missing = sorted({str(s.label) for s in dataset.songs
                          if s.label not in model_config.labels})
        if missing:
            raise ParameterError(
                f"songs with labels {missing[:5]} are not among the model's labels "
                f"{list(model_config.labels)[:5]}; preprocess with --labels or train without "
                "--condition"
            )


@dataclass
class TrainingState:
    """Everything a resume needs, in one object: the configs, the step and where it came from.

    ``step`` is the next optimizer step and also the data position: the windows of a step are
    a pure function of it (see :class:`~rainforest.sampling.WindowSampler`). ``data`` names the
    data the run reads (dataset, manifest sha256, seed, ranks, steps per epoch). The weights
    and optimizer slots live in the :class:`Trainer`; this object is what a checkpoint's
    ``config.json`` records beside them.
    """

    model: ModelConfig
    train: TrainConfig
    step: int = 0
    resumed_from: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, folder: str) -> TrainingState:
        """The state saved in checkpoint ``folder``, after checking every file's sha256."""
        saved = checkpoint.read_config(folder)
        checkpoint.verify(folder, saved)
        data = dict(saved["data"])
        step = int(data.pop("next_step"))
        return cls(model=ModelConfig.from_dict(saved["model"]),
                   train=TrainConfig.from_dict(saved["train"]), step=step,
                   resumed_from=folder, data=data)

    def to_document(self, *, audio, metrics: dict[str, float], size: int) -> dict[str, Any]:
        """The checkpoint's ``config.json`` content (the format header is added on write)."""
        return checkpoint.config_document(
            model=self.model, audio=audio, train=self.train, next_step=self.step,
            learning_rate=learning_rate_at(self.step, self.train, size), data=self.data,
            metrics=metrics)


def labels_for_conditioning(dataset: Dataset) -> tuple[str, ...]:
    """The dataset's labels, for ``--condition``; an error if some songs have none."""
    unlabelled = dataset.unlabelled
    if unlabelled:
        raise ParameterError(
            f"--condition needs a label on every song, but {len(unlabelled)} song(s) have none "
            f"(e.g. {unlabelled[0].source}); preprocess with `--labels parent` to label songs "
            "by folder"
        )
    return dataset.labels


def _differences(saved: Mapping[str, Any], asked: Mapping[str, Any]) -> list[str]:
    return [f"{name}={value!r} (the run has {saved[name]!r})"
            for name, value in sorted(asked.items()) if saved.get(name) != value]


def start_state(run: str, dataset: Dataset, *, model_config: ModelConfig | None,
                config: TrainConfig | None, overrides: Mapping[str, Any], resume: bool,
                condition: bool, log) -> TrainingState:
    """Decide where training starts: a new run, or the latest checkpoint of ``run``.

    A new run takes ``config`` (default ``TrainConfig()``) with ``overrides`` applied. A resume
    keeps the saved configs and takes only :data:`RESUME_MAY_CHANGE` from what was asked; any
    other setting asked for that differs from the saved run is named in a warning.
    """
    existing = checkpoint.list_checkpoints(run)
    if not resume:
        if existing:
            raise ParameterError(
                f"run folder {run} already holds {len(existing)} checkpoint(s); pass --resume "
                "to continue it, or choose a new --run folder")
        model = model_config or ModelConfig()
        if condition:
            model = dataclasses.replace(model, labels=labels_for_conditioning(dataset))
        train = dataclasses.replace(config or TrainConfig(), **overrides)
        return TrainingState(model=model, train=train)
    state = TrainingState.from_checkpoint(checkpoint.latest(run))
    asked = {**(config.to_dict() if config else {}), **overrides}
    ignored = _differences(state.train.to_dict(), {k: v for k, v in asked.items()
                                                   if k not in RESUME_MAY_CHANGE})
    if model_config is not None and model_config != state.model:
        ignored += _differences(state.model.to_dict(), model_config.to_dict())
    if ignored:
        log(f"warning: --resume keeps the settings {state.resumed_from} was trained with; "
            f"ignoring {', '.join(ignored)}. Start a new --run to change them")
    state.train = dataclasses.replace(state.train, **{k: v for k, v in asked.items()
                                                      if k in RESUME_MAY_CHANGE})
    return state


def _check_resume(state: TrainingState, dataset: Dataset, manifest_digest: str, size: int,
                  log) -> None:
    if state.step >= state.train.steps:
        raise ParameterError(
            f"{state.resumed_from} is already at step {state.step}; pass a larger --steps to "
            "go on")
    if state.data["dataset_manifest_sha256"] != manifest_digest:
        raise ParameterError(
            f"{state.resumed_from} was trained on a different dataset (manifest sha256 "
            f"{state.data['dataset_manifest_sha256'][:12]}...); resume with the same "
            "dataset or start a new --run")
    if state.data["ranks"] != size:
        log(f"note: the checkpoint was written by {state.data['ranks']} rank(s) and this run "
            f"has {size}; training continues, but the data order differs from an "
            "uninterrupted run")


@dataclass
class TrainingInput:
    """One rank's training windows and its part of the fixed held-out windows."""

    sampler: WindowSampler
    training_songs: int
    held_out_songs: int
    validation: tuple[np.ndarray, np.ndarray] | None


def training_input(dataset: Dataset, state: TrainingState, *, rank: int,
                   size: int) -> TrainingInput:
    """Split the songs, give this rank its share, and cut its held-out windows."""
    model, config = state.model, state.train
    window = receptive_field(model) + config.target_length
    training, held_out = split_songs(dataset.songs,
                                     validation_fraction=config.validation_fraction)
    label_ids = {name: i for i, name in enumerate(model.labels)} or None
    share = rank_share(training, rank=rank, size=size)
    dataset.verify_shards((song.shard for song in share + held_out), full=config.verify_shards)
    sampler = WindowSampler(dataset, share,
                            window=window, target_length=config.target_length,
                            batch_size=config.batch_size, seed=config.seed, rank=rank,
                            label_ids=label_ids)
    validation = None
    if held_out and config.validation_windows > 0 and config.validation_every > 0:
        validation = validation_windows(dataset, held_out, window=window,
                                        count=config.validation_windows, rank=rank, size=size,
                                        label_ids=label_ids)
    return TrainingInput(sampler, len(training), len(held_out), validation)


def train(dataset_url: str, run: str, *, model_config: ModelConfig | None = None,
          config: TrainConfig | None = None, overrides: Mapping[str, Any] | None = None,
          resume: bool = False, condition: bool = False,
          time_limit_minutes: float | None = None, elastic: bool = False,
          progress: bool = True, log=print) -> dict[str, Any]:
    """Train a WaveNet on a dataset; every rank calls this (see ``rainforest train --help``).

    ``condition`` conditions a new model on the dataset's labels. ``overrides`` are settings
    asked for by name (the command line's); on ``resume`` only ``steps`` is taken from them
    and from ``config``. ``time_limit_minutes`` stops the run cleanly, with a checkpoint, once
    that much wall time has passed since the first step (useful inside a Slurm time limit).
    ``elastic`` survives lost and joining ranks under ``horovodrun --host-discovery-script``
    (the state a lost rank rolls back to is :mod:`rainforest.elastic`'s).

    Returns a summary on every rank: final step, last losses, held-out bits per sample.
    """
    hvd = init_horovod()
    rank, size = hvd.rank(), hvd.size()
    say = log if rank == 0 else (lambda line: None)
    if rank == 0:  # Horovod: 7. only rank 0 writes (here: removes a killed writer's leftovers)
        checkpoint.remove_leftovers(run)
    dataset = Dataset(dataset_url)
    manifest_digest = storage.sha256_of(storage.join(dataset.url, MANIFEST_NAME))
    state = start_state(run, dataset, model_config=model_config, config=config,
                        overrides=overrides or {}, resume=resume, condition=condition, log=say)
    if state.resumed_from:
        _check_resume(state, dataset, manifest_digest, size, say)
    check_fit(dataset, state.model)
    data = training_input(dataset, state, rank=rank, size=size)
    choice = _step_choice(state, hvd, elastic=elastic, log=say)
    state.data = {"seed": state.train.seed, "ranks": size, "dataset": dataset.url,
                  "dataset_manifest_sha256": manifest_digest,
                  "steps_per_epoch": data.sampler.steps_per_epoch,
                  "step_choice": choice.to_dict()}
    trainer = Trainer(state.model, state.train, hvd)
    if state.resumed_from:
        with checkpoint.local_copy(state.resumed_from) as folder:
            trainer.load(folder)
    say(_banner(dataset, state, size, data))
    deadline = None if time_limit_minutes is None else time.monotonic() + 60 * time_limit_minutes
    config = state.train
    sampling = TrainingSampler(run, config.sample_every, config.sample_seconds,
                              config.sample_temperature, config.seed, log=say)
    try:
        with graceful_stop(interrupt=False, also_ctrl_c=True) as stop:
            context = _RunContext(run, dataset, deadline, sampling, stop, log)
            if elastic:  # Horovod: no collective before elastic.run's first sync (joiners hang)
                stopped_by, val_bits, unigram, writer = _train_elastic(trainer, state, context,
                                                                       progress=progress)
            else:
                writer = RankZeroLog(run, rank, progress=progress, log=log)
                stopped_by, val_bits, unigram = _membership(trainer, state, data, writer, context)
    except BaseException:
        sampling.abandon()  # no waiting for samples of a run that failed
        raise
    finally:
        arm_watchdog(0)  # an error leaving the loop must not leave a watchdog behind
    sampling.finish(writer)  # its last summaries go out with the logs
    writer.finish(state.step, stopped_by)
    return {"step": state.step, "stopped_by": stopped_by, "validation_bits": val_bits,
            "unigram_bits": unigram, "rank": hvd.rank(), "ranks": hvd.size(),
            "last": writer.last}


def _step_choice(state: TrainingState, hvd, *, elastic: bool, log) -> StepChoice:
    """Resolve a new run's ``--compile auto`` and ``--precision auto`` into ``state.train``;
    a resumed run keeps the choice it was started with."""
    if state.resumed_from:
        saved = state.data.get("step_choice")
        if saved:
            return StepChoice(**saved)
        return StepChoice(state.train.compile, state.train.precision, reason="as saved")
    config = state.train
    choice = choose(state.model, config, hvd, gpu=gpu_present(), steps_left=config.steps,
                    elastic=elastic, log=log,
                    build_trainer=lambda candidate: Trainer(state.model, candidate, hvd))
    state.train = dataclasses.replace(config, compile=choice.compile,
                                      precision=choice.precision)
    log(f"training step: {choice.compile}, {choice.precision}: {choice.reason}")
    return choice


@dataclass
class _RunContext:
    """What every membership of ranks in one run shares: where it writes, when and why it stops."""

    run: str
    dataset: Dataset
    deadline: float | None  # time.monotonic() at which the time limit stops the run
    sampling: TrainingSampler
    stop: StopRequest
    log: Any


def _membership(trainer: Trainer, state: TrainingState, data: TrainingInput,
                writer: RankZeroLog, context: _RunContext, commit=None
                ) -> tuple[str, float, float | None]:
    """Train with the ranks there are now; returns (stopped by, held-out bits, unigram bits).

    A fixed run has one membership; an elastic run has one per change of ranks.
    """
    hvd = trainer.hvd
    state.data.update(ranks=hvd.size(), steps_per_epoch=data.sampler.steps_per_epoch)
    hosts = hvd.allgather_object(socket.gethostname())  # Horovod: a collective on every rank
    if hvd.rank() == 0:
        context.log(f"ranks on hosts: {', '.join(hosts)}")
    unigram = None
    if data.validation is not None:
        unigram = _unigram_bits(data.validation[0][:, trainer.receptive:], hvd)
    stopped_by, bits = _loop(trainer, state, data, writer, context, unigram=unigram,
                             commit=commit)
    return stopped_by, bits, unigram


def _train_elastic(trainer: Trainer, state: TrainingState, context: _RunContext, *,
                   progress: bool) -> tuple[str, float, float | None, RankZeroLog]:
    """Train until the last step or a stop, surviving lost and joining ranks.

    Returns ``(stopped_by, validation_bits, unigram_bits, writer)`` of the final membership.
    """
    from rainforest.elastic import ElasticLog, ElasticTrainingState, weights_digest

    hvd, log = trainer.hvd, context.log
    trainer.broadcast_done = True  # the first sync below is the broadcast
    elastic_state = ElasticTrainingState(state, trainer, hvd)
    outcome, recent = {}, {}

    # Horovod: elastic.run syncs from rank 0, and on a lost or added rank restores the last
    # commit, re-forms the ring and calls the function again
    @hvd.elastic.run
    def train_from_commit(elastic_state):
        rank, size = hvd.rank(), hvd.size()
        trainer.size = size  # Horovod: 3. the learning rate follows the number of ranks
        data = training_input(context.dataset, state, rank=rank, size=size)
        writer = ElasticLog(context.run, rank, size, recent, progress=progress, log=log)
        if rank == 0:
            log(f"elastic: {size} rank(s), training from step {state.step} (the last commit; "
                f"{elastic_state.repeated} step(s) after it are done again); rank 0 trains on "
                f"{len(data.sampler.songs)} of {data.training_songs} songs")
        elastic_state.repeated = 0
        outcome.update(writer=writer, result=_membership(trainer, state, data, writer, context,
                                                         commit=elastic_state.commit))
        return True

    # Horovod: elastic.run returns None, silently, on a TensorFlow error it cannot place
    if train_from_commit(elastic_state) is not True:
        raise RainforestError(
            f"elastic training stopped at step {state.step} on an error Horovod could not "
            "recover from (see the TensorFlow messages above); continue with --resume")
    # Every rank names its weights, so a log shows that the ranks agree after joins.
    log(f"rank {hvd.rank()}/{hvd.size()}: step {state.step}, weights sha256 "
        f"{weights_digest(trainer.model.weights)}")
    return (*outcome["result"], outcome["writer"])


def _loop(trainer: Trainer, state: TrainingState, data: TrainingInput, writer: RankZeroLog,
          context: _RunContext, *, unigram: float | None, commit=None) -> tuple[str, float]:
    """Train from ``state.step`` to the last step or a stop; returns (stopped by, bits).

    ``context.sampling`` makes audio samples of the steps it is due at, beside training.

    ``commit`` (elastic training) is called every ``commit_every`` steps and after each
    checkpoint, so no checkpoint is ever ahead of the state a lost rank rolls back to.
    """
    config, size = state.train, trainer.size
    stop, run, sampling = context.stop, context.run, context.sampling
    audio = context.dataset.audio

    def save() -> None:
        if trainer.hvd.rank() == 0:  # Horovod: 7. only rank 0 writes checkpoints
            checkpoint.write(run, state.step,
                             state.to_document(audio=audio, metrics=writer.last, size=size),
                             trainer.save, keep=config.keep_checkpoints)
            writer.publish()  # an s3:// run's logs travel with each checkpoint

    def snapshot() -> Snapshot:  # a copy in memory: milliseconds, where a Keras file takes 10x
        return Snapshot([(v.path, np.array(v.numpy())) for v in trainer.model.weights],
                        state.model.to_dict(), audio.to_dict())

    last_saved = state.step if state.resumed_from else -1
    samples_per_step = config.batch_size * config.target_length
    writer.start(state.step, config.steps)
    tick, tick_step = time.perf_counter(), state.step
    val_bits, stopped_by = float("nan"), ""
    watchdog = arm_watchdog(config.stall_timeout)  # stays armed across elastic resets
    for windows, labels in data.sampler.tf_dataset(state.step, config.steps):
        if (context.deadline is not None and time.monotonic() > context.deadline
                and not stop.requested):
            stop.ask("the time limit")
        loss, norm, stop_all = trainer.train_step(windows, labels, state.step,
                                                  stop_requested=stop.requested)
        watchdog.beat()
        state.step += 1
        step = state.step
        scalars = {"loss_bits": loss / math.log(2.0), "grad_norm": norm,
                   "learning_rate": learning_rate_at(step - 1, config, size)}
        if step % config.log_every == 0 or step == config.steps:
            elapsed = time.perf_counter() - tick
            per_rank = (step - tick_step) * samples_per_step / max(elapsed, 1e-9)
            scalars.update(samples_per_second=per_rank * size, samples_per_second_per_rank=per_rank)
            tick, tick_step = time.perf_counter(), step
        if data.validation is not None and (step % config.validation_every == 0
                                            or step == config.steps):
            val_bits = trainer.validation_bits(*data.validation)
            scalars.update(validation_bits=val_bits, unigram_bits=unigram)
        writer.record(step, scalars)
        sampling.at_step(step, trainer.hvd.rank(), writer, snapshot)
        if step % config.checkpoint_every == 0:
            save()
            last_saved = step
        if commit is not None and (step % config.commit_every == 0
                                   or step % config.checkpoint_every == 0):
            commit()  # Horovod: a collective; raises when ranks were lost or hosts added
        if stop_all:
            stopped_by = stop.reason or "another rank"
            break
    watchdog.disarm()
    if last_saved != state.step:
        save()
    return stopped_by, val_bits


def _unigram_bits(targets: np.ndarray, hvd) -> float:
    """Entropy of the held-out codes' own histogram: what a model ignoring context achieves."""
    import tensorflow as tf

    counts = np.bincount(targets.ravel(), minlength=256).astype(np.float64)
    counts = hvd.allreduce(tf.constant(counts), op=hvd.Sum).numpy()  # Horovod: 6. sum over ranks
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _banner(dataset: Dataset, state: TrainingState, size: int, data: TrainingInput) -> str:
    model_config, config = state.model, state.train
    n_train, n_held = data.training_songs, data.held_out_songs
    where = (f"resuming {state.resumed_from} at step {state.step}" if state.resumed_from
             else "new run")
    labels = f", labels: {len(model_config.labels)}" if model_config.labels else ""
    return (
        f"training on {dataset.url}: {n_train} songs, {n_held} held out ({dataset.hours:.2f} h)\n"
        f"model: {len(model_config.dilations)} layers, receptive field "
        f"{receptive_field(model_config)} codes, residual {model_config.residual_channels}, "
        f"skip {model_config.skip_channels}, {multiply_adds_per_sample(model_config) / 1e6:.2f} "
        f"M multiply-adds/sample{labels}\n"
        f"{size} rank(s) x batch {config.batch_size} x {config.target_length} targets; "
        f"{config.compile}, {config.precision}; {where}"
    )


if __name__ == "__main__":  # python -m rainforest.train ARGS is rainforest train ARGS
    from rainforest.cli import run_stage

    run_stage("train")
