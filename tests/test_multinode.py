"""Every cluster path across nodes that have their own names and addresses.

One cluster of three namespaced nodes (n0, n1, n2) and a login namespace serves the whole
module (:mod:`multinode`); the client commands run on the login node, which has no default
route, like a login node inside a site's network. Each node has 1 CPU, so each 1-core job gets
a node of its own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

import audiogen
from conftest import (
    NO_TRIAL,
    RAINFOREST,
    TINY_TRAINING,
    assert_same_tree,
    checkpoint_digest,
    checkpoint_weights,
    rank_env,
    write_hosts,
)
from multinode import MultiNode, available
from rainforest import checkpoint, runlog
from rainforest.preprocess import preprocess

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.multinode]
#: Seconds from a worker node's power cut to the scheduler removing its worker: Dask's TCP
#: timeout (distributed.comm.timeouts.tcp, 30 s: keepalive probes and TCP_USER_TIMEOUT), with
#: slack for a loaded machine.
LOST_WORKER_BOUND_SECONDS = 60
#: --stall-timeout of a non-elastic job that loses a node: its surviving rank waits that long
#: in a collective that never ends (MPI's do not time out) before its watchdog ends it.
STALL_SECONDS = 30
#: Seconds from the power cut of one node of a non-elastic job to the job's end: Slurm's
#: SlurmdTimeout (20 s in tests/multinode.py) or the stall watchdog, whichever comes first,
#: plus KillWait (5 s) and slack for a loaded machine.
NODE_LOSS_BOUND_SECONDS = 90


@pytest.fixture(scope="module")
def nodes():
    missing = available()
    if missing:
        pytest.fail(f"the multi-node cluster is needed: {missing}")
    # KillWait 30 s, as at many sites: a preempted job's ranks get that long to checkpoint.
    cluster = MultiNode(3, kill_wait=30).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def songs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("multinode-songs")
    for index in range(6):
        audiogen.write_song(folder / f"song{index}.flac", seconds=1.0 + 0.2 * index,
                            rate=22050, channels=1 + index % 2, leading_silence=0.2,
                            trailing_silence=0.3, freq=200.0 + 50 * index, seed=index)
    return folder


@pytest.fixture(scope="module")
def local_dataset(songs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("multinode-local") / "dataset"
    preprocess([str(songs)], str(out), cluster="sync", songs_per_shard=1, progress=False,
               log=lambda line: None)
    return out


def _env(nodes: MultiNode, **values) -> dict:
    return {**nodes.env, "VENV": str(VENV), "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
            **{k: str(v) for k, v in values.items()}}


def _shards_by_host(output: str) -> dict[str, int]:
    """The run's own account of where its shards ran: "worker tcp://HOST:PORT: N shard(s)"."""
    counts: dict[str, int] = {}
    for host, count in re.findall(r"worker tcp://([\d.]+):\d+: (\d+) shard", output):
        counts[host] = counts.get(host, 0) + int(count)
    return counts


@pytest.mark.parametrize("interface", [None, "eth0"], ids=["no-interface", "eth0"])
def test_cluster_slurm_from_the_login_node_uses_workers_on_both_nodes(interface, nodes, songs,
                                                                      local_dataset, tmp_path):
    out = tmp_path / "dataset"
    flags = ["--slurm-interface", interface] if interface else []
    result = _preprocess_on_slurm(nodes, songs, out, tmp_path, *flags)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "slurm: 2 worker(s) connected" in output, output
    used = _shards_by_host(output)
    assert len(used) == 2 and set(used) <= set(nodes.addresses.values()), output
    assert_same_tree(out, local_dataset)


def _preprocess_command(songs: Path, out: Path, folder: Path, *flags: str) -> list[str]:
    return [*RAINFOREST, "preprocess", str(songs), "--out", str(out), "--cluster", "slurm",
            "--no-progress", "--songs-per-shard", "1", "--slurm-cores", "1",
            "--slurm-memory", "500MB", "--slurm-walltime", "00:10:00", "--slurm-min-jobs", "2",
            "--slurm-max-jobs", "2", "--slurm-start-timeout", "60",
            f"--slurm-directive=--chdir={folder}", *flags]


