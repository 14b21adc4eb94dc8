"""The dataset format: ``manifest.json`` plus ``shards/part-NNNNN.npy``, and its reader.

Layout of a dataset folder (local or ``s3://``)::

    manifest.json            what is in the dataset (written last, atomically)
    plan.json                which songs go to which shard (lets an interrupted run resume)
    shards/part-00000.npy    uint8 mu-law codes of whole songs laid end to end
    shards/part-00000.json   that shard's songs and failures (written after its .npy)

Every JSON file carries ``format`` and ``version``; a reader refuses a version it does not
know. Shards are plain ``.npy`` and are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from rainforest import storage
from rainforest.config import AudioConfig
from rainforest.documents import check_format, read_document
from rainforest.errors import DatasetFormatError, ParameterError
from rainforest.kernels import cut_windows, random_window_starts, strided_window_starts

MANIFEST_FORMAT = "rainforest-dataset"
SHARD_FORMAT = "rainforest-shard"
PLAN_FORMAT = "rainforest-plan"
VERSION = 1

MANIFEST_NAME = "manifest.json"
PLAN_NAME = "plan.json"
SHARD_DIR = "shards"


def shard_name(number: int) -> str:
    return f"part-{number:05d}"


_ADVICE = "upgrade rainforest or re-run `rainforest preprocess` into a new folder"


def check_header(data: Any, expected_format: str, where: str) -> dict[str, Any]:
    """Refuse a dataset document of another format or an unknown version, with a clear error."""
    return check_format(data, kind=expected_format, version=VERSION, where=where,
                        error=DatasetFormatError, advice=_ADVICE)


def read_manifest(url: str) -> dict[str, Any]:
    """Read and check a dataset's manifest.

    Raises
    ------
    DatasetFormatError
        If the manifest is missing, not JSON, foreign, or of an unknown version.
    """
    return read_document(
        storage.join(url, MANIFEST_NAME), kind=MANIFEST_FORMAT, version=VERSION,
        error=DatasetFormatError, advice=_ADVICE,
        missing=f"no {MANIFEST_NAME} at {url}: not a rainforest dataset, or its preprocessing "
                f"has not finished; run `rainforest preprocess SONGS --out {url}`")


@dataclass(frozen=True)
class Song:
    """One song's place in a dataset."""

    id: str
    source: str
    shard: str
    offset: int
    length: int
    label: str | None


