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

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from rainforest import storage
from rainforest.config import AudioConfig
from rainforest.errors import DatasetFormatError, ParameterError

MANIFEST_FORMAT = "rainforest-dataset"
SHARD_FORMAT = "rainforest-shard"
PLAN_FORMAT = "rainforest-plan"
VERSION = 1

MANIFEST_NAME = "manifest.json"
PLAN_NAME = "plan.json"
SHARD_DIR = "shards"


def shard_name(number: int) -> str:
    return f"part-{number:05d}"


def check_header(data: Any, expected_format: str, where: str) -> None:
    """Refuse a JSON document of another format or an unknown version, with a clear error."""
    if not isinstance(data, dict) or data.get("format") != expected_format:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise DatasetFormatError(
            f"{where} is not a rainforest file of kind {expected_format!r} (found {found!r}); "
            "is this path a rainforest dataset?"
        )
    version = data.get("version")
    if version != VERSION:
        raise DatasetFormatError(
            f"{where} has format version {version!r}, but this rainforest reads version "
            f"{VERSION}; upgrade rainforest or re-run `rainforest preprocess` into a new folder"
        )


def read_manifest(url: str) -> dict[str, Any]:
    """Read and check a dataset's manifest.

    Raises
    ------
    DatasetFormatError
        If the manifest is missing, not JSON, foreign, or of an unknown version.
    """
    manifest_url = storage.join(url, MANIFEST_NAME)
    if not storage.exists(manifest_url):
        raise DatasetFormatError(
            f"no {MANIFEST_NAME} at {url}: not a rainforest dataset, or its preprocessing has "
            f"not finished; run `rainforest preprocess SONGS --out {url}`"
        )
    try:
        data = storage.read_json(manifest_url)
    except ValueError as error:
        raise DatasetFormatError(f"{manifest_url} is not valid JSON: {error}") from None
    check_header(data, MANIFEST_FORMAT, manifest_url)
    return data


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

    def song_codes(self, song: Song) -> np.ndarray:
        return self.shard_codes(song.shard)[song.offset : song.offset + song.length]

    def _local_copy(self, url: str, shard: dict[str, Any]) -> str:
        cache = self._cache_dir or os.path.join(
            os.environ.get("RAINFOREST_CACHE", os.path.expanduser("~/.cache/rainforest")),
            "shards",
        )
        os.makedirs(cache, exist_ok=True)
        path = os.path.join(cache, f"{shard['sha256']}.npy")
        if not os.path.exists(path):
            staging = storage.local_staging_path(path)
            fs, remote_path = storage.filesystem(url)
            fs.get_file(remote_path, staging)
            if storage.sha256_of(staging) != shard["sha256"]:
                os.remove(staging)
                raise DatasetFormatError(f"{url} does not match the sha256 in the manifest")
            os.replace(staging, path)
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
