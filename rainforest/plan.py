"""Time and money before a run (``rainforest plan``): read headers, calibrate, predict.

Three steps:

1. **headers**: every source's size and duration, read from its header through
   :mod:`rainforest.storage` (local paths and ``s3://``) with no decoding. A source whose
   header cannot be read is counted and listed, never fatal.
2. **calibration**: a few songs preprocessed on this machine (the per-core cost per second of
   audio, from :func:`rainforest.audio.encode_song`; Dask's per-task overhead; the fixed cost
   of a whole ``rainforest preprocess`` command on one local worker) and a few training steps
   of the chosen config on one core (a whole ``rainforest train`` command). Or the figures of
   an earlier run folder or an earlier ``plan --json`` (``--from``).
3. **prediction**, per worker or rank count, by the model below.

The preprocessing model, for songs of compute cost ``c_i`` (seconds on one core) in
``S = ceil(N / k)`` shards of ``k`` songs on ``W`` single-threaded workers::

    T(W) = makespan(shards over W workers)  +  2 S o  +  bytes / B  +  t0

The makespan is each shard, in order, given to the worker free first (Dask hands tasks to
idle workers); with equal songs it is ``ceil(S / W) k c``, the waves of shard tasks whose last
wave leaves workers idle. ``o`` is the scheduler's per-task overhead (it handles tasks one at
a time, so it does not shrink with ``W``), ``2 S`` tasks are one identify and one shard task per
shard, ``B`` the aggregate bandwidth of the shared storage (an assumption; added, not
overlapped), ``t0`` the fixed cost of a whole command. Parallel efficiency is
``E(W) = T(1) / (W T(W))``.

Training, ``steps`` steps on ``R`` ranks of one core each::

    T(R) = t0_train + steps * t_step / e(R),    e(1) = 1,  e(R >= 2) = rank efficiency

with ``t_step`` one rank's step time measured on one core; the batch per rank is fixed, so a
step takes as long on any number of ranks save Horovod's allreduce, which the rank efficiency
(measured 0.95 for 2 ranks here) accounts for. Ring allreduce moves the same bytes per rank
whatever ``R``, so the efficiency is taken as constant beyond 2 ranks: an assumption, printed.
"""

from __future__ import annotations

import dataclasses
import heapq
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from rainforest import storage
from rainforest.config import AudioConfig, Config, cli_fields, documented, flag_of, setting
from rainforest.errors import AudioDecodeError, ParameterError, RainforestError
from rainforest.preprocess import SONGS_PER_SHARD

PLAN_FORMAT = "rainforest-plan"
PLAN_VERSION = 1

#: The 2-rank scaling efficiency measured here (docs/performance.md: 2 ranks x 1 core
#: against 1 rank x 2 cores, 0.95).
MEASURED_RANK_EFFICIENCY = 0.95

# Header reads are network round trips on an object store: overlap them.
_HEADER_THREADS = 16
# Training steps not timed during calibration: the first ones trace the graph.
_WARM_STEPS = 2


