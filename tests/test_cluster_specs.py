"""``--cluster`` specs (rainforest.cluster.connect): the client each gives, and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import dask
import pytest

import audiogen
from conftest import free_port, run_cli
from rainforest.cluster import connect
from rainforest.errors import ParameterError

pytestmark = pytest.mark.distributed

BIN = os.path.dirname(sys.executable)


def _worker_threads(client) -> list[int]:
    return sorted(w["nthreads"] for w in client.scheduler_info()["workers"].values())


def test_local_is_the_default_with_one_single_threaded_process_per_core():
    from rainforest.cli import build_parser
    from rainforest.preprocess import preprocess

    args = build_parser().parse_args(["preprocess", "songs", "--out", "data"])
    assert args.cluster == "local"
    assert preprocess.__kwdefaults__["cluster"] == "local"
    with connect() as client:
        cores = os.cpu_count() or 1
        assert _worker_threads(client) == [1] * cores
        pids = client.run(os.getpid)
        assert len(set(pids.values())) == cores and os.getpid() not in pids.values()
        assert client.submit(sum, [1, 2, 3]).result() == 6
        cluster = client.cluster
    assert client.status == "closed" and cluster.status.name == "closed"


def test_local_n_starts_n_workers():
    with connect("local:1") as client:
        assert _worker_threads(client) == [1]
        assert list(client.run(os.getpid).values()) != [os.getpid()]


@pytest.mark.parametrize("spec", ["local:0", "local:-2", "local:two", "local:"])
def test_a_bad_worker_count_is_refused(spec):
    with pytest.raises(ParameterError, match="the worker count must be >= 1"):
        with connect(spec):
            pass


@pytest.mark.parametrize("spec", ["banana", "lokal", "http://127.0.0.1:8786", ""])
def test_an_unknown_spec_is_refused_with_the_choices(spec):
    with pytest.raises(ParameterError, match="unknown --cluster") as caught:
        with connect(spec):
            pass
    assert "scheduler-file:PATH" in str(caught.value) and "'local:N'" in str(caught.value)


def test_an_unknown_spec_on_the_command_line_is_a_clear_error(tmp_path):
    audiogen.write_song(tmp_path / "song.wav", seconds=1.5, rate=16000)
    result = run_cli("preprocess", tmp_path / "song.wav", "--out", tmp_path / "data", "--cluster",
                     "banana", check=False)
    assert result.returncode == 1 and "unknown --cluster 'banana'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "data").exists()


@pytest.mark.timeout(60)  # without the check, the client waits for the file for ever
def test_a_missing_scheduler_file_is_refused(tmp_path):
    with pytest.raises(ParameterError, match="does not exist"):
        with connect(f"scheduler-file:{tmp_path / 'nowhere.json'}"):
            pass


@pytest.mark.slow
def test_an_unreachable_scheduler_is_a_clear_error():
    # A free port nobody listens on; the client gives up after Dask's connect timeout.
    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(ParameterError, match="cannot reach the Dask scheduler") as caught, \
            dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        with connect(address):
            pass
    assert address in str(caught.value) and "dask scheduler" in str(caught.value)


def _start(args):
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)


@pytest.mark.slow
def test_scheduler_file_connects_to_that_scheduler_and_leaves_it_running(tmp_path):
    from distributed import Client

    scheduler_file = tmp_path / "scheduler.json"
    processes = [_start([os.path.join(BIN, "dask"), "scheduler", "--host", "127.0.0.1",
                         "--port", "0", "--no-dashboard", "--scheduler-file",
                         str(scheduler_file)])]
    try:
        deadline = time.monotonic() + 120
        while not scheduler_file.exists() and time.monotonic() < deadline:
            assert processes[0].poll() is None, "dask scheduler exited"
            time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        processes.append(_start([os.path.join(BIN, "dask"), "worker", "--scheduler-file",
                                 str(scheduler_file), "--nthreads", "1", "--name",
                                 "spec-worker", "--no-dashboard"]))
        with connect(f"scheduler-file:{scheduler_file}") as client:
            client.wait_for_workers(1, timeout=120)
            assert client.scheduler.address == address
            names = [w["name"] for w in client.scheduler_info()["workers"].values()]
            assert names == ["spec-worker"]
            future = client.submit(sum, [20, 22])
            assert future.result(timeout=60) == 42
            assert client.who_has(future)[future.key]  # held by that worker
        assert client.status == "closed"
        # The scheduler belongs to whoever started it: it and its worker are still there.
        with Client(address, timeout="30s") as again:
            assert len(again.scheduler_info()["workers"]) == 1
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(timeout=60)