class Dataset:
    """A finished dataset: its manifest, songs and memory-mapped shards.

    Parameters
    ----------
    url : str
        A local folder or ``s3://`` prefix written by ``rainforest preprocess``.
    cache_dir : str, optional
        Where remote shards are downloaded to be memory-mapped
        (default: ``$RAINFOREST_CACHE/shards`` or ``~/.cache/rainforest/shards``).

    Examples
    --------
    >>> data = Dataset("dataset/")                      # doctest: +SKIP
    >>> codes = data.shard_codes(data.songs[0].shard)   # doctest: +SKIP
    """

    def __init__(self, url: str, *, cache_dir: str | None = None) -> None:
        self.url = storage.canonical(url)
        self.manifest = read_manifest(self.url)
        self.audio = AudioConfig.from_dict(self.manifest["audio"])
        self.songs = [
            Song(s["id"], s["source"], s["shard"], s["offset"], s["length"], s.get("label"))
            for s in self.manifest["songs"]
        ]
        self.shards = {s["name"]: s for s in self.manifest["shards"]}
        self.failed = self.manifest["failed"]
        self._cache_dir = cache_dir
        self._mapped: dict[str, np.ndarray] = {}

    @property
    def samples(self) -> int:
        return int(self.manifest["samples"])

    @property
    def labels(self) -> tuple[str, ...]:
        """The distinct song labels (genre, artist, ...), sorted; empty if there are none."""
        return tuple(sorted({s.label for s in self.songs if s.label is not None}))

    @property
    def unlabelled(self) -> list[Song]:
        """The songs without a label."""
        return [s for s in self.songs if s.label is None]

    @property
    def hours(self) -> float:
        return self.samples / self.audio.sample_rate / 3600.0

    def shard_codes(self, name: str) -> np.ndarray:
        """The codes of shard ``name``, memory-mapped read-only (remote shards cached locally)."""
        if name not in self.shards:
            raise ParameterError(f"dataset {self.url} has no shard {name!r}")
        if name not in self._mapped:
            url = storage.join(self.url, self.shards[name]["path"])
            path = self._local_copy(url, self.shards[name]) if storage.is_remote(url) else url
            codes = np.load(path, mmap_mode="r", allow_pickle=False)
            if codes.dtype != np.uint8 or codes.ndim != 1:
                raise DatasetFormatError(
                    f"{url} holds {codes.dtype} {codes.shape}, not uint8 codes"
                )
            if codes.shape[0] != self.shards[name]["samples"]:
                raise DatasetFormatError(
                    f"{url} holds {codes.shape[0]} codes but the manifest says "
                    f"{self.shards[name]['samples']}; the dataset is damaged, re-run preprocess"
                )
            self._mapped[name] = codes
        return self._mapped[name]

    def verify_shards(self, names, *, full: bool = False) -> None:
        """Check shards against the manifest's sha256 before they are trained on.

        Local shards are hashed once per change (:func:`rainforest.storage.verified_sha256`),
        or every time with ``full``; remote ones are checked when they are downloaded into
        the cache.

        Raises
        ------
        DatasetFormatError
            Naming the first shard whose bytes are not the ones the manifest recorded.
        """
        for name in sorted(set(names)):
            shard = self.shards[name]
            url = storage.join(self.url, shard["path"])
            if storage.is_remote(url):
                continue
            if not os.path.exists(url):
                raise DatasetFormatError(f"{url} is missing; the dataset is damaged. Re-run "
                                         "`rainforest preprocess` into a new folder")
            if storage.verified_sha256(url, trust_cache=not full) != shard["sha256"]:
                raise DatasetFormatError(
                    f"{url} does not match the sha256 in {MANIFEST_NAME}: the shard was "
                    "changed or damaged after preprocessing. Re-run `rainforest preprocess` "
                    "into a new folder (or delete this shard and its .json record and re-run "
                    "the same preprocess command to rebuild it)")

    def song_codes(self, song: Song) -> np.ndarray:
        return self.shard_codes(song.shard)[song.offset : song.offset + song.length]

    def _local_copy(self, url: str, shard: dict[str, Any]) -> str:
        cache = self._cache_dir or os.path.join(storage.cache_root(), "shards")
        os.makedirs(cache, exist_ok=True)
        path = os.path.join(cache, f"{shard['sha256']}.npy")
        if not os.path.exists(path):
            fs, remote_path = storage.filesystem(url)
            with storage.Staged(path) as staging:
                fs.get_file(remote_path, staging)
                if storage.sha256_of(staging) != shard["sha256"]:
                    raise DatasetFormatError(f"{url} does not match the sha256 in the manifest")
        return path


def summary(url: str) -> dict[str, Any]:
    """What ``rainforest inspect`` shows: counts, hours, shards and failures."""
    manifest = read_manifest(storage.canonical(url))
    rate = manifest["audio"]["sample_rate"]
    labels: dict[str, int] = {}
    for song in manifest["songs"]:
        if song.get("label") is not None:
            labels[song["label"]] = labels.get(song["label"], 0) + 1
    return {
        "dataset": storage.canonical(url),
        "format_version": manifest["version"],
        "songs": len(manifest["songs"]),
        "hours": manifest["samples"] / rate / 3600.0,
        "samples": manifest["samples"],
        "sample_rate": rate,
        "audio": manifest["audio"],
        "trimmed_seconds": sum(
            s["trimmed_start"] + s["trimmed_end"] for s in manifest["songs"]
        ) / rate,
        "shards": [
            {"name": s["name"], "songs": s["songs"], "samples": s["samples"],
             "megabytes": s["bytes"] / 1e6}
            for s in manifest["shards"]
        ],
        "labels": labels,
        "notes": [
            {"source": s["source"], "note": s["note"]} for s in manifest["songs"] if s.get("note")
        ],
        "duplicates": manifest.get("duplicates", []),
        "failed": [{"source": f["source"], "reason": f["reason"]} for f in manifest["failed"]],
    }