@documented
@dataclass(frozen=True)
class PlanConfig(Config):
    """What to predict for, and what to assume where nothing was measured."""

    workers: tuple[int, ...] = setting((1, 2, 8, 64, 512), "single-threaded Dask workers to "
                                       "predict preprocessing for (repeat the flag for more "
                                       "counts)", type=int, repeat=True)
    ranks: tuple[int, ...] = setting((), "Horovod ranks of one core each to predict training "
                                     "for, paired with --workers by position (repeatable; "
                                     "default: the same counts as --workers)", type=int,
                                     repeat=True)
    price_per_hour: float | None = setting(None, "price of one core-hour (a worker or a rank), "
                                           "in any currency; without it, time only",
                                           type=float)
    songs_per_shard: int = setting(SONGS_PER_SHARD, "songs per shard, as preprocess would use")
    storage_gbps: float = setting(2.0, "aggregate bandwidth of the shared storage in GB/s "
                                  "(an assumption: it is not measured)")
    rank_efficiency: float = setting(MEASURED_RANK_EFFICIENCY, "training efficiency of 2 or "
                                     "more ranks, taken as constant beyond 2 (an assumption "
                                     "past the measured 2)")
    calibration_songs: int = setting(3, "songs preprocessed to calibrate (those nearest the "
                                     "median duration)")
    calibration_steps: int = setting(6, "training steps run to calibrate (the first "
                                     f"{_WARM_STEPS} are not timed)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "workers", tuple(self.workers))
        object.__setattr__(self, "ranks", tuple(self.ranks))
        if not self.workers or min(self.workers) < 1 or (self.ranks and min(self.ranks) < 1):
            raise ParameterError("--workers and --ranks must be >= 1")
        if self.ranks and len(self.ranks) != len(self.workers):
            raise ParameterError(
                f"--ranks pairs with --workers by position: give as many ({len(self.workers)}"
                f" --workers, {len(self.ranks)} --ranks)")
        if self.price_per_hour is not None and self.price_per_hour < 0:
            raise ParameterError(f"price_per_hour must be >= 0, got {self.price_per_hour}")
        if self.songs_per_shard < 1 or not self.storage_gbps > 0:
            raise ParameterError("songs_per_shard must be >= 1 and storage_gbps > 0")
        if not 0 < self.rank_efficiency <= 1:
            raise ParameterError(f"rank_efficiency must be in (0, 1], got {self.rank_efficiency}")
        if self.calibration_songs < 1 or self.calibration_steps < _WARM_STEPS + 2:
            raise ParameterError(f"calibration_songs must be >= 1 and calibration_steps >= "
                                 f"{_WARM_STEPS + 2}")


# ----------------------------------------------------------------------------- headers


@dataclass(frozen=True)
class SourceHeader:
    """A source as its header tells it: bytes and seconds, or why it could not be read."""

    url: str
    bytes: int
    seconds: float | None = None
    reason: str | None = None


def read_header(source: storage.SourceFile) -> SourceHeader:
    """Duration from the header alone (libsndfile reads no audio frames for ``info``)."""
    import soundfile

    if source.problem:
        return SourceHeader(source.url, source.size, reason=source.problem)
    try:
        if storage.is_remote(source.url):
            fs, path = storage.filesystem(source.url)
            with fs.open(path, "rb", block_size=1 << 16) as handle:
                info = soundfile.info(handle)
        else:
            info = soundfile.info(source.url)
    except Exception as error:  # libsndfile, the OS or the object store: this source's problem
        return SourceHeader(source.url, source.size,
                            reason=f"header unreadable: {type(error).__name__}: {error}")
    if info.frames <= 0 or info.samplerate <= 0:
        return SourceHeader(source.url, source.size, reason="header gives no audio frames")
    return SourceHeader(source.url, source.size, seconds=info.frames / info.samplerate)


def read_headers(sources: Sequence[str]) -> list[SourceHeader]:
    """Every source's header, in the order preprocess would list them."""
    listed = storage.list_sources(sources)
    if not listed:
        raise ParameterError(f"no audio files found in {list(sources)} "
                             f"(looked for {', '.join(storage.AUDIO_EXTENSIONS)})")
    with ThreadPoolExecutor(_HEADER_THREADS) as pool:
        return list(pool.map(read_header, listed))


# ----------------------------------------------------------------------------- the model


def makespan(work: Sequence[float], workers: int) -> float:
    """Wall time of tasks taken in order, each by the worker that is free first.

    Examples
    --------
    >>> makespan([3.0, 1.0, 1.0, 1.0], workers=2)
    3.0
    >>> makespan([1.0] * 5, workers=2)   # three waves, the last one half idle
    3.0
    """
    free = [0.0] * min(workers, max(1, len(work)))
    for seconds in work:
        heapq.heappush(free, heapq.heappop(free) + seconds)
    return max(free)


def preprocess_seconds(song_work: Sequence[float], *, workers: int, songs_per_shard: int,
                       overhead: float, total_bytes: float, storage_bytes_per_second: float,
                       fixed: float) -> float:
    """The preprocessing model's wall time (see the module docstring).

    ``song_work`` is each song's compute on one core, in preprocess's order.
    """
    shards = [sum(song_work[i:i + songs_per_shard])
              for i in range(0, len(song_work), songs_per_shard)]
    scheduling = 2 * len(shards) * overhead
    return (makespan(shards, workers) + scheduling
            + total_bytes / storage_bytes_per_second + fixed)


def train_seconds(*, ranks: int, steps: int, step_seconds: float, fixed: float,
                  rank_efficiency: float) -> float:
    """The training model's wall time (see the module docstring)."""
    efficiency = 1.0 if ranks == 1 else rank_efficiency
    return fixed + steps * step_seconds / efficiency


def task_overhead(client, tasks: int = 2000) -> float:
    """Seconds per task that the scheduler and workers add to a task doing nothing."""
    client.gather(client.map(_noop, range(100), pure=False))  # warm
    started = time.perf_counter()
    client.gather(client.map(_noop, range(tasks), pure=False))
    return (time.perf_counter() - started) / tasks


def _noop(x):
    return x


# ----------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Calibration(Config):
    """The measured figures a prediction rests on, and where they came from."""

    seconds_per_audio_second: float  # preprocessing compute on one core, hashing included
    task_overhead_seconds: float
    preprocess_fixed_seconds: float
    step_seconds: float  # one training step on one rank of one core
    train_fixed_seconds: float
    batch_size: int
    target_length: int
    model: str
    source: str


def _flags(cls: type, values: dict[str, Any]) -> list[str]:
    """Command-line flags that give the fields ``values`` of config class ``cls``."""
    flags = []
    for field in cli_fields(cls):
        if field.name not in values:
            continue
        value = values[field.name]
        if isinstance(value, bool):
            flags.append(flag_of(field) if value else "--no-" + flag_of(field)[2:])
        else:
            flags += [flag_of(field), str(value)]
    return flags


def _representative(headers: list[SourceHeader], count: int) -> list[SourceHeader]:
    """The ``count`` readable sources nearest the median duration."""
    readable = [h for h in headers if h.seconds is not None]
    if not readable:
        raise ParameterError("no source has a readable header, so there is nothing to calibrate "
                             "on; give other sources or --from an earlier plan or run")
    middle = statistics.median(h.seconds for h in readable)
    return sorted(sorted(readable, key=lambda h: abs(h.seconds - middle))[:count],
                  key=lambda h: h.url)


class _Discard:
    def append(self, codes) -> None:
        pass


def _compute_per_audio_second(paths: list[str], audio: AudioConfig, scratch: str) -> float:
    """Hash and encode each song in this process; seconds of work per second of audio."""
    _calibration_encode(paths[0], audio, scratch)  # warm: Numba loads its cache
    work, audio_seconds = 0.0, 0.0
    for path in paths:
        started = time.perf_counter()
        storage.sha256_of(path)
        fields = _calibration_encode(path, audio, scratch)
        work += time.perf_counter() - started
        audio_seconds += fields["source_seconds"]
    return work / audio_seconds


def _calibration_encode(path: str, audio: AudioConfig, scratch: str) -> dict[str, Any]:
    from rainforest.audio import encode_song

    try:
        return encode_song(path, audio, _Discard(), spool_dir=scratch)
    except AudioDecodeError as error:
        raise AudioDecodeError(
            f"calibration song {os.path.basename(path)} cannot be preprocessed ({error}), so "
            "its time cannot be priced; remove it from the sources, or plan --from an earlier "
            "plan or run") from None


def _launcher() -> list[str]:
    """``horovodrun`` for one rank over Gloo, as a training job starts, or nothing if absent.

    Its start-up (and Gloo's rendezvous) is part of every real training command's cost.
    """
    from rainforest.hosts import local_gloo_launcher

    return local_gloo_launcher(1)


def _timed_command(arguments: list[str], *, one_core: bool = False,
                   launcher: Sequence[str] = ()) -> float:
    """Wall seconds of a whole ``rainforest`` command; an error if it fails, or if it failed
    songs (exit status 3): a calibration that left songs out would price less work than the
    run will do."""
    pin = None
    if one_core and hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))

        def pin():  # children (the launcher's rank) inherit it
            os.sched_setaffinity(0, {core})
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "OMPI_ALLOW_RUN_AS_ROOT": "1",
           "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    started = time.perf_counter()
    result = subprocess.run([*launcher, sys.executable, "-m", "rainforest.cli", *arguments],
                            capture_output=True, text=True, preexec_fn=pin, env=env)
    elapsed = time.perf_counter() - started
    if result.returncode == 3:
        raise RainforestError(
            f"calibration command `rainforest {' '.join(arguments)}` failed song(s), so its "
            f"time cannot be priced:\n{result.stdout[-2000:]}{result.stderr[-2000:]}\nRemove "
            "those songs from the sources, or plan --from an earlier plan or run")
    if result.returncode != 0:
        raise RainforestError(f"calibration command `rainforest {' '.join(arguments)}` failed "
                              f"({result.returncode}):\n{result.stderr[-2000:]}")
    return elapsed


