"""Songs to a dataset: decode -> mono -> resample -> mu-law -> trim, spread by a Dask bag.

The run has three steps:

1. **identify**: every source is hashed (size + sha256) on the cluster. Identity, not the
   path, says whether a song is already done, so a renamed file is not processed twice.
2. **plan**: songs not yet done are assigned to shards in URL order, ``songs_per_shard`` at a
   time, and the assignment is saved as ``plan.json`` before any shard is written. A resumed
   run keeps the saved assignment, which is why an interrupted-then-resumed run is
   byte-identical to a clean one, whatever the number of workers.
3. **process**: each bag partition is one shard. Its songs are decoded in blocks into a spool
   file, trimmed, and copied into the shard, which is committed atomically, followed by its
   ``part-NNNNN.json`` record. ``manifest.json`` is assembled from the records at the end.

A song that cannot be used is recorded with its reason; it never stops the run.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rainforest import storage
from rainforest.audio import encode_song
from rainforest.config import AudioConfig
from rainforest.dataset import (
    MANIFEST_NAME,
    PLAN_NAME,
    SHARD_DIR,
    ShardWriter,
    build_manifest,
    read_plan,
    read_shard_records,
    shard_codes_path,
    shard_name,
    shard_number,
    shard_record,
    shard_record_path,
    write_plan,
)
from rainforest.errors import AudioDecodeError, ParameterError, StorageError
from rainforest.labels import NO_LABELS
from rainforest.labels import resolve as resolve_labels

#: Songs per shard unless told otherwise: small enough to spread a few dozen songs over a
#: cluster, large enough that thousands of songs do not make thousands of files.
SONGS_PER_SHARD = 8


# ----------------------------------------------------------------------------- identify


def identify(source: storage.SourceFile) -> dict[str, Any]:
    """Size and sha256 of one source, or the reason it cannot be used.

    A local file that cannot be read is that song's problem; an object store that fails is
    the run's, so it raises :class:`StorageError` instead of failing every song.
    """
    entry = {"source": source.url, "size": source.size}
    if source.problem:
        return {**entry, "reason": source.problem}
    if storage.is_remote(source.url):
        with storage.reported(f"reading {source.url}"):
            return {**entry, "sha256": storage.sha256_of(source.url)}
    try:
        return {**entry, "sha256": storage.sha256_of(source.url)}
    except OSError as error:
        return {**entry, "reason": f"cannot read: {error}"}


def identify_group(sources: list[storage.SourceFile]) -> list[dict[str, Any]]:
    """:func:`identify` for each of a few sources: one Dask task."""
    return [identify(source) for source in sources]


def _label(url: str, mode) -> str | None:
    if callable(mode):  # fetch.json or a CSV column, from rainforest.labels.resolve
        return mode(url)
    if mode == "parent":
        return posixpath.basename(posixpath.dirname(url.replace(os.sep, "/"))) or None
    return None


# ----------------------------------------------------------------------------- plan


def _identity(entry: dict[str, Any]) -> tuple[str, int]:
    return entry["sha256"], int(entry["size"])


def make_plan(
    identified: Sequence[dict[str, Any]],
    *,
    done: set[tuple[str, int]],
    completed_shards: set[str],
    old_plan: dict[str, Any] | None,
    songs_per_shard: int,
    label_mode: str,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Assign songs that are not done to shards, keeping any earlier assignment.

    Returns the full list of shards (completed ones included, so numbers are never reused)
    and the list of duplicate sources (same content as an earlier URL).
    """
    current: dict[tuple[str, int], dict[str, Any]] = {}
    duplicates = []
    for entry in sorted((e for e in identified if "sha256" in e), key=lambda e: e["source"]):
        key = _identity(entry)
        if key in current:
            duplicates.append({"source": entry["source"], "same_as": current[key]["source"]})
            continue
        current[key] = {
            "source": entry["source"], "size": entry["size"], "sha256": entry["sha256"],
            "label": _label(entry["source"], label_mode),
        }

    shards: list[dict[str, Any]] = []
    planned: set[tuple[str, int]] = set()
    for shard in (old_plan or {}).get("shards", []):
        if shard["name"] in completed_shards:
            shards.append(shard)
            planned.update(_identity(s) for s in shard["songs"])
            continue
        songs = [current[_identity(s)] for s in shard["songs"]
                 if _identity(s) in current and _identity(s) not in done]
        if songs:
            shards.append({"name": shard["name"], "songs": songs})
            planned.update(_identity(s) for s in songs)

    used = {shard_number(s["name"]) for s in shards}
    used.update(shard_number(name) for name in completed_shards)
    next_number = max(used, default=-1) + 1
    new = [song for key, song in current.items() if key not in planned and key not in done]
    for first in range(0, len(new), songs_per_shard):
        songs = new[first : first + songs_per_shard]
        shards.append({"name": shard_name(next_number), "songs": songs})
        next_number += 1
    return shards, duplicates


