"""Hear the model as it trains: ``rainforest train --sample-every N``.

Every N steps rank 0 copies the current weights (milliseconds; writing a Keras weights file
would take about ten times as long), writes the copy as a plain HDF5 arrays file
(``checkpoint.save_arrays``) into a local temporary folder, and hands it to a sampler process
of its own, started once with ``python -m rainforest.training_samples`` and niced, so the ranks
never wait for generation. The sampler lays the arrays out for the fused loop exactly as
``rainforest generate`` lays out a checkpoint's (:func:`rainforest.checkpoint.weights_in_order`
names them as :func:`~rainforest.checkpoint.read_weights` does, then
:func:`~rainforest.kernels.priming.fuse`), runs the loop for ``--sample-seconds`` at
``--sample-temperature`` with the run's ``--seed`` (one stream per label of a ``--condition``
model, each the stream ``rainforest generate --label L`` would give), and publishes
``RUN/samples/step-NNNNNNNNN/`` whole (``storage.Staged``; local or ``s3://``):
``stream-KKK.wav`` and its spectrogram PNG per stream, and ``samples.json`` (written last).
Rank 0 picks finished samples up at a later step and adds them to TensorBoard as audio and
image summaries under the step they were taken at.

Jobs and replies are JSON lines on the sampler's stdin and stdout (nothing pickled). A step
whose samples folder already exists is never sampled again, so a resumed run, or an elastic
run rolled back to its last commit, continues the numbering without repeats.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rainforest import checkpoint, storage
from rainforest.documents import read_document
from rainforest.errors import CheckpointError, ParameterError

SAMPLES_DIR = "samples"
INDEX_NAME = "samples.json"
FORMAT = "rainforest-samples"
VERSION = 1
#: How long the end of training waits for samples still being generated.
FINISH_TIMEOUT_S = 600.0


def sample_folder(run: str, step: int) -> str:
    return storage.join(run, SAMPLES_DIR, checkpoint.step_name(step))


def is_sampled(run: str, step: int) -> bool:
    """A step counts as sampled once its ``samples.json`` is there (it is published last)."""
    return storage.exists(storage.join(sample_folder(run, step), INDEX_NAME))


def read_index(run: str, step: int) -> dict:
    """A sampled step's ``samples.json``, checked: its format, and file names that stay in
    its folder (the report copies them)."""
    from rainforest.generate import is_stream_file

    url = storage.join(sample_folder(run, step), INDEX_NAME)
    index = read_document(url, kind=FORMAT, version=VERSION, error=CheckpointError,
                          advice="upgrade rainforest to read these samples",
                          missing=f"{url} is missing")
    files, labels = index.get("files"), index.get("labels")
    if (not isinstance(files, list) or not isinstance(labels, list)
            or len(files) != len(labels)
            or not all(isinstance(f, str) and is_stream_file(f) for f in files)):
        raise CheckpointError(f"{url} lists files that are not this step's streams")
    return index


def sampled_steps(run: str) -> list[tuple[int, dict]]:
    """Each sampled step of ``run`` with its checked ``samples.json``, oldest first."""
    found = []
    for name in storage.list_names(storage.join(run, SAMPLES_DIR)):
        if re.fullmatch(r"step-[0-9]{9}", name) and is_sampled(run, int(name[5:])):
            found.append((int(name[5:]), read_index(run, int(name[5:]))))
    return sorted(found, key=lambda item: item[0])


@dataclass(frozen=True)
class Snapshot:
    """The step being sampled: a copy of the model's weights, named and in the model's own
    order, and the model and audio configs (as dicts)."""

    weights: list
    model: dict
    audio: dict


@dataclass
class TrainingSampler:
    """Rank 0's side: snapshots weights, feeds the sampler process, logs what it finished.

    Every rank holds one; only the rank that is rank 0 at a sampled step does anything, so
    under ``--elastic`` the current rank 0 samples.
    """

    run: str
    every: int
    seconds: float
    temperature: float
    seed: int
    log: Callable[[str], None] = print
    submitted: set[int] = field(default_factory=set)
    handoff_seconds: list[float] = field(default_factory=list)
    sampler_seconds: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._replies: queue.Queue = queue.Queue()
        self._jobs: queue.Queue = queue.Queue()
        self._feeder: threading.Thread | None = None
        self._pending: set[int] = set()
        self._work = ""

    def at_step(self, step: int, rank: int, writer, snapshot: Callable[[], Snapshot]) -> None:
        """After ``step``: sample it if due, and log samples finished since the last call.

        ``snapshot()`` copies this step's weights; it is called only when the step is due.
        """
        if rank != 0:
            return
        started = time.perf_counter()
        if self.every and step % self.every == 0 and step not in self.submitted:
            self.submitted.add(step)
            if is_sampled(self.run, step):
                self.log(f"samples: step {step} was sampled before; not again")
            elif self._submit(step, snapshot()):
                self.handoff_seconds.append(time.perf_counter() - started)
        self._log_finished(writer, wait=0.0)

    def finish(self, writer) -> None:
        """Wait for the samples still being made, log them, stop the sampler process."""
        if self._process is None:
            return
        self._jobs.put(None)
        self._feeder.join()  # every snapshot written and handed over; then stdin closes
        deadline = time.monotonic() + FINISH_TIMEOUT_S
        while self._pending and time.monotonic() < deadline:
            self._log_finished(writer, wait=max(0.0, deadline - time.monotonic()))
        if self._pending:
            self.log(f"note: samples of steps {sorted(self._pending)} were not finished "
                     f"after {FINISH_TIMEOUT_S:.0f} s; left out")
        else:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=60)  # its stdin is closed: it ends by itself
        self.abandon()
        if self.handoff_seconds:
            handoff = 1e3 * statistics.median(self.handoff_seconds)
            made = statistics.median(self.sampler_seconds or [float("nan")])
            self.log(f"samples: {len(self.handoff_seconds)} step(s) sampled into "
                     f"{storage.join(self.run, SAMPLES_DIR)}; rank 0 spent {handoff:.1f} ms "
                     f"per sampled step (median; the first, which starts the sampler: "
                     f"{1e3 * self.handoff_seconds[0]:.1f} ms), the sampler process {made:.2f} "
                     "s beside training")

    def abandon(self) -> None:
        """Stop the sampler process (at once if it is still working) and remove its files."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            shutil.rmtree(self._work, ignore_errors=True)
            self._process = None

    def _start(self) -> None:
        self._work = tempfile.mkdtemp(prefix="rainforest-samples-")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "rainforest.training_samples"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, bufsize=1)
        stdout, replies = self._process.stdout, self._replies

        def read() -> None:
            for line in stdout:
                replies.put(json.loads(line))
            replies.put(None)  # the process ended

        threading.Thread(target=read, daemon=True).start()
        self._feeder = threading.Thread(target=self._feed, daemon=True)
        self._feeder.start()

    def _submit(self, step: int, snapshot: Snapshot) -> bool:
        """Queue the job; the feeder thread writes the snapshot file, off the training path."""
        if self._process is None:
            self._start()
        if self._process.poll() is not None:
            self.log(f"note: the sampler process has ended; step {step} is not sampled")
            return False
        self._pending.add(step)
        self._jobs.put((step, snapshot))
        return True

    def _feed(self) -> None:
        """Write each queued snapshot and hand it to the sampler; close its stdin at the end."""
        stdin = self._process.stdin
        while (job := self._jobs.get()) is not None:
            step, snapshot = job
            folder = os.path.join(self._work, checkpoint.step_name(step))
            request = {"step": step, "weights": os.path.join(folder, "weights.h5"),
                       "model": snapshot.model, "audio": snapshot.audio,
                       "work": os.path.join(folder, "out"), "out": sample_folder(self.run, step),
                       "seconds": self.seconds, "temperature": self.temperature,
                       "seed": self.seed}
            try:
                os.makedirs(folder)
                checkpoint.save_arrays(request["weights"], snapshot.weights)
                stdin.write(json.dumps(request) + "\n")
                stdin.flush()
            except OSError as error:  # e.g. the sampler died: training goes on without it
                self._replies.put({"step": step, "work": request["work"],
                                   "error": f"not handed to the sampler ({error})"})
        try:
            stdin.close()
        except OSError:
            pass

    def _log_finished(self, writer, *, wait: float) -> None:
        """Log every finished sample; wait up to ``wait`` seconds for the first one."""
        while self._pending:
            try:
                reply = self._replies.get(timeout=wait) if wait > 0 else self._replies.get_nowait()
            except queue.Empty:
                return
            wait = 0.0
            if reply is None:
                self.log(f"note: the sampler process ended; steps {sorted(self._pending)} "
                         "are not sampled")
                self._pending.clear()
                return
            self._pending.discard(reply["step"])
            if "error" in reply:
                self.log(f"note: samples of step {reply['step']} failed: {reply['error']}")
            else:
                self.sampler_seconds.append(reply["wall_seconds"])
                try:
                    _summarise(writer, reply)
                except Exception as error:  # a summary must never cost the run
                    self.log(f"note: could not add step {reply['step']}'s samples to "
                             f"TensorBoard ({error})")
            shutil.rmtree(os.path.dirname(reply["work"]), ignore_errors=True)


