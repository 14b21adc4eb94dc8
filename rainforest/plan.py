"""Time, money and quality before a run (``rainforest plan``): read headers, calibrate, predict.

Three steps:

1. **headers**: every source's size, duration and codec, read from its header through
   :mod:`rainforest.storage` (local paths and ``s3://``) with no decoding. A source whose
   header cannot be read is counted and listed, never fatal.
2. **calibration**: what the run will do, done small on this machine. A song of each codec
   present is hashed and encoded (seconds of one core per byte hashed and per second of audio,
   by codec), Dask's per-task overhead is timed, and a whole ``rainforest preprocess`` on one
   local worker gives the fixed cost of a command; an ``s3://`` object gives the store's
   request latency and bandwidth. Then a whole ``rainforest train`` of the chosen settings runs
   under ``horovodrun``, on one rank pinned to one core and on as many ranks as this machine
   holds, with the planned ``--steps`` (so ``--compile auto``'s trial runs when the real run's
   would), held-out measurements, checkpoints and samples on a short schedule of its own; its
   ``metrics.jsonl`` (a wall-clock time per step) and Horovod's timeline split its wall time
   into start-up, steps, allreduce, each held-out measurement, each checkpoint and the end.
   Or the figures of an earlier ``plan --json`` or run folder (``--from``).
3. **prediction**, per worker and rank count, by the model below; and, given a run's own
   held-out curve, the bits per sample its ``--steps`` (or ``--hours``) would reach.

Preprocessing ``N`` songs (bytes ``b_i``, seconds ``d_i``, codec ``f_i``) in ``S = ceil(N/k)``
shards of ``k`` on ``W`` single-threaded workers::

    T(W) = t0 + makespan(identify groups, W) + makespan(shards largest first, W)
              + 4 S o + sum(b) / B
    identify work of a song  h b_i (+ L + b_i / beta on s3://)
    encode work of a song    c(f_i) d_i (+ L + b_i / beta on s3://)

The identify groups are the songs in URL order, ``k`` to a task; the shards are the same
groups sent largest (in bytes) first, as ``preprocess`` sends them; each task goes to the
worker free first. ``o`` is Dask's per-task overhead (each bag partition is two tasks, twice),
``B`` the shared storage's bandwidth (an assumption), ``L`` and ``beta`` an object store's
request latency and per-stream bandwidth, ``t0`` the fixed cost of a command.

Training ``n`` steps on ``R`` ranks of one core each, ``r`` of them on a node::

    t_step(R) = t_compute(r) + allreduce(R)
    allreduce(R) = 2 (R - 1) / R * G / bandwidth  (+ 3 * 2 (R - 1) * latency across nodes)
    T(R, n) = t_start + (n - 1) t_step(R) + n_val t_val(R) + t_trace_val + n_ckpt t_ckpt
              + n_sample t_sample + t_end

``t_compute(r)`` is a rank's step less its allreduce, measured with ``r`` ranks sharing this
machine (1, and as many as it holds); ``G`` the gradient bytes of a step (4 per weight); the
bandwidth the measured local one on one node, else the lesser of it and ``--network-gbps``.
``t_start`` runs from launch to the first step's end (start-up, the step-choice trial when
the steps would trigger it, the first trace), ``n_val = ceil(n / val_every)`` held-out
measurements of ``ceil(windows / R / batch)`` forward passes each (the first also traces),
``n_ckpt = floor((n - 1) / checkpoint_every)`` checkpoints before the last one, which ``t_end``
holds with the rest of the exit.

Quality: held-out bits fall as ``floor + scale / sqrt(step)`` past the warm-up. A line in
``ln(step)`` fits later measurements as well (about 0.1 bits per doubling of the steps,
docs/performance.md) but not the first minutes, which are all a short run has; fixed at 0.5,
the exponent predicted a run's end from its first quarter within 0.10 bits (docs/plan.md).
``floor`` and ``scale`` are fitted by least squares to a run's own measurements; the
interval is the union of the 95% prediction intervals of the fits with exponents 0.25, 0.5
and 1, since minutes of measurements cannot tell those apart.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from rainforest import storage
from rainforest.config import AudioConfig, Config, cli_fields, documented, flag_of, setting
from rainforest.errors import AudioDecodeError, ParameterError, RainforestError
from rainforest.preprocess import SONGS_PER_SHARD

PLAN_FORMAT = "rainforest-plan"
PLAN_VERSION = 2

#: Between nodes, Gbit/s: 10 Gigabit Ethernet, the common floor of cluster and cloud nodes
#: (docs/plan.md); the ring runs at its slowest link.
DEFAULT_NETWORK_GBPS = 10.0
#: One message's latency between nodes, microseconds: TCP over Ethernet (Gloo's transport).
DEFAULT_NETWORK_LATENCY_US = 50.0
#: Allreduce calls a training step makes: the fused gradients, the mean loss, the stop flag.
ALLREDUCES_PER_STEP = 3

# Header reads are network round trips on an object store: overlap them.
_HEADER_THREADS = 16
# Training steps not timed during calibration: the first traces, the second broadcasts.
_WARM_STEPS = 2
# The calibration run's own schedule: held-out measurements, checkpoints and samples at steps
# apart, so that each step's wall time holds one of them at most.
_CAL_VALIDATION_EVERY = 5
_CAL_CHECKPOINT_EVERY = 8
_CAL_SAMPLE_EVERY = 6
# How often the calibration looks at metrics.jsonl to stop a long run.
_POLL_SECONDS = 0.25
# Where --hours stops counting steps that cost nothing (figures of zero).
_MOST_STEPS = 2**40
# The Horovod timeline's name for the ring's data movement (rank 0's view).
_RING_ACTIVITY = "GLOO_ALLREDUCE"


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
    hours: float | None = setting(None, "predict training for this many hours of wall time on "
                                  "each rank count instead of --steps: the steps that fit, and "
                                  "with a run's curve (--from RUN) the bits they reach",
                                  type=float)
    price_per_hour: float | None = setting(None, "price of one core-hour (a worker or a rank), "
                                           "in any currency; without it, time only",
                                           type=float)
    songs_per_shard: int = setting(SONGS_PER_SHARD, "songs per shard, as preprocess would use")
    storage_gbps: float = setting(2.0, "aggregate bandwidth of the shared storage in GB/s "
                                  "(an assumption: it is not measured)")
    network_gbps: float = setting(DEFAULT_NETWORK_GBPS, "bandwidth between nodes in Gbit/s, "
                                  "which a ring allreduce across nodes runs at (an assumption: "
                                  "the ranks on this machine are measured; 10 Gigabit Ethernet "
                                  "by default)")
    network_latency_us: float = setting(DEFAULT_NETWORK_LATENCY_US, "latency of one message "
                                        "between nodes in microseconds (an assumption)")
    ranks_per_node: int | None = setting(None, "ranks on one node, beyond which allreduce "
                                         "crosses the network (default: as many as the "
                                         "calibration ran on this machine)", type=int)
    calibration_songs: int = setting(2, "songs of each codec present preprocessed to calibrate "
                                     "(those nearest that codec's median duration)")
    calibration_steps: int = setting(16, "training steps run to calibrate (the first "
                                     f"{_WARM_STEPS} are not taken as the step time)")

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
        if self.hours is not None and not (math.isfinite(self.hours) and self.hours > 0):
            raise ParameterError(f"--hours must be a positive number, got {self.hours}")
        if self.songs_per_shard < 1 or not self.storage_gbps > 0:
            raise ParameterError("songs_per_shard must be >= 1 and storage_gbps > 0")
        if not self.network_gbps > 0 or not self.network_latency_us >= 0:
            raise ParameterError("network_gbps must be > 0 and network_latency_us >= 0")
        if self.ranks_per_node is not None and self.ranks_per_node < 1:
            raise ParameterError(f"ranks_per_node must be >= 1, got {self.ranks_per_node}")
        if self.calibration_songs < 1 or self.calibration_steps < 12:
            raise ParameterError("calibration_songs must be >= 1 and calibration_steps >= 12 "
                                 "(two held-out measurements and a checkpoint)")

    @property
    def rank_counts(self) -> tuple[int, ...]:
        return self.ranks or self.workers


# ----------------------------------------------------------------------------- headers


@dataclass(frozen=True)
class SourceHeader:
    """A source as its header tells it: bytes, seconds and codec, or why it could not be read."""

    url: str
    bytes: int
    seconds: float | None = None
    codec: str | None = None
    reason: str | None = None


def codec_of(info) -> str:
    """The decoder a song needs, from libsndfile's ``info``: the container names it, save Ogg,
    whose codec (Vorbis or Opus) is its subtype.

    >>> from types import SimpleNamespace as S
    >>> codec_of(S(format="OGG", subtype="OPUS")), codec_of(S(format="MP3", subtype="MPEG"))
    ('OGG/OPUS', 'MP3')
    """
    return f"OGG/{info.subtype}" if info.format == "OGG" else str(info.format)


def read_header(source: storage.SourceFile) -> SourceHeader:
    """Duration and codec from the header alone (libsndfile reads no audio frames for ``info``)."""
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
    return SourceHeader(source.url, source.size, seconds=info.frames / info.samplerate,
                        codec=codec_of(info))


def read_headers(sources: Sequence[str]) -> list[SourceHeader]:
    """Every source's header, in the order preprocess lists them (by URL)."""
    listed = storage.list_sources(sources)
    if not listed:
        raise ParameterError(f"no audio files found in {list(sources)} "
                             f"(looked for {', '.join(storage.AUDIO_EXTENSIONS)})")
    with ThreadPoolExecutor(_HEADER_THREADS) as pool:
        return list(pool.map(read_header, listed))