def _preprocess_on_slurm(nodes: MultiNode, songs: Path, out: Path, folder: Path, *flags: str):
    return nodes.run(*_preprocess_command(songs, out, folder, *flags), env=_env(nodes),
                     check=False, cwd=folder, timeout=300)


def test_a_worker_job_that_fails_is_named_with_its_output_file(nodes, songs, local_dataset,
                                                               tmp_path):
    out = tmp_path / "dataset"
    result = _preprocess_on_slurm(nodes, songs, out, tmp_path,
                                  '--slurm-prologue=[ "$(hostname)" != n1 ] || exit 3')
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    failed = re.findall(r"worker job (\d+) \(\w+, exit code 3:0, on n1\) ended before its worker "
                        r"connected; its output: (\S+)", output)
    assert failed, output
    for job, log in failed:
        assert log == str(tmp_path / f"slurm-{job}.out"), output
    assert "slurm: 1 worker(s) connected" in output, output
    assert len(_shards_by_host(output)) == 1, output
    assert_same_tree(out, local_dataset)


def test_a_loopback_interface_for_remote_nodes_is_refused_before_any_job(nodes, songs,
                                                                         tmp_path):
    before = nodes.run("squeue", "-h", "-o", "%i").stdout.split()
    jobs_before = len(nodes.completed_jobs())
    result = _preprocess_on_slurm(nodes, songs, tmp_path / "dataset", tmp_path,
                                  "--slurm-interface", "lo")
    assert result.returncode != 0
    assert "--slurm-interface lo is loopback, and the node at 192.0.2.1" in result.stderr
    assert "nothing was submitted" in result.stderr and "eth0 (192.0.2.2" in result.stderr
    assert nodes.run("squeue", "-h", "-o", "%i").stdout.split() == before
    assert len(nodes.completed_jobs()) == jobs_before


def test_preprocess_sbatch_on_two_nodes_gives_the_dataset_of_a_local_run(nodes, songs,
                                                                        local_dataset, tmp_path):
    out, log = tmp_path / "dataset", tmp_path / "job.out"
    job = nodes.submit(str(REPO / "slurm/preprocess.sbatch"), "--nodes=2", "--ntasks=2",
                       "--mem-per-cpu=200M", f"--output={log}", f"--chdir={tmp_path}",
                       script_args=("--songs-per-shard", "1"),
                       env=_env(nodes, SONGS=songs, OUT=out, SHARED_TMP=tmp_path))
    state = nodes.wait(job, timeout=200)
    output = log.read_text() if log.exists() else "(no output file)"
    assert state == "COMPLETED", output
    assert "preflight: 2 worker(s)" in output, output
    used = _shards_by_host(output)
    assert len(used) == 2 and set(used) <= set(nodes.addresses.values()), output
    assert_same_tree(out, local_dataset)