# --- Training input: song splits, per-rank shares and deterministic windows -----------------

def split_songs(songs: list[Song], *, validation_fraction: float) -> tuple[list[Song], list[Song]]:
    """Split songs into (training, validation) by a hash of the song id.

    The split depends only on the ids (content hashes) and the fraction, so it is the same on
    every run, every rank and every machine, and adding songs never moves an old song from
    training into validation unless its rank in the hash order changes the cut.

    Examples
    --------
    >>> songs = [Song(str(i), "", "part-00000", 0, 10, None) for i in range(10)]
    >>> train, held_out = split_songs(songs, validation_fraction=0.2)
    >>> len(train), len(held_out)
    (8, 2)
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ParameterError(f"validation fraction must be in [0, 1), got {validation_fraction}")
    if validation_fraction == 0.0:
        return list(songs), []
    if len(songs) < 2:
        raise ParameterError(
            f"the dataset has {len(songs)} song(s); a held-out split by song needs at least 2. "
            "Add songs, or pass --val-fraction 0 to train without validation"
        )
    order = sorted(songs, key=lambda s: hashlib.sha256(s.id.encode()).hexdigest())
    held = min(len(songs) - 1, max(1, round(validation_fraction * len(songs))))
    held_ids = {s.id for s in order[:held]}
    return ([s for s in songs if s.id not in held_ids], [s for s in songs if s.id in held_ids])


def rank_share(songs: list[Song], *, rank: int, size: int) -> list[Song]:
    """The songs rank ``rank`` of ``size`` trains on: disjoint shares balanced by length.

    Longest songs first, each to the rank with the fewest samples so far (ties: lowest rank).

    Examples
    --------
    >>> songs = [Song(str(i), "", "p", 0, n, None) for i, n in enumerate([5, 9, 4, 3])]
    >>> [s.length for s in rank_share(songs, rank=0, size=2)], \\
    ...     [s.length for s in rank_share(songs, rank=1, size=2)]
    ([9, 3], [5, 4])
    """
    if not 0 <= rank < size:
        raise ParameterError(f"rank must be in 0..{size - 1}, got {rank}")
    if len(songs) < size:
        raise ParameterError(
            f"{len(songs)} training song(s) cannot give each of {size} ranks its own share; "
            "use fewer ranks or more songs"
        )
    totals = [0] * size
    mine: list[Song] = []
    for song in sorted(songs, key=lambda s: (-s.length, s.id)):
        target = min(range(size), key=lambda r: (totals[r], r))
        totals[target] += song.length
        if target == rank:
            mine.append(song)
    return sorted(mine, key=lambda s: (s.shard, s.offset))


def _derive_seed(*parts: int) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


class WindowSampler:
    """Random training windows from one rank's songs, a pure function of the step number.

    Step ``s`` lies in epoch ``s // steps_per_epoch``; an epoch is one random stream seeded by
    ``(seed, rank, epoch)``, of which step ``s`` takes the next ``batch_size`` draws. The data
    position is therefore just the step, and a resumed run sees exactly the windows an
    uninterrupted one would. An epoch has as many target samples as the rank's songs have codes.

    Parameters
    ----------
    dataset : Dataset
    songs : list of Song
        This rank's share (see :func:`rank_share`).
    window : int
        Codes per window: receptive field + target length.
    target_length : int
    batch_size : int
        Windows per step on this rank.
    seed, rank : int
    label_ids : dict, optional
        Label name -> id for conditioned models.
    """

    def __init__(self, dataset: Dataset, songs: list[Song], *, window: int, target_length: int,
                 batch_size: int, seed: int, rank: int,
                 label_ids: dict[str, int] | None = None) -> None:
        self.dataset = dataset
        self.songs = [s for s in songs if s.length >= window]
        if not self.songs:
            longest = max((s.length for s in songs), default=0)
            raise ParameterError(
                f"a training window of {window} codes (receptive field + target length) is "
                f"longer than every song of rank {rank} (longest: {longest} codes, "
                f"{longest / dataset.audio.sample_rate:.2f} s); use a shorter --target-length "
                "or a model with a smaller receptive field"
            )
        self.window, self.batch_size, self.seed, self.rank = window, batch_size, seed, rank
        self.lengths = np.array([s.length for s in self.songs], dtype=np.int64)
        self.virtual_offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        total = int(self.lengths.sum())
        self.steps_per_epoch = max(1, total // (batch_size * target_length))
        self.label_ids = label_ids
        self.labels = np.array(
            [label_ids[s.label] if label_ids else 0 for s in self.songs], dtype=np.int32)

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``(batch_size, window)`` uint8 windows and int32 song labels of ``step``."""
        epoch, within = divmod(int(step), self.steps_per_epoch)
        starts = random_window_starts(
            self.virtual_offsets, self.lengths, window=self.window, count=self.batch_size,
            seed=_derive_seed(self.seed, self.rank, epoch), skip=within * self.batch_size)
        which = np.searchsorted(self.virtual_offsets, starts, side="right") - 1
        return self._cut(which, starts - self.virtual_offsets[which]), self.labels[which]

    def _cut(self, which: np.ndarray, local_starts: np.ndarray) -> np.ndarray:
        out = np.empty((which.shape[0], self.window), dtype=np.uint8)
        shards = np.array([self.songs[i].shard for i in which])
        for shard in np.unique(shards):
            rows = np.flatnonzero(shards == shard)
            shard_starts = np.array(
                [self.songs[which[j]].offset + local_starts[j] for j in rows], dtype=np.int64)
            out[rows] = cut_windows(self.dataset.shard_codes(str(shard)), shard_starts,
                                    window=self.window)
        return out

    def tf_dataset(self, first_step: int, last_step: int, *, prefetch: int = 2):
        """A ``tf.data.Dataset`` of the batches of steps ``first_step .. last_step - 1``."""
        import tensorflow as tf

        def load(step):
            windows, labels = tf.numpy_function(self.batch, [step], [tf.uint8, tf.int32],
                                                stateful=False)
            windows.set_shape((self.batch_size, self.window))
            labels.set_shape((self.batch_size,))
            return windows, labels

        steps = tf.data.Dataset.range(first_step, last_step)
        return steps.map(load, num_parallel_calls=1, deterministic=True).prefetch(prefetch)


