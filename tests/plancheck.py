"""`rainforest plan` against whole commands measured on this machine (its honesty check).

Used by tests/test_plan_accuracy.py (one case) and benchmarks/plan.py (many): each case is
planned as a new user would (``rainforest plan SOURCES --workers W --ranks R --steps N ...
--json``, calibrating here), then the real ``rainforest preprocess`` on a local cluster of
``W`` workers and the real ``rainforest train`` under ``horovodrun -np R --gloo`` (one rank
pinned to one core; ``R`` ranks on ``R`` cores) are timed whole, start-up included, and set
beside the plan's row.

Inputs big enough for a minute of work are copies of a few songs made distinct byte-wise
(``distinct_copies``): preprocess identifies songs by content hash, so plain copies would be
skipped as duplicates, while a changed tag leaves the audio, and so the work, as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import audiogen

RAINFOREST = [sys.executable, "-m", "rainforest.cli"]


# ----------------------------------------------------------------------------- songs


def _ogg_crc_table() -> list[int]:
    table = []
    for index in range(256):
        value = index << 24
        for _ in range(8):
            value = ((value << 1) ^ 0x04C11DB7) if value & 0x80000000 else value << 1
        table.append(value & 0xFFFFFFFF)
    return table


_OGG_CRC = _ogg_crc_table()


def ogg_crc(page: bytes) -> int:
    """The CRC of an Ogg page (polynomial 0x04C11DB7, no reflection, initial value 0)."""
    crc = 0
    for byte in page:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_CRC[((crc >> 24) & 0xFF) ^ byte]
    return crc


def _retag_ogg(data: bytearray, index: int) -> None:
    """Write ``index`` over the end of the vendor string of an Ogg Vorbis or Opus comment
    header, and seal its page's CRC again."""
    for magic in (b"\x03vorbis", b"OpusTags"):
        at = data.find(magic, 0, 1 << 16)
        if at >= 0:
            break
    else:
        raise ValueError("no Vorbis or Opus comment header in the first 64 KiB")
    length_at = at + len(magic)
    vendor_length = int.from_bytes(data[length_at:length_at + 4], "little")
    mark = str(index).encode().rjust(min(8, vendor_length), b"0")[-min(8, vendor_length):]
    end = length_at + 4 + vendor_length
    data[end - len(mark):end] = mark
    page = data.rfind(b"OggS", 0, at)
    segments = data[page + 26]
    size = 27 + segments + sum(data[page + 27:page + 27 + segments])
    data[page + 22:page + 26] = b"\0\0\0\0"
    data[page + 22:page + 26] = ogg_crc(bytes(data[page:page + size])).to_bytes(4, "little")


def distinct_copies(song: Path, folder: Path, count: int) -> list[Path]:
    """``count`` copies of an Ogg (Vorbis, Opus) or mp3 song with the same audio and distinct
    bytes: the Ogg comment header's vendor string ends in the copy's number; an mp3 gets an
    ID3v1 tag naming it. Existing copies are kept."""
    folder.mkdir(parents=True, exist_ok=True)
    original = song.read_bytes()
    copies = []
    for index in range(count):
        target = folder / f"{song.stem}-{index:04d}{song.suffix}"
        copies.append(target)
        if target.exists():
            continue
        data = bytearray(original)
        if song.suffix.lower() == ".mp3":
            data += b"TAG" + f"copy {index}".encode().ljust(125, b"\0")
        else:
            _retag_ogg(data, index)
        partial = target.with_name(target.name + ".part")
        partial.write_bytes(bytes(data))
        os.replace(partial, target)
    return copies


def encode_cost(song: Path) -> float:
    """Seconds of this core per second of ``song``'s audio, to size an input (not the plan's
    own measurement: that is what is being checked)."""
    import tempfile

    from rainforest.audio import encode_song
    from rainforest.config import AudioConfig

    class Discard:
        def append(self, codes) -> None:
            pass

    with tempfile.TemporaryDirectory() as scratch:
        encode_song(str(song), AudioConfig(), Discard(), spool_dir=scratch)  # warm
        started = time.perf_counter()
        fields = encode_song(str(song), AudioConfig(), Discard(), spool_dir=scratch)
        return (time.perf_counter() - started) / fields["source_seconds"]


def write_songs(folder: Path, *, count: int, seconds: float, suffix: str = ".flac",
                rate: int = 44100) -> Path:
    """Stereo synthetic songs of a few tones each, ``seconds`` long."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        audiogen.write_song(folder / f"song{index:03d}{suffix}", seconds=seconds, rate=rate,
                            channels=2, freq=180.0 + 25 * index, seed=index)
    return folder


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One plan and the two whole commands it predicts."""

    name: str
    sources: tuple[str, ...]
    workers: int
    ranks: int
    steps: int
    training: tuple[str, ...] = ()  # rainforest train options: --config, --batch-size, ...
    planning: tuple[str, ...] = ()  # extra rainforest plan options
    notes: dict = field(default_factory=dict)