def _summarise(writer, reply: dict) -> None:
    """TensorBoard audio and spectrogram of each stream, read back from the local copy."""
    import soundfile

    from rainforest.generate import spectrogram_file

    for index, name in enumerate(reply["files"]):
        samples, rate = soundfile.read(os.path.join(reply["work"], name), dtype="float32")
        with open(os.path.join(reply["work"], spectrogram_file(name)), "rb") as handle:
            png = handle.read()
        writer.record_sample(reply["step"], f"samples/{_tag(reply['labels'][index], index)}",
                             samples, rate, png)


def _tag(label: str | None, index: int) -> str:
    """A TensorBoard tag for one stream: its label where it has one (only safe characters)."""
    if label is None:
        return "audio"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    return f"{index:02d}-{safe}"


# --- the sampler process --------------------------------------------------------------


def make_samples(request: dict) -> dict:
    """One job: the snapshot's streams as wavs and PNGs in ``work``, published to ``out``."""
    import numpy as np

    from rainforest.config import AudioConfig
    from rainforest.generate import (
        SPECTROGRAM_MIN_SAMPLES,
        GenerationConfig,
        TrainedNetwork,
        stream_codes,
        write_outputs,
    )
    from rainforest.kernels.priming import fuse
    from rainforest.model_config import ModelConfig

    started = time.perf_counter()
    model = ModelConfig.from_dict(request["model"])
    arrays = [array for _, array in checkpoint.load_arrays(request["weights"])]
    source = TrainedNetwork(request["weights"], request["step"], model,
                            AudioConfig.from_dict(request["audio"]),
                            fuse(checkpoint.weights_in_order(arrays, model), model))
    length = int(round(request["seconds"] * source.audio.sample_rate))
    if length < SPECTROGRAM_MIN_SAMPLES:
        raise ParameterError(f"--sample-seconds {request['seconds']} gives {length} samples; a "
                             f"spectrogram needs at least {SPECTROGRAM_MIN_SAMPLES}")
    labels = list(source.model.labels) or [None]
    codes = []
    for label in labels:  # each the stream `rainforest generate --label L` gives
        config = GenerationConfig(seconds=request["seconds"], seed=request["seed"],
                                  temperature=request["temperature"], label=label)
        codes.append(stream_codes(source.network, source, config)[0])
    work = request["work"]
    paths = write_outputs(np.stack(codes), source.audio, work)
    index = {"format": FORMAT, "version": VERSION, "step": request["step"],
             "seconds": request["seconds"], "seed": request["seed"],
             "temperature": request["temperature"], "sample_rate": source.audio.sample_rate,
             "files": [os.path.basename(p) for p in paths], "labels": labels,
             "wall_seconds": round(time.perf_counter() - started, 3)}
    with storage.Staged(request["out"], folder=True, marker=INDEX_NAME) as staging:
        shutil.copytree(work, staging, dirs_exist_ok=True)
        with open(os.path.join(staging, INDEX_NAME), "wb") as handle:
            handle.write(storage.dumps_json(index))
    return {**index, "step": request["step"], "work": work}


def serve() -> None:
    """Answer one JSON job per stdin line with one JSON line, until stdin closes."""
    replies = sys.stdout
    sys.stdout = sys.stderr  # nothing else may write into the reply channel
    if hasattr(os, "nice"):
        os.nice(10)  # training comes first on a shared machine
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = make_samples(request)
        except Exception as error:  # one failed sample must not end the others
            reply = {"step": request["step"], "work": request["work"],
                     "error": f"{type(error).__name__}: {error}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve()
