"""The dataset format: ``manifest.json`` plus ``shards/part-NNNNN.npy``: names, writer, reader.

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
import re
import tokenize
import warnings
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from rainforest import storage
from rainforest.config import AudioConfig
from rainforest.documents import (
    LIST,
    NATURAL,
    OBJECT,
    OPTIONAL_SHA256,
    OPTIONAL_TEXT,
    SHA256,
    TEXT,
    Kind,
    check_fields,
    check_format,
    read_document,
)
from rainforest.errors import DatasetFormatError, ParameterError

MANIFEST_FORMAT = "rainforest-dataset"
SHARD_FORMAT = "rainforest-shard"
PLAN_FORMAT = "rainforest-plan"
VERSION = 1

MANIFEST_NAME = "manifest.json"
PLAN_NAME = "plan.json"
SHARD_DIR = "shards"


SHARD_PREFIX = "part-"
CODES_SUFFIX = ".npy"  # a shard's codes
RECORD_SUFFIX = ".json"  # its record, written after the codes


def shard_name(number: int) -> str:
    return f"{SHARD_PREFIX}{number:05d}"


def shard_number(name: str) -> int:
    """The number in a shard's name: ``shard_number(shard_name(n)) == n``."""
    return int(name[len(SHARD_PREFIX):])


def shard_codes_path(name: str) -> str:
    """Where a shard's codes are, relative to the dataset (the manifest's ``path``)."""
    return f"{SHARD_DIR}/{name}{CODES_SUFFIX}"


def shard_record_path(name: str) -> str:
    """Where a shard's record is, relative to the dataset."""
    return f"{SHARD_DIR}/{name}{RECORD_SUFFIX}"


_ADVICE = "upgrade rainforest or re-run `rainforest preprocess` into a new folder"
_REBUILD = ("Re-run `rainforest preprocess` into a new folder (or delete this shard and its "
            ".json record and re-run the same preprocess command to rebuild it)")


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
    where = storage.join(url, MANIFEST_NAME)
    manifest = read_document(
        where, kind=MANIFEST_FORMAT, version=VERSION,
        error=DatasetFormatError, advice=_ADVICE,
        missing=f"no {MANIFEST_NAME} at {url}: not a rainforest dataset, or its preprocessing "
                f"has not finished; run `rainforest preprocess SONGS --out {url}`")
    _check(manifest, {"audio": OBJECT, "samples": NATURAL, "shards": LIST, "songs": LIST,
                      "failed": LIST, "duplicates": LIST}, where, "it", optional=("duplicates",))
    try:
        AudioConfig.from_dict(manifest["audio"])
    except (TypeError, ValueError) as problem:  # ParameterError is a ValueError
        _refuse(where, f"its audio settings are unusable ({problem})")
    samples: dict[str, int] = {}
    for index, shard in enumerate(manifest["shards"]):
        _check(shard, {"name": _SHARD_NAME, "path": TEXT, "samples": NATURAL, "bytes": NATURAL,
                       "sha256": SHA256, "songs": NATURAL}, where, f"shard {index}")
        if shard["path"] != shard_codes_path(shard["name"]) or shard["name"] in samples:
            _refuse(where, f"shard {shard['name']} is listed twice or not at "
                           f"{shard_codes_path(shard['name'])}")
        samples[shard["name"]] = shard["samples"]
    _check_songs(manifest["songs"], samples, where, recorded=False)
    for index, failure in enumerate(manifest["failed"]):
        _check(failure, _FAILED, where, f"failure {index}")
    return manifest


# What a reader checks of the songs and failures that manifests and shard records list, beside
# the header, so that what it returns can be used as it is (a shard name is a file name too).
_DAMAGED = "re-run `rainforest preprocess` into a new folder"
_SHARD_NAME = Kind("a shard name (part-NNNNN)", lambda v: type(v) is str
                   and re.fullmatch(r"part-[0-9]{5,18}", v) is not None
                   and shard_name(shard_number(v)) == v)
_SONG = {"id": TEXT, "source": TEXT, "shard": TEXT, "offset": NATURAL, "length": NATURAL,
         "label": OPTIONAL_TEXT, "trimmed_start": NATURAL, "trimmed_end": NATURAL,
         "note": TEXT}
_FAILED = {"source": TEXT, "reason": TEXT}
_RECORDED = {"source_size": NATURAL, "source_sha256": SHA256}  # how a resumed run knows a song


def _check(record: Any, fields: dict[str, Kind], where: str, what: str,
           optional: tuple[str, ...] = ()) -> dict[str, Any]:
    return check_fields(record, fields, where=where, what=what, error=DatasetFormatError,
                        advice=_DAMAGED, optional=optional)


def _refuse(where: str, problem: str) -> NoReturn:
    raise DatasetFormatError(f"{where}: {problem}; the file is damaged or was not written by "
                             f"rainforest: {_DAMAGED}")