# ----------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class PreprocessFigures(Config):
    """Preprocessing's measured figures (seconds of one core unless said)."""

    decode_seconds: dict[str, float]  # by codec, per second of audio: decode, resample, encode
    hash_seconds_per_byte: float
    task_overhead_seconds: float
    fixed_seconds: float  # a whole command's cost beyond its tasks
    source: str
    s3_latency_seconds: float | None = None  # one request's wait, on s3:// sources
    s3_bytes_per_second: float | None = None  # one stream's bandwidth, on s3:// sources


@dataclass(frozen=True)
class RankFigures(Config):
    """One calibration run's wall time, split: on ``ranks`` ranks sharing this machine."""

    ranks: int
    step_seconds: float  # the mean step past the warm ones, allreduce included
    allreduce_seconds: float  # the ring's share of a step (Horovod's timeline; 0 on 1 rank)
    start_seconds: float  # launch to the end of the first step: start-up, trial, first trace
    validation_seconds: float  # one held-out measurement, beyond its step
    validation_trace_seconds: float  # the first measurement's extra (its trace)
    validation_passes: int  # forward passes a rank made per measurement
    checkpoint_seconds: float  # one checkpoint written mid-run, beyond its step
    sample_seconds: float  # one training sample handed to the sampler, beyond its step
    end_seconds: float  # the last step's end to exit: the last checkpoint, logs, teardown

    def __post_init__(self) -> None:
        if self.ranks < 1 or self.validation_passes < 0:
            raise ParameterError("ranks must be >= 1 and validation_passes >= 0")


@dataclass(frozen=True)
class TrainingFigures(Config):
    """Training's measured figures: what was calibrated, and its runs by rank count."""

    model: str  # a preset, a JSON file, or "the model of RUN"
    batch_size: int
    target_length: int
    step_choice: str  # compile/precision the calibration trained with, and why
    gradient_bytes: int  # allreduced a step: 4 bytes a weight
    runs: tuple[RankFigures, ...]
    source: str

    def __post_init__(self) -> None:
        runs = tuple(r if isinstance(r, RankFigures) else RankFigures(**r) for r in self.runs)
        if not runs:
            raise ParameterError("training figures need at least one calibration run")
        object.__setattr__(self, "runs", tuple(sorted(runs, key=lambda r: r.ranks)))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "runs": [r.to_dict() for r in self.runs]}

    def on(self, ranks: int) -> RankFigures:
        """The run whose rank count is the best guide to ``ranks``: the same count, else for one
        rank the smallest measured and for more the largest measured on several ranks."""
        exact = [r for r in self.runs if r.ranks == ranks]
        if exact:
            return exact[0]
        several = [r for r in self.runs if r.ranks >= 2]
        return self.runs[0] if ranks == 1 or not several else several[-1]


# ----------------------------------------------------------------------------- the models


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


def song_work(song: SourceHeader, figures: PreprocessFigures) -> tuple[float, float]:
    """(identify, encode) seconds of one core for one song, an object store's requests included."""
    identify = figures.hash_seconds_per_byte * song.bytes
    encode = figures.decode_seconds[song.codec] * song.seconds
    if storage.is_remote(song.url):
        transfer = figures.s3_latency_seconds + song.bytes / figures.s3_bytes_per_second
        identify, encode = identify + transfer, encode + transfer  # read to hash, then to decode
    return identify, encode


def preprocess_seconds(song_work: Sequence[float], *, workers: int, songs_per_shard: int,
                       overhead: float, total_bytes: float, storage_bytes_per_second: float,
                       fixed: float, identify_work: Sequence[float] = (),
                       song_bytes: Sequence[float] = ()) -> float:
    """The preprocessing model's wall time (see the module docstring).

    ``song_work`` is each song's encoding on one core and ``identify_work`` its hashing, in
    preprocess's (URL) order; with ``song_bytes`` the shards are sent largest first, as
    preprocess sends them (bytes being its guess of their work), else in order.
    """
    groups = [range(i, min(i + songs_per_shard, len(song_work)))
              for i in range(0, len(song_work), songs_per_shard)]
    identify = [sum(identify_work[i] for i in group) for group in groups] if identify_work \
        else []
    if song_bytes:
        groups = sorted(groups, key=lambda g: sum(song_bytes[i] for i in g), reverse=True)
    encode = [sum(song_work[i] for i in group) for group in groups]
    tasks = 4 * len(groups)  # two bags (identify, build), each partition two tasks
    return (fixed + (makespan(identify, workers) if identify else 0.0)
            + makespan(encode, workers) + tasks * overhead
            + total_bytes / storage_bytes_per_second)


def predict_preprocessing(songs: Sequence[SourceHeader], figures: PreprocessFigures, *,
                          workers: int, songs_per_shard: int,
                          storage_bytes_per_second: float) -> float:
    """:func:`preprocess_seconds` of readable ``songs``, priced by ``figures``."""
    ordered = sorted(songs, key=lambda s: s.url)
    work = [song_work(s, figures) for s in ordered]
    return preprocess_seconds(
        [w[1] for w in work], identify_work=[w[0] for w in work],
        song_bytes=[s.bytes for s in ordered], workers=workers,
        songs_per_shard=songs_per_shard, overhead=figures.task_overhead_seconds,
        total_bytes=sum(s.bytes for s in ordered),
        storage_bytes_per_second=storage_bytes_per_second, fixed=figures.fixed_seconds)


@dataclass(frozen=True)
class Schedule:
    """What of a training run's settings its wall time depends on, beyond the step itself."""

    validation: bool  # held-out songs, windows and a period
    validation_every: int
    validation_windows: int
    checkpoint_every: int
    sample_every: int
    batch_size: int

    @classmethod
    def of(cls, train) -> Schedule:
        """The schedule of a ``TrainConfig``."""
        return cls(validation=(train.validation_fraction > 0 and train.validation_windows > 0
                               and train.validation_every > 0),
                   validation_every=train.validation_every,
                   validation_windows=train.validation_windows,
                   checkpoint_every=train.checkpoint_every, sample_every=train.sample_every,
                   batch_size=train.batch_size)

    def passes(self, ranks: int) -> int:
        """Forward passes a rank makes per held-out measurement (windows dealt round-robin)."""
        return math.ceil(math.ceil(self.validation_windows / ranks) / self.batch_size)


@dataclass(frozen=True)
class Network:
    """Between nodes: what the ring runs at once it leaves one."""

    bytes_per_second: float
    latency_seconds: float
    ranks_per_node: int