@pytest.fixture
def dask_on_nodes(nodes, tmp_path):
    """A `dask scheduler` on n0 (on eth0, as a user on a node without a default route must
    ask) and one `dask worker` on each of n1 and n2; yields the scheduler file."""
    scheduler_file = tmp_path / "scheduler.json"
    dask = [sys.executable, "-m"]
    processes = [subprocess.Popen(
        [*nodes.enter("n0"), *dask, "distributed.cli.dask_scheduler", "--interface", "eth0",
         "--port", "0", "--no-dashboard", "--scheduler-file", str(scheduler_file)], cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert scheduler_file.exists(), "the scheduler did not start"
        for host in ("n1", "n2"):
            processes.append(subprocess.Popen(
                [*nodes.enter(host), *dask, "distributed.cli.dask_worker", "--scheduler-file",
                 str(scheduler_file), "--nthreads", "1", "--name", host, "--no-dashboard"],
                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        nodes.run(sys.executable, "-c", "import sys; from distributed import Client\n"
                  "with Client(scheduler_file=sys.argv[1], timeout='30s') as c:\n"
                  "    c.wait_for_workers(2, timeout=90)", str(scheduler_file), cwd=tmp_path,
                  timeout=150)
        yield scheduler_file
    finally:
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_tcp_and_scheduler_file_clusters_use_workers_on_two_other_nodes(
        nodes, dask_on_nodes, songs, local_dataset, tmp_path):
    address = json.loads(dask_on_nodes.read_text())["address"]
    assert address.startswith(f"tcp://{nodes.addresses['n0']}:"), address
    workers = {nodes.addresses["n1"], nodes.addresses["n2"]}
    for spec in (address, f"scheduler-file:{dask_on_nodes}"):
        out = tmp_path / f"dataset-{len(spec)}"
        result = nodes.run(*RAINFOREST, "preprocess", str(songs), "--out", str(out),
                           "--cluster", spec, "--no-progress", "--songs-per-shard", "1",
                           env=_env(nodes), check=False, cwd=tmp_path, timeout=300)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert "preflight: 2 worker(s)" in output, output
        assert set(_shards_by_host(output)) == workers, output
        assert_same_tree(out, local_dataset)


TRAIN = [*TINY_TRAINING, "--steps", "6", "--val-every", "6"]


@pytest.fixture(scope="module")
def one_node_weights(local_dataset, tmp_path_factory) -> dict:
    """The same training with 2 ranks on one host (horovodrun over Gloo, no Slurm)."""
    run = tmp_path_factory.mktemp("one-node") / "run"
    result = subprocess.run(
        [str(VENV / "bin/horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo",
         sys.executable, "-m", "rainforest.cli", "train", str(local_dataset), "--run", str(run),
         *TRAIN], capture_output=True, text=True, env=rank_env(), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return checkpoint_weights(checkpoint.latest(str(run)))


@pytest.mark.parametrize("launcher", ["srun", "mpirun", "horovodrun"])
def test_train_sbatch_on_two_nodes_matches_two_ranks_on_one(launcher, nodes, local_dataset,
                                                            one_node_weights, tmp_path):
    run, log = tmp_path / "run", tmp_path / "job.out"
    job = nodes.submit(str(REPO / "slurm/train.sbatch"), "--nodes=2", "--ntasks-per-node=1",
                       f"--output={log}", f"--chdir={tmp_path}", script_args=TRAIN,
                       env=_env(nodes, DATASET=local_dataset, RUN=run, LAUNCHER=launcher),
                       cwd=str(REPO))  # where a user submits from: the checkout
    state = nodes.wait(job, timeout=400)
    output = log.read_text() if log.exists() else "(no output file)"
    assert state == "COMPLETED", output
    assert "ranks on hosts: n0, n1" in output and "done: step 6 on 2 rank(s)" in output, output
    weights = checkpoint_weights(checkpoint.latest(str(run)))
    assert weights.keys() == one_node_weights.keys()
    for name, value in weights.items():
        assert np.array_equal(value, one_node_weights[name]), name


def test_the_horovodrun_hosts_recipe_trains_on_two_other_nodes(nodes, local_dataset,
                                                             one_node_weights, tmp_path):
    """launch/horovodrun-hosts.sh as a user runs it on one node (n0), outside Slurm: its
    ranks start on n1 and n2 over ssh and give the weights of 2 ranks on one host."""
    run = tmp_path / "run"
    result = nodes.run(str(REPO / "launch/horovodrun-hosts.sh"), "n1:1,n2:1",
                       str(local_dataset), "--run", str(run), *TRAIN, host="n0",
                       env=_env(nodes), check=False, cwd=tmp_path, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "ranks on hosts: n1, n2" in output, output[-4000:]
    weights = checkpoint_weights(checkpoint.latest(str(run)))
    assert weights.keys() == one_node_weights.keys()
    for name, value in weights.items():
        assert np.array_equal(value, one_node_weights[name]), name


def test_a_two_node_train_job_requeued_mid_run_loses_and_repeats_no_step(nodes, local_dataset,
                                                                        tmp_path):
    run, log = tmp_path / "run", tmp_path / "job.out"
    steps = 200
    # No periodic checkpoint: only the one written on SIGTERM can carry the run over.
    job = nodes.submit(str(REPO / "slurm/train.sbatch"), "--nodes=2", "--ntasks-per-node=1",
                       f"--output={log}", f"--chdir={tmp_path}",
                       script_args=(*TINY_TRAINING, "--steps", str(steps), "--val-every", "100",
                                    "--checkpoint-every", "100000"),
                       env=_env(nodes, DATASET=local_dataset, RUN=run), cwd=str(REPO))
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 20):
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "no output"
        time.sleep(0.2)
    nodes.run("scontrol", "requeue", job)
    state = nodes.wait(job, timeout=600)
    output = log.read_text()
    assert state == "COMPLETED" and nodes.job_field(job, "Restarts") == "1", output
    assert "start 1," in output and "resuming" in output, output
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert logged == list(range(1, steps + 1)), "a step was lost or repeated"


def test_elastic_slurm_launcher_keeps_ssh_alive_where_plain_discovery_refuses(
        nodes, local_dataset, tmp_path):
    """A 2-node job with the cluster's own ssh config, which has no keepalives: the discovery
    script alone refuses the other node (horovodrun's ssh would wait on it forever) and says
    what to add; launch/elastic-slurm.sh puts rainforest's ssh first on horovodrun's PATH, so
    the same discovery passes and elastic training runs on both nodes."""
    assert not re.search("alive", nodes.ssh_settings(), re.I), nodes.ssh_settings()
    run, log = tmp_path / "run", tmp_path / "job.out"
    discover, elastic = REPO / "launch/slurm-discover.sh", REPO / "launch/elastic-slurm.sh"
    keepalive = f"$({VENV}/bin/rainforest hosts keepalive)"
    script = tmp_path / "elastic.sbatch"
    script.write_text(
        f"#!/bin/bash\n{discover} > {tmp_path}/plain.txt 2>&1; echo $? > {tmp_path}/plain.rc\n"
        f"PATH={keepalive}:$PATH {discover} > {tmp_path}/kept.txt\n"
        f"exec {elastic} {local_dataset} --run {run} {' '.join(TRAIN)}\n")
    job = nodes.submit(str(script), "--nodes=2", "--ntasks-per-node=1", f"--output={log}",
                       f"--chdir={tmp_path}", env=_env(nodes), cwd=str(REPO))
    state = nodes.wait(job, timeout=400)
    output = log.read_text() if log.exists() else "(no output file)"
    plain = (tmp_path / "plain.txt").read_text()
    assert (tmp_path / "plain.rc").read_text().strip() == "1", plain
    assert "ssh to n1 has no keepalives" in plain and "ServerAliveInterval 5" in plain, plain
    assert sorted((tmp_path / "kept.txt").read_text().split()) == ["n0:1", "n1:1"]
    assert state == "COMPLETED", output[-4000:]
    assert "done: step 6 on 2 rank(s)" in output, output[-4000:]


def _logged_steps(run: Path) -> list[int]:
    return [row["step"] for row in runlog.read_metrics(str(run))]


class _Log:
    """A job's output file, searched from a mark on (the text written after an event)."""

    def __init__(self, path: Path, process: subprocess.Popen) -> None:
        self.path, self.process = path, process

    def text(self) -> str:
        return self.path.read_text(errors="replace")

    def mark(self) -> int:
        return len(self.text())

    def until(self, what: str, found, timeout: float):
        """Poll ``found()`` until it gives something true; fail if the job ends first."""
        deadline = time.monotonic() + timeout
        while not (result := found()):
            assert self.process.poll() is None and time.monotonic() < deadline, \
                f"no {what} within {timeout} s:\n{self.text()[-4000:]}"
            time.sleep(0.2)
        return result

    def wait_for(self, what: str, pattern: str, after: int, timeout: float) -> re.Match:
        return self.until(what, lambda: re.search(pattern, self.text()[after:]), timeout)


def _wait_steps(run: Path, log: _Log, ranks: int, after_step: int, count: int,
                timeout: float) -> None:
    """Until ``count`` steps after ``after_step`` are logged as trained on ``ranks`` ranks."""
    log.until(f"{count} steps on {ranks} ranks", lambda: sum(
        row.get("ranks") == ranks and row["step"] > after_step
        for row in runlog.read_metrics(str(run))) >= count, timeout)


#: Steps between commits of the elastic run: what a lost node may cost at most.
ELASTIC_COMMIT_EVERY = 10
#: --gloo-timeout-seconds of the elastic run. It bounds both ways: the survivors of a power
#: cut wait that long in the collective n1 never joins, and a rank that boots again must
#: import TensorFlow and reach the rendezvous within it (slower on a loaded machine).
ELASTIC_GLOO_TIMEOUT = 30


def _start_elastic(cluster: MultiNode, hosts: Path, dataset: Path, run: Path,
                   log: Path) -> subprocess.Popen:
    """launch/elastic-local.sh on n0 over a hosts file, open-ended, Gloo on eth0."""
    return subprocess.Popen(
        [*cluster.enter("n0"), f"--wd={REPO}", "launch/elastic-local.sh", str(hosts),
         str(dataset), "--run", str(run), *TINY_TRAINING, "--steps", "1000000",
         "--commit-every", str(ELASTIC_COMMIT_EVERY), "--checkpoint-every", "1000",
         "--log-every", "1", "--val-every", "100000"],
        env={**rank_env(), **cluster.env, "NIC": "eth0", "GLOO_TIMEOUT": str(ELASTIC_GLOO_TIMEOUT),
             "COOLDOWN": "1 2"},
        stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def test_elastic_training_on_three_nodes_survives_a_power_cut_and_takes_the_node_back(
        local_dataset, tmp_path):
    """Three nodes of their own (n1 loses power, then boots again): the link of n1 goes down
    first, so no peer gets a reset, then every process on n1 dies. Gloo's timeout ends the
    collective n1 never joins, rainforest's ssh with keepalives (elastic-local.sh puts it first
    on horovodrun's PATH; the cluster's own ssh config has none) lets horovodrun see n1's rank
    as failed, and n0 and n2 go on from the last commit.
    The hosts file plays the site's discovery: it drops n1 while n1 is down and lists it again
    once n1 has booted, and a rank starts there again."""
    cluster = MultiNode(3).start()
    assert not re.search("alive", cluster.ssh_settings(), re.I), cluster.ssh_settings()
    hosts, run = tmp_path / "hosts", tmp_path / "run"
    write_hosts(hosts, "n0", "n1", "n2")
    process = _start_elastic(cluster, hosts, local_dataset, run, tmp_path / "elastic.log")
    log = _Log(tmp_path / "elastic.log", process)
    try:
        # Cut between commits, so that the survivors have steps to roll back.
        _wait_steps(run, log, 3, 0, 3 * ELASTIC_COMMIT_EVERY + 3, 300)
        cut_at, cut_mark = _logged_steps(run)[-1], log.mark()
        cluster.power_cut("n1")
        cut = time.monotonic()
        survived = log.wait_for("survivors going on", r"elastic: 2 rank\(s\), training from "
                                r"step (\d+) .* (\d+) step\(s\) after it", cut_mark, 120)
        survived_after = time.monotonic() - cut
        rolled_back_to, repeated = int(survived.group(1)), int(survived.group(2))
        write_hosts(hosts, "n0", "n2")
        _wait_steps(run, log, 2, rolled_back_to, 5, 120)
        boot_mark = log.mark()
        cluster.power_on("n1")
        booted = time.monotonic()
        write_hosts(hosts, "n0", "n1", "n2")
        joined = log.wait_for("n1's rank joining", r"elastic: 3 rank\(s\), training from "
                              r"step (\d+)", boot_mark, 240)
        joined_from, joined_after = int(joined.group(1)), time.monotonic() - booted
        _wait_steps(run, log, 3, joined_from, 5, 180)
        # SIGTERM to the rank on n1: the ranks agree on the step to stop at (an allreduce of
        # the request), write a checkpoint there and all end cleanly.
        ranks_on_n1 = _training_on(cluster, "n1")
        assert len(ranks_on_n1) == 1, log.text()[-4000:]
        os.kill(ranks_on_n1[0], signal.SIGTERM)
        assert process.wait(timeout=180) == 0, log.text()[-4000:]
        text = log.text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        cluster.stop()
    print(f"power cut of n1 at step {cut_at}: n0 and n2 went on {survived_after:.1f} s later "
          f"from step {rolled_back_to} (steps repeated: {repeated}); n1 booted, and its rank "
          f"joined {joined_after:.1f} s later, at step {joined_from}")
    assert rolled_back_to % ELASTIC_COMMIT_EVERY == 0 and 0 <= repeated < ELASTIC_COMMIT_EVERY
    assert joined_from % ELASTIC_COMMIT_EVERY == 0 and joined_from > rolled_back_to
    steps = int(re.search(r"stopped by another rank at step (\d+)", text).group(1))
    assert f"done: step {steps} on 3 rank(s)" in text, text[-4000:]
    assert _logged_steps(run) == list(range(1, steps + 1)), "a step was lost or logged twice"
    ranks = [row["ranks"] for row in runlog.read_metrics(str(run))]
    # A step trained again after the cut replaces its first record: from the commit on, the
    # records are those of the 2 ranks whose weights went on.
    first_pair = ranks.index(2)
    assert first_pair == rolled_back_to, ranks
    assert set(ranks[:first_pair]) == {3} and set(ranks[first_pair:joined_from]) == {2}
    assert set(ranks[joined_from:]) == {3}, ranks
    digests = {m.group(1): m.group(2) for m in re.finditer(
        rf"rank (\d)/3: step {steps}, weights sha256 (\w+)", text)}
    assert set(digests) == {"0", "1", "2"} and len(set(digests.values())) == 1, digests
    final = checkpoint.latest(str(run))
    assert checkpoint.read_config(final)["step"] == steps
    assert checkpoint_digest(final) == digests["0"]
    # Adam counts the updates it applied: none twice, none dropped, across the cut and the boot.
    optimizer = dict(checkpoint.load_arrays(os.path.join(final, checkpoint.OPTIMIZER_NAME)))
    assert int(optimizer["adam/iteration"]) == steps


def _seconds_processed(output: str) -> float:
    return float(re.search(r"song\(s\) processed in ([\d.]+) s", output).group(1))


def test_preprocessing_on_slurm_goes_on_after_a_worker_node_loses_power(tmp_path):
    """Two nodes of their own (n1 is lost): the same songs are preprocessed without a loss,
    then again with n1's power cut once both workers have built shards. The run ends on n0
    with the dataset of a local run, and names the lost worker, its node and its Slurm job."""
    songs, runs = tmp_path / "songs", tmp_path / "runs"
    songs.mkdir()
    runs.mkdir()
    for index in range(12):  # ~1 s of work each: long enough to cut mid-run
        audiogen.write_song(songs / f"song{index:02d}.wav", seconds=40.0, rate=44100,
                            channels=2, leading_silence=0.2, trailing_silence=0.3,
                            freq=150.0 + 25 * index, seed=index)
    local = tmp_path / "local"
    preprocess([str(songs)], str(local), cluster="sync", songs_per_shard=1, progress=False,
               log=lambda line: None)
    cluster = MultiNode(2).start()
    try:
        whole = _preprocess_on_slurm(cluster, songs, runs / "whole", runs)
        assert whole.returncode == 0, whole.stdout + whole.stderr
        assert "lost worker" not in whole.stdout + whole.stderr
        out, log = runs / "cut", runs / "cut.log"
        process = subprocess.Popen(
            [*cluster.enter("login"), f"--wd={runs}", *_preprocess_command(songs, out, runs)],
            env=_env(cluster), stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while len(list((out / "shards").glob("*.json"))) < 2:
                assert time.monotonic() < deadline and process.poll() is None, log.read_text()
                time.sleep(0.05)
            jobs = dict(line.split() for line in cluster.run(
                "squeue", "-h", "-t", "R", "-o", "%N %i").stdout.splitlines())
            cluster.power_cut("n1")
            cut = time.time()
            process.wait(timeout=240)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        output = log.read_text()
    finally:
        cluster.stop()
    assert process.returncode == 0, output
    lost = re.findall(r"lost worker tcp://([\d.]+):\d+ \(on (\w+), Slurm job (\d+)\) mid-run: "
                      r"the scheduler removed it at (\S+);", output)
    assert len(lost) == 1, output
    assert lost[0][:3] == (cluster.addresses["n1"], "n1", jobs["n1"]), output
    assert "the run ended with 1 worker(s), having lost 1" in output, output
    assert cluster.addresses["n0"] in _shards_by_host(output), output
    assert_same_tree(out, local)
    assert_same_tree(runs / "whole", local)
    removed = datetime.fromisoformat(lost[0][3]).timestamp() - cut
    print("\n".join(line for line in output.splitlines() if "lost" in line))
    print(f"12 songs on 2 nodes: {_seconds_processed(whole.stdout):.1f} s without a loss, "
          f"{_seconds_processed(output):.1f} s with n1's power cut after 2 shards; the "
          f"scheduler removed n1's worker {removed:.1f} s after the cut")
    assert removed < LOST_WORKER_BOUND_SECONDS, output


def _training_on(cluster: MultiNode, host: str) -> list[int]:
    """The pids of ``rainforest train`` ranks on ``host``."""
    found = []
    for pid in cluster.pids(host):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(part.endswith(b"rainforest") for part in command) and b"train" in command:
            found.append(pid)
    return found


def test_a_two_node_train_job_that_loses_a_node_ends_and_resumes_on_the_survivor(local_dataset,
                                                                                 tmp_path):
    """Two nodes of their own (n1 is lost). Without --elastic a lost node ends the job: Slurm
    finds n1 not responding (SlurmdTimeout, 20 s here) and kills the job, and the rank on n0,
    stuck in a collective, is ended by the stall watchdog if Slurm has not done it. The run
    then goes on from its last checkpoint on n0 alone."""
    run = tmp_path / "run"
    cluster = MultiNode(2).start()
    try:
        job = cluster.submit(
            str(REPO / "slurm/train.sbatch"), "--nodes=2", "--ntasks-per-node=1",
            f"--output={tmp_path / 'first.out'}", f"--chdir={tmp_path}",
            script_args=(*TINY_TRAINING, *NO_TRIAL, "--steps", "100000", "--val-every",
                         "100000", "--checkpoint-every", "10", "--stall-timeout",
                         str(STALL_SECONDS)),
            env=_env(cluster, DATASET=local_dataset, RUN=run), cwd=str(REPO))
        deadline = time.monotonic() + 300
        while len(_logged_steps(run)) < 25:
            assert time.monotonic() < deadline, (tmp_path / "first.out").read_text()
            time.sleep(0.2)
        cluster.power_cut("n1")
        cut = time.monotonic()
        while cluster.job_field(job, "JobState") == "RUNNING" or _training_on(cluster, "n0"):
            assert time.monotonic() - cut < NODE_LOSS_BOUND_SECONDS, cluster.logs()
            time.sleep(0.5)
        ended = time.monotonic() - cut
        state = cluster.job_field(job, "JobState")
        logged = _logged_steps(run)[-1]
        saved = int(re.search(r"(\d+)$", checkpoint.latest(str(run))).group(1))
        cluster.run("scancel", job)  # requeued by Slurm, it would wait for 2 nodes
        cluster.wait(job, timeout=60, states=("CANCELLED", "COMPLETED", "FAILED", "NODE_FAIL"))
        log = tmp_path / "resume.out"
        resumed = cluster.submit(
            str(REPO / "slurm/train.sbatch"), "--nodes=1", "--ntasks-per-node=1",
            f"--output={log}", f"--chdir={tmp_path}",
            script_args=(*TINY_TRAINING, "--steps", str(saved + 15), "--val-every", "100000",
                         "--checkpoint-every", "10"),
            env=_env(cluster, DATASET=local_dataset, RUN=run), cwd=str(REPO))
        final = cluster.wait(resumed, timeout=300)
        output = log.read_text() if log.exists() else "(no output file)"
        first = (tmp_path / "first.out").read_text()
    finally:
        cluster.stop()
    print(f"n1 lost at step {logged}: the job ended ({state}) {ended:.1f} s after the cut; "
          f"resumed on n0 from the checkpoint of step {saved}, redoing {logged - saved} step(s)")
    print("\n".join(line for line in first.splitlines()
                    if re.search(r"srun|stall|error|rainforest:", line)))
    assert final == "COMPLETED", output
    assert re.search(rf"resuming \S+ at step {saved}\b", output), output
    assert f"done: step {saved + 15} on 1 rank(s)" in output, output
    if logged > saved:
        assert f"metrics.jsonl: steps {saved + 1}-{logged} were trained after step {saved}, " \
               "which this run goes on from" in output, output
    assert _logged_steps(run) == list(range(1, saved + 16)), "a step was lost or logged twice"