def validation_windows(dataset: Dataset, songs: list[Song], *, window: int, count: int,
                       rank: int, size: int,
                       label_ids: dict[str, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """This rank's part of a fixed set of held-out windows (the same on every run).

    Non-overlapping windows through every held-out song, thinned evenly to at most ``count``,
    then dealt round-robin to the ranks.
    """
    usable = [s for s in songs if s.length >= window]
    if not usable:
        longest = max((s.length for s in songs), default=0)
        raise ParameterError(
            f"a window of {window} codes is longer than every held-out song (longest: "
            f"{longest}); use a shorter --target-length or pass --val-fraction 0"
        )
    pairs = []
    for index, song in enumerate(usable):
        for start in strided_window_starts([song.offset], [song.length], window=window,
                                           stride=window):
            pairs.append((index, int(start)))
    chosen = np.linspace(0, len(pairs) - 1, num=min(count, len(pairs))).round().astype(int)
    mine = [pairs[i] for i in np.unique(chosen)][rank::size]
    windows = np.empty((len(mine), window), dtype=np.uint8)
    labels = np.zeros(len(mine), dtype=np.int32)
    for row, (index, start) in enumerate(mine):
        song = usable[index]
        windows[row] = dataset.shard_codes(song.shard)[start : start + window]
        if label_ids:
            labels[row] = label_ids[song.label]
    return windows, labels