# ----------------------------------------------------------------------------- process


def process_shard(shard: dict[str, Any], *, out: str, config: AudioConfig) -> dict[str, Any]:
    """Build one shard and its record; runs on a Dask worker.

    A song that cannot be used is recorded as failed and the shard goes on. Storage that
    fails (a source that cannot be read, an output that is full or gone) raises
    :class:`StorageError`: the run stops, nothing half-written stays, and a re-run resumes.
    A shard all of whose songs failed gets a record but no ``.npy``.
    """
    target = storage.join(out, shard_codes_path(shard["name"]))
    with storage.reported(f"writing shard {shard['name']} of {out}"):
        writer = ShardWriter(target)
        try:
            with tempfile.TemporaryDirectory(prefix="rainforest-") as scratch:
                songs, failed = _encode_songs(shard, writer, config, scratch)
            size, digest = writer.commit() if songs else (0, None)
            if not songs:
                writer.abort()
        except BaseException:
            writer.abort()
            raise
        record = shard_record(shard["name"], writer, size=size, sha256=digest, songs=songs,
                              failed=failed)
        storage.write_json_atomic(storage.join(out, shard_record_path(shard["name"])), record)
    return record


def _encode_songs(shard: dict[str, Any], writer: ShardWriter, config: AudioConfig,
                  scratch: str) -> tuple[list[dict], list[dict]]:
    songs, failed = [], []
    for spec in shard["songs"]:
        base = {"source": spec["source"], "source_size": spec["size"],
                "source_sha256": spec["sha256"]}
        offset = writer.samples
        with storage.reported(f"reading {spec['source']}"):
            local = storage.fetch_to_local(spec["source"], scratch)
        try:
            fields = encode_song(local, config, writer, spool_dir=scratch)
        except (AudioDecodeError, OSError, StorageError) as error:
            writer.rollback(offset)  # nothing of this song stays in the shard
            if not isinstance(error, AudioDecodeError):
                raise  # full disk, lost file: the storage's fault, not the song's
            failed.append({**base, "reason": str(error)})
            continue
        except Exception as error:  # a bug must not stop the run; the song is listed
            writer.rollback(offset)
            failed.append({**base, "reason": f"internal error ({type(error).__name__}): "
                                             f"{error}; please report it"})
            continue
        finally:
            if local != spec["source"]:
                os.remove(local)
        songs.append({**base, **fields, "id": spec["sha256"][:16], "label": spec["label"],
                      "shard": shard["name"], "offset": offset})
    return songs, failed


# ----------------------------------------------------------------------------- run


def _load_plan(out: str, config: AudioConfig) -> dict[str, Any] | None:
    url = storage.join(out, PLAN_NAME)
    if not storage.exists(url):
        if storage.exists(storage.join(out, MANIFEST_NAME)) or read_shard_records(out):
            raise ParameterError(f"{out} holds a dataset without {PLAN_NAME}; use a new --out")
        return None
    plan = read_plan(out)
    if plan["audio"] != config.to_dict():
        changed = {k: (plan["audio"].get(k), v) for k, v in config.to_dict().items()
                   if plan["audio"].get(k) != v}
        raise ParameterError(
            f"{out} was made with other audio settings (was, now): {changed}; re-run with the "
            "same settings to resume, or choose a new --out"
        )
    return plan


def _run_bag(client, function: Callable, items: list, *, description: str, unit: str,
             progress: bool, where: dict[str, int] | None = None) -> list:
    """Map ``function`` over ``items`` with a Dask bag, one item per partition, started in
    the order given (results come back in that order too).

    ``where``, if given, counts the items done by each worker address."""
    import dask
    import dask.bag as db
    from tqdm.auto import tqdm

    if not items:
        return []
    # Dask's own ordering starts independent partitions in no useful order (measured: 8, 9,
    # 6, 7, 4, 5, 2, 3, 10, 11, 1, 0); a priority per partition index keeps the caller's.
    with dask.annotate(priority=lambda key: -key[1]):
        bag = db.from_sequence(items, npartitions=len(items)).map(function)
    results: list = [None] * len(items)
    with tqdm(total=len(items), desc=description, unit=unit, disable=not progress,
              dynamic_ncols=True) as bar:
        if client is None:
            for index, part in enumerate(bag.to_delayed()):
                results[index] = part.compute(scheduler="sync")[0]
                bar.update(1)
            return results
        from distributed import as_completed

        # Unoptimised: fusing renames the tasks and drops their priorities.
        futures = client.compute(bag.to_delayed(optimize_graph=False))
        index_of = {future.key: index for index, future in enumerate(futures)}
        for batch in as_completed(futures).batches():
            if where is not None:
                for holders in client.who_has(batch).values():
                    for address in holders[:1]:  # the worker that computed it
                        where[address] = where.get(address, 0) + 1
            for future in batch:
                results[index_of[future.key]] = future.result()[0]
                # Released once fetched: a worker lost later does not take the result with
                # it, so the scheduler does not build that shard again.
                future.release()
                bar.update(1)
    return results


