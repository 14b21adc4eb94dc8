"""Data-parallel training with Horovod ring allreduce (``rainforest train``).

The same code runs as one process, under ``horovodrun -np N`` (Gloo or MPI), under
``mpirun -np N`` and under Slurm's ``srun``. Every Horovod line is tagged ``# Horovod:`` and
they come in Horovod's own order: init, pin the device, scale the learning rate, wrap the
gradient tape, broadcast after the first step, average metrics, and let rank 0 alone write.
Keras 3 variables are passed to Horovod as ``v.value`` (``horovod.tensorflow.keras`` does not
work with Keras 3).

Learning rate: ``lr * size`` after a linear warm-up from ``lr`` (Goyal et al., "Accurate,
Large Minibatch SGD", 2017, section 2.2), so step 0 uses the single-worker rate.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from rainforest import checkpoint, storage
from rainforest.config import from_dict
from rainforest.dataset import (
    Dataset,
    WindowSampler,
    rank_share,
    split_songs,
    validation_windows,
)
from rainforest.errors import CheckpointError, ParameterError
from rainforest.model import ModelConfig, receptive_field

COMPILE_MODES = ("eager", "graph", "xla")
PRECISIONS = ("auto", "float32", "mixed_bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Saved in every checkpoint next to the model and audio configs.

    Parameters
    ----------
    steps
        Total optimizer steps of the run (a resumed run continues to this number).
    batch_size
        Windows per step on each rank; the global batch is ``batch_size * ranks``.
    target_length
        Predicted codes per window; a window holds ``receptive_field + target_length`` codes.
    learning_rate
        Adam's rate for one rank; scaled by the number of ranks after ``warmup_steps``.
    clip_norm
        Gradients are clipped to this global norm (after averaging across ranks).
    validation_fraction, validation_every, validation_windows
        Share of songs held out (by song), how often to measure held-out bits per sample,
        and how many fixed windows to measure it on (0 = never).
    checkpoint_every, keep_checkpoints
        Checkpoint period in steps (and always at the end), and how many to keep.
    compile
        ``"graph"`` (``tf.function``), ``"xla"`` (``jit_compile``) or ``"eager"``.
    precision
        ``"auto"`` (bfloat16 compute on a GPU, float32 on a CPU), ``"float32"`` or
        ``"mixed_bfloat16"``.
    """

    steps: int = 1000
    batch_size: int = 4
    target_length: int = 4096
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    clip_norm: float = 1.0
    validation_fraction: float = 0.1
    validation_every: int = 100
    validation_windows: int = 64
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    seed: int = 0
    compile: str = "graph"
    precision: str = "auto"
    log_every: int = 10

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "target_length", "checkpoint_every",
                     "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ParameterError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "validation_every", "validation_windows", "seed"):
            if getattr(self, name) < 0:
                raise ParameterError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0 or not self.clip_norm > 0:
            raise ParameterError("learning_rate and clip_norm must be positive")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ParameterError(
                f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.compile not in COMPILE_MODES:
            raise ParameterError(f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if self.precision not in PRECISIONS:
            raise ParameterError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return from_dict(cls, data)


def learning_rate_at(step: int, config: TrainConfig, size: int) -> float:
    """Linear warm-up from the one-rank rate to ``size`` times it, then constant."""
    ramp = 1.0 if config.warmup_steps == 0 else min(1.0, step / config.warmup_steps)
    return config.learning_rate * (1.0 + (size - 1) * ramp)


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

        from rainforest.layers import nll_nats, split_window
        from rainforest.model import build_model

        self.hvd, self.config, self.model_config = hvd, config, model_config
        self.size = hvd.size()
        gpu = bool(tf.config.list_physical_devices("GPU"))
        precision = config.precision
        if precision == "auto":
            precision = "mixed_bfloat16" if gpu else "float32"
        keras.mixed_precision.set_dtype_policy(precision)
        self.receptive = receptive_field(model_config)
        # Every rank builds the same initial weights from the seed; the broadcast after the
        # first step makes that a guarantee rather than an assumption.
        self.model = build_model(model_config, seed=config.seed)
        self.optimizer = keras.optimizers.Adam(learning_rate=config.learning_rate)
        self.optimizer.build(self.model.trainable_variables)
        self.broadcast_done = False
        model, optimizer, receptive = self.model, self.optimizer, self.receptive
        conditioned = model_config.conditioned

        def local_loss(inputs, targets, labels):
            logits = model(inputs, labels) if conditioned else model(inputs)
            return nll_nats(logits, targets)

        jit = config.compile == "xla"
        forward = local_loss if config.compile == "eager" else tf.function(
            local_loss, jit_compile=jit)

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

        self._step = step if config.compile == "eager" else tf.function(step)
        self._summed_nll = summed_nll if config.compile == "eager" else tf.function(summed_nll)

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


@dataclass
class _StopFlag:
    requested: bool = False
    signal_name: str = ""

    def install(self) -> None:
        def handler(signum, frame):
            self.requested = True
            self.signal_name = signal.Signals(signum).name

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def _label_ids(model_config: ModelConfig) -> dict[str, int] | None:
    return {name: i for i, name in enumerate(model_config.labels)} or None


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


def dataset_labels(dataset: Dataset) -> tuple[str, ...]:
    """The sorted distinct song labels, for ``--condition``; an error if songs lack labels."""
    unlabelled = [s.source for s in dataset.songs if s.label is None]
    if unlabelled:
        raise ParameterError(
            f"--condition needs a label on every song, but {len(unlabelled)} song(s) have none "
            f"(e.g. {unlabelled[0]}); preprocess with `--labels parent` to label songs by folder"
        )
    return tuple(sorted({str(s.label) for s in dataset.songs}))


def train(dataset_url: str, run: str, *, model_config: ModelConfig | None = None,
          config: TrainConfig | None = None, resume: bool = False,
          time_limit_minutes: float | None = None,
          progress: bool = True, log=print) -> dict[str, Any]:
    """Train a WaveNet on a dataset; every rank calls this (see ``rainforest train --help``).

    ``time_limit_minutes`` stops the run cleanly, with a checkpoint, once that much wall time
    has passed since the first step (useful inside a Slurm time limit).

    Returns a summary on every rank: final step, last losses, held-out bits per sample.
    """
    hvd = init_horovod()
    rank, size = hvd.rank(), hvd.size()
    dataset = Dataset(dataset_url)
    manifest_digest = storage.sha256_of(storage.join(dataset.url, "manifest.json"))
    start_step, resumed_from = 0, None
    existing = checkpoint.list_checkpoints(run)
    if resume:
        resumed_from = checkpoint.latest(run)
        saved = checkpoint.read_config(resumed_from)
        checkpoint.verify(resumed_from, saved)
        model_config = ModelConfig.from_dict(saved["model"])
        saved_train = TrainConfig.from_dict(saved["train"])
        config = dataclasses.replace(saved_train, steps=(config or saved_train).steps)
        start_step = int(saved["data"]["next_step"])
        if saved["data"]["dataset_manifest_sha256"] != manifest_digest:
            raise ParameterError(
                f"{resumed_from} was trained on a different dataset (manifest sha256 "
                f"{saved['data']['dataset_manifest_sha256'][:12]}...); resume with the same "
                "dataset or start a new --run"
            )
        if saved["data"]["ranks"] != size and rank == 0:
            log(f"note: the checkpoint was written by {saved['data']['ranks']} rank(s) and this "
                f"run has {size}; training continues, but the data order differs from an "
                "uninterrupted run")
    elif existing:
        raise ParameterError(
            f"run folder {run} already holds {len(existing)} checkpoint(s); pass --resume to "
            "continue it, or choose a new --run folder"
        )
    model_config = model_config or ModelConfig()
    config = config or TrainConfig()
    check_fit(dataset, model_config)
    receptive = receptive_field(model_config)
    window = receptive + config.target_length
    training_songs, held_out = split_songs(dataset.songs,
                                           validation_fraction=config.validation_fraction)
    label_ids = _label_ids(model_config)
    sampler = WindowSampler(dataset, rank_share(training_songs, rank=rank, size=size),
                            window=window, target_length=config.target_length,
                            batch_size=config.batch_size, seed=config.seed, rank=rank,
                            label_ids=label_ids)
    validate = bool(held_out) and config.validation_windows > 0 and config.validation_every > 0
    if validate:
        val_windows, val_labels = validation_windows(
            dataset, held_out, window=window, count=config.validation_windows, rank=rank,
            size=size, label_ids=label_ids)
    if start_step >= config.steps:
        raise ParameterError(
            f"{resumed_from} is already at step {start_step}; pass a larger --steps to go on")

    trainer = Trainer(model_config, config, hvd)
    if resumed_from:
        trainer.load(resumed_from)
    writer = _RankZeroLog(run, rank, progress=progress, log=log)
    stop = _StopFlag()
    stop.install()
    unigram = None
    if validate:
        unigram = _unigram_bits(val_windows[:, receptive:], hvd)
    if rank == 0:
        log(_banner(dataset, model_config, config, size, len(training_songs), len(held_out),
                    start_step, resumed_from))
    data_position = {"seed": config.seed, "ranks": size, "dataset": dataset.url,
                     "dataset_manifest_sha256": manifest_digest,
                     "steps_per_epoch": sampler.steps_per_epoch}

    def save(step: int) -> None:
        if rank != 0:  # Horovod: 7. only rank 0 writes checkpoints
            return
        document = {"model": model_config.to_dict(), "audio": dataset.audio.to_dict(),
                    "train": config.to_dict(),
                    "optimizer": {"name": "adam", "file": checkpoint.OPTIMIZER_NAME,
                                  "learning_rate": learning_rate_at(step, config, size)},
                    "data": {**data_position, "next_step": step},
                    "metrics": writer.last}
        checkpoint.write(run, step, document, trainer.save, keep=config.keep_checkpoints)

    step = start_step
    last_saved = start_step if resumed_from else -1
    samples_per_step = config.batch_size * config.target_length
    writer.start(start_step, config.steps)
    tick, tick_step = time.perf_counter(), step
    val_bits = float("nan")
    stopped_by = ""
    deadline = None if time_limit_minutes is None else time.monotonic() + 60 * time_limit_minutes
    for windows, labels in sampler.tf_dataset(start_step, config.steps):
        if deadline is not None and time.monotonic() > deadline and not stop.requested:
            stop.requested, stop.signal_name = True, "the time limit"
        loss, norm, stop_all = trainer.train_step(windows, labels, step,
                                                  stop_requested=stop.requested)
        step += 1
        scalars = {"loss_bits": loss / math.log(2.0), "grad_norm": norm,
                   "learning_rate": learning_rate_at(step - 1, config, size)}
        if step % config.log_every == 0 or step == config.steps:
            elapsed = time.perf_counter() - tick
            per_rank = (step - tick_step) * samples_per_step / max(elapsed, 1e-9)
            scalars.update(samples_per_second=per_rank * size, samples_per_second_per_rank=per_rank)
            tick, tick_step = time.perf_counter(), step
        if validate and (step % config.validation_every == 0 or step == config.steps):
            val_bits = trainer.validation_bits(val_windows, val_labels)
            scalars.update(validation_bits=val_bits, unigram_bits=unigram)
        writer.record(step, scalars)
        if step % config.checkpoint_every == 0:
            save(step)
            last_saved = step
        if stop_all:
            stopped_by = stop.signal_name or "another rank"
            break
    if last_saved != step:
        save(step)
    writer.finish(step, stopped_by)
    return {"step": step, "stopped_by": stopped_by, "validation_bits": val_bits,
            "unigram_bits": unigram, "rank": rank, "ranks": size, "last": writer.last}


def _unigram_bits(targets: np.ndarray, hvd) -> float:
    """Entropy of the held-out codes' own histogram: what a model ignoring context achieves."""
    import tensorflow as tf

    counts = np.bincount(targets.ravel(), minlength=256).astype(np.float64)
    counts = hvd.allreduce(tf.constant(counts), op=hvd.Sum).numpy()  # Horovod: 6. sum over ranks
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _banner(dataset, model_config, config, size, n_train, n_held, start_step, resumed_from):
    from rainforest.model import multiply_adds_per_sample

    where = f"resuming {resumed_from} at step {start_step}" if resumed_from else "new run"
    labels = f", labels: {len(model_config.labels)}" if model_config.labels else ""
    return (
        f"training on {dataset.url}: {n_train} songs, {n_held} held out ({dataset.hours:.2f} h)\n"
        f"model: {len(model_config.dilations)} layers, receptive field "
        f"{receptive_field(model_config)} codes, residual {model_config.residual_channels}, "
        f"skip {model_config.skip_channels}, {multiply_adds_per_sample(model_config) / 1e6:.2f} "
        f"M multiply-adds/sample{labels}\n"
        f"{size} rank(s) x batch {config.batch_size} x {config.target_length} targets; "
        f"{config.compile}; {where}"
    )


class _RankZeroLog:
    """Progress bar, TensorBoard scalars, ``metrics.jsonl`` and ``curves.png``; rank 0 only."""

    def __init__(self, run: str, rank: int, *, progress: bool, log) -> None:
        self.run, self.active, self.progress, self.log = run, rank == 0, progress, log
        self.last: dict[str, float] = {}
        self._bar = None
        self._tensorboard = None

    def start(self, first: int, last: int) -> None:
        if not self.active:  # Horovod: 7. only rank 0 writes logs
            return
        import tensorflow as tf

        os.makedirs(self.run, exist_ok=True)
        self._tensorboard = tf.summary.create_file_writer(os.path.join(self.run, "tensorboard"))
        if self.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=last, initial=first, unit="step", dynamic_ncols=True,
                             mininterval=1.0, file=sys.stderr)

    def record(self, step: int, scalars: dict[str, float]) -> None:
        if not self.active:
            return
        import tensorflow as tf

        self.last.update({k: float(v) for k, v in scalars.items()
                          if v is not None and math.isfinite(v)})
        with self._tensorboard.as_default(step=step):
            for name, value in scalars.items():
                if value is not None:
                    tf.summary.scalar(name, value)
        line = {"step": step, **{k: float(v) for k, v in scalars.items() if v is not None}}
        with open(os.path.join(self.run, "metrics.jsonl"), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(bits=f"{self.last['loss_bits']:.3f}",
                                  refresh=False)
        if "validation_bits" in scalars:
            message = (f"step {step}: train {self.last['loss_bits']:.3f} bits/sample, held-out "
                       f"{scalars['validation_bits']:.3f} (unigram {scalars['unigram_bits']:.3f})"
                       f", {self.last.get('samples_per_second', float('nan')):.0f} samples/s")
            if self._bar is not None:
                self._bar.write(message, file=sys.stderr)
            else:
                self.log(message)

    def finish(self, step: int, stopped_by: str) -> None:
        if not self.active:
            return
        if self._bar is not None:
            self._bar.close()
        self._tensorboard.flush()
        if stopped_by:
            self.log(f"stopped by {stopped_by} at step {step}; checkpoint written. "
                     f"Continue with --resume")
        try:
            plot_curves(self.run)
        except Exception as error:  # a plot must never cost a finished run
            self.log(f"note: could not draw curves.png ({error})")


def plot_curves(run: str) -> str:
    """Draw training and held-out bits per sample from ``metrics.jsonl`` into ``curves.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"),
                                              encoding="utf-8")]
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot([r["step"] for r in rows], [r["loss_bits"] for r in rows], lw=0.8,
              label="training")
    held = [r for r in rows if "validation_bits" in r]
    if held:
        axes.plot([r["step"] for r in held], [r["validation_bits"] for r in held], "o-",
                  label="held out")
        axes.axhline(held[-1]["unigram_bits"], color="grey", ls="--", label="unigram entropy")
    axes.set_xlabel("step")
    axes.set_ylabel("bits per sample")
    axes.legend()
    axes.grid(alpha=0.3)
    path = os.path.join(run, "curves.png")
    staging = storage.local_staging_path(path)
    figure.savefig(staging, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    os.replace(staging, path)
    return path