def _check_songs(songs: list, samples: dict[str, int], where: str, *, recorded: bool) -> None:
    """Each song's fields, and its codes inside a shard of ``samples`` (name -> length)."""
    for index, song in enumerate(songs):
        _check(song, {**_SONG, **(_RECORDED if recorded else {})}, where, f"song {index}",
               optional=("note",))
        if song["offset"] + song["length"] > samples.get(song["shard"], -1):
            _refuse(where, f"song {index} ({song['source']!r}) lies outside its shard "
                           f"{song['shard']!r}")


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
            try:
                codes = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, TypeError, EOFError, SyntaxError, RecursionError,
                    tokenize.TokenError) as problem:  # what numpy's header parsing raises
                raise DatasetFormatError(f"{url} is not a shard of codes ({problem}); the dataset "
                                         f"is damaged. {_REBUILD}") from None
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

        Local shards, and the local cache's copies of remote ones, are hashed once per change
        (:func:`rainforest.storage.verified_sha256`); a remote shard missing from the cache is
        downloaded and hashed. With ``full``, every local file is hashed again, and every
        remote shard is hashed where it is stored as well.

        Raises
        ------
        DatasetFormatError
            Naming the first shard whose bytes are not the ones the manifest recorded.
        """
        for name in sorted(set(names)):
            shard = self.shards[name]
            url = storage.join(self.url, shard["path"])
            if storage.is_remote(url):
                if full and storage.sha256_of(url) != shard["sha256"]:
                    raise DatasetFormatError(
                        f"{url} does not match the sha256 in {MANIFEST_NAME}: the shard was "
                        f"changed or damaged after preprocessing. {_REBUILD}")
                self._local_copy(url, shard, rehash=full)
                continue
            if not os.path.exists(url):
                raise DatasetFormatError(f"{url} is missing; the dataset is damaged. Re-run "
                                         "`rainforest preprocess` into a new folder")
            if storage.verified_sha256(url, trust_cache=not full) != shard["sha256"]:
                raise DatasetFormatError(
                    f"{url} does not match the sha256 in {MANIFEST_NAME}: the shard was "
                    f"changed or damaged after preprocessing. {_REBUILD}")

    def song_codes(self, song: Song) -> np.ndarray:
        return self.shard_codes(song.shard)[song.offset : song.offset + song.length]

    def _local_copy(self, url: str, shard: dict[str, Any], *, rehash: bool = False) -> str:
        """The cache's copy of the remote shard ``url``, verified since it was written (or
        hashed again, with ``rehash``); a missing or damaged copy is downloaded again."""
        cache = self._cache_dir or os.path.join(storage.cache_root(), "shards")
        os.makedirs(cache, exist_ok=True)
        path = os.path.join(cache, f"{shard['sha256']}.npy")
        if os.path.exists(path):
            if storage.verified_sha256(path, trust_cache=not rehash) == shard["sha256"]:
                return path
            warnings.warn(f"{path}, the cached copy of {url}, no longer matches its sha256 "
                          "(damaged on this disk); downloading it again", stacklevel=3)
        fs, remote_path = storage.filesystem(url)
        with storage.Staged(path) as staging:
            fs.get_file(remote_path, staging)
            if storage.sha256_of(staging) != shard["sha256"]:
                raise DatasetFormatError(f"{url} does not match the sha256 in {MANIFEST_NAME}:"
                                         f" the shard was changed or damaged. {_REBUILD}")
        storage.remember_sha256(path, shard["sha256"])
        return path


def summary(url: str) -> dict[str, Any]:
    """What ``rainforest inspect`` shows: counts, hours, shards and failures."""
    manifest = read_manifest(storage.canonical(url))
    rate = AudioConfig.from_dict(manifest["audio"]).sample_rate  # the default where absent
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


# --- The writer: shards, their records and the manifest --------------------------------------

_NPY_HEADER_BYTES = 128  # fixed, so the header can be rewritten in place once the length is known


class ShardWriter:
    """Builds one ``.npy`` shard under a temporary name; only ``commit`` gives it its name."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._staged = storage.Staged(url)
        self.staging = self._staged.path
        self.samples = 0
        self._file = open(self.staging, "w+b")
        self._file.write(_npy_header(0))

    def append(self, codes: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(codes, dtype=np.uint8))
        self.samples += codes.shape[0]

    def rollback(self, samples: int) -> None:
        """Drop everything appended after the first ``samples`` codes (a song that failed)."""
        self._file.truncate(_NPY_HEADER_BYTES + samples)
        self._file.seek(0, os.SEEK_END)
        self.samples = samples

    def commit(self) -> tuple[int, str]:
        """Finish the header, flush to disk and publish; returns (bytes, sha256)."""
        self._file.seek(0)
        self._file.write(_npy_header(self.samples))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        size, digest = os.path.getsize(self.staging), storage.sha256_of(self.staging)
        self._staged.commit()
        return size, digest

    def abort(self) -> None:
        self._file.close()
        self._staged.abort()


