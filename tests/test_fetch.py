"""`rainforest fetch` against a real HTTP server on 127.0.0.1 with injected faults."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import faultserver as fs
from conftest import RAINFOREST, run_cli
from interrupt import signal_when, when
from rainforest.errors import ParameterError
from rainforest.fetch import (
    FetchConfig,
    Source,
    fetch,
    fill_template,
    plan_names,
    read_csv_table,
    read_sources,
    safe_name,
)

# No route that these settings meet stays silent, so the timeout only bounds a broken test:
# at 30 s, no load can make a healthy local request time out, retry, and change the request
# counts the tests assert (the one test of timeouts uses its own, short, setting).
QUICK = dict(rate=50.0, concurrency=4, retries=2, timeout=30.0, backoff=0.05, max_backoff=5.0)


def song_bytes(size: int, seed: int) -> bytes:
    """Opaque binary 'songs' (an ID3 tag, then noise): what the fetcher must save as is."""
    return b"ID3\x03\x00" + np.random.default_rng(seed).bytes(size - 5)


def entries_by_path(out: Path, server: fs.FaultServer) -> dict[str, dict]:
    record = json.loads((out / "fetch.json").read_text())
    assert record["format"] == "rainforest-fetch" and record["version"] == 1
    return {e["source"].removeprefix(server.base): e for e in record["entries"]}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- names, sources


@pytest.mark.parametrize("raw, expected", [
    ("../../etc/x", "x"),
    ("/etc/passwd", "passwd"),
    ("..\\..\\windows\\evil.mp3", "evil.mp3"),
    ("", "file"),
    ("..", "file"),
    ("...mp3", "mp3"),
    (".hidden.ogg", "hidden.ogg"),
    ("a%2F..%2Fb.mp3", "b.mp3"),
    ("song\x00\n name.mp3", "song__ name.mp3"),
])
def test_safe_name_keeps_hostile_names_inside_the_folder(raw, expected):
    assert safe_name(raw) == expected


def test_safe_name_bounds_very_long_names_and_keeps_the_extension():
    name = safe_name("x" * 5000 + ".flac")
    assert name.endswith(".flac") and len(name.encode()) <= 120
    assert len(safe_name("é" * 300 + ".mp3").encode()) <= 120


def test_plan_names_never_collide_and_keep_recorded_names():
    sources = [Source("http://a/x/song.mp3"), Source("http://b/y/song.mp3"),
               Source("http://c/SONG.mp3"), Source("http://d/fetch.json"),
               Source("http://e/")]
    names = plan_names(sources, {})
    assert len({n.casefold() for n in names.values()}) == len(sources)
    assert names["http://a/x/song.mp3"] == "song.mp3"
    assert names["http://d/fetch.json"] != "fetch.json"  # never overwrites the record
    # A later run with a new colliding source first keeps every recorded name.
    previous = {url: {"name": name} for url, name in names.items()}
    again = plan_names([Source("http://0/song.mp3"), *sources], previous)
    assert all(again[url] == name for url, name in names.items())
    assert again["http://0/song.mp3"] not in names.values()


FMA_TRACKS = (
    ",artist,artist,set,track,track\n"
    ",id,name,split,genre_top,title\n"
    "track_id,,,,,\n"
    "2,1,AWOL,training,Hip-Hop,Food\n"
    "140,6,\"Alec K. Redfearn, the Eyesores\",training,Folk,Queen Of The Wires\n"
    "3,1,AWOL,test,,Electric Ave\n"
)


def test_two_level_fma_header_is_flattened(tmp_path):
    rows = read_csv_table(FMA_TRACKS)
    assert rows[1] == {"track_id": "140", "artist.id": "6",
                       "artist.name": "Alec K. Redfearn, the Eyesores", "set.split": "training",
                       "track.genre_top": "Folk", "track.title": "Queen Of The Wires"}
    path = tmp_path / "tracks.csv"
    path.write_text(FMA_TRACKS)
    sources = read_sources([path], url_template="https://h/{track_id:06d[:3]}/{track_id:06d}.mp3",
                           label_columns=["track.genre_top", "artist.name"])
    assert [s.url for s in sources] == ["https://h/000/000002.mp3", "https://h/000/000140.mp3",
                                        "https://h/000/000003.mp3"]
    assert sources[0].labels == {"track.genre_top": "Hip-Hop", "artist.name": "AWOL"}
    assert sources[2].labels == {"artist.name": "AWOL"}  # an empty genre is no label


def test_flat_csv_url_column_and_clear_errors(tmp_path):
    path = tmp_path / "raw_tracks.csv"
    path.write_text("track_id,track_url,artist_name\n7,https://h/a.mp3,X\n8,,Y\n")
    sources = read_sources([path], url_column="track_url", label_columns=["artist_name"])
    assert sources == [Source("https://h/a.mp3", {"artist_name": "X"})]  # a row without URL
    with pytest.raises(ParameterError, match="no column 'genre'"):
        read_sources([path], url_column="track_url", label_columns=["genre"])
    with pytest.raises(ParameterError, match="exactly one of --url-column"):
        read_sources([path])
    with pytest.raises(ParameterError, match="names column 'id'"):
        fill_template("https://h/{id}.mp3", {"track_id": "7"})


# ----------------------------------------------------------------------------- faults


SONG = song_bytes(20_000, 1)
HTML = b"<!DOCTYPE html><html><body>403 Forbidden</body></html>"


def fault_routes() -> dict:
    return {
        "/good.mp3": fs.ok(SONG, {"ETag": '"v1"'}),
        "/retry-after.mp3": fs.failing([(429, {"Retry-After": "1"})], fs.ok(song_bytes(900, 2))),
        "/busy.mp3": fs.failing([(503, {})], fs.ok(song_bytes(800, 3))),
        "/broken.mp3": fs.failing([(500, {})] * 3, fs.ok(song_bytes(700, 4))),
        "/missing.mp3": lambda handler, nth: handler.send_error(404, "gone"),
        "/cut-once.mp3": fs.cut_short(song_bytes(5000, 5), times=1),
        "/cut-always.mp3": fs.cut_short(song_bytes(5000, 6)),
        "/drip.mp3": fs.drip(song_bytes(3000, 7), chunk=300, pause=0.02),
        "/loop-a.mp3": fs.redirect("/loop-b.mp3"),
        "/loop-b.mp3": fs.redirect("/loop-a.mp3"),
        "/moved.mp3": fs.redirect("/moved-here.mp3"),
        "/moved-here.mp3": fs.ok(song_bytes(600, 16)),
        "/to-ftp.mp3": fs.redirect("ftp://127.0.0.1/x.mp3"),
        "/huge.mp3": fs.ok(song_bytes(70_000, 9)),
        "/huge-stream.mp3": fs.no_length(song_bytes(70_000, 10)),
        "/error-page.mp3": fs.ok(HTML, {"Content-Type": "text/html"}),
        "/error.json.mp3": fs.ok(b'{"error": "rate limited"}',
                                 {"Content-Type": "application/json"}),
        "/cd-traversal.mp3": fs.ok(song_bytes(600, 11),
                                   {"Content-Disposition": 'attachment; filename="../../etc/x"'}),
        "/cd-absolute.mp3": fs.ok(song_bytes(600, 12),
                                  {"Content-Disposition": "attachment; filename=/etc/passwd"}),
        "/cd-empty.mp3": fs.ok(song_bytes(600, 13),
                               {"Content-Disposition": 'attachment; filename=""'}),
        "/cd-long.mp3": fs.ok(song_bytes(600, 14), {
            "Content-Disposition": "attachment; filename*=UTF-8''" + "%C3%A9" * 400 + ".mp3"}),
        "/sub/..%2F..%2Fescape.mp3": fs.ok(song_bytes(600, 15)),
    }


EXPECTED = {  # path -> (status, reason fragment, requests the server must have seen)
    "/good.mp3": ("ok", None, 1),
    "/retry-after.mp3": ("ok", None, 2),
    "/busy.mp3": ("ok", None, 2),
    "/broken.mp3": ("failed", "HTTP 500", 3),
    "/missing.mp3": ("failed", "HTTP 404", 1),
    "/cut-once.mp3": ("ok", None, 2),
    "/cut-always.mp3": ("failed", "cut short: got 2,500 of the 5,000 bytes", 3),
    "/drip.mp3": ("ok", None, 1),
    "/loop-a.mp3": ("failed", "redirect loop", None),
    "/moved.mp3": ("ok", None, 1),
    "/to-ftp.mp3": ("failed", "refused a redirect to 'ftp'", 1),
    "/huge.mp3": ("failed", "Content-Length 70,000 bytes is over the 65,536-byte cap", 1),
    "/huge-stream.mp3": ("failed", "while streaming", 1),
    "/error-page.mp3": ("failed", "not audio", 1),
    "/error.json.mp3": ("failed", "not audio", 1),
    "/cd-traversal.mp3": ("ok", None, 1),
    "/cd-absolute.mp3": ("ok", None, 1),
    "/cd-empty.mp3": ("ok", None, 1),
    "/cd-long.mp3": ("ok", None, 1),
    "/sub/..%2F..%2Fescape.mp3": ("ok", None, 1),
}


@pytest.mark.slow
def test_each_fault_ends_as_its_status_in_fetch_json(tmp_path):
    out = tmp_path / "out" / "songs"
    with fs.FaultServer(fault_routes()) as server:
        sources = [Source(server.url(path)) for path in EXPECTED]
        sources.append(Source("ftp://127.0.0.1/song.mp3"))
        config = FetchConfig(**{**QUICK, "max_bytes": 65_536})
        summary = fetch(sources, str(out), config=config,
                        progress=False, log=lambda line: None)
        entries = entries_by_path(out, server)
        for path, (status, reason, requests) in EXPECTED.items():
            entry = entries[path]
            assert entry["status"] == status, (path, entry)
            if reason is None:
                assert entry["reason"] is None
            else:
                assert reason in entry["reason"], (path, entry["reason"])
            if requests is not None:
                assert len(server.requests_for(path)) == requests, path
        assert "unsupported scheme 'ftp'" in entries["ftp://127.0.0.1/song.mp3"]["reason"]
        assert summary["failed"] == sum(s == "failed" for s, _, _ in EXPECTED.values()) + 1

        # Retry-After: 1 was waited out, measured on the server's clock.
        first, second = server.requests_for("/retry-after.mp3")
        assert second["time"] - first["time"] >= 0.95
        assert all(entry["user_agent"].startswith("rainforest/") for entry in server.log)

    fields = {"source", "name", "status", "bytes", "sha256", "etag", "final_url", "labels",
              "attempts", "reason", "content_type", "remote_name"}
    assert all(set(entry) == fields for entry in entries.values())  # one schema for all
    good = entries["/good.mp3"]
    assert (good["bytes"], good["sha256"], good["etag"]) == (len(SONG), sha256(SONG), '"v1"')
    assert entries["/moved.mp3"]["final_url"] == server.url("/moved-here.mp3")
    assert entries["/moved.mp3"]["sha256"] == sha256(song_bytes(600, 16))
    assert (out / entries["/drip.mp3"]["name"]).read_bytes() == song_bytes(3000, 7)
    assert (out / entries["/cut-once.mp3"]["name"]).read_bytes() == song_bytes(5000, 5)
    # Hostile names stay inside the folder; the header's name is recorded, sanitised.
    assert entries["/cd-traversal.mp3"]["remote_name"] == "x"
    assert entries["/cd-absolute.mp3"]["remote_name"] == "passwd"
    assert entries["/cd-empty.mp3"]["remote_name"] == "file"
    assert len(entries["/cd-long.mp3"]["remote_name"].encode()) <= 120
    assert entries["/sub/..%2F..%2Fescape.mp3"]["name"] == "escape.mp3"
    # Exactly the good files, each under its own name, and nothing else anywhere under out/.
    everything = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    saved = sorted(f"out/songs/{e['name']}" for e in entries.values() if e["status"] == "ok")
    assert everything == sorted(saved + ["out/songs/fetch.json"])
    for entry in entries.values():
        if entry["status"] == "ok":
            assert sha256((out / entry["name"]).read_bytes()) == entry["sha256"]


def test_a_silent_server_times_out_and_is_retried(tmp_path):
    """The only test with a short timeout, and no route here answers in time: the count of
    attempts cannot change with load."""
    release = threading.Event()  # never set while the fetch runs
    with fs.FaultServer({"/stall.mp3": fs.held(song_bytes(3000, 8), release)}) as server:
        summary = fetch([Source(server.url("/stall.mp3"))], str(tmp_path / "out"),
                        config=FetchConfig(**{**QUICK, "timeout": 1.0}), progress=False,
                        log=lambda line: None)
        release.set()
        assert len(server.requests_for("/stall.mp3")) == 1 + QUICK["retries"]
    assert summary["failed"] == 1 and "timed out" in summary["failures"][0]["reason"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fetch.json"]


def test_rate_limit_and_concurrency_hold_on_the_server(tmp_path):
    paths = [f"/s{i:02d}.mp3" for i in range(12)]
    routes = {path: fs.ok(song_bytes(1000, i), delay=0.15) for i, path in enumerate(paths)}
    rate = 10.0
    with fs.FaultServer(routes) as server:
        fetch([Source(server.url(p)) for p in paths], str(tmp_path / "out"),
              config=FetchConfig(rate=rate, concurrency=3, retries=0, timeout=10.0),
              progress=False, log=lambda line: None)
        times = sorted(entry["time"] for entry in server.log)
        assert server.max_in_flight <= 3
    assert len(times) == len(paths)
    # 12 request starts at 10/s span at least 1.1 s; arrival jitter can only shrink a gap by
    # the network delay of one request, so allow half of it.
    assert times[-1] - times[0] >= 0.5 * (len(paths) - 1) / rate
    gaps = np.diff(times)
    assert np.median(gaps) >= 0.6 / rate, gaps


def test_retry_after_pauses_the_whole_host(tmp_path):
    routes = {"/a.mp3": fs.failing([(503, {"Retry-After": "1"})], fs.ok(song_bytes(500, 1)))}
    routes.update({f"/b{i}.mp3": fs.ok(song_bytes(500, i + 2)) for i in range(6)})
    with fs.FaultServer(routes) as server:
        fetch([Source(server.url(p)) for p in routes], str(tmp_path / "out"),
              config=FetchConfig(**{**QUICK, "rate": 2.0, "concurrency": 4}), progress=False,
              log=lambda line: None)
        refused = server.requests_for("/a.mp3")[0]["time"]
        after = [e for e in server.log if e["time"] > refused]
    # /a.mp3 is among the first four of seven requests, so at least three come after its
    # refusal: every one of them, to any file of this host, waited out the 1 s (without the
    # host-wide pause the others would go on at 2/s while /a.mp3 waits).
    assert len(after) >= 3 and "/a.mp3" in {e["path"] for e in after}
    assert min(e["time"] for e in after) - refused >= 0.95


def test_files_of_one_host_share_its_connections(tmp_path):
    paths = [f"/r{i}.mp3" for i in range(8)]
    routes = {path: fs.ok(song_bytes(1000, i)) for i, path in enumerate(paths)}
    with fs.FaultServer(routes, keep_alive=True) as server:
        summary = fetch([Source(server.url(p)) for p in paths], str(tmp_path / "out"),
                        config=FetchConfig(**{**QUICK, "concurrency": 2}), progress=False,
                        log=lambda line: None)
        connections = {entry["connection"] for entry in server.log}
    assert summary["fetched"] == len(paths) and len(server.log) == len(paths)
    # Two threads keep at most two connections open; eight files over fresh connections
    # would have needed eight.
    assert 1 <= len(connections) <= 2, connections


def test_redirects_are_followed_up_to_ten_over_http_only(tmp_path):
    def chain(name: str, hops: int) -> dict:
        links = {f"/{name}{i}.mp3": fs.redirect(f"/{name}{i + 1}.mp3") for i in range(hops)}
        return {**links, f"/{name}{hops}.mp3": fs.ok(SONG)}

    routes = {**chain("ten", 10), **chain("eleven", 11),
              "/to-file.mp3": fs.redirect("file:///etc/passwd"),
              "/to-ftp.mp3": fs.redirect("ftp://127.0.0.1/x.mp3")}
    starts = ["/ten0.mp3", "/eleven0.mp3", "/to-file.mp3", "/to-ftp.mp3"]
    with fs.FaultServer(routes) as server:
        summary = fetch([Source(server.url(p)) for p in starts], str(tmp_path / "out"),
                        config=FetchConfig(**QUICK), progress=False, log=lambda line: None)
        seen = [entry["path"] for entry in server.log]
    entries = entries_by_path(tmp_path / "out", server)
    assert entries["/ten0.mp3"]["status"] == "ok"
    assert entries["/ten0.mp3"]["final_url"] == server.url("/ten10.mp3")
    eleven = entries["/eleven0.mp3"]
    assert eleven["status"] == "failed" and eleven["attempts"] == 1, eleven
    assert "too many redirects (more than 10)" in eleven["reason"]
    # The first request and ten redirects: the eleventh is not followed, nor retried.
    assert [p for p in seen if p.startswith("/eleven")] == [
        f"/eleven{i}.mp3" for i in range(11)]
    for path, scheme in (("/to-file.mp3", "file"), ("/to-ftp.mp3", "ftp")):
        entry = entries[path]
        assert (entry["status"], entry["attempts"]) == ("failed", 1), entry
        assert f"refused a redirect to {scheme!r}" in entry["reason"]
        assert seen.count(path) == 1
    assert summary["failed"] == 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fetch.json", "ten0.mp3"]


def test_a_url_with_spaces_and_accents_is_sent_percent_encoded(tmp_path):
    with fs.FaultServer({"/%C3%A9t%C3%A9%20song.mp3": fs.ok(SONG)}) as server:
        summary = fetch([Source(server.url("/été song.mp3"))], str(tmp_path / "out"),
                        config=FetchConfig(**QUICK), progress=False, log=lambda line: None)
        assert [entry["path"] for entry in server.log] == ["/%C3%A9t%C3%A9%20song.mp3"]
    assert summary["fetched"] == 1 and (tmp_path / "out" / "été song.mp3").read_bytes() == SONG


def test_a_refused_connection_is_retried_with_backoff_within_one_attempt(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on once it is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = FetchConfig(**{**QUICK, "retries": 3, "backoff": 0.2})
    started = time.monotonic()
    summary = fetch([Source(f"http://127.0.0.1:{port}/a.mp3")], str(tmp_path / "out"),
                    config=config, progress=False, log=lambda line: None)
    elapsed = time.monotonic() - started
    entry = json.loads((tmp_path / "out" / "fetch.json").read_text())["entries"][0]
    assert summary["failed"] == 1 and entry["attempts"] == 1, entry
    assert "could not connect (4 tries" in entry["reason"] and "refused" in entry["reason"]
    # urllib3 waits 0, 2 and 4 times the backoff between its four tries.
    assert elapsed >= 6 * config.backoff, elapsed


def test_rerun_skips_what_is_fetched_and_refetches_what_changed(tmp_path):
    routes = {f"/s{i}.mp3": fs.ok(song_bytes(2000, i)) for i in range(4)}
    out = tmp_path / "out"
    with fs.FaultServer(routes) as server:
        sources = [Source(server.url(p), {"genre": f"g{i % 2}"}) for i, p in enumerate(routes)]
        fetch(sources, str(out), config=FetchConfig(**QUICK), progress=False,
              log=lambda line: None)
        assert len(server.log) == 4
        again = fetch(sources, str(out), config=FetchConfig(**QUICK), progress=False,
                      log=lambda line: None)
        assert (again["skipped"], again["fetched"], len(server.log)) == (4, 0, 4)
        damaged = bytearray((out / "s2.mp3").read_bytes())
        damaged[-1] ^= 0xFF  # the same size, other bytes: only the sha256 can tell
        (out / "s2.mp3").write_bytes(bytes(damaged))
        third = fetch(sources, str(out), config=FetchConfig(**QUICK), progress=False,
                      log=lambda line: None)
        assert (third["skipped"], third["fetched"]) == (3, 1)
        assert [e["path"] for e in server.log[4:]] == ["/s2.mp3"]
    assert (out / "s2.mp3").read_bytes() == song_bytes(2000, 2)
    entries = entries_by_path(out, server)
    assert entries["/s3.mp3"]["labels"] == {"genre": "g1"}


def test_a_url_listed_twice_is_fetched_once_with_the_first_labels(tmp_path):
    with fs.FaultServer({"/a.mp3": fs.ok(SONG)}) as server:
        url = server.url("/a.mp3")
        summary = fetch([Source(url, {"genre": "first"}), Source(url, {"genre": "second"})],
                        str(tmp_path / "out"), config=FetchConfig(**QUICK), progress=False,
                        log=lambda line: None)
        assert len(server.log) == 1
    assert (summary["sources"], summary["fetched"]) == (1, 1)
    assert entries_by_path(tmp_path / "out", server)["/a.mp3"]["labels"] == {"genre": "first"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.mp3", "fetch.json"]


def _recorded(out: Path) -> list[dict]:
    """The entries of ``out``'s fetch.json as it is on disk now (none before the first save)."""
    manifest = out / "fetch.json"
    return json.loads(manifest.read_text())["entries"] if manifest.exists() else []