def preprocess(
    sources: Sequence[str],
    out: str,
    *,
    config: AudioConfig | None = None,
    cluster: str = "local",
    cluster_settings: Any = None,
    songs_per_shard: int = SONGS_PER_SHARD,
    labels: str = NO_LABELS,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Turn songs into a dataset at ``out`` (local folder or ``s3://`` prefix).

    Parameters
    ----------
    sources : sequence of str
        Files, folders (searched recursively by audio extension) or fsspec URLs.
    out : str
        The dataset folder or prefix. An existing dataset made with the same settings is
        resumed: only songs not yet done are processed.
    config : AudioConfig, optional
        Sample rate and the rest; the default is ``AudioConfig()``.
    cluster : str
        See :mod:`rainforest.cluster`.
    cluster_settings : optional
        The cluster's own settings, e.g. a :class:`~rainforest.cluster.SlurmSettings`.
    songs_per_shard : int
        Songs per shard (the unit of work and of the progress bar).
    labels : str
        ``"parent"`` labels each song with its folder's name (e.g. a genre folder), for
        global conditioning; ``"fetch[:COLUMN]"`` takes the labels ``rainforest fetch``
        recorded, ``"FILE.csv:COLUMN"`` a metadata CSV's column (see :mod:`rainforest.labels`).
    progress : bool
        Show progress bars.
    log : callable
        Where status lines go.

    Returns
    -------
    dict
        The run's summary: songs, hours, shards, failed, processed this run, and more.

    Examples
    --------
    >>> preprocess(["songs/"], "dataset/", cluster="local:2")    # doctest: +SKIP
    """
    config = config or AudioConfig()
    if songs_per_shard < 1:
        raise ParameterError(f"songs_per_shard must be >= 1, got {songs_per_shard}")
    labels = resolve_labels(labels)
    out = storage.canonical(out)
    started = time.perf_counter()
    listed = storage.list_sources(sources)
    if not listed:
        raise ParameterError(
            f"no audio files found in {list(sources)} "
            f"(looked for {', '.join(storage.AUDIO_EXTENSIONS)})"
        )
    old_plan = _load_plan(out, config)
    storage.remove_stale_staging(storage.join(out, SHARD_DIR))
    built = _build_shards(
        listed, out, config, old_plan, reads=[storage.canonical(s) for s in sources],
        cluster=cluster, cluster_settings=cluster_settings, songs_per_shard=songs_per_shard,
        labels=labels, progress=progress, log=log)
    # A worker killed mid-shard leaves its staging file; its task was redone elsewhere.
    storage.remove_stale_staging(storage.join(out, SHARD_DIR))
    plan = built.plan
    records = {**plan.records, **{record["name"]: record for record in built.records}}
    unreadable = [{"source": e["source"], "source_size": e["size"], "reason": e["reason"]}
                  for e in plan.identified if "reason" in e]
    manifest = build_manifest(config, records, unreadable, plan.duplicates)
    with storage.reported(f"writing the manifest of {out}"):
        storage.write_json_atomic(storage.join(out, MANIFEST_NAME), manifest)
    return _summary(out, manifest, built.records, plan, time.perf_counter() - started,
                    built.workers, built.lost)


def _build_shards(listed, out: str, config: AudioConfig, old_plan, *, reads: list[str],
                  cluster: str, cluster_settings: Any, songs_per_shard: int, labels: str,
                  progress: bool, log: Callable[[str], None]) -> _Built:
    """Identify the songs and build the shards still to do on the cluster, saying how it
    went: the dashboard, the workers the preflight found, lost workers, shards per worker."""
    from rainforest.cluster import connect, describe_lost_worker, lost_workers, preflight

    workers: dict[str, int] = {}
    with connect(cluster, settings=cluster_settings, quiet=not progress, log=log) as client:
        if client is not None:
            log(f"Dask dashboard: {client.dashboard_link}")
        places = preflight(client, reads=reads, write=out)
        if places:
            log(f"preflight: {len(places)} worker(s) run this environment and see the data")
        since = time.time()
        plan = _plan_run(client, listed, out, config, old_plan, songs_per_shard=songs_per_shard,
                         labels=labels, progress=progress)
        if plan.skipped:
            log(f"resuming: {plan.skipped} song(s) already done, {len(plan.pending)} shard(s) "
                "to go")

        def process(shard):
            return process_shard(shard, out=out, config=config)

        records = _run_bag(client, process, plan.pending, description="preprocess",
                           unit="shard", progress=progress, where=workers)
        lost = lost_workers(client, since=since, places=places)
        for worker in lost:
            log(f"warning: {describe_lost_worker(worker)}")
        if lost:
            log(f"the run ended with {len(client.scheduler_info(n_workers=-1)['workers'])} "
                f"worker(s), having lost {len(lost)}")
    if workers:
        log(f"{len(records)} shard(s) built by {len(workers)} worker(s):")
        for address, count in sorted(workers.items()):
            log(f"  worker {address}: {count} shard(s)")
    return _Built(plan, records, workers, lost)


@dataclass
class _RunPlan:
    identified: list[dict[str, Any]]
    records: dict[str, dict[str, Any]]  # shards already finished, by name
    duplicates: list[dict[str, str]]
    pending: list[dict[str, Any]]  # shards to build now
    skipped: int  # songs already done by an earlier run


@dataclass
class _Built:
    """What the cluster did: the run's plan, the shards built now, by whom, and who was lost."""

    plan: _RunPlan
    records: list[dict[str, Any]]
    workers: dict[str, int]  # shards built by each worker address
    lost: list[dict]


def _plan_run(client, listed, out: str, config: AudioConfig, old_plan, *, songs_per_shard: int,
              labels: str, progress: bool) -> _RunPlan:
    """Identify every source on the cluster, then save the plan before any shard is built."""
    # Songs are hashed a shard's worth per task: the scheduler's cost per task (about 1.5 ms
    # measured by benchmarks/scaling.py) then stays small beside the work, even at scale.
    groups = [listed[i:i + songs_per_shard] for i in range(0, len(listed), songs_per_shard)]
    identified = [entry for group in _run_bag(client, identify_group, groups,
                                              description="identify", unit="group",
                                              progress=progress) for entry in group]
    records = read_shard_records(out)
    done = {(s["source_sha256"], int(s["source_size"]))
            for record in records.values() for s in record["songs"] + record["failed"]}
    shards, duplicates = make_plan(
        identified, done=done, completed_shards=set(records), old_plan=old_plan,
        songs_per_shard=songs_per_shard, label_mode=labels,
    )
    with storage.reported(f"writing the plan of {out}"):
        write_plan(out, config, shards, songs_per_shard=songs_per_shard)
    # Largest first (bytes as the guess of work): the last tasks are then small, so workers
    # wait less for one another at the end (benchmarks/scaling.py measures that tail).
    pending = sorted((shard for shard in shards if shard["name"] not in records),
                     key=lambda shard: sum(song["size"] for song in shard["songs"]),
                     reverse=True)
    skipped = len({_identity(e) for e in identified if "sha256" in e} & done)
    return _RunPlan(identified, records, duplicates, pending, skipped)


def _summary(out: str, manifest: dict[str, Any], new_records: list[dict[str, Any]],
             plan: _RunPlan, elapsed: float, workers: dict[str, int],
             lost: list[dict]) -> dict[str, Any]:
    processed_seconds = sum(s["source_seconds"] for r in new_records for s in r["songs"])
    return {
        "dataset": out,
        "songs": len(manifest["songs"]),
        "hours": manifest["seconds"] / 3600.0,
        "shards": len(manifest["shards"]),
        "failed": len(manifest["failed"]),
        "duplicates": len(plan.duplicates),
        "processed_songs": sum(len(r["songs"]) + len(r["failed"]) for r in new_records),
        "skipped_songs": plan.skipped,
        "elapsed_seconds": elapsed,
        "realtime_factor": processed_seconds / elapsed if elapsed > 0 else 0.0,
        "workers": workers,  # shards built by each worker address this run
        "lost_workers": lost,  # workers removed mid-run (cluster.lost_workers)
    }


__all__ = ["ShardWriter", "make_plan", "preprocess", "process_shard"]


if __name__ == "__main__":  # python -m rainforest.preprocess ARGS is rainforest preprocess ARGS
    from rainforest.cli import run_stage

    run_stage("preprocess")