def calibrate(headers: list[SourceHeader], config: PlanConfig, *, audio: AudioConfig,
              train: dict[str, Any] | None, model: str,
              log: Callable[[str], None]) -> dict[str, Any]:
    """Preprocess a few songs and (unless ``train`` is None) train a few steps here, each as
    a whole command; returns the :class:`Calibration` fields measured."""
    from rainforest.cluster import connect

    picks = _representative(headers, config.calibration_songs)
    with tempfile.TemporaryDirectory(prefix="rainforest-plan-") as scratch:
        paths = [storage.fetch_to_local(h.url, scratch) for h in picks]
        log(f"calibrating on {len(paths)} song(s) ({sum(h.seconds for h in picks):.1f} s of "
            "audio): encoding, Dask's per-task overhead, a whole preprocess on 1 worker")
        per_second = _compute_per_audio_second(paths, audio, scratch)
        with connect("local:1", quiet=True) as client:
            overhead = task_overhead(client, tasks=500)
        dataset = os.path.join(scratch, "dataset")
        wall = _timed_command(["preprocess", *paths, "--out", dataset, "--cluster", "local:1",
                               "--songs-per-shard", str(config.songs_per_shard),
                               "--no-progress", "--json", *_flags(AudioConfig, audio.to_dict())])
        variable = preprocess_seconds(
            [per_second * h.seconds for h in picks], workers=1,
            songs_per_shard=config.songs_per_shard, overhead=overhead,
            total_bytes=sum(h.bytes for h in picks),
            storage_bytes_per_second=config.storage_gbps * 1e9, fixed=0.0)
        measured = {"seconds_per_audio_second": per_second, "task_overhead_seconds": overhead,
                    "preprocess_fixed_seconds": max(0.0, wall - variable)}
        source = f"calibrated on this machine ({os.cpu_count()} cores): {len(picks)} song(s)"
        if train is not None:
            measured.update(_calibrate_training(dataset, os.path.join(scratch, "run"), config,
                                                train=train, model=model, log=log))
            source += f", {config.calibration_steps} training steps on one core"
    return {**measured, "source": source}