def _timed(command: list[str], *, env: dict | None = None,
           cores: int | None = None) -> tuple[float, float, float]:
    """(wall seconds, launch and end in Unix seconds) of a whole command, which must succeed."""
    pin = None
    if cores is not None and hasattr(os, "sched_setaffinity"):
        chosen = set(sorted(os.sched_getaffinity(0))[:cores])

        def pin():
            os.sched_setaffinity(0, chosen)
    launched, started = time.time(), time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, preexec_fn=pin)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise AssertionError(f"{command} failed ({result.returncode}):\n{result.stdout[-2000:]}"
                             f"\n{result.stderr[-3000:]}")
    return elapsed, launched, launched + elapsed


def measured_parts(run: Path, launched: float, ended: float) -> dict[str, float]:
    """A finished run's wall time in three: launch to its first step's end, the steps after
    it (held-out measurements, checkpoints and samples included), its last step's end to exit."""
    from rainforest import runlog

    times = [row["time"] for row in runlog.read_metrics(str(run))]
    return {"start": times[0] - launched, "middle": times[-1] - times[0],
            "end": ended - times[-1]}


def plan_case(case: Case) -> dict:
    """``rainforest plan --json`` for the case, calibrating on this machine."""
    command = [*RAINFOREST, "plan", *case.sources, "--json", "--workers", str(case.workers),
               "--ranks", str(case.ranks), "--steps", str(case.steps), *case.training,
               *case.planning]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"plan failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout)


def run_case(case: Case, work: Path, *, env: dict) -> list[dict]:
    """Plan the case, then time its preprocess and its training whole; one check per stage
    (command, predicted, measured, error, and the plan's parts of the prediction)."""
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    document = plan_case(case)
    planning = time.perf_counter() - started
    row = document["rows"][0]
    dataset, run = work / f"{case.name}-dataset", work / f"{case.name}-run"
    for folder in (dataset, run):
        shutil.rmtree(folder, ignore_errors=True)
    preprocess, _, _ = _timed([*RAINFOREST, "preprocess", *case.sources, "--out",
                               str(dataset), "--cluster", f"local:{case.workers}",
                               "--no-progress", "--json"], env=env)
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    train, launched, ended = _timed(
        [horovodrun, "-np", str(case.ranks), "-H", f"localhost:{case.ranks}", "--gloo",
         *RAINFOREST, "train", str(dataset), "--run", str(run), "--steps", str(case.steps),
         "--no-progress", *case.training], env=env, cores=case.ranks)
    hours, codecs = document["sources"]["hours"], "+".join(document["sources"]["codecs"])
    choice = _step_choice(run)
    parts = row["train_parts"]
    split = {"predicted": {"start": parts["start"], "end": parts["end"],
                           "middle": sum(parts.values()) - parts["start"] - parts["end"]},
             "measured": measured_parts(run, launched, ended)}
    shutil.rmtree(dataset, ignore_errors=True)
    shutil.rmtree(run, ignore_errors=True)
    checks = [
        {"case": case.name, "stage": "preprocess",
         "command": f"preprocess {hours:.1f} h ({codecs}), {case.workers} worker(s)",
         "predicted": row["preprocess_seconds"], "measured": preprocess},
        {"case": case.name, "stage": "train",
         "command": f"train {' '.join(case.training) or 'defaults'}, {case.steps} steps, "
                    f"{case.ranks} rank(s) ({choice})",
         "predicted": row["train_seconds"], "measured": train, "parts": parts,
         "split": split, "calibrated": document["calibration"]["training"]},
    ]
    for check in checks:
        check["error"] = check["predicted"] / check["measured"] - 1.0
        check["planning_seconds"] = planning
    return checks


def _step_choice(run: Path) -> str:
    from rainforest import checkpoint

    saved = checkpoint.read_config(checkpoint.latest(str(run)))["data"].get("step_choice") or {}
    return f"{saved.get('compile')}/{saved.get('precision')}"


def table(checks: list[dict]) -> str:
    """A Markdown table of the checks, as docs/performance.md gives them."""
    lines = ["| case | command (whole, timed from outside) | predicted | measured | error |",
             "|---|---|---|---|---|"]
    lines += [f"| {c['case']} | {c['command']}{'' if c['measured'] >= 60 else ' (< 60 s)'} | "
              f"{c['predicted']:.1f} s | {c['measured']:.1f} s | {c['error']:+.1%} |"
              for c in checks]
    return "\n".join(lines)


def summary(checks: list[dict], *, tolerance: float = 0.20, median_target: float = 0.10) -> str:
    """The verdicts the issue asks for: every stage within ``tolerance``, the median within
    ``median_target``, every stage a minute or more."""
    errors = [abs(c["error"]) for c in checks]
    middle = statistics.median(errors)
    worst = max(checks, key=lambda c: abs(c["error"]))
    short = [c for c in checks if c["measured"] < 60]
    return (f"{len(checks)} stages: median absolute error {middle:.1%} "
            f"({'<=' if middle <= median_target else '>'} {median_target:.0%}), largest "
            f"{worst['error']:+.1%} ({worst['case']} {worst['stage']}; "
            f"{'all within' if abs(worst['error']) <= tolerance else 'NOT all within'} "
            f"+-{tolerance:.0%}); {len(short)} stage(s) under 60 s")
