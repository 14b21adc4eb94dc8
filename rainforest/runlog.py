"""What a training run shows and leaves behind besides checkpoints; rank 0 only.

``RUN/metrics.jsonl`` (one JSON line per logged step, with its wall-clock ``time`` in Unix
seconds, so bits can be drawn against time as well as steps), TensorBoard scalars in
``RUN/tensorboard``, ``RUN/curves.png`` (bits per sample against the unigram line) and a
progress bar.

An ``s3://`` run keeps these in a local mirror (a temporary folder, started from what the run
already holds, so a resumed run appends) and uploads them with each checkpoint and at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence

from rainforest import storage
from rainforest.plots import png_figure

METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "curves.png"
TENSORBOARD_DIR = "tensorboard"


class RankZeroLog:
    """Progress bar, TensorBoard scalars, ``metrics.jsonl`` and ``curves.png``; rank 0 only."""

    def __init__(self, run: str, rank: int, *, progress: bool, log) -> None:
        self.run, self.active, self.progress, self.log = run, rank == 0, progress, log
        # Where the logs go in the end; self.run is where they are written (a local mirror).
        self.remote = run if storage.is_remote(run) else None
        self.last: dict[str, float] = {}
        self._bar = None
        self._tensorboard = None

    def start(self, first: int, last: int) -> None:
        if not self.active:  # Horovod: 7. only rank 0 writes logs
            return
        import tensorflow as tf

        if self.remote:
            self.run = tempfile.mkdtemp(prefix="rainforest-run-")
            self._mirror_existing_logs()
        os.makedirs(self.run, exist_ok=True)
        self._tensorboard = tf.summary.create_file_writer(os.path.join(self.run, TENSORBOARD_DIR))
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
        line = {"step": step, "time": round(time.time(), 3),
                **{k: float(v) for k, v in scalars.items() if v is not None}}
        with open(os.path.join(self.run, METRICS_NAME), "a", encoding="utf-8") as handle:
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

    def record_sample(self, step: int, tag: str, samples, rate: int, png: bytes) -> None:
        """One generated clip as TensorBoard audio, and its spectrogram as an image."""
        if not self.active:
            return
        import tensorflow as tf

        with self._tensorboard.as_default(step=step):
            tf.summary.audio(tag, tf.constant(samples, tf.float32)[None, :, None], rate)
            tf.summary.image(tag + "/spectrogram", tf.image.decode_png(png, channels=3)[None])

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
            self.log(f"note: could not draw {CURVES_NAME} ({error})")
        if self.remote:
            self.publish()
            shutil.rmtree(self.run, ignore_errors=True)
            self.run = self.remote

    def _mirror_existing_logs(self) -> None:
        metrics = storage.join(self.remote, METRICS_NAME)
        if storage.exists(metrics):
            with open(os.path.join(self.run, METRICS_NAME), "wb") as handle:
                handle.write(storage.read_bytes(metrics))
        events = storage.join(self.remote, TENSORBOARD_DIR)
        if storage.exists(events):
            storage.download_folder(events, os.path.join(self.run, TENSORBOARD_DIR))

    def publish(self) -> None:
        """Upload the mirrored logs of an ``s3://`` run, each object whole (a no-op locally)."""
        if not (self.active and self.remote and self._tensorboard is not None):
            return
        self._tensorboard.flush()
        for name in (METRICS_NAME, CURVES_NAME):
            if os.path.exists(os.path.join(self.run, name)):
                with storage.Staged(storage.join(self.remote, name)) as staging:
                    shutil.copyfile(os.path.join(self.run, name), staging)
        with storage.Staged(storage.join(self.remote, TENSORBOARD_DIR), folder=True) as staging:
            shutil.copytree(os.path.join(self.run, TENSORBOARD_DIR), staging, dirs_exist_ok=True)


def read_metrics(run: str) -> list[dict[str, float]]:
    """The rows of ``RUN/metrics.jsonl``, a local or ``s3://`` run (empty if it has none yet).

    A line that is not a whole record is skipped: a rank killed while appending leaves one.
    """
    url = storage.join(run, METRICS_NAME)
    if not storage.exists(url):
        return []
    rows = []
    for line in storage.read_bytes(url).decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def forget_steps_after(run: str, step: int) -> list[int]:
    """Remove the records of steps after ``step`` from ``RUN/metrics.jsonl``; returns them.

    A resume goes on from its checkpoint: steps logged after it were trained by a job that
    ended without a later checkpoint (a lost node), and are trained again, so each step of
    the file is the one the weights went through, logged once.
    """
    url = storage.join(run, METRICS_NAME)
    if not storage.exists(url):
        return []
    lines = storage.read_bytes(url).decode("utf-8", errors="replace").splitlines()
    kept, dropped = [], []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a torn line, as read_metrics skips it
        if not (isinstance(row, dict) and "step" in row):
            continue
        (kept if int(row["step"]) <= step else dropped).append((line, int(row["step"])))
    if dropped:
        with storage.Staged(url) as staging, open(staging, "w", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line, _ in kept))
    return [number for _, number in dropped]


def plot_curves(run: str) -> str:
    """Draw training and held-out bits per sample from ``metrics.jsonl`` into ``curves.png``."""
    path = os.path.join(run, CURVES_NAME)
    draw_curves(read_metrics(run), path)
    return path


def draw_curves(rows: list[dict[str, float]], path: str, *, marks: Sequence[int] = ()) -> None:
    """Training and held-out bits per sample against the held-out codes' unigram entropy;
    a dotted line at each step in ``marks`` (the steps with audio samples)."""
    with png_figure(path, size=(7, 4)) as axes:
        for index, step in enumerate(marks):
            axes.axvline(step, color="#b8860b", ls=":", lw=1,
                         label="audio sample" if index == 0 else None)
        trained = [r for r in rows if "loss_bits" in r]
        axes.plot([r["step"] for r in trained], [r["loss_bits"] for r in trained], lw=0.8,
                  label="training")
        held = [r for r in rows if "validation_bits" in r]
        if held:
            axes.plot([r["step"] for r in held], [r["validation_bits"] for r in held], "o-",
                      label="held out")
            axes.axhline(held[-1]["unigram_bits"], color="grey", ls="--",
                         label="unigram entropy")
        axes.set_xlabel("step")
        axes.set_ylabel("bits per sample")
        axes.legend()
        axes.grid(alpha=0.3)