def _calibrate_training(dataset: str, run: str, config: PlanConfig, *, train: dict[str, Any],
                        model: str, log) -> dict[str, Any]:
    """A whole ``rainforest train`` of a few steps on one core: its Calibration fields."""
    from rainforest.train import TrainConfig

    steps = config.calibration_steps
    # No held-out songs: they cost no step time, and one calibration song is enough.
    asked = {**train, "steps": steps, "log_every": 1, "validation_windows": 0,
             "validation_fraction": 0.0,
             "checkpoint_every": steps}
    settings = TrainConfig(**asked)
    launcher = _launcher()
    log(f"calibrating training: {steps} steps of {model!r}, batch {settings.batch_size} x "
        f"{settings.target_length}, one rank on one core"
        + (" under horovodrun" if launcher else " (no horovodrun found: its start-up is not "
                                                 "included)"))
    wall = _timed_command(["train", dataset, "--run", run, "--config", model, "--no-progress",
                           *_flags(TrainConfig, asked)], one_core=True, launcher=launcher)
    step = _step_seconds(run, settings.batch_size, settings.target_length)
    return {"step_seconds": step, "train_fixed_seconds": max(0.0, wall - steps * step),
            "batch_size": settings.batch_size, "target_length": settings.target_length,
            "model": model}


