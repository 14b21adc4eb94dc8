"""`train --sample-every`: audio from the current weights while training, for real.

A tiny conditioned model trains for 4 steps with samples at steps 2 and 4, checkpoints at the
same steps, so each sample can be checked against `rainforest generate` on that step's
checkpoint; TensorBoard's own reader finds the audio; the report's timeline is opened in
headless Chromium; a resume never samples a step twice; an s3:// run gets its samples.

The rest drive `TrainingSampler` directly, with its real sampler process, on a tiny model's
random weights (no training needed): a sampler kept busy skips steps instead of queueing
them; a killed sampler, a snapshot that cannot be written and a corrupt reply are each
reported within seconds with their cause; and what the sampler prints on its fd 1 never
reaches its replies.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from test_report import CHECK_MEDIA

import chromium
from conftest import TINY_TRAINING, run_cli
from rainforest import checkpoint, storage, training_samples
from rainforest.config import AudioConfig
from rainforest.generate import GenerationConfig, generate
from rainforest.model_config import PRESETS, weight_layout
from rainforest.training_samples import (
    INDEX_NAME,
    MAX_PENDING,
    Snapshot,
    TrainingSampler,
    is_sampled,
    sampled_steps,
)
from test_s3 import BUCKET, s3_endpoint  # noqa: F401  (the moto server fixture)

pytestmark = pytest.mark.slow

SECONDS, TEMPERATURE, SEED = 0.25, 0.9, 3
LENGTH = int(SECONDS * 16000)
SAMPLING = ["--sample-seconds", str(SECONDS), "--sample-temperature", str(TEMPERATURE),
            "--seed", str(SEED)]
LABELS = ["high", "low"]  # the periodic dataset's folders
TAGS = ["samples/00-high", "samples/01-low"]


def _folder(run: Path, step: int) -> Path:
    return run / "samples" / checkpoint.step_name(step)


def _int16(data) -> np.ndarray:
    return soundfile.read(data if not isinstance(data, bytes) else io.BytesIO(data),
                          dtype="int16")[0]


def _audio_events(logdir: Path) -> dict[str, list]:
    """Every audio summary in ``logdir``'s event files, by tag, read by TensorBoard itself."""
    from tensorboard.backend.event_processing import event_accumulator

    reader = event_accumulator.EventAccumulator(
        str(logdir), size_guidance={event_accumulator.TENSORS: 0})
    reader.Reload()
    return {tag: reader.Tensors(tag) for tag in reader.Tags()["tensors"]
            if reader.SummaryMetadata(tag).plugin_data.plugin_name == "audio"}