def _npy_header(length: int) -> bytes:
    """A .npy v1.0 header for a 1-D uint8 array, padded to a fixed size."""
    text = f"{{'descr': '|u1', 'fortran_order': False, 'shape': ({length},), }}"
    text = text.ljust(_NPY_HEADER_BYTES - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin1")


def shard_record(name: str, writer: ShardWriter, *, size: int, sha256: str | None,
                 songs: list[dict[str, Any]], failed: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``part-NNNNN.json`` record of a shard (``songs`` empty: no ``.npy`` was kept)."""
    return {
        "format": SHARD_FORMAT, "version": VERSION, "name": name,
        "path": shard_codes_path(name) if songs else None,
        "samples": writer.samples, "bytes": size, "sha256": sha256, "songs": songs,
        "failed": failed,
    }


def read_shard_records(out: str) -> dict[str, dict[str, Any]]:
    """The records of the shards already written, by shard name."""
    shard_dir = storage.join(out, SHARD_DIR)
    records, samples = {}, 0
    for name in storage.list_names(shard_dir):
        if name.startswith(SHARD_PREFIX) and name.endswith(RECORD_SUFFIX):
            url = storage.join(shard_dir, name)
            record = read_document(url, kind=SHARD_FORMAT, version=VERSION,
                                   error=DatasetFormatError, advice=_ADVICE,
                                   missing=f"{url} vanished while it was read")
            _check_record(record, name[: -len(RECORD_SUFFIX)], url)
            samples += record["samples"]
            if not NATURAL.test(samples):  # the manifest adds them up
                _refuse(url, f"its {record['samples']} codes take the dataset past 2**63 - 1")
            records[record["name"]] = record
    return records


def _check_record(record: dict[str, Any], name: str, url: str) -> None:
    """A shard record's fields: its own shard's name, songs inside its codes, its sha256."""
    _check(record, {"name": _SHARD_NAME, "path": OPTIONAL_TEXT, "samples": NATURAL,
                    "bytes": NATURAL, "sha256": OPTIONAL_SHA256, "songs": LIST, "failed": LIST},
           url, "it")
    codes = shard_codes_path(name) if record["songs"] else None
    if record["name"] != name or record["path"] != codes or (codes and not record["sha256"]):
        _refuse(url, f"it records shard {record['name']!r} at {record['path']!r}, not this "
                     f"file's shard {name!r} at {codes!r} with its sha256")
    if (record["bytes"], record["samples"]) != ((_NPY_HEADER_BYTES + record["samples"],
                                                 record["samples"]) if codes else (0, 0)):
        _refuse(url, f"its {record['samples']} codes do not fill its {record['bytes']} bytes "
                     f"(a {_NPY_HEADER_BYTES}-byte header, then a byte a code)")
    _check_songs(record["songs"], {name: record["samples"]}, url, recorded=True)
    for index, failure in enumerate(record["failed"]):
        _check(failure, {**_FAILED, **_RECORDED}, url, f"failure {index}")


def build_manifest(config: AudioConfig, records: dict[str, dict[str, Any]],
                   unreadable: list[dict[str, Any]], duplicates: list[dict[str, str]]) -> dict:
    ordered = [records[name] for name in sorted(records)]
    songs = [song for record in ordered for song in record["songs"]]
    failed = sorted([f for record in ordered for f in record["failed"]] + unreadable,
                    key=lambda f: f["source"])
    samples = sum(record["samples"] for record in ordered)
    return {
        "format": MANIFEST_FORMAT,
        "version": VERSION,
        "audio": config.to_dict(),
        "samples": samples,
        "seconds": round(samples / config.sample_rate, 6),
        "shards": [{"name": r["name"], "path": r["path"], "samples": r["samples"],
                    "bytes": r["bytes"], "sha256": r["sha256"], "songs": len(r["songs"])}
                   for r in ordered if r["songs"]],
        "songs": songs,
        "labels": sorted({s["label"] for s in songs if s["label"] is not None}),
        "failed": failed,
        "duplicates": sorted(duplicates, key=lambda d: d["source"]),
    }


def write_plan(out: str, config: AudioConfig, shards: list[dict[str, Any]], *,
               songs_per_shard: int) -> None:
    """Save ``plan.json``: which songs go to which shard, before any shard is built."""
    storage.write_json_atomic(storage.join(out, PLAN_NAME), {
        "format": PLAN_FORMAT, "version": VERSION, "audio": config.to_dict(),
        "songs_per_shard": songs_per_shard, "shards": shards,
    })


def read_plan(out: str) -> dict[str, Any]:
    """The checked ``plan.json`` of a dataset being written."""
    url = storage.join(out, PLAN_NAME)
    plan = read_document(url, kind=PLAN_FORMAT, version=VERSION, error=DatasetFormatError,
                         advice=_ADVICE, missing=f"no {PLAN_NAME} at {out}")
    _check(plan, {"audio": OBJECT, "songs_per_shard": NATURAL, "shards": LIST}, url, "it")
    names: set[str] = set()
    for index, shard in enumerate(plan["shards"]):
        _check(shard, {"name": _SHARD_NAME, "songs": LIST}, url, f"shard {index}")
        if shard["name"] in names:
            _refuse(url, f"shard {shard['name']} is planned twice")
        names.add(shard["name"])
        for number, song in enumerate(shard["songs"]):
            _check(song, {"source": TEXT, "size": NATURAL, "sha256": SHA256,
                          "label": OPTIONAL_TEXT}, url, f"song {number} of {shard['name']}")
    return plan