@pytest.mark.slow
def test_killed_fetch_reruns_to_each_file_exactly_once(tmp_path):
    paths = [f"/track-{i:02d}.mp3" for i in range(16)]
    bodies = {path: song_bytes(40_000 + 1000 * i, i) for i, path in enumerate(paths)}
    # The first four come at once; the rest send half and are then held until the kill, so
    # the first run cannot finish first and the kill lands in the middle of downloads,
    # however fast or loaded the machine.
    release = threading.Event()
    routes = {path: fs.ok(body) if i < 4 else fs.held(body, release)
              for i, (path, body) in enumerate(bodies.items())}
    out = tmp_path / "songs"
    with fs.FaultServer(routes) as server:
        urls = tmp_path / "urls.txt"
        urls.write_text("# songs\n" + "".join(server.url(p) + "\n" for p in paths))
        command = [*RAINFOREST, "fetch", str(urls), "--out", str(out), "--rate", "20",
                   "--concurrency", "3", "--no-progress"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # fetch.json is saved while the held downloads go on: wait for the first four in it.
        stderr = signal_when(process, when(lambda: len(_recorded(out)) >= 4), signal.SIGKILL,
                             seconds=120)[1]
        assert process.returncode == -signal.SIGKILL, stderr.decode(errors="replace")
        recorded = _recorded(out)
        assert len(recorded) == 4 and all(e["status"] == "ok" for e in recorded), recorded
        assert any(p.name.startswith(".") for p in out.iterdir())  # killed mid-download
        # Whatever carries a final name is complete; the rest are hidden temporaries.
        for path in out.iterdir():
            if path.name != "fetch.json" and not path.name.startswith("."):
                assert path.read_bytes() == bodies["/" + path.name], path.name
        release.set()
        first_run = len(server.log)

        result = run_cli(*command[3:], env={**os.environ})
        assert result.returncode == 0, result.stderr
        second_run = [entry["path"] for entry in server.log[first_run:]]
    done_before = {e["source"].removeprefix(server.base) for e in recorded}
    assert not done_before & set(second_run)  # recorded files were not fetched again
    assert sorted(second_run) == sorted(set(paths) - done_before)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [p.lstrip("/") for p in paths] + ["fetch.json"])
    for path, body in bodies.items():
        assert (out / path.lstrip("/")).read_bytes() == body
    entries = entries_by_path(out, server)
    assert all(entries[p]["status"] == "ok" for p in paths)


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_keeps_the_record_and_removes_temporaries(tmp_path):
    paths = [f"/t{i}.mp3" for i in range(8)]
    bodies = {path: song_bytes(60_000, i) for i, path in enumerate(paths)}
    release = threading.Event()  # set only once the run ended: the rest stay in flight
    routes = {path: fs.ok(body) if i == 0 else fs.held(body, release)
              for i, (path, body) in enumerate(bodies.items())}
    out = tmp_path / "songs"
    with fs.FaultServer(routes) as server:
        command = [*RAINFOREST, "fetch", *[server.url(p) for p in paths], "--out", str(out),
                   "--rate", "20", "--concurrency", "2", "--no-progress", "--timeout", "5"]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # A held download's thread sees the stop when its read times out (--timeout), so
        # nothing can complete after the signal. One file finished and recorded, another
        # under way: then Ctrl-C.
        _, stderr = signal_when(process, when(lambda: _recorded(out) and any(
            p.name.startswith(".") for p in out.iterdir())), signal.SIGINT, seconds=120)
        release.set()
    assert process.returncode == 130, stderr.decode(errors="replace")
    assert "re-run the same command to resume" in stderr.decode()
    left = sorted(p.name for p in out.iterdir())
    assert "fetch.json" in left and not [name for name in left if name.startswith(".")]
    record = _recorded(out)
    assert 1 <= len(record) < len(paths)  # stopped early, and what it recorded is on disk
    assert sorted(left) == sorted([e["name"] for e in record] + ["fetch.json"])
    for entry in record:
        assert (out / entry["name"]).read_bytes() == bodies["/" + entry["name"]]