@pytest.fixture(scope="module")
def sampled_run(periodic_dataset, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("sampled") / "run"
    result = run_cli("train", periodic_dataset, "--run", run, *TINY_TRAINING, "--steps", "4",
                     "--val-every", "2", "--checkpoint-every", "2", "--keep", "5",
                     "--condition", "--sample-every", "2", *SAMPLING)
    assert "samples: 2 step(s) sampled" in result.stdout, result.stdout
    return run


def test_samples_decode_at_their_length_and_equal_generate_on_that_steps_checkpoint(
        sampled_run, tmp_path):
    assert sorted(p.name for p in (sampled_run / "samples").iterdir()) == [
        "step-000000002", "step-000000004"]
    for step in (2, 4):
        index = json.loads((_folder(sampled_run, step) / INDEX_NAME).read_text())
        assert index["labels"] == LABELS and index["step"] == step
        assert (index["seconds"], index["temperature"], index["seed"]) == (SECONDS,
                                                                             TEMPERATURE, SEED)
        for stream, label in enumerate(LABELS):
            sample = _int16(str(_folder(sampled_run, step) / f"stream-{stream:03d}.wav"))
            assert sample.shape == (LENGTH,)
            assert (_folder(sampled_run, step) / f"stream-{stream:03d}.png").stat().st_size
            out = tmp_path / f"{step}-{label}"
            generate(str(sampled_run / "checkpoints" / checkpoint.step_name(step)), str(out),
                     GenerationConfig(seconds=SECONDS, temperature=TEMPERATURE, seed=SEED,
                                      label=label), progress=False, log=lambda line: None)
            # 16-bit mu-law decodes are one-to-one with codes: equal samples, equal codes.
            np.testing.assert_array_equal(sample, _int16(str(out / "stream-000.wav")))
    # Each step was sampled from its own weights, not from one stale snapshot.
    assert not np.array_equal(_int16(str(_folder(sampled_run, 2) / "stream-000.wav")),
                              _int16(str(_folder(sampled_run, 4) / "stream-000.wav")))


def test_tensorboard_holds_each_steps_audio_as_written(sampled_run):
    events = _audio_events(sampled_run / "tensorboard")
    assert sorted(events) == TAGS
    for stream, tag in enumerate(TAGS):
        assert [event.step for event in events[tag]] == [2, 4]
        for event in events[tag]:
            wav = event.tensor_proto.string_val[0]  # [clip, description] of one clip
            clip, rate = soundfile.read(io.BytesIO(wav), dtype="int16")
            written = _int16(str(_folder(sampled_run, event.step) / f"stream-{stream:03d}.wav"))
            assert rate == 16000 and clip.shape == (LENGTH,)
            assert np.abs(clip.astype(int) - written).max() <= 1  # float -> 16 bits again


def test_report_timeline_plays_every_sample_in_headless_chromium(sampled_run, tmp_path):
    if chromium.executable() is None:
        pytest.fail("Debian's chromium package is missing; scripts/install.sh installs it")
    report = tmp_path / "report"
    run_cli("report", sampled_run, "--out", report)
    page = (report / "index.html").resolve().as_uri()
    timeline = CHECK_MEDIA.replace("document.images", "document.querySelectorAll("
                                   "'#timeline img')").replace(
        "document.querySelectorAll('audio')", "document.querySelectorAll('#timeline audio')")
    with chromium.Chromium(tmp_path / "profile") as browser:
        browser.open(page, width=1200, height=1800)
        seen = browser.evaluate(timeline)
    assert [i["src"] for i in seen["images"]] == ["timeline.png"] + [
        f"sample-step-00000000{step}-stream-00{stream}.png" for step in (2, 4)
        for stream in (0, 1)]
    assert all(image["ok"] for image in seen["images"]), seen["images"]
    assert len(seen["audios"]) == 4 and all(a["ok"] for a in seen["audios"]), seen["audios"]
    assert all(abs(a["seconds"] - SECONDS) < 0.01 for a in seen["audios"])
    assert "Step 2" in seen["text"] and "step 4 [low]" in seen["text"]


def test_timeline_escapes_labels_and_refuses_paths_out_of_the_step(sampled_run, tmp_path):
    from rainforest.errors import CheckpointError
    from rainforest.report import report

    run = tmp_path / "run"
    shutil.copytree(sampled_run, run)
    index_path = _folder(run, 2) / INDEX_NAME
    index = json.loads(index_path.read_text())
    hostile = "<script>alert(1)</script>"
    index_path.write_text(json.dumps({**index, "labels": [hostile, "low"]}))
    page = Path(report(str(run), str(tmp_path / "r"), log=lambda line: None)).read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and hostile not in page
    index_path.write_text(json.dumps({**index, "files": ["../../checkpoints/latest", "x"]}))
    with pytest.raises(CheckpointError, match="not this step's streams"):
        sampled_steps(str(run))


def test_a_resume_continues_the_numbering_and_never_samples_a_step_twice(
        sampled_run, periodic_dataset, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sampled_run, run)
    # As if killed after sampling step 4 but before its checkpoint: steps 3-4 are trained again.
    shutil.rmtree(run / "checkpoints" / "step-000000004")
    (run / "checkpoints" / "latest").write_text("step-000000002\n")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in _folder(run, 4).iterdir()}
    result = run_cli("train", periodic_dataset, "--run", run, "--resume",
                     "--steps", "6", "--sample-every", "2", "--no-progress")
    assert "samples: step 4 was sampled before; not again" in result.stdout, result.stdout
    assert "samples: 1 step(s) sampled" in result.stdout
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in _folder(run, 4).iterdir()}
    assert after == before
    assert [step for step, _ in sampled_steps(str(run))] == [2, 4, 6]
    events = _audio_events(run / "tensorboard")
    assert {tag: [e.step for e in events[tag]] for tag in TAGS} == {tag: [2, 4, 6]
                                                                    for tag in TAGS}
    index = json.loads((_folder(run, 6) / INDEX_NAME).read_text())
    assert (index["seconds"], index["temperature"], index["seed"]) == (SECONDS, TEMPERATURE,
                                                                       SEED)