def _step_seconds(run: str, batch_size: int, target_length: int) -> float:
    """Median seconds per step of one rank, from ``metrics.jsonl``, after the warm steps."""
    from rainforest import runlog

    rows = runlog.read_metrics(run)
    rates = [row["samples_per_second_per_rank"] for row in rows
             if "samples_per_second_per_rank" in row and row["step"] > _WARM_STEPS]
    if not rates:
        raise ParameterError(f"{run} has no per-rank throughput in {runlog.METRICS_NAME} past "
                             f"step {_WARM_STEPS}; train it longer")
    return batch_size * target_length / statistics.median(rates)


def from_earlier(url: str) -> dict[str, Any]:
    """Figures from an earlier ``plan --json`` output or run folder (some or all fields)."""
    from rainforest import checkpoint
    from rainforest.dataset import MANIFEST_NAME
    from rainforest.documents import read_document

    if not storage.is_remote(url) and os.path.isfile(url):
        document = read_document(url, kind=PLAN_FORMAT, version=PLAN_VERSION,
                                 error=ParameterError, advice="re-run `rainforest plan --json`",
                                 missing=f"{url} is missing")
        return {**_figures(document, url), "source": f"{url} (an earlier plan)"}
    if storage.exists(storage.join(url, MANIFEST_NAME)):
        raise ParameterError(
            f"{url} is a dataset, and a dataset records no timings (it is byte-identical "
            "whatever the run); give a run folder or an earlier `rainforest plan --json` output")
    saved = checkpoint.read_config(checkpoint.latest(url))
    batch, target = saved["train"]["batch_size"], saved["train"]["target_length"]
    ranks = saved["data"].get("ranks", 1)
    return {"step_seconds": _step_seconds(url, batch, target), "train_fixed_seconds": 0.0,
            "batch_size": batch, "target_length": target, "model": f"the model of {url}",
            "source": f"{url} (a run on {ranks} rank(s); its start-up is not recorded, so "
                      "none is included)"}


def _figures(document: dict[str, Any], url: str) -> dict[str, Any]:
    """The calibration of a ``plan --json`` document, refused unless every figure it gives
    is a :class:`Calibration` field of the right kind (a time >= 0, a count >= 1, text)."""
    from rainforest.documents import NUMBER, TEXT, Kind, check_fields

    advice = "re-run `rainforest plan --json` and give its output to --from"
    if "calibration" not in document:
        raise ParameterError(f"{url} holds no calibration figures: it is not the output of "
                             f"`rainforest plan --json` (a dataset's plan.json is another kind "
                             f"of plan); {advice}")
    kinds = {"float": Kind("a number >= 0", lambda v: NUMBER.test(v) and v >= 0),
             "int": Kind("a whole number >= 1", lambda v: type(v) is int and 1 <= v < 2**63),
             "str": TEXT}
    fields = {f.name: kinds[f.type] for f in dataclasses.fields(Calibration)}
    figures = check_fields(document["calibration"], fields, where=url, what="its calibration",
                           error=ParameterError, advice=advice, optional=tuple(fields))
    if set(figures) - set(fields):
        raise ParameterError(f"{url}: its calibration has figures this rainforest does not "
                             f"know, {sorted(set(figures) - set(fields))[:5]}; {advice}")
    return figures


