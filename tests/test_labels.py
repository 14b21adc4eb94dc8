"""Labels end to end: a metadata CSV -> fetch -> preprocess -> train --condition -> generate."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import audiogen
import faultserver as fs
from conftest import TINY_TRAINING, run_cli
from rainforest import checkpoint
from rainforest.dataset import read_manifest
from rainforest.errors import ParameterError
from rainforest.labels import csv_labels, resolve
from rainforest.preprocess import preprocess

# The FMA's tracks.csv layout: groups, names, then the index name; genre under track.
GENRES = {2: "Hip-Hop", 3: "Hip-Hop", 5: "Folk", 10: "Folk", 20: "Hip-Hop", 26: "Folk"}
TRACKS_CSV = (
    ",artist,set,track,track\n"
    ",name,split,genre_top,title\n"
    "track_id,,,,\n"
    + "".join(f"{tid},Artist {tid},training,{genre},Title {tid}\n"
              for tid, genre in GENRES.items())
)


def fma_songs(folder) -> dict[int, bytes]:
    """Periodic songs (one waveform per genre) named like FMA tracks, as bytes by track id."""
    scratch = folder / "scratch"
    audiogen.write_periodic_songs(scratch, songs=len(GENRES), labels=("Hip-Hop", "Folk"))
    by_label = {label: sorted((scratch / label).iterdir()) for label in ("Hip-Hop", "Folk")}
    songs = {tid: by_label[genre].pop(0).read_bytes() for tid, genre in GENRES.items()}
    shutil.rmtree(scratch)
    return songs


def test_csv_labels_match_by_track_id_or_file_name(tmp_path):
    tracks = tmp_path / "tracks.csv"
    tracks.write_text(TRACKS_CSV)
    label = csv_labels(str(tracks), "track.genre_top")
    assert label("/x/000005.mp3") == "Folk" and label("s3://b/p/000002.ogg") == "Hip-Hop"
    assert label("/x/000004.mp3") is None and label("/x/song.mp3") is None
    raw = tmp_path / "raw_tracks.csv"
    raw.write_text("track_id,track_file,artist_name\n"
                   "7,music/Public/AWOL/000007.mp3,AWOL\n8,music/x/Other.mp3,Kel\n")
    by_file = csv_labels(str(raw), "artist_name")
    assert by_file("/songs/Other.mp3") == "Kel" and by_file("/songs/000007.mp3") == "AWOL"
    with pytest.raises(ParameterError, match="no column 'genre'"):
        csv_labels(str(tracks), "genre")
    with pytest.raises(ParameterError, match="FILE.csv:COLUMN"):
        resolve("folder")


def test_preprocess_labels_from_a_csv_column(tmp_path):
    songs = tmp_path / "songs"
    songs.mkdir()
    for tid, body in fma_songs(tmp_path).items():
        (songs / f"{tid:06d}.wav").write_bytes(body)
    tracks = tmp_path / "tracks.csv"
    tracks.write_text(TRACKS_CSV)
    preprocess([str(songs)], str(tmp_path / "dataset"), cluster="sync", progress=False,
               labels=f"{tracks}:track.genre_top", log=lambda line: None)
    manifest = read_manifest(str(tmp_path / "dataset"))
    assert manifest["labels"] == ["Folk", "Hip-Hop"]
    by_file = {os.path.basename(s["source"]): s["label"] for s in manifest["songs"]}
    assert by_file == {f"{tid:06d}.wav": genre for tid, genre in GENRES.items()}


@pytest.mark.slow
def test_fma_csv_to_fetch_to_conditioned_model_to_generated_label(tmp_path):
    bodies = fma_songs(tmp_path)
    routes = {f"/{tid:06d}"[:4] + f"/{tid:06d}.wav": fs.ok(body, {"Content-Type": "audio/wav"})
              for tid, body in bodies.items()}
    tracks = tmp_path / "tracks.csv"
    tracks.write_text(TRACKS_CSV)
    songs, dataset, run, out = (tmp_path / name for name in ("songs", "ds", "run", "gen"))
    with fs.FaultServer(routes) as server:
        result = run_cli("fetch", tracks, "--out", songs, "--rate", "50", "--no-progress",
                         "--url-template", server.base + "/{track_id:06d[:3]}/{track_id:06d}.wav",
                         "--label-column", "track.genre_top", "--label-column", "artist.name",
                         env={**os.environ})
        assert result.returncode == 0, result.stderr
        assert sorted(e["path"] for e in server.log) == sorted(routes)

    # Two label columns were fetched, so preprocess must be told which one.
    refused = run_cli("preprocess", songs, "--out", dataset, "--labels", "fetch",
                      "--cluster", "sync", check=False)
    assert refused.returncode == 1 and "fetch:COLUMN" in refused.stderr
    run_cli("preprocess", songs, "--out", dataset, "--labels", "fetch:track.genre_top",
            "--cluster", "sync", "--no-progress")
    manifest = read_manifest(str(dataset))
    assert manifest["labels"] == ["Folk", "Hip-Hop"]
    assert {os.path.basename(s["source"]): s["label"] for s in manifest["songs"]} == {
        f"{tid:06d}.wav": genre for tid, genre in GENRES.items()}

    run_cli("train", dataset, "--run", run, *TINY_TRAINING, "--steps", "4", "--val-every",
            "0", "--condition")
    config = checkpoint.read_config(checkpoint.latest(str(run)))
    assert config["step"] == 4 and config["model"]["labels"] == ["Folk", "Hip-Hop"]

    run_cli("generate", run, "--seconds", "0.1", "--label", "Folk", "--out", out,
            "--no-progress")
    assert (out / "stream-000.wav").exists()
    assert json.loads((out / "generation.json").read_text())["settings"]["label"] == "Folk"
    unknown = run_cli("generate", run, "--seconds", "0.1", "--label", "Jazz", "--out",
                      tmp_path / "gen2", check=False)
    assert unknown.returncode == 1 and "Folk, Hip-Hop" in unknown.stderr