def allreduce_seconds(ranks: int, figures: TrainingFigures, network: Network) -> float:
    """A step's ring allreduce on ``ranks`` ranks: each moves ``2 (R - 1) / R`` of the gradient
    bytes, at the bandwidth measured on this machine's ranks while the ring stays on a node,
    and at the slower of it and the network's once it spans nodes (plus each message's
    latency)."""
    if ranks == 1:
        return 0.0
    local = figures.on(ranks)
    share = 2 * (ranks - 1) / ranks
    on_node = 0.0
    if local.ranks >= 2:  # the measured time, for this share of the bytes
        on_node = local.allreduce_seconds * share / (2 * (local.ranks - 1) / local.ranks)
    if ranks <= network.ranks_per_node:
        return on_node
    return (max(on_node, share * figures.gradient_bytes / network.bytes_per_second)
            + ALLREDUCES_PER_STEP * 2 * (ranks - 1) * network.latency_seconds)


def step_seconds(ranks: int, figures: TrainingFigures, network: Network) -> float:
    """One step on ``ranks`` ranks: a rank's compute as measured with its node's cores all at
    work, plus the ring allreduce."""
    run = figures.on(ranks)
    compute = run.step_seconds - run.allreduce_seconds
    return compute + allreduce_seconds(ranks, figures, network)


def train_parts(*, ranks: int, steps: int, figures: TrainingFigures, schedule: Schedule,
                network: Network) -> dict[str, float]:
    """The training model's wall time, by part (see the module docstring); they add up."""
    run = figures.on(ranks)
    validations = 0
    if schedule.validation:
        validations = steps // schedule.validation_every + bool(steps % schedule.validation_every)
    scale = schedule.passes(ranks) / run.validation_passes if run.validation_passes else 1.0
    samples = steps // schedule.sample_every if schedule.sample_every else 0
    return {
        "start": run.start_seconds,
        "steps": (steps - 1) * step_seconds(ranks, figures, network),
        "validation": (validations * run.validation_seconds * scale
                       + (run.validation_trace_seconds if validations else 0.0)),
        "checkpoints": (steps - 1) // schedule.checkpoint_every * run.checkpoint_seconds,
        "samples": samples * run.sample_seconds,
        "end": run.end_seconds,
    }


def steps_within(seconds: float, *, ranks: int, figures: TrainingFigures, schedule: Schedule,
                 network: Network) -> int:
    """The most steps whose predicted wall time fits ``seconds`` (0 if not even one does)."""
    def fits(steps: int) -> bool:
        return sum(train_parts(ranks=ranks, steps=steps, figures=figures, schedule=schedule,
                               network=network).values()) <= seconds
    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):
        if high >= _MOST_STEPS:  # steps that cost nothing: no limit to them
            return _MOST_STEPS
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def task_overhead(client, tasks: int = 2000) -> float:
    """Seconds per task that the scheduler and workers add to a task doing nothing."""
    client.gather(client.map(_noop, range(100), pure=False))  # warm
    started = time.perf_counter()
    client.gather(client.map(_noop, range(tasks), pure=False))
    return (time.perf_counter() - started) / tasks


def _noop(x):
    return x


# ----------------------------------------------------------------------------- quality

#: Student's t, two-sided 95%, for 1..30 degrees of freedom.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
#: Held-out bits against steps: ``floor + scale / step**e``. Minutes of noisy measurements do
#: not determine ``e`` (0.5 to 1.5 fitted a 12-minute run's whole curve equally well), so it
#: is fixed at the middle exponent, which predicted that run's end from its first quarter
#: within 0.10 bits where a line in ln(step) (e -> 0) missed by 0.32 (docs/plan.md); the
#: interval spans the fits of all three.
CURVE_EXPONENTS = (0.25, 0.5, 1.0)


def t95(degrees: int) -> float:
    """Student's t quantile for a two-sided 95% interval (past 30: within 0.002 of exact).

    >>> t95(1), t95(10), round(t95(100), 2)
    (12.706, 2.228, 1.98)
    """
    if degrees < 1:
        raise ParameterError("an interval needs at least 1 degree of freedom")
    return _T95[degrees - 1] if degrees <= len(_T95) else 1.96 + 2.5 / degrees