@pytest.mark.s3
def test_an_s3_run_gets_its_samples_and_their_tensorboard_audio(periodic_dataset, tmp_path,
                                                              s3_endpoint):  # noqa: F811
    import boto3

    run, scratch = f"s3://{BUCKET}/sampled", tmp_path / "scratch"
    scratch.mkdir()
    result = run_cli("train", periodic_dataset, "--run", run, *TINY_TRAINING, "--steps", "2",
                     "--val-every", "0", "--sample-every", "2", *SAMPLING,
                     env={**os.environ, "TMPDIR": str(scratch)})
    assert "samples: 1 step(s) sampled" in result.stdout, result.stdout
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(
        Bucket=BUCKET, Prefix="sampled/samples/")["Contents"]}
    assert keys == {f"sampled/samples/step-000000002/{name}"
                    for name in ("samples.json", "stream-000.wav", "stream-000.png")}
    [(step, index)] = sampled_steps(run)
    assert step == 2 and index["labels"] == [None]
    wav = storage.read_bytes(f"{run}/samples/step-000000002/stream-000.wav")
    assert _int16(wav).shape == (LENGTH,)
    storage.download_folder(f"{run}/tensorboard", str(tmp_path / "tensorboard"))
    events = _audio_events(tmp_path / "tensorboard")
    assert {tag: [e.step for e in found] for tag, found in events.items()} == {
        "samples/audio": [2]}
    assert os.listdir(scratch) == []  # the sampler's snapshots and mirrors are cleaned up


# --- TrainingSampler with its real sampler process, no training -----------------------


def _snapshot(**replace) -> Snapshot:
    """The tiny model's weights, random, in its own order; ``replace`` swaps arrays by name."""
    model, rng = PRESETS["tiny"], np.random.default_rng(0)
    weights = [(f"{owner}/{name}".lstrip("/"),
                replace.get(name, 0.1 * rng.standard_normal(shape)))
               for owner, items in weight_layout(model).items() for name, shape in items]
    return Snapshot(weights, model.to_dict(), AudioConfig().to_dict())


class _Writer:
    """Stands in for RankZeroLog: keeps the steps of the audio summaries it is given."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def record_sample(self, step, tag, samples, rate, png) -> None:
        self.steps.append(step)


def _sampler(tmp_path: Path, lines: list[str], seconds: float = SECONDS) -> TrainingSampler:
    return TrainingSampler(str(tmp_path / "run"), 1, seconds, TEMPERATURE, SEED,
                           log=lines.append)


def _wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.02)


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    """The temporary folder the sampler's snapshots go to, watched by the test."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setattr(training_samples, "FINISH_TIMEOUT_S", 60.0)  # a hang fails in 1 min
    return folder


def _timed_finish(sampler: TrainingSampler, writer) -> float:
    started = time.monotonic()
    sampler.finish(writer)
    return time.monotonic() - started


def test_a_busy_sampler_skips_steps_and_counts_them_and_a_skipped_step_is_sampled_later(
        tmp_path, scratch):
    lines, writer, most = [], _Writer(), [0]
    done = threading.Event()

    def watch() -> None:  # the weights files in the temporary folder, as often as it can
        while not done.wait(0.005):
            with contextlib.suppress(FileNotFoundError):  # a folder removed while listed
                most[0] = max(most[0], len(list(scratch.glob("*/step-*/weights.h5"))))

    watcher = threading.Thread(target=watch)
    watcher.start()
    sampler = _sampler(tmp_path, lines)
    try:
        for step in range(1, 7):  # milliseconds apart: the sampler is still starting
            sampler.at_step(step, 0, writer, _snapshot)
        [behind] = [line for line in lines if "the sampler is behind" in line]
        assert "(steps [1, 2] are still being made), so step 3 is not sampled" in behind
        assert not is_sampled(sampler.run, 3)

        def step_3_again() -> bool:  # as after an elastic rollback: step 3 is due once more
            sampler.at_step(3, 0, writer, _snapshot)
            return 3 in sampler.submitted

        _wait_for(step_3_again, "place for step 3 once the sampler caught up")
        sampler.finish(writer)
    finally:
        done.set()
        watcher.join()
    assert lines[-1].startswith("samples: 3 step(s) sampled into ")
    assert lines[-1].endswith("; 3 step(s) skipped because the sampler was behind"), lines
    assert [step for step, _ in sampled_steps(sampler.run)] == [1, 2, 3]
    assert writer.steps == [1, 2, 3]
    assert 1 <= most[0] <= MAX_PENDING
    assert list(scratch.iterdir()) == []


