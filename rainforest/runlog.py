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
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rainforest import storage
from rainforest.plots import png_figure

METRICS_NAME = "metrics.jsonl"
#: Lines of ``metrics.jsonl`` that are not records, moved aside rather than deleted.
REJECTED_NAME = "metrics.rejected.jsonl"
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
        replaced = forget_steps_after(self.run, first, log=self.log)
        if replaced:
            self.log(f"{METRICS_NAME}: steps {replaced[0]}-{replaced[-1]} were trained after "
                     f"step {first}, which this run goes on from (its checkpoint or elastic "
                     "commit); their records are replaced as the steps are trained again")
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
        for name in (METRICS_NAME, REJECTED_NAME):
            if storage.exists(storage.join(self.remote, name)):
                with open(os.path.join(self.run, name), "wb") as handle:
                    handle.write(storage.read_bytes(storage.join(self.remote, name)))
        events = storage.join(self.remote, TENSORBOARD_DIR)
        if storage.exists(events):
            storage.download_folder(events, os.path.join(self.run, TENSORBOARD_DIR))

    def publish(self) -> None:
        """Upload the mirrored logs of an ``s3://`` run, each object whole (a no-op locally)."""
        if not (self.active and self.remote and self._tensorboard is not None):
            return
        self._tensorboard.flush()
        for name in (METRICS_NAME, REJECTED_NAME, CURVES_NAME):
            if os.path.exists(os.path.join(self.run, name)):
                with storage.Staged(storage.join(self.remote, name)) as staging:
                    shutil.copyfile(os.path.join(self.run, name), staging)
        with storage.Staged(storage.join(self.remote, TENSORBOARD_DIR), folder=True) as staging:
            shutil.copytree(os.path.join(self.run, TENSORBOARD_DIR), staging, dirs_exist_ok=True)


def _warn(message: str) -> None:
    warnings.warn(message, MetricsWarning, stacklevel=3)


class MetricsWarning(UserWarning):
    """``metrics.jsonl`` holds a line that is not a record (other than a torn last line)."""


@dataclass(frozen=True)
class MetricsLines:
    """``metrics.jsonl`` read line by line: the records, and what is not one.

    ``rejected`` holds ``(line number, text, why)`` for each line that is not a record; a last
    line without its newline that does not parse is ``torn`` instead (a writer killed mid-line).
    """

    rows: list[dict[str, float]]
    kept: list[str]  # the text of each row's line, in order
    rejected: list[tuple[int, str, str]]
    torn: str | None


def parse_metrics(data: bytes) -> MetricsLines:
    """Split the bytes of a ``metrics.jsonl`` into records and lines that are not records."""
    text = data.decode("utf-8", errors="replace")
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends with its newline
    rows, kept, rejected = [], [], []
    for number, line in enumerate(lines, start=1):
        row, why = _record(line)
        if why is None:
            rows.append(row)
            kept.append(line)
        elif line.strip():
            rejected.append((number, line, why))
    torn = None
    if tail.strip():
        row, why = _record(tail)
        if why is None:  # whole but for its newline
            rows.append(row)
            kept.append(tail)
        else:
            torn = tail
    return MetricsLines(rows, kept, rejected, torn)


def _record(line: str) -> tuple[dict | None, str | None]:
    """The record on ``line``, or why it is not one: a JSON object with an integer ``step`` of
    at least 0 and numbers for every other value."""
    try:
        row = json.loads(line)
    except ValueError as error:
        return None, f"not JSON ({error})"
    if not isinstance(row, dict):
        return None, "not a JSON object"
    step = row.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return None, f"its step is {step!r}, not a whole number"
    for name, value in row.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None, f"{name!r} is {type(value).__name__}, not a number"
    return row, None


def _describe_rejected(url: str, rejected: list[tuple[int, str, str]]) -> str:
    shown = "; ".join(f"line {number}: {why}" for number, _, why in rejected[:5])
    more = f" (and {len(rejected) - 5} more)" if len(rejected) > 5 else ""
    return f"{url}: {len(rejected)} line(s) are not records and were left out: {shown}{more}"


def read_metrics(run: str, *, log: Callable[[str], None] = _warn) -> list[dict[str, float]]:
    """The records of ``RUN/metrics.jsonl``, a local or ``s3://`` run (empty if none yet).

    A torn last line (a rank killed while appending) is skipped quietly. Any other line that is
    not a record is left out and reported to ``log`` with its line number (by default as a
    :class:`MetricsWarning`).
    """
    url = storage.join(run, METRICS_NAME)
    if not storage.exists(url):
        return []
    parsed = parse_metrics(storage.read_bytes(url))
    if parsed.rejected:
        log(_describe_rejected(url, parsed.rejected))
    return parsed.rows


def forget_steps_after(run: str, step: int, *, log: Callable[[str], None] = _warn
                       ) -> list[int]:
    """Remove the records of steps after ``step`` from ``RUN/metrics.jsonl``; returns them.

    Rank 0 calls it (through :meth:`RankZeroLog.start`) wherever training goes on from a step:
    a new run, a resume from a checkpoint, an elastic rollback to a commit. So a step trained
    again replaces its earlier record, and each step of the file is logged once, by the
    training that the run's weights went through. A line that is not a record, and a torn last
    line, are never dropped: they move to ``RUN/metrics.rejected.jsonl`` (appended), and
    ``log`` says so; the file then ends with a whole line, ready to be appended to.
    """
    url = storage.join(run, METRICS_NAME)
    if not storage.exists(url):
        return []
    data = storage.read_bytes(url)
    parsed = parse_metrics(data)
    kept = [line for line, row in zip(parsed.kept, parsed.rows, strict=True)
            if row["step"] <= step]
    dropped = [int(row["step"]) for row in parsed.rows if row["step"] > step]
    aside = [text for _, text, _ in parsed.rejected] + ([parsed.torn] if parsed.torn else [])
    if not (dropped or aside or (data and not data.endswith(b"\n"))):
        return []
    if aside:
        _set_aside(run, aside)
        where = [f"line {number}" for number, _, _ in parsed.rejected]
        where += ["a torn last line"] if parsed.torn else []
        log(f"{url}: {', '.join(where)} not a record; moved to {REJECTED_NAME}")
    with storage.Staged(url) as staging, open(staging, "w", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in kept))
    return dropped


def _set_aside(run: str, lines: list[str]) -> None:
    url = storage.join(run, REJECTED_NAME)
    before = storage.read_bytes(url) if storage.exists(url) else b""
    with storage.Staged(url) as staging, open(staging, "wb") as handle:
        handle.write(before + "".join(line + "\n" for line in lines).encode("utf-8"))


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