# ----------------------------------------------------------------------------- prediction


def assumptions(config: PlanConfig, calibration: Calibration) -> list[str]:
    """What the figures assume beyond what was measured; printed with them."""
    tasks_per_second = 1.0 / max(calibration.task_overhead_seconds, 1e-9)
    return [
        f"shared storage delivers {config.storage_gbps:g} GB/s in all (not measured; "
        "--storage-gbps)",
        f"the Dask scheduler handles {tasks_per_second:,.0f} tasks/s, one at a time, whatever "
        "the number of workers (measured on this machine)",
        "every worker and rank has one core as fast as this machine's, and they start in "
        "parallel (the fixed start-up of a command does not grow with the count)",
        f"training efficiency {config.rank_efficiency:.2f} on 2 or more ranks, constant beyond "
        "2 (measured 0.95 for 2 ranks; ring allreduce moves the same bytes per rank)",
        "held-out measurements and checkpoints beyond the last one are not included",
    ]


def predict(headers: list[SourceHeader], config: PlanConfig, calibration: Calibration, *,
            steps: int) -> list[dict[str, Any]]:
    """One row per worker count (paired with its rank count): times, core-hours, money."""
    readable = [h for h in headers if h.seconds is not None]
    work = [calibration.seconds_per_audio_second * h.seconds for h in readable]
    model = dict(songs_per_shard=config.songs_per_shard,
                 overhead=calibration.task_overhead_seconds,
                 total_bytes=sum(h.bytes for h in readable),
                 storage_bytes_per_second=config.storage_gbps * 1e9,
                 fixed=calibration.preprocess_fixed_seconds)
    one_worker = preprocess_seconds(work, workers=1, **model)
    rows = []
    for workers, ranks in zip(config.workers, config.ranks or config.workers, strict=True):
        pre = preprocess_seconds(work, workers=workers, **model)
        tra = train_seconds(ranks=ranks, steps=steps, step_seconds=calibration.step_seconds,
                            fixed=calibration.train_fixed_seconds,
                            rank_efficiency=config.rank_efficiency)
        core_hours = (workers * pre + ranks * tra) / 3600.0
        row = {"workers": workers, "preprocess_seconds": pre,
               "preprocess_efficiency": one_worker / (workers * pre), "ranks": ranks,
               "train_seconds": tra, "core_hours": core_hours,
               "extrapolated": max(workers, ranks) > 2}
        if config.price_per_hour is not None:
            row["money"] = core_hours * config.price_per_hour
        rows.append(row)
    return rows


def plan(sources: Sequence[str], config: PlanConfig, *, steps: int,
         audio: AudioConfig | None = None, train: dict[str, Any] | None = None,
         model: str = "default", earlier: Sequence[str] = (),
         log: Callable[[str], None] = print) -> dict[str, Any]:
    """Read the sources' headers, calibrate (or take ``earlier`` figures), and predict.

    Returns the plan document that ``--json`` prints and ``--from`` reads back.
    """
    headers = read_headers(sources)
    figures: dict[str, Any] = {}
    for url in earlier:
        found = from_earlier(storage.canonical(url))
        figures = {**figures, **found,
                   "source": "; ".join(filter(None, [figures.get("source"), found["source"]]))}
    missing = {f for f in Calibration.__dataclass_fields__} - set(figures)
    if missing:
        need_training = "step_seconds" in missing
        measured = calibrate(headers, config, audio=audio or AudioConfig(),
                             train=dict(train or {}) if need_training else None, model=model,
                             log=log)
        source = "; ".join(filter(None, [figures.get("source"), measured["source"]]))
        figures = {**measured, **figures, "source": source}
    calibration = Calibration(**figures)
    unreadable = [{"source": h.url, "reason": h.reason} for h in headers if h.reason]
    readable = [h for h in headers if h.seconds is not None]
    return {
        "format": PLAN_FORMAT, "version": PLAN_VERSION,
        "sources": {"count": len(headers), "readable": len(readable),
                    "hours": sum(h.seconds for h in readable) / 3600.0,
                    "bytes": sum(h.bytes for h in readable), "unreadable": unreadable},
        "steps": steps, "price_per_hour": config.price_per_hour,
        "calibration": calibration.to_dict(),
        "assumptions": assumptions(config, calibration),
        "rows": predict(headers, config, calibration, steps=steps),
    }


