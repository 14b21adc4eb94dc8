"""Every reader of a rainforest document survives anything (property-based, Hypothesis):
here the dataset's (manifest.json, its shards and their records, plan.json) and fetch.json.

For each document, one written by the project's own writer reads back exactly, and a damaged
one (cut short, a byte flipped, a value replaced by the wrong type, a huge number, NaN, a
name with ``../``, an absolute path, a NUL or 5000 characters, a field deleted, renamed or
copied from elsewhere; see tests/fuzzing.py) either reads as a value its users can use or
raises :class:`~rainforest.errors.RainforestError` naming the file. Never another exception,
never a wrong format version or a wrong sha256 accepted, never a write outside the folder
read. Checkpoints and plans are in tests/test_fuzz_readers_runs.py; names, URL templates and
label CSVs in tests/test_fuzz_names.py.

The number of examples comes from the Hypothesis profile (tests/conftest.py): a quick,
derandomised one by default; ``HYPOTHESIS_PROFILE=long`` (with ``--timeout=0``) runs 100,000
examples per test.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fuzzing import (
    Scratch,
    changed_outside,
    damage_in_copy,
    damaged,
    damaged_bytes,
    header_ok,
    outcome,
    sha256_file,
    template_document,
    tree,
)
from hypothesis import given
from hypothesis import strategies as st

import faultserver
from rainforest import storage
from rainforest.config import RESAMPLE_QUALITIES, AudioConfig
from rainforest.dataset import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    PLAN_FORMAT,
    PLAN_NAME,
    SHARD_FORMAT,
    VERSION,
    Dataset,
    ShardWriter,
    build_manifest,
    read_manifest,
    read_plan,
    read_shard_records,
    shard_codes_path,
    shard_name,
    shard_number,
    shard_record,
    shard_record_path,
    summary,
    write_plan,
)
from rainforest.documents import is_plain_name
from rainforest.errors import RainforestError
from rainforest.fetch import (
    FETCH_FORMAT,
    FETCH_NAME,
    FetchConfig,
    Source,
    _write_manifest,
    fetch,
    labels_by_file,
    read_fetch_manifest,
    safe_name,
)

preprocess = importlib.import_module("rainforest.preprocess")  # the package's name is a function

pytestmark = pytest.mark.slow  # about a minute in all under the default profile


# --- datasets: the project's own writer --------------------------------------------------------


@dataclass
class Song:
    codes: np.ndarray
    label: str | None
    source: str
    note: str | None = None


def write_dataset(out: str, songs: list[Song], config: AudioConfig, *, per_shard: int,
                  failed: list[str] = ()) -> dict:
    """A dataset as ``rainforest preprocess`` writes it, through the same functions: shards by
    ShardWriter, their records, plan.json, then manifest.json from the records."""
    records, planned = {}, []
    for number, first in enumerate(range(0, max(len(songs), 1), per_shard)):
        name = shard_name(number)
        writer = ShardWriter(storage.join(out, shard_codes_path(name)))
        entries, planned_songs = [], []
        for index, song in enumerate(songs[first:first + per_shard], start=first):
            source_sha = hashlib.sha256(f"{index}:{song.source}".encode()).hexdigest()
            offset = writer.samples
            writer.append(song.codes)
            entry = {"source": song.source, "source_size": 1000 + index,
                     "source_sha256": source_sha, "source_rate": 44100, "channels": 2,
                     "source_format": "WAV", "source_seconds": 1.5, "trimmed_start": index,
                     "trimmed_end": 2 * index, "length": len(song.codes),
                     "seconds": len(song.codes) / config.sample_rate, "id": source_sha[:16],
                     "label": song.label, "shard": name, "offset": offset}
            if song.note:
                entry["note"] = song.note
            entries.append(entry)
            planned_songs.append({"source": song.source, "size": 1000 + index,
                                  "sha256": source_sha, "label": song.label})
        failures = [{"source": source, "source_size": 7, "source_sha256": "0" * 64,
                     "reason": "too short"} for source in failed] if number == 0 else []
        size, digest = writer.commit() if entries else (0, None)
        if not entries:
            writer.abort()
        records[name] = shard_record(name, writer, size=size, sha256=digest, songs=entries,
                                     failed=failures)
        storage.write_json_atomic(storage.join(out, shard_record_path(name)), records[name])
        planned.append({"name": name, "songs": planned_songs})
    write_plan(out, config, planned, songs_per_shard=per_shard)
    manifest = build_manifest(config, records, [], [])
    storage.write_json_atomic(storage.join(out, MANIFEST_NAME), manifest)
    return manifest


def use_dataset(url: str) -> dict:
    """What training and ``inspect`` do with a dataset; returns the manifest read."""
    manifest = read_manifest(url)
    data = Dataset(url)
    summary(url)
    data.verify_shards(data.shards, full=True)
    for song in data.songs:
        assert data.song_codes(song).shape == (song.length,), song  # every song is whole
    assert data.hours >= 0 and data.labels is not None and data.unlabelled is not None
    return manifest


#: What dataset readers trust most: names and paths, offsets and lengths, checksums.
DATASET_FOCUS = ("name", "path", "shard", "offset", "length", "sha256", "samples", "size")
CODES = st.integers(1, 40).flatmap(
    lambda n: st.binary(min_size=n, max_size=n).map(lambda b: np.frombuffer(b, np.uint8)))
SONGS = st.lists(st.builds(Song, CODES, st.none() | st.text(max_size=8),
                           st.text(min_size=1, max_size=20), st.none() | st.text(max_size=8)),
                 max_size=6, unique_by=lambda song: song.source)
AUDIO = st.builds(AudioConfig, sample_rate=st.integers(1000, 384000),
                  trim_db=st.floats(0.001, 200.0), min_seconds=st.floats(0.0, 100.0),
                  silence_floor_db=st.floats(-200.0, 0.0),
                  resample_quality=st.sampled_from(RESAMPLE_QUALITIES))


@given(SONGS, AUDIO, st.integers(1, 4), st.lists(st.text(max_size=8), max_size=2))
def test_datasets_written_by_the_writer_read_back_exactly(songs, config, per_shard, failed):
    with Scratch() as root:
        out = str(root / "dataset")
        manifest = write_dataset(out, songs, config, per_shard=per_shard, failed=failed)
        assert use_dataset(out) == manifest
        data = Dataset(out)
        assert data.audio == config
        assert [(s.source, s.length, s.label) for s in data.songs] == [
            (s.source, len(s.codes), s.label) for s in songs]
        for song, written in zip(data.songs, songs, strict=True):
            assert np.array_equal(data.song_codes(song), written.codes)
        assert sorted(f["source"] for f in data.failed) == sorted(failed)
        records = read_shard_records(out)
        assert records == {name: json.loads(Path(out, shard_record_path(name)).read_text())
                           for name in records}
        assert read_plan(out) == json.loads(Path(out, PLAN_NAME).read_text())
        assert summary(out)["songs"] == len(songs)


@pytest.fixture(scope="module")
def dataset_template(tmp_path_factory) -> Path:
    """Five songs in three shards: labels, a note, a failure, a shard with no codes left."""
    root = tmp_path_factory.mktemp("dataset-template")
    rng = np.random.default_rng(0)
    songs = [Song(rng.integers(0, 256, 30 + 7 * i, dtype=np.uint8), label, f"songs/{i}.wav",
                  "a note" if i == 1 else None)
             for i, label in enumerate(["jazz", "rock", None, "jazz", "folk"])]
    write_dataset(str(root / "dataset"), songs, AudioConfig(), per_shard=2,
                  failed=["songs/bad.mp3"])
    return root / "dataset"


@given(st.data())
def test_a_damaged_manifest_reads_as_a_whole_dataset_or_is_refused_naming_it(
        dataset_template, data):
    manifest = template_document(dataset_template, MANIFEST_NAME)
    damage = data.draw(damaged(manifest, *DATASET_FOCUS), label="manifest.json")
    with Scratch() as root:
        folder = damage_in_copy(dataset_template, root, MANIFEST_NAME, damage)
        before = tree(root)
        result = outcome(lambda: use_dataset(str(folder)), names=str(folder))
        if not header_ok(damage, MANIFEST_FORMAT, VERSION):
            assert isinstance(result, RainforestError), "a wrong format or version was read"
        if not isinstance(result, RainforestError):  # accepted: every sha256 is the real one
            for shard in result["shards"]:
                assert shard["sha256"] == sha256_file(folder / shard["path"])
        assert changed_outside(root, before) == []


@pytest.mark.filterwarnings("ignore:invalid escape sequence")  # numpy parsing a damaged header
@given(st.data())
def test_a_damaged_shard_fails_its_sha256_and_reads_whole_or_is_refused(dataset_template, data):
    name = "part-00000"
    original = (dataset_template / shard_codes_path(name)).read_bytes()
    damage = data.draw(damaged_bytes(original), label="part-00000.npy")
    with Scratch() as root:
        folder = damage_in_copy(dataset_template, root, shard_codes_path(name), damage)
        url = str(folder / shard_codes_path(name))
        dataset = Dataset(str(folder))
        if damage != original:
            with pytest.raises(RainforestError, match="sha256") as refused:
                dataset.verify_shards([name])
            assert url in str(refused.value)
        codes = outcome(lambda: np.array(dataset.shard_codes(name)), names=url)
        if not isinstance(codes, RainforestError):
            assert codes.dtype == np.uint8 and codes.shape == (dataset.shards[name]["samples"],)


def resume_from_records(out: str) -> dict:
    """What a resumed ``preprocess`` does with the shard records: plan the rest around them,
    then build the manifest from them. Returns that manifest."""
    records = read_shard_records(out)
    done = {(s["source_sha256"], int(s["source_size"]))
            for record in records.values() for s in record["songs"] + record["failed"]}
    shards, _ = preprocess.make_plan([], done=done, completed_shards=set(records),
                                     old_plan=read_plan(out), songs_per_shard=2,
                                     label_mode="none")
    assert all(shard_name(shard_number(s["name"])) == s["name"] for s in shards)
    return build_manifest(AudioConfig(), records, [], [])


@given(st.data())
def test_damaged_shard_records_build_a_readable_manifest_or_are_refused_naming_them(
        dataset_template, data):
    name = shard_record_path(data.draw(st.sampled_from(["part-00000", "part-00002"])))
    damage = data.draw(damaged(template_document(dataset_template, name), *DATASET_FOCUS),
                       label=name)
    with Scratch() as root:
        folder = damage_in_copy(dataset_template, root, name, damage)
        before = tree(root)
        manifest = outcome(lambda: resume_from_records(str(folder)), names=str(folder / name))
        if not header_ok(damage, SHARD_FORMAT, VERSION):
            assert isinstance(manifest, RainforestError), "a wrong format or version was read"
        assert changed_outside(root, before) == []
        if not isinstance(manifest, RainforestError):  # what was read makes a readable dataset
            storage.write_json_atomic(str(folder / MANIFEST_NAME), manifest)
            Dataset(str(folder))
            summary(str(folder))


def resume_from_plan(out: str) -> list[dict]:
    """What a resumed ``preprocess`` does with plan.json: check it against the audio settings,
    keep its assignment of the songs still to do. Returns the shards to build."""
    saved = preprocess._load_plan(out, AudioConfig())
    identified = [{"source": song["source"], "size": song["size"], "sha256": song["sha256"]}
                  for shard in saved["shards"] for song in shard["songs"]]
    shards, _ = preprocess.make_plan(identified, done=set(), completed_shards={"part-00000"},
                                     old_plan=saved, songs_per_shard=2, label_mode="none")
    return shards


@given(st.data())
def test_a_damaged_dataset_plan_only_ever_names_shards_inside_the_dataset(dataset_template,
                                                                          data):
    damage = data.draw(damaged(template_document(dataset_template, PLAN_NAME), *DATASET_FOCUS),
                       label=PLAN_NAME)
    with Scratch() as root:
        folder = damage_in_copy(dataset_template, root, PLAN_NAME, damage)
        before = tree(root)
        shards = outcome(lambda: read_plan(str(folder)), names=str(folder / PLAN_NAME))
        if not isinstance(shards, RainforestError):  # other audio settings name the folder
            shards = outcome(lambda: resume_from_plan(str(folder)), names=str(folder))
        if not header_ok(damage, PLAN_FORMAT, VERSION):
            assert isinstance(shards, RainforestError), "a wrong format or version was read"
        assert changed_outside(root, before) == []
        if not isinstance(shards, RainforestError):
            for shard in shards:  # each is built at shards/part-NNNNN.npy, inside the dataset
                assert shard_name(shard_number(shard["name"])) == shard["name"]
                target = os.path.normpath(storage.join(str(folder),
                                                       shard_codes_path(shard["name"])))
                assert os.path.dirname(target) == str(folder / "shards")


def test_preprocess_refuses_a_plan_that_names_a_shard_outside_the_dataset(tmp_path):
    """The end-to-end case of the property above: a real preprocess, resumed on a plan.json
    whose shard name climbs out of the dataset, writes nothing outside it."""
    import audiogen
    from rainforest.preprocess import preprocess as run_preprocess

    (tmp_path / "songs").mkdir()
    song = audiogen.write_song(tmp_path / "songs" / "a.wav", seconds=1.5, rate=16000,
                               channels=1)
    out = tmp_path / "dataset"
    out.mkdir()
    entry = {"source": str(song), "size": song.stat().st_size, "sha256": sha256_file(song),
             "label": None}
    storage.write_json_atomic(str(out / PLAN_NAME), {
        "format": PLAN_FORMAT, "version": VERSION, "audio": AudioConfig().to_dict(),
        "songs_per_shard": 2, "shards": [{"name": "../../escape", "songs": [entry]}]})
    before = tree(tmp_path)
    with pytest.raises(RainforestError, match=str(out / PLAN_NAME)):
        run_preprocess([str(tmp_path / "songs")], str(out), cluster="sync", progress=False,
                       log=lambda line: None)
    assert changed_outside(tmp_path, before, inside="dataset") == []


# --- fetch.json ------------------------------------------------------------------------------

QUICK = FetchConfig(rate=0.0, concurrency=2, retries=0, timeout=10.0, backoff=0.0,
                    max_backoff=1.0)


@pytest.fixture(scope="module")
def fetch_server():
    routes = {f"/{name}.mp3": faultserver.ok(b"ID3\x03\x00" + bytes([index]) * 300)
              for index, name in enumerate("abc")}
    with faultserver.FaultServer(routes) as server:
        yield server


def fetch_sources(server) -> list[Source]:
    return [Source(server.url("/a.mp3"), {"genre": "jazz"}),
            Source(server.url("/b.mp3"), {"genre": "rock"}), Source(server.url("/c.mp3")),
            Source("ftp://example.invalid/d.mp3", {"genre": "folk"})]


@pytest.fixture(scope="module")
def fetch_template(tmp_path_factory, fetch_server) -> Path:
    """A folder fetched for real: three songs and a failure (an unsupported scheme)."""
    out = tmp_path_factory.mktemp("fetch-template") / "songs"
    fetch(fetch_sources(fetch_server), str(out), config=QUICK, progress=False,
          log=lambda line: None)
    return out


def use_fetch_record(out: str, sources: list[Source]) -> dict:
    """What ``preprocess --labels fetch`` and a resumed ``fetch`` do with fetch.json; returns
    the record as it was read."""
    record = read_fetch_manifest(out)
    for entry in record["entries"]:  # a name is where a resumed fetch writes
        assert is_plain_name(entry["name"]), entry
    labels_by_file(out)
    fetch(sources, out, config=QUICK, progress=False, log=lambda line: None)
    return record


@given(st.data())
def test_a_damaged_fetch_json_is_read_or_refused_and_fetch_writes_only_in_its_folder(
        fetch_template, fetch_server, data):
    damage = data.draw(damaged(template_document(fetch_template, FETCH_NAME), "name",
                               "sha256", "bytes", "labels", "source"), label=FETCH_NAME)
    with Scratch() as root:
        folder = damage_in_copy(fetch_template, root, FETCH_NAME, damage)
        before, files_before = tree(root), {p.name for p in folder.iterdir()}
        record = outcome(lambda: use_fetch_record(str(folder), fetch_sources(fetch_server)),
                         names=str(folder / FETCH_NAME))
        if not header_ok(damage, FETCH_FORMAT, 1):
            assert isinstance(record, RainforestError), "a wrong format or version was read"
        assert changed_outside(root, before, inside=folder.name) == []
        if not isinstance(record, RainforestError):  # every file fetched is one it records
            names = {entry["name"] for entry in read_fetch_manifest(str(folder))["entries"]}
            assert {p.name for p in folder.iterdir()} - files_before <= names


FETCH_ENTRIES = st.lists(st.fixed_dictionaries({
    "source": st.text(min_size=1), "name": st.text(min_size=1).map(safe_name),
    "labels": st.dictionaries(st.sampled_from(["genre", "artist"]), st.text()),
    "status": st.sampled_from(["ok", "failed"]),
    "bytes": st.none() | st.integers(0, 2**40), "sha256": st.none() | st.binary().map(
        lambda b: hashlib.sha256(b).hexdigest()),
    "etag": st.none() | st.text(), "final_url": st.none() | st.text(),
    "content_type": st.none() | st.text(), "remote_name": st.none() | st.text(),
    "attempts": st.none() | st.integers(0, 10), "reason": st.none() | st.text()}),
    max_size=5, unique_by=(lambda e: e["source"], lambda e: e["name"].casefold()))


@given(FETCH_ENTRIES)
def test_fetch_records_written_by_fetch_read_back_exactly(entries):
    with Scratch() as root:
        out = str(root / "songs")
        os.makedirs(out)
        _write_manifest(out, {entry["source"]: entry for entry in entries}, QUICK)
        record = read_fetch_manifest(out)
        assert record["entries"] == sorted(entries, key=lambda entry: entry["source"])
        for column in ("genre", "artist"):
            if any(column in e["labels"] for e in entries):
                assert labels_by_file(out, column) == {
                    e["name"]: e["labels"][column] for e in entries
                    if e["status"] == "ok" and column in e["labels"]}