def test_a_snapshot_that_cannot_be_written_fails_its_step_with_the_reason_and_no_other(
        tmp_path, scratch):
    lines, writer = [], _Writer()
    sampler = _sampler(tmp_path, lines)
    sampler.at_step(1, 0, writer, lambda: _snapshot(input_bias=np.array([object()])))
    sampler.at_step(2, 0, writer, _snapshot)
    assert _timed_finish(sampler, writer) < 30  # one real sample; never FINISH_TIMEOUT_S
    assert ("note: samples of step 1 failed: its snapshot was not written (TypeError: Object "
            "dtype dtype('O') has no native HDF5 equivalent)") in lines, lines
    assert [step for step, _ in sampled_steps(sampler.run)] == [2] and writer.steps == [2]
    assert lines[-1].startswith("samples: 1 step(s) sampled into ")
    assert lines[-1].endswith("; 1 step(s) failed"), lines


SITECUSTOMIZE = """
import os
import signal
import sys


def _mid_job(event, args):  # a step's samples are being published: mid-job
    if event != "shutil.copytree":
        return
    action = os.environ["RAINFOREST_TEST_MID_JOB"]
    if action == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    fd = 1 if action == "stdout" else int(sys.argv[sys.argv.index("--replies-fd") + 1])
    os.write(fd, b"garbage\\n")


sys.addaudithook(_mid_job)
"""


@pytest.fixture
def mid_job(tmp_path, monkeypatch):
    """``mid_job(action)`` makes the sampler process, while it publishes a step's samples,
    kill itself (``"die"``), or write ``garbage`` with a raw write(2) that bypasses Python's
    streams as a C library's printf does: to its fd 1 (``"stdout"``) or into its reply
    channel (``"replies"``). A ``sitecustomize`` module on its PYTHONPATH does it."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return lambda action: monkeypatch.setenv("RAINFOREST_TEST_MID_JOB", action)


def test_a_sampler_killed_mid_job_is_reported_at_once_with_its_signal(tmp_path, scratch,
                                                                      mid_job):
    mid_job("die")
    lines = []
    sampler = _sampler(tmp_path, lines)
    sampler.at_step(1, 0, _Writer(), _snapshot)
    assert _timed_finish(sampler, _Writer()) < 30  # one real sample; never FINISH_TIMEOUT_S
    assert ("note: the sampler stopped: the sampler process was killed by SIGKILL; steps [1] "
            "are not sampled; no later step will be sampled") in lines, lines
    assert lines[-1].startswith("samples: 0 step(s) sampled into ")
    assert lines[-1].endswith("; 1 step(s) failed"), lines
    assert list(scratch.iterdir()) == []


def test_what_the_sampler_writes_to_its_fd_1_never_reaches_a_reply(tmp_path, scratch,
                                                                   mid_job, capfd):
    mid_job("stdout")
    lines, writer = [], _Writer()
    sampler = _sampler(tmp_path, lines)
    sampler.at_step(1, 0, writer, _snapshot)
    sampler.finish(writer)
    assert not any(line.startswith("note:") for line in lines), lines
    assert lines[-1].startswith("samples: 1 step(s) sampled into "), lines
    assert writer.steps == [1] and is_sampled(sampler.run, 1)
    assert "garbage\n" in capfd.readouterr().err  # it was written, to stderr


def test_a_reply_that_is_not_json_stops_the_sampler_at_once_naming_it(tmp_path, scratch,
                                                                    mid_job):
    mid_job("replies")
    lines = []
    sampler = _sampler(tmp_path, lines)
    sampler.at_step(1, 0, _Writer(), _snapshot)
    assert _timed_finish(sampler, _Writer()) < 30
    assert ("note: the sampler stopped: it wrote a reply that is not one: b'garbage\\n'; "
            "steps [1] are not sampled; no later step will be sampled") in lines, lines
    assert lines[-1].endswith("; 1 step(s) failed"), lines