# ----------------------------------------------------------------------------- output


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_plan(document: dict[str, Any]) -> str:
    """The table and the assumptions, as ``rainforest plan`` prints them."""
    sources, cal = document["sources"], document["calibration"]
    priced = document["price_per_hour"] is not None
    lines = [f"{sources['readable']} of {sources['count']} source(s) readable: "
             f"{sources['hours']:.2f} h of audio, {sources['bytes'] / 1e9:.2f} GB"]
    lines += [f"  UNREADABLE {u['source']}: {u['reason']}" for u in sources["unreadable"]]
    lines.append(f"figures: {cal['source']}")
    lines.append(f"  preprocessing {cal['seconds_per_audio_second'] * 1e3:.2f} ms per second of "
                 f"audio on one core, Dask {cal['task_overhead_seconds'] * 1e3:.2f} ms per task, "
                 f"{cal['preprocess_fixed_seconds']:.1f} s fixed per command")
    lines.append(f"  training {cal['step_seconds'] * 1e3:.0f} ms per step per rank "
                 f"({cal['model']}, batch {cal['batch_size']} x {cal['target_length']}), "
                 f"{cal['train_fixed_seconds']:.1f} s fixed per command; "
                 f"{document['steps']:,} steps")
    header = (f"\n{'workers':>8} {'preprocess':>11} {'efficiency':>10} {'ranks':>6} "
              f"{'training':>10} {'core-hours':>11}" + (f" {'money':>10}" if priced else ""))
    lines.append(header)
    for row in document["rows"]:
        line = (f"{row['workers']:>8} {_duration(row['preprocess_seconds']):>11} "
                f"{row['preprocess_efficiency']:>10.0%} {row['ranks']:>6} "
                f"{_duration(row['train_seconds']):>10} {row['core_hours']:>11.2f}")
        if priced:
            line += f" {row['money']:>10.4g}"
        lines.append(line + ("  (extrapolated)" if row["extrapolated"] else ""))
    if not priced:
        lines.append("no --price-per-hour: time only")
    lines.append("\nassumptions" + (" (the figures past 2 workers or ranks rest on them):"
                                    if any(r["extrapolated"] for r in document["rows"]) else ":"))
    lines += [f"  - {line}" for line in document["assumptions"]]
    return "\n".join(lines)


def plot_plan(document: dict[str, Any], path: str) -> None:
    """Predicted preprocessing and training time against the worker (rank) count."""
    from rainforest.plots import png_figure

    rows = document["rows"]
    with png_figure(path, size=(6, 4)) as axes:
        axes.plot([r["workers"] for r in rows], [r["preprocess_seconds"] for r in rows], "o-",
                  label="preprocess (workers)")
        axes.plot([r["ranks"] for r in rows], [r["train_seconds"] for r in rows], "s--",
                  label=f"train {document['steps']:,} steps (ranks)")
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xlabel("workers or ranks (one core each)")
        axes.set_ylabel("predicted wall time (s)")
        axes.set_title(f"{document['sources']['hours']:.2f} h of audio")
        axes.grid(alpha=0.3, which="both")
        axes.legend()


__all__ = ["Calibration", "PlanConfig", "format_plan", "plan", "plot_plan", "predict",
           "preprocess_seconds", "read_headers", "task_overhead", "train_seconds"]


if __name__ == "__main__":  # python -m rainforest.plan ARGS is rainforest plan ARGS
    from rainforest.cli import run_stage

    run_stage("plan")