def _self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that no system trust store knows."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256()))
    key_path, cert_path = folder / "key.pem", folder / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def test_tls_certificates_are_verified(tmp_path, monkeypatch):
    import ssl

    key, cert = _self_signed_certificate(tmp_path)
    with fs.FaultServer({"/a.mp3": fs.ok(SONG)}) as server:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        url = server.url("/a.mp3").replace("http://", "https://")
        refused = fetch([Source(url)], str(tmp_path / "untrusted"), config=FetchConfig(**QUICK),
                        progress=False, log=lambda line: None)
        # The same server, once its certificate is trusted, is fetched: the refusal was
        # the verification, not a broken TLS path.
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        trusted = fetch([Source(url)], str(tmp_path / "trusted"), config=FetchConfig(**QUICK),
                        progress=False, log=lambda line: None)
    assert refused["failed"] == 1 and "certificate" in refused["failures"][0]["reason"]
    assert not (tmp_path / "untrusted" / "a.mp3").exists()
    assert trusted["fetched"] == 1 and (tmp_path / "trusted" / "a.mp3").read_bytes() == SONG


def test_cli_fetch_from_a_csv_reports_and_exits_3_on_failures(tmp_path):
    routes = {"/000/000002.mp3": fs.ok(song_bytes(1000, 2)), "/000/000140.mp3": fs.ok(HTML)}
    with fs.FaultServer(routes) as server:
        tracks = tmp_path / "tracks.csv"
        tracks.write_text(FMA_TRACKS.replace("3,1,AWOL,test,,Electric Ave\n", ""))
        result = run_cli("fetch", tracks, "--out", tmp_path / "songs", "--url-template",
                         server.base + "/{track_id:06d[:3]}/{track_id:06d}.mp3",
                         "--label-column", "track.genre_top", "--rate", "50", "--no-progress",
                         "--retries", "0", env={**os.environ}, expect_failed_songs=True)
    assert result.returncode == 3, result.stderr
    assert "1 file(s) fetched" in result.stdout and "1 failed" in result.stdout
    assert "FAILED" in result.stdout and "not audio" in result.stdout
    entries = entries_by_path(tmp_path / "songs", server)
    assert entries["/000/000002.mp3"]["labels"] == {"track.genre_top": "Hip-Hop"}


def test_cli_fetch_refuses_a_csv_without_url_choice(tmp_path):
    tracks = tmp_path / "tracks.csv"
    tracks.write_text(FMA_TRACKS)
    result = subprocess.run([*RAINFOREST, "fetch", str(tracks), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "--url-template" in result.stderr
    assert not (tmp_path / "o").exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-x", "-q"]))