@dataclass(frozen=True)
class CurveFit(Config):
    """Held-out measurements, and the curves ``floor + scale / step**e`` through them."""

    steps: tuple[int, ...]
    bits: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))
        object.__setattr__(self, "bits", tuple(float(b) for b in self.bits))
        if len(self.steps) != len(self.bits) or len(set(self.steps)) < 3 \
                or min(self.steps) < 1 or not all(map(math.isfinite, self.bits)):
            raise ParameterError("a curve needs held-out bits at 3 or more distinct steps")

    @property
    def points(self) -> int:
        return len(self.steps)

    def line(self, exponent: float) -> tuple[float, float, float, float, float]:
        """Least squares in ``x = step**-exponent``: (floor, scale, residual standard
        deviation, mean x, sum of squared deviations of x)."""
        xs = [s ** -exponent for s in self.steps]
        mean_x, mean_y = statistics.fmean(xs), statistics.fmean(self.bits)
        spread = sum((x - mean_x) ** 2 for x in xs)
        scale = sum((x - mean_x) * (y - mean_y)
                    for x, y in zip(xs, self.bits, strict=True)) / spread
        floor = mean_y - scale * mean_x
        residual = math.sqrt(sum((y - floor - scale * x) ** 2
                                 for x, y in zip(xs, self.bits, strict=True)) / (len(xs) - 2))
        return floor, scale, residual, mean_x, spread

    def predict(self, steps: int) -> dict[str, float]:
        """Bits after ``steps`` steps by the middle exponent, and an interval that holds one
        measurement there with 95% odds under any of the exponents."""
        guesses = []
        for exponent in CURVE_EXPONENTS:
            floor, scale, residual, mean_x, spread = self.line(exponent)
            x = steps ** -exponent
            half = t95(self.points - 2) * residual * math.sqrt(
                1 + 1 / self.points + (x - mean_x) ** 2 / spread)
            guesses.append((floor + scale * x, half))
        middle = guesses[len(guesses) // 2][0]
        return {"steps": steps, "bits": middle, "low": min(g - h for g, h in guesses),
                "high": max(g + h for g, h in guesses)}


def fit_curve(points: Iterable[tuple[int, float]], *, after_step: int = 0) -> CurveFit:
    """The curves through held-out ``(step, bits)`` measurements taken after ``after_step``
    (the warm-up, whose rising rate bends them); at least 3 of them.

    >>> fit = fit_curve([(s, 4.5 + 8 / math.sqrt(s)) for s in (200, 400, 800)])
    >>> round(fit.line(0.5)[0], 6), round(fit.predict(1600)["bits"], 6)
    (4.5, 4.7)
    """
    kept = sorted((int(s), float(b)) for s, b in points
                  if s > after_step and s > 0 and math.isfinite(b))
    if len({s for s, _ in kept}) < 3:
        raise ParameterError(f"a curve needs at least 3 held-out measurements after step "
                             f"{after_step}, found {len(kept)}; train longer, or measure "
                             "more often (--val-every)")
    return CurveFit(steps=tuple(s for s, _ in kept), bits=tuple(b for _, b in kept))


def held_out_curve(rows: Iterable[dict[str, Any]]) -> list[tuple[int, float]]:
    """``(step, validation_bits)`` of a run's metrics records."""
    return [(int(r["step"]), float(r["validation_bits"])) for r in rows
            if "validation_bits" in r and r["validation_bits"] is not None
            and math.isfinite(r["validation_bits"])]


# ----------------------------------------------------------------------------- calibration


def _flags(cls: type, values: dict[str, Any]) -> list[str]:
    """Command-line flags that give the fields ``values`` of config class ``cls``."""
    flags = []
    for field in cli_fields(cls):
        if field.name not in values or values[field.name] is None:
            continue
        value = values[field.name]
        if isinstance(value, bool):
            flags.append(flag_of(field) if value else "--no-" + flag_of(field)[2:])
        else:
            flags += [flag_of(field), str(value)]
    return flags


def _readable(headers: Sequence[SourceHeader]) -> list[SourceHeader]:
    readable = [h for h in headers if h.seconds is not None]
    if not readable:
        raise ParameterError("no source has a readable header, so there is nothing to calibrate "
                             "on; give other sources or --from an earlier plan or run")
    return readable


def calibration_picks(headers: Sequence[SourceHeader], per_codec: int,
                      least: int = 1) -> list[SourceHeader]:
    """``per_codec`` songs of each codec (those nearest that codec's median duration), then
    the songs nearest the median of all until there are ``least``; in URL order."""
    readable = _readable(headers)
    picks: dict[str, SourceHeader] = {}
    for codec in sorted({h.codec for h in readable}):
        of = [h for h in readable if h.codec == codec]
        middle = statistics.median(h.seconds for h in of)
        for pick in sorted(of, key=lambda h: (abs(h.seconds - middle), h.url))[:per_codec]:
            picks[pick.url] = pick
    middle = statistics.median(h.seconds for h in readable)
    for header in sorted(readable, key=lambda h: (abs(h.seconds - middle), h.url)):
        if len(picks) >= least:
            break
        picks.setdefault(header.url, header)
    return sorted(picks.values(), key=lambda h: h.url)


class _Discard:
    def append(self, codes) -> None:
        pass


def _measure_songs(paths: list[str], picks: list[SourceHeader], audio: AudioConfig,
                   scratch: str) -> tuple[dict[str, float], float]:
    """Hash and encode each song in this process: (seconds per second of audio by codec,
    seconds per byte hashed)."""
    shortest = min(range(len(picks)), key=lambda i: picks[i].seconds)
    _calibration_encode(paths[shortest], audio, scratch)  # warm: Numba loads its cache
    work: dict[str, float] = {}
    audio_seconds: dict[str, float] = {}
    hashing, hashed = 0.0, 0
    for path, pick in zip(paths, picks, strict=True):
        started = time.perf_counter()
        storage.sha256_of(path)
        hashing += time.perf_counter() - started
        hashed += os.path.getsize(path)
        started = time.perf_counter()
        fields = _calibration_encode(path, audio, scratch)
        work[pick.codec] = work.get(pick.codec, 0.0) + time.perf_counter() - started
        audio_seconds[pick.codec] = audio_seconds.get(pick.codec, 0.0) + fields["source_seconds"]
    return {codec: work[codec] / audio_seconds[codec] for codec in work}, hashing / max(hashed, 1)


def _calibration_encode(path: str, audio: AudioConfig, scratch: str) -> dict[str, Any]:
    from rainforest.audio import encode_song

    try:
        return encode_song(path, audio, _Discard(), spool_dir=scratch)
    except AudioDecodeError as error:
        raise AudioDecodeError(
            f"calibration song {os.path.basename(path)} cannot be preprocessed ({error}), so "
            "its time cannot be priced; remove it from the sources, or plan --from an earlier "
            "plan or run") from None


def object_store_figures(url: str, requests: int = 5) -> tuple[float, float]:
    """(seconds of one request, bytes per second of one stream) of the store holding ``url``:
    the median of a few 1-byte reads, then one whole read of the object."""
    fs, path = storage.filesystem(url)
    waits = []
    for _ in range(requests):
        started = time.perf_counter()
        fs.cat_file(path, start=0, end=1)
        waits.append(time.perf_counter() - started)
    latency = statistics.median(waits)
    started = time.perf_counter()
    size = len(fs.cat_file(path))
    transfer = max(time.perf_counter() - started - latency, 1e-6)
    return latency, size / transfer


def _env() -> dict[str, str]:
    """A calibration command's environment: this venv's launchers first, OpenMPI allowed as
    root (containers), quiet TensorFlow, unbuffered output."""
    return {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep
            + os.environ.get("PATH", ""), "TF_CPP_MIN_LOG_LEVEL": "2",
            "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "PYTHONUNBUFFERED": "1"}


def _cores() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _pinned(cores: int | None):
    """A ``preexec_fn`` that keeps a command (and what it starts) on the first ``cores`` cores."""
    if cores is None or not hasattr(os, "sched_setaffinity"):
        return None
    chosen = set(_cores()[:cores])

    def pin():  # children (the launcher's ranks) inherit it
        os.sched_setaffinity(0, chosen)
    return pin


def _failed(arguments: list[str], returncode: int, stdout: str, stderr: str) -> RainforestError:
    if returncode == 3:
        return RainforestError(
            f"calibration command `rainforest {' '.join(arguments)}` failed song(s), so its "
            f"time cannot be priced:\n{stdout[-2000:]}{stderr[-2000:]}\nRemove those songs "
            "from the sources, or plan --from an earlier plan or run")
    return RainforestError(f"calibration command `rainforest {' '.join(arguments)}` failed "
                           f"({returncode}):\n{stdout[-1000:]}{stderr[-2000:]}")


def _timed_command(arguments: list[str], *, cores: int | None = None,
                   launcher: Sequence[str] = ()) -> float:
    """Wall seconds of a whole ``rainforest`` command; an error if it fails, or if it failed
    songs (exit status 3): a calibration that left songs out would price less work than the
    run will do."""
    started = time.perf_counter()
    result = subprocess.run([*launcher, sys.executable, "-m", "rainforest.cli", *arguments],
                            capture_output=True, text=True, preexec_fn=_pinned(cores),
                            env=_env())
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise _failed(arguments, result.returncode, result.stdout, result.stderr)
    return elapsed


def _last_step(run: str) -> int:
    """The last step ``RUN/metrics.jsonl`` holds whole (0 before the first)."""
    path = os.path.join(run, "metrics.jsonl")
    try:
        with open(path, "rb") as handle:
            lines = handle.read().split(b"\n")[:-1]  # the last piece may be half written
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def _stop_ranks(process: subprocess.Popen) -> None:
    """SIGTERM to every rank of a training command: each finishes its step, they agree to
    stop, and rank 0 writes the last checkpoint, as when a batch system ends a job."""
    import psutil

    try:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(
            recursive=True)]
    except psutil.NoSuchProcess:
        return
    for member in family:
        try:
            command = member.cmdline()
            # the ranks themselves, not the launcher nor its shell wrappers (which would exit
            # on the signal and fail the job)
            if command[1:3] == ["-m", "rainforest.cli"] and "train" in command:
                member.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            continue


@dataclass(frozen=True)
class _Timed:
    launched: float  # Unix seconds, the clock of metrics.jsonl
    ended: float


def _timed_training(arguments: list[str], run: str, *, ranks: int, stop_after: int | None,
                    timeline: str | None) -> _Timed:
    """A whole ``rainforest train`` under ``horovodrun`` on ``ranks`` of this machine's cores;
    stopped by SIGTERM once ``metrics.jsonl`` holds step ``stop_after``, if given."""
    from rainforest.hosts import local_gloo_launcher

    launcher = local_gloo_launcher(ranks)
    if not launcher and ranks > 1:
        raise RainforestError(f"horovodrun is not installed, so {ranks} ranks cannot be "
                              "calibrated; install it (scripts/install.sh), or plan --ranks 1")
    env = _env()
    if timeline:
        env["HOROVOD_TIMELINE"] = timeline
    command = [*launcher, sys.executable, "-m", "rainforest.cli", *arguments]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        launched = time.time()
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env,
                                   preexec_fn=_pinned(ranks))
        stopping = stop_after is None
        while True:
            try:
                process.wait(timeout=_POLL_SECONDS)
                break
            except subprocess.TimeoutExpired:
                if not stopping and _last_step(run) >= stop_after:
                    _stop_ranks(process)
                    stopping = True
        ended = time.time()
        if process.returncode != 0:
            out.seek(0)
            err.seek(0)
            raise _failed(arguments, process.returncode, out.read(), err.read())
    return _Timed(launched, ended)


def ring_seconds(timeline: str, windows: Sequence[tuple[float, float]]) -> float:
    """Mean seconds per window that Horovod's ring moved data (``GLOO_ALLREDUCE`` spans in
    rank 0's timeline, overlapping ones counted once), for windows in Unix seconds."""
    try:
        with open(timeline, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        return 0.0
    events = _timeline_events(text)
    origin = next((e["args"]["start_time_since_epoch_in_micros"] for e in events
                   if isinstance(e.get("args"), dict)
                   and "start_time_since_epoch_in_micros" in e["args"]), None)
    if origin is None or not windows:
        return 0.0
    open_spans: dict[Any, list[tuple[str, float]]] = {}
    spans = []
    for event in events:
        phase, lane = event.get("ph"), event.get("pid")
        if phase == "B":
            open_spans.setdefault(lane, []).append((event.get("name"), event["ts"]))
        elif phase == "E" and open_spans.get(lane):
            name, began = open_spans[lane].pop()
            if name == _RING_ACTIVITY:
                spans.append(((origin + began) / 1e6, (origin + event["ts"]) / 1e6))
    merged: list[list[float]] = []
    for begin, end in sorted(spans):
        if merged and begin <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([begin, end])
    inside = sum(max(0.0, min(end, right) - max(begin, left))
                 for left, right in windows for begin, end in merged)
    return inside / len(windows)


def _timeline_events(text: str) -> list[dict[str, Any]]:
    """The events of a Chrome-trace timeline that may still lack its closing bracket."""
    decoder = json.JSONDecoder()
    events, at = [], text.find("[") + 1
    while 0 < at < len(text):
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        if at >= len(text) or text[at] == "]":
            break
        try:
            event, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            break  # a torn last event: the run was stopped while writing it
        if isinstance(event, dict):
            events.append(event)
    return events


def rank_figures(rows: Sequence[dict[str, Any]], *, ranks: int, launched: float | None,
                 ended: float | None, schedule: Schedule,
                 ring: Callable[[list[tuple[float, float]]], float] | None = None
                 ) -> RankFigures:
    """Split one run's wall time by what each step did, from its ``metrics.jsonl`` records (a
    wall-clock time per step): a held-out measurement shows in its own step's time, a
    checkpoint or a sample in the next step's. ``launched``/``ended`` (Unix seconds) give the
    start-up and the end, where known; ``ring(windows)`` the allreduce seconds per window."""
    times = {int(r["step"]): float(r["time"]) for r in rows}
    validated = {int(r["step"]) for r in rows if "validation_bits" in r}
    steps = sorted(times)
    gaps = {s: times[s] - times[s - 1] for s in steps if s - 1 in times}

    def after(every: int, step: int) -> bool:  # an event at step - 1 shows in this step
        return every > 0 and (step - 1) % every == 0 and step - 1 > 0

    plain = [s for s in gaps if s > _WARM_STEPS and s not in validated
             and not after(schedule.checkpoint_every, s) and not after(schedule.sample_every, s)]
    if len(plain) < 2:
        raise RainforestError(f"a calibration run logged {len(steps)} step(s), too few to time a "
                              f"step; raise --calibration-steps")
    # the mean, as a long run averages its steps, less the slowest (one stray pause in a
    # dozen steps would otherwise weigh a twelfth)
    timed = sorted(gaps[s] for s in plain)
    step = statistics.fmean(timed[:-1] if len(timed) >= 5 else timed)
    measured = [gaps[s] - step for s in sorted(validated) if s in gaps]
    checkpoints = [gaps[s] - step for s in gaps if after(schedule.checkpoint_every, s)
                   and s not in validated]
    samples = [gaps[s] - step for s in gaps if after(schedule.sample_every, s)
               and s not in validated and not after(schedule.checkpoint_every, s)]
    later = measured[1:] or measured
    validation = max(0.0, statistics.median(later)) if later else 0.0
    allreduce = 0.0
    if ranks > 1 and ring is not None:
        allreduce = min(ring([(times[s - 1], times[s]) for s in plain]), step)
    return RankFigures(
        ranks=ranks, step_seconds=step, allreduce_seconds=allreduce,
        start_seconds=max(0.0, times[steps[0]] - launched) if launched is not None else 0.0,
        validation_seconds=validation,
        validation_trace_seconds=max(0.0, measured[0] - validation) if measured else 0.0,
        validation_passes=schedule.passes(ranks) if measured else 0,
        checkpoint_seconds=max(0.0, statistics.median(checkpoints)) if checkpoints else 0.0,
        sample_seconds=max(0.0, statistics.median(samples)) if samples else 0.0,
        end_seconds=max(0.0, ended - times[steps[-1]]) if ended is not None else 0.0)


def calibrate_preprocessing(headers: list[SourceHeader], config: PlanConfig, *,
                            audio: AudioConfig, least: int, scratch: str,
                            log: Callable[[str], None]) -> tuple[PreprocessFigures, str]:
    """Measure preprocessing on a few songs; returns the figures and the calibration dataset
    (a whole ``rainforest preprocess`` of those songs, which training calibrates on)."""
    from rainforest.cluster import connect

    picks = calibration_picks(headers, config.calibration_songs, least)
    codecs = sorted({p.codec for p in picks})
    log(f"calibrating preprocessing on {len(picks)} song(s) ({', '.join(codecs)}; "
        f"{sum(h.seconds for h in picks):.1f} s of audio): hashing and encoding each codec, "
        "Dask's per-task overhead, a whole preprocess on 1 worker")
    remote = next((h.url for h in picks if storage.is_remote(h.url)), None)
    latency = bandwidth = None
    if remote is not None:
        latency, bandwidth = object_store_figures(remote)
    folder = os.path.join(scratch, "songs")
    os.makedirs(folder, exist_ok=True)
    paths = [storage.fetch_to_local(h.url, folder) for h in picks]
    decode, hashing = _measure_songs(paths, picks, audio, scratch)
    with connect("local:1", quiet=True) as client:
        overhead = task_overhead(client, tasks=500)
    dataset = os.path.join(scratch, "dataset")
    wall = _timed_command(["preprocess", *paths, "--out", dataset, "--cluster", "local:1",
                           "--songs-per-shard", str(config.songs_per_shard),
                           "--no-progress", "--json", *_flags(AudioConfig, audio.to_dict())])
    local = [dataclasses.replace(h, url=p) for h, p in zip(picks, paths, strict=True)]
    figures = PreprocessFigures(decode_seconds=decode, hash_seconds_per_byte=hashing,
                                task_overhead_seconds=overhead, fixed_seconds=0.0, source="",
                                s3_latency_seconds=latency, s3_bytes_per_second=bandwidth)
    variable = predict_preprocessing(local, figures, workers=1,
                                     songs_per_shard=config.songs_per_shard,
                                     storage_bytes_per_second=config.storage_gbps * 1e9)
    source = (f"calibrated on this machine ({len(_cores())} cores): {len(picks)} song(s) "
              f"({', '.join(codecs)})" + (f", s3:// requests to {remote}" if remote else ""))
    return dataclasses.replace(figures, fixed_seconds=max(0.0, wall - variable),
                               source=source), dataset


def songs_for_training(ranks: int, validation_fraction: float) -> int:
    """Songs a calibration dataset needs so that each of ``ranks`` ranks has a training song
    and the held-out split (``rainforest.sampling.split_songs``) has one."""
    songs = ranks
    while validation_fraction > 0:
        songs += 1
        held = min(songs - 1, max(1, round(validation_fraction * songs)))
        if songs - held >= ranks:
            break
    return songs


def calibrate_training(dataset: str, scratch: str, config: PlanConfig, *, train,
                       asked: dict[str, Any], model: str, steps: int,
                       log: Callable[[str], None]) -> TrainingFigures:
    """Whole ``rainforest train`` commands of the asked settings: on one rank pinned to one
    core (if one rank is planned) and on as many ranks as this machine holds (if more are);
    ``train`` is the resolved ``TrainConfig``, ``asked`` the flags given."""
    from rainforest import checkpoint, runlog
    from rainforest.model_config import load_model_config
    from rainforest.step_choice import MEASURE_FROM_STEPS

    schedule = Schedule.of(train)
    local = min(len(_cores()), max(config.rank_counts))
    counts = sorted({1 if 1 in config.rank_counts or local == 1 else local, local})
    # The planned steps pick the step the run trains with (a long run times its candidates
    # first): run with them and stop early, or run just the calibration's steps.
    trial = steps >= MEASURE_FROM_STEPS
    calibration = {**asked, "steps": steps if trial else config.calibration_steps,
                   "checkpoint_every": _CAL_CHECKPOINT_EVERY,
                   "validation_every": _CAL_VALIDATION_EVERY,
                   "sample_every": _CAL_SAMPLE_EVERY if schedule.sample_every else 0}
    if not schedule.validation:
        calibration["validation_windows"] = 0
    short = Schedule(validation=schedule.validation, validation_every=_CAL_VALIDATION_EVERY,
                     validation_windows=schedule.validation_windows,
                     checkpoint_every=_CAL_CHECKPOINT_EVERY,
                     sample_every=calibration["sample_every"], batch_size=schedule.batch_size)
    runs, choice = [], ""
    for ranks in counts:
        log(f"calibrating training: {model!r}, batch {train.batch_size} x "
            f"{train.target_length}, {ranks} rank(s) on {ranks} core(s), "
            + (f"--steps {steps} (its step-choice trial included), stopped after "
               f"{config.calibration_steps}" if trial else f"{config.calibration_steps} steps"))
        run = os.path.join(scratch, f"run-{ranks}")
        timeline = os.path.join(scratch, f"timeline-{ranks}.json") if ranks > 1 else None
        timed = _timed_training(["train", dataset, "--run", run, "--config", model,
                                 "--no-progress", *_flags(type(train), calibration)], run,
                                ranks=ranks, stop_after=config.calibration_steps if trial
                                else None, timeline=timeline)
        runs.append(rank_figures(
            runlog.read_metrics(run), ranks=ranks, launched=timed.launched, ended=timed.ended,
            schedule=short, ring=(lambda w, t=timeline: ring_seconds(t, w)) if timeline
            else None))
        saved = checkpoint.read_config(checkpoint.latest(run))["data"].get("step_choice") or {}
        choice = (f"{saved.get('compile')}/{saved.get('precision')} on {ranks} rank(s): "
                  f"{saved.get('reason')}")
    return TrainingFigures(
        model=model, batch_size=train.batch_size, target_length=train.target_length,
        step_choice=choice, gradient_bytes=gradient_bytes(load_model_config(model)),
        runs=tuple(runs),
        source=f"calibrated on this machine: whole `rainforest train` commands on "
               f"{' and '.join(map(str, counts))} rank(s)"
               + (f", each with the step-choice trial of a {steps}-step run" if trial else ""))


def gradient_bytes(model) -> int:
    """Bytes a step allreduces: every weight's float32 gradient."""
    from rainforest.model_config import weight_layout

    return 4 * sum(math.prod(shape) for group in weight_layout(model).values()
                   for _, shape in group)


# ----------------------------------------------------------------------------- --from


@dataclass
class Earlier:
    """What ``--from`` gave: figures, a run's settings and curve, and notes for the reader."""

    preprocessing: PreprocessFigures | None = None
    preprocessing_from: str | None = None  # the plan that gave them
    training: TrainingFigures | None = None
    run: str | None = None
    run_train: dict[str, Any] | None = None  # the run's TrainConfig, as saved
    run_model: dict[str, Any] | None = None  # the run's ModelConfig, as saved
    curve: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


def read_earlier(urls: Sequence[str]) -> Earlier:
    """The figures of earlier ``plan --json`` outputs and run folders, later ones first."""
    earlier = Earlier()
    for url in urls:
        url = storage.canonical(url)
        if not storage.is_remote(url) and os.path.isfile(url):
            preprocessing, training = _plan_figures(url)
            if preprocessing is not None:
                earlier.preprocessing, earlier.preprocessing_from = preprocessing, url
            earlier.training = training or earlier.training
        else:
            _read_run(url, earlier)
    return earlier


def _read_run(url: str, earlier: Earlier) -> None:
    from rainforest import checkpoint, runlog
    from rainforest.dataset import MANIFEST_NAME

    if storage.exists(storage.join(url, MANIFEST_NAME)):
        raise ParameterError(
            f"{url} is a dataset, and a dataset records no timings (it is byte-identical "
            "whatever the run); give a run folder or an earlier `rainforest plan --json` output")
    saved = checkpoint.read_config(checkpoint.latest(url))
    rows = runlog.read_metrics(url)
    train = saved["train"]
    ranks = int(saved["data"].get("ranks", 1))
    schedule = Schedule(validation=True, validation_every=train["validation_every"],
                        validation_windows=train["validation_windows"],
                        checkpoint_every=train["checkpoint_every"],
                        sample_every=train.get("sample_every", 0),
                        batch_size=train["batch_size"])
    choice = saved["data"].get("step_choice") or {}
    try:
        run_figures = rank_figures(rows, ranks=ranks, launched=None, ended=None,
                                   schedule=schedule)
    except RainforestError:
        raise ParameterError(f"{url} logged too few steps in {runlog.METRICS_NAME} to time "
                             "one; train it longer, or plan without it") from None
    from rainforest.model_config import ModelConfig

    earlier.training = TrainingFigures(
        model=f"the model of {url}", batch_size=train["batch_size"],
        target_length=train["target_length"],
        step_choice=f"{choice.get('compile', train.get('compile'))}/"
                    f"{choice.get('precision', train.get('precision'))} on {ranks} rank(s)",
        gradient_bytes=gradient_bytes(ModelConfig.from_dict(saved["model"])),
        runs=(run_figures,),
        source=f"{url} (a run on {ranks} rank(s): its steps, held-out measurements and "
               "checkpoints; its start-up and end are not recorded, so none is counted)")
    earlier.run, earlier.run_train, earlier.run_model = url, train, saved["model"]
    earlier.curve = held_out_curve(rows)


def from_earlier(url: str) -> dict[str, Any]:
    """The calibration figures of an earlier ``plan --json`` output, as its document gives
    them (``preprocessing``, ``training``: either may be absent), each checked."""
    found = dict(zip(("preprocessing", "training"), _plan_figures(url), strict=True))
    return {name: figures.to_dict() for name, figures in found.items() if figures is not None}


def _plan_figures(url: str) -> tuple[PreprocessFigures | None, TrainingFigures | None]:
    """The calibration of a ``plan --json`` document, refused unless every figure it gives is
    of the right kind."""
    from rainforest.documents import read_document

    advice = "re-run `rainforest plan --json` and give its output to --from"
    document = read_document(url, kind=PLAN_FORMAT, version=PLAN_VERSION,
                             error=ParameterError, advice="re-run `rainforest plan --json`",
                             missing=f"{url} is missing")
    calibration = document.get("calibration")
    if not isinstance(calibration, dict):
        raise ParameterError(f"{url} holds no calibration figures: it is not the output of "
                             f"`rainforest plan --json` (a dataset's plan.json is another kind "
                             f"of plan); {advice}")
    found = []
    for name, cls in (("preprocessing", PreprocessFigures), ("training", TrainingFigures)):
        part = calibration.get(name)
        if part is None:
            found.append(None)
            continue
        _check_figures(part, cls, where=url, what=f"its {name} figures", advice=advice)
        if cls is TrainingFigures:
            for run in part["runs"] if isinstance(part["runs"], list) else [None]:
                _check_figures(run, RankFigures, where=url, what="a training run's figures",
                               advice=advice)
        try:
            found.append(cls.from_dict(part))
        except (ParameterError, TypeError) as error:
            raise ParameterError(f"{url}: {name} figures: {error}; {advice}") from None
    return found[0], found[1]


def _check_figures(part: Any, cls: type, *, where: str, what: str, advice: str) -> None:
    from rainforest.documents import NUMBER, TEXT, Kind, check_fields

    def number(v) -> bool:
        return NUMBER.test(v) and v >= 0

    kinds = {
        "float": Kind("a number >= 0", number),
        "float | None": Kind("a number >= 0 or null", lambda v: v is None or number(v)),
        "int": Kind("a whole number >= 0", lambda v: type(v) is int and 0 <= v < 2**63),
        "str": TEXT,
        "dict[str, float]": Kind("an object of numbers >= 0", lambda v: type(v) is dict and all(
            type(k) is str and number(x) for k, x in v.items())),
        "tuple[RankFigures, ...]": Kind("a list", lambda v: type(v) is list and len(v) > 0),
    }
    fields = {f.name: kinds[f.type] for f in dataclasses.fields(cls)}
    optional = tuple(f.name for f in dataclasses.fields(cls)
                     if f.default is not dataclasses.MISSING)
    check_fields(part, fields, where=where, what=what, error=ParameterError, advice=advice,
                 optional=optional)
    unknown = set(part) - set(fields)
    if unknown:
        raise ParameterError(f"{where}: {what} has figures this rainforest does not know, "
                             f"{sorted(unknown)[:5]}; {advice}")


# ----------------------------------------------------------------------------- prediction


def assumptions(config: PlanConfig, preprocessing: PreprocessFigures,
                training: TrainingFigures, network: Network, *, remote: bool,
                notes: Sequence[str]) -> list[str]:
    """What the figures assume beyond what was measured; printed with them."""
    tasks_per_second = 1.0 / max(preprocessing.task_overhead_seconds, 1e-9)
    measured = max(r.ranks for r in training.runs)
    lines = [
        f"shared storage delivers {config.storage_gbps:g} GB/s in all (not measured; "
        "--storage-gbps)",
        f"the Dask scheduler handles {tasks_per_second:,.0f} tasks/s, one at a time, whatever "
        "the number of workers (measured on this machine)",
        "every worker and rank has one core as fast as this machine's, and they start in "
        "parallel (a command's start-up, the step-choice trial and the first trace do not grow "
        "with the count)",
        f"ranks share a node {network.ranks_per_node} to a node (--ranks-per-node), each "
        f"node's ranks slowing one another as the {measured} measured here did; beyond a node "
        f"the ring runs at {network.bytes_per_second * 8 / 1e9:g} Gbit/s with "
        f"{network.latency_seconds * 1e6:g} us a message (not measured; --network-gbps, "
        "--network-latency-us)",
    ]
    if remote:
        lines.append("each s3:// song is read twice (hashed, then decoded) at the latency and "
                     "single-stream bandwidth measured on one object")
    return lines + list(notes)


def predict(headers: list[SourceHeader], config: PlanConfig,
            preprocessing: PreprocessFigures, training: TrainingFigures, *,
            schedule: Schedule, network: Network, steps: int,
            fit: CurveFit | None) -> list[dict[str, Any]]:
    """One row per worker count (paired with its rank count): times, core-hours, money and,
    with a curve, held-out bits."""
    readable = [h for h in headers if h.seconds is not None]
    storage_rate = config.storage_gbps * 1e9
    model = dict(songs_per_shard=config.songs_per_shard, storage_bytes_per_second=storage_rate)
    one_worker = predict_preprocessing(readable, preprocessing, workers=1, **model)
    one_rank = step_seconds(1, training, network)
    measured_ranks = max(r.ranks for r in training.runs)
    rows = []
    for workers, ranks in zip(config.workers, config.rank_counts, strict=True):
        pre = predict_preprocessing(readable, preprocessing, workers=workers, **model)
        planned = steps
        if config.hours is not None:
            planned = steps_within(config.hours * 3600, ranks=ranks, figures=training,
                                   schedule=schedule, network=network)
        parts = train_parts(ranks=ranks, steps=max(planned, 1), figures=training,
                            schedule=schedule, network=network) if planned else {}
        train = sum(parts.values())
        step = step_seconds(ranks, training, network)
        core_hours = (workers * pre + ranks * train) / 3600.0
        row = {"workers": workers, "preprocess_seconds": pre,
               "preprocess_efficiency": one_worker / (workers * pre), "ranks": ranks,
               "nodes": math.ceil(ranks / network.ranks_per_node), "steps": planned,
               "step_seconds": step, "rank_efficiency": one_rank / step if step > 0 else 1.0,
               "train_seconds": train, "train_parts": parts, "core_hours": core_hours,
               "extrapolated": workers > len(_cores()) or ranks > measured_ranks}
        if config.price_per_hour is not None:
            row["money"] = core_hours * config.price_per_hour
        if fit is not None and planned:
            row["bits"] = fit.predict(planned)
        rows.append(row)
    return rows


def _resolve_training(train: dict[str, Any], model: str | None, earlier: Earlier
                      ) -> tuple[Any, str, list[str], bool]:
    """The TrainConfig the plan is for (a run's own settings under the flags given), its model
    spec, notes, and whether the run's own figures and curve still apply."""
    from rainforest.train import TrainConfig

    notes: list[str] = []
    base = dict(earlier.run_train or {})
    resolved = TrainConfig.from_dict({**{k: v for k, v in base.items()
                                         if k in TrainConfig.__dataclass_fields__}, **train})
    if earlier.run is None:
        return resolved, model or "default", notes, False
    # the step's settings: a run's figures time its own step only
    differ = [f"--{name.replace('_', '-')} {train[name]} (the run has {base.get(name)})"
              for name in ("batch_size", "target_length", "compile", "precision")
              if name in train and train[name] != base.get(name)]
    spec = model
    if model is not None:
        from rainforest.model_config import load_model_config

        if load_model_config(model).to_dict() != earlier.run_model:
            differ.append(f"--config {model} (the run trained another model)")
    applies = not differ
    if differ:
        notes.append(f"{earlier.run}'s step time is not used: asked {', '.join(differ)}; "
                     "training was calibrated with the settings asked")
    return resolved, spec, notes, applies


def _usable_preprocessing(found: Earlier, readable: Sequence[SourceHeader],
                          log: Callable[[str], None]) -> PreprocessFigures | None:
    """An earlier plan's preprocessing figures, if they price every codec of the sources; an
    object store they have no figures for is measured (a few requests)."""
    figures = found.preprocessing
    if figures is None:
        return None
    missing = sorted({h.codec for h in readable} - set(figures.decode_seconds))
    if missing:
        raise ParameterError(
            f"{found.preprocessing_from} has no preprocessing figures for {', '.join(missing)}, "
            "which these sources hold; plan without it (to calibrate), or --from a plan "
            "calibrated on songs of every codec here")
    remote = next((h.url for h in readable if storage.is_remote(h.url)), None)
    if remote is not None and figures.s3_latency_seconds is None:
        log(f"measuring the object store's latency and bandwidth on {remote}")
        latency, bandwidth = object_store_figures(remote)
        figures = dataclasses.replace(figures, s3_latency_seconds=latency,
                                      s3_bytes_per_second=bandwidth)
    return figures


def _usable_training(found: Earlier, asked: dict[str, Any], model: str | None,
                     run_applies: bool, notes: list[str]) -> TrainingFigures | None:
    """An earlier run's or plan's training figures, unless they time another step than the
    one asked for (another batch, target length or model given explicitly)."""
    if found.run is not None:
        return found.training if run_applies else None
    figures = found.training
    if figures is None:
        return None
    differ = [f"--{name.replace('_', '-')} {asked[name]}" for name in ("batch_size",
                                                                      "target_length")
              if name in asked and asked[name] != getattr(figures, name)]
    if model is not None and model != figures.model:
        differ.append(f"--config {model}")
    if differ:
        notes.append(f"the earlier plan's training figures are of {figures.model!r}, batch "
                     f"{figures.batch_size} x {figures.target_length}, not of "
                     f"{', '.join(differ)}: training was calibrated for the settings asked")
        return None
    return figures


def plan(sources: Sequence[str], config: PlanConfig, *, steps: int,
         audio: AudioConfig | None = None, train: dict[str, Any] | None = None,
         model: str | None = None, earlier: Sequence[str] = (),
         log: Callable[[str], None] = print) -> dict[str, Any]:
    """Read the sources' headers, calibrate (or take ``earlier`` figures), and predict.

    ``train`` holds the training flags given (they win over a ``--from`` run's settings);
    ``model`` the ``--config`` given, if any. Returns the plan document that ``--json``
    prints and ``--from`` reads back.
    """
    headers = read_headers(sources)
    readable = _readable(headers)
    found = read_earlier(earlier)
    asked = dict(train or {})
    resolved, spec, notes, run_applies = _resolve_training(asked, model, found)
    preprocessing = _usable_preprocessing(found, readable, log)
    training = _usable_training(found, asked, model, run_applies, notes)
    if preprocessing is None or training is None:
        with tempfile.TemporaryDirectory(prefix="rainforest-plan-") as scratch:
            local = min(len(_cores()), max(config.rank_counts))
            least = (songs_for_training(local, resolved.validation_fraction)
                     if training is None else 1)
            measured, dataset = calibrate_preprocessing(headers, config, audio=audio or
                                                        AudioConfig(), least=least,
                                                        scratch=scratch, log=log)
            preprocessing = preprocessing or measured
            if training is None:
                if found.run is not None and spec is None:  # the run's own model
                    spec = os.path.join(scratch, "model.json")
                    with open(spec, "w", encoding="utf-8") as handle:
                        json.dump(found.run_model, handle)
                flags = {**{k: v for k, v in resolved.to_dict().items()
                            if k in (found.run_train or {})}, **asked}
                flags.pop("steps", None)
                training = calibrate_training(dataset, scratch, config, train=resolved,
                                              asked=flags, model=spec or "default",
                                              steps=_regime_steps(config, steps), log=log)
                if found.run is not None and model is None:
                    training = dataclasses.replace(training, model=f"the model of {found.run}")
    network = Network(bytes_per_second=config.network_gbps * 1e9 / 8,
                      latency_seconds=config.network_latency_us * 1e-6,
                      ranks_per_node=config.ranks_per_node
                      or max(r.ranks for r in training.runs))
    schedule = Schedule.of(resolved)
    fit, quality = _quality(found, resolved, asked, run_applies, notes)
    if config.hours is not None:
        notes.append(f"--hours {config.hours:g}: the steps are those that fit, and the "
                     "calibration took the run to be long enough to time its step candidates")
    unreadable = [{"source": h.url, "reason": h.reason} for h in headers if h.reason]
    document = {
        "format": PLAN_FORMAT, "version": PLAN_VERSION,
        "sources": {"count": len(headers), "readable": len(readable),
                    "hours": sum(h.seconds for h in readable) / 3600.0,
                    "bytes": sum(h.bytes for h in readable),
                    "codecs": sorted({h.codec for h in readable}), "unreadable": unreadable},
        "steps": steps, "hours": config.hours, "price_per_hour": config.price_per_hour,
        "calibration": {"preprocessing": preprocessing.to_dict(),
                        "training": training.to_dict()},
        "assumptions": assumptions(config, preprocessing, training, network,
                                   remote=any(storage.is_remote(h.url) for h in readable),
                                   notes=notes),
        "rows": predict(headers, config, preprocessing, training, schedule=schedule,
                        network=network, steps=steps, fit=fit),
    }
    if quality is not None:
        document["quality"] = quality
    return document


def _regime_steps(config: PlanConfig, steps: int) -> int:
    """The steps whose step choice the calibration must reproduce: ``--hours`` is taken as a
    run long enough to time its candidates."""
    from rainforest.step_choice import MEASURE_FROM_STEPS

    return max(steps, MEASURE_FROM_STEPS) if config.hours is not None else steps


def _quality(found: Earlier, resolved, asked: dict[str, Any], run_applies: bool,
             notes: list[str]) -> tuple[CurveFit | None, dict[str, Any] | None]:
    """The fit of a ``--from`` run's held-out curve, or why there is none."""
    if found.run is None:
        return None, None
    quality: dict[str, Any] = {"run": found.run, "measurements": len(found.curve)}
    if not run_applies:
        quality["omitted"] = ("the settings asked differ from the run's, whose curve is of its "
                              "own batch and model; plan without them to predict its bits")
        return None, quality
    warmup = int(found.run_train.get("warmup_steps", 0))
    try:
        fit = fit_curve(found.curve, after_step=warmup)
    except ParameterError as error:
        quality["omitted"] = str(error)
        return None, quality
    floor, scale, residual, _, _ = fit.line(CURVE_EXPONENTS[1])
    quality.update(fit=fit.to_dict(), floor=floor, scale=scale, residual_bits=residual,
                   form=f"bits = floor + scale / step**{CURVE_EXPONENTS[1]:g}; the interval "
                        f"spans the fits with exponents {', '.join(map(str, CURVE_EXPONENTS))}")
    if found.run_train.get("lr_schedule", "constant") != "constant":
        notes.append("the run's learning rate decays, which bends its curve down at the end; "
                     "the line through it knows nothing of that")
    ranks = max(r.ranks for r in found.training.runs)
    notes.append(f"held-out bits: floor + scale / sqrt(step) through {fit.points} measurements "
                 f"of {found.run} (steps {fit.steps[0]}-{fit.steps[-1]}, past its warm-up), "
                 f"on its {ranks} rank(s); other rank counts are taken to learn as much per "
                 "step; measured within 0.10 bits at 4x the fitted steps, untried further")
    return fit, quality


# ----------------------------------------------------------------------------- output


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_plan(document: dict[str, Any]) -> str:
    """The table and the assumptions, as ``rainforest plan`` prints them."""
    sources = document["sources"]
    pre, tra = document["calibration"]["preprocessing"], document["calibration"]["training"]
    priced = document["price_per_hour"] is not None
    bits = any("bits" in row for row in document["rows"])
    lines = [f"{sources['readable']} of {sources['count']} source(s) readable: "
             f"{sources['hours']:.2f} h of audio, {sources['bytes'] / 1e9:.2f} GB "
             f"({', '.join(sources['codecs'])})"]
    lines += [f"  UNREADABLE {u['source']}: {u['reason']}" for u in sources["unreadable"]]
    lines.append(f"preprocessing figures: {pre['source']}")
    codecs = ", ".join(f"{codec} {seconds * 1e3:.2f}" for codec, seconds
                       in sorted(pre["decode_seconds"].items()))
    lines.append(f"  ms per second of audio on one core: {codecs}; Dask "
                 f"{pre['task_overhead_seconds'] * 1e3:.2f} ms per task, "
                 f"{pre['fixed_seconds']:.1f} s fixed per command")
    if pre.get("s3_latency_seconds") is not None:
        lines.append(f"  s3://: {pre['s3_latency_seconds'] * 1e3:.1f} ms a request, "
                     f"{pre['s3_bytes_per_second'] / 1e6:.1f} MB/s a stream")
    lines.append(f"training figures: {tra['source']}")
    lines.append(f"  {tra['model']}, batch {tra['batch_size']} x {tra['target_length']}; "
                 f"step {tra['step_choice']}")
    for run in tra["runs"]:
        lines.append(
            f"  {run['ranks']} rank(s): {run['step_seconds'] * 1e3:.0f} ms a step "
            f"({run['allreduce_seconds'] * 1e3:.1f} ms allreduce), start "
            f"{run['start_seconds']:.1f} s, held-out {run['validation_seconds']:.2f} s "
            f"(+{run['validation_trace_seconds']:.1f} s once), checkpoint "
            f"{run['checkpoint_seconds']:.2f} s, end {run['end_seconds']:.1f} s")
    what = (f"{document['hours']:g} h of training" if document.get("hours")
            else f"{document['steps']:,} steps")
    header = (f"\n{'workers':>8} {'preprocess':>11} {'efficiency':>10} {'ranks':>6} "
              f"{'steps':>8} {'training':>10} {'efficiency':>10} {'core-hours':>11}"
              + (f" {'money':>10}" if priced else "") + (f" {'bits (95%)':>20}" if bits else ""))
    lines.append(f"\nfor {what}:" + header)
    for row in document["rows"]:
        line = (f"{row['workers']:>8} {_duration(row['preprocess_seconds']):>11} "
                f"{row['preprocess_efficiency']:>10.0%} {row['ranks']:>6} {row['steps']:>8,} "
                f"{_duration(row['train_seconds']):>10} {row['rank_efficiency']:>10.0%} "
                f"{row['core_hours']:>11.2f}")
        if priced:
            line += f" {row['money']:>10.4g}"
        if "bits" in row:
            b = row["bits"]
            line += f" {b['bits']:>6.3f} ({b['low']:.2f}-{b['high']:.2f})"
        lines.append(line + ("  (extrapolated)" if row["extrapolated"] else ""))
    if not priced:
        lines.append("no --price-per-hour: time only")
    if "omitted" in document.get("quality", {}):
        lines.append(f"no held-out bits predicted: {document['quality']['omitted']}")
    lines.append("\nassumptions" + (" (the figures past what was measured rest on them):"
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


__all__ = ["CurveFit", "PlanConfig", "PreprocessFigures", "RankFigures", "TrainingFigures",
           "fit_curve", "format_plan", "from_earlier", "plan", "plot_plan", "predict",
           "predict_preprocessing", "preprocess_seconds", "rank_figures", "read_headers",
           "step_seconds", "task_overhead", "train_parts"]


if __name__ == "__main__":  # python -m rainforest.plan ARGS is rainforest plan ARGS
    from rainforest.cli import run_stage

    run_stage("plan")
