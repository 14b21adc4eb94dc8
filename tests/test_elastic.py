"""Lost ranks, for real: SIGKILL a Horovod rank in the middle of training.

With ``--elastic`` (2 local Gloo ranks, one host name per slot, a discovery script over a
hosts file) the survivor rolls back to the last commit and goes on alone, and a rank joins
again when its host is listed again. Without ``--elastic`` the launcher ends the job promptly
and ``--resume`` continues from the last checkpoint.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import NO_TRIAL, TINY_TRAINING, checkpoint_digest, rank_env, write_hosts
from rainforest import checkpoint, runlog
from rainforest.elastic import last_logged_step
from rainforest.train import TrainingState

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
BIN = os.path.dirname(sys.executable)
COMMIT_EVERY = 5
#: Generous: a loaded 2-core machine starts two TensorFlow ranks in well under this.
STARTUP_TIMEOUT = 240
#: The bound this project states for a non-elastic job to end after a lost rank.
LOST_RANK_EXIT_BOUND = 60
#: Seconds a rank waits at a rendezvous for the others (elastic-local.sh's default is 10): a
#: rank joining on a loaded machine needs longer to import TensorFlow and reach it. A lost
#: rank is still noticed at once (its connections reset).
GLOO_TIMEOUT = 90
#: Steps the two ranks train together after a rejoin before the test stops the job.
TOGETHER_STEPS = 10




class Job:
    """A launcher process whose output lines are collected, with arrival times, as they come."""

    def __init__(self, command: list[str], **env) -> None:
        self.lines: list[tuple[float, str]] = []
        self.process = subprocess.Popen(
            [str(c) for c in command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env={**rank_env(), **env}, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait_for(self, what: str, predicate, timeout: float):
        """Poll ``predicate()`` until it is truthy; fail naming ``what`` on timeout or exit."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.process.poll() is not None:
                pytest.fail(f"the job ended ({self.process.returncode}) before {what}:\n"
                            f"{self.output[-4000:]}")
            time.sleep(0.2)
        pytest.fail(f"no {what} within {timeout} s:\n{self.output[-4000:]}")

    def line_matching(self, pattern: str, after: float = 0.0):
        for when, line in self.lines:
            match = re.search(pattern, line)
            if match and when >= after:
                return when, match
        return None

    def ranks(self) -> list[psutil.Process]:
        """This job's training processes (never another test's)."""
        found = []
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if "rainforest" in " ".join(child.cmdline()) and "train" in child.cmdline():
                    found.append(child)
            except psutil.NoSuchProcess:
                continue
        return found

    def rank_where(self, **expected) -> psutil.Process:
        for process in self.ranks():
            try:
                environ = process.environ()
            except psutil.NoSuchProcess:
                continue
            if all(environ.get(k) == v for k, v in expected.items()):
                return process
        return None

    def finish(self, timeout: float) -> int:
        try:
            code = self.process.wait(timeout)
            self._reader.join(30)  # every line it wrote, read
            return code
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the job did not end within {timeout} s:\n{self.output[-4000:]}")

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)


@pytest.fixture
def jobs():
    started: list[Job] = []
    yield started
    for job in started:
        job.kill()


def _steps(run: Path) -> list[int]:
    return [int(row["step"]) for row in runlog.read_metrics(str(run))]


def test_elastic_training_survives_a_killed_rank_and_takes_it_back(periodic_dataset, tmp_path,
                                                                   jobs):
    # Open-ended: the job runs until the test stops it, so no fixed budget of steps races
    # the rejoin.
    run, hosts = tmp_path / "run", tmp_path / "hosts"
    write_hosts(hosts, "localhost", "127.0.0.1")
    job = Job([ROOT / "launch" / "elastic-local.sh", hosts, periodic_dataset, "--run", run,
               *TINY_TRAINING, "--target-length", "1024", "--steps", 1_000_000,
               "--commit-every", COMMIT_EVERY, "--checkpoint-every", 100, "--log-every", 1,
               "--val-every", 200], COOLDOWN="1 2", GLOO_TIMEOUT=str(GLOO_TIMEOUT))
    jobs.append(job)
    job.wait_for("2 ranks training", lambda: last_logged_step(str(run)) >= 6 * COMMIT_EVERY + 2,
                 STARTUP_TIMEOUT)

    # SIGKILL rank 0 (it writes the logs and checkpoints) and take its host off the list for
    # now: the survivor becomes rank 0.
    victim = job.rank_where(HOROVOD_RANK="0")
    assert victim is not None, [p.environ().get("HOROVOD_RANK") for p in job.ranks()]
    host = victim.environ()["HOROVOD_HOSTNAME"]
    other = {"localhost": "127.0.0.1", "127.0.0.1": "localhost"}[host]
    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    write_hosts(hosts, other)
    resumed_at, match = job.wait_for("the survivor going on", lambda: job.line_matching(
        r"elastic: 1 rank\(s\), training from step (\d+) .* (\d+) step\(s\) after it",
        after=killed_at), 120)
    rolled_back_to, repeated = int(match.group(1)), int(match.group(2))
    assert rolled_back_to % COMMIT_EVERY == 0 and rolled_back_to >= 6 * COMMIT_EVERY
    assert 0 <= repeated < COMMIT_EVERY  # no more is lost than the last commit allows
    job.wait_for("steps on 1 rank", lambda: any(
        row.get("ranks") == 1 for row in runlog.read_metrics(str(run))), 120)

    write_hosts(hosts, other, host)
    rejoined_at, match = job.wait_for("the rank re-joining", lambda: job.line_matching(
        r"elastic: 2 rank\(s\), training from step (\d+)", after=resumed_at), 180)
    joined_from = int(match.group(1))
    job.wait_for(f"{TOGETHER_STEPS} steps on 2 ranks after the rejoin", lambda: sum(
        row.get("ranks") == 2 and row["step"] > joined_from
        for row in runlog.read_metrics(str(run))) >= TOGETHER_STEPS, 180)
    # SIGTERM to the joiner only (rank 1 now; the survivor became rank 0, so the ranks that
    # processes started with no longer tell): the ranks agree on the step to stop at (an
    # allreduce of the request), S, so rank 0 stops there too, writes a checkpoint and both
    # end cleanly.
    assert len(job.ranks()) == 2, job.ranks()
    job.rank_where(HOROVOD_HOSTNAME=host).send_signal(signal.SIGTERM)
    assert job.finish(STARTUP_TIMEOUT) == 0, job.output[-4000:]
    stop = job.line_matching(r"stopped by another rank at step (\d+)")
    assert stop, job.output[-4000:]
    steps = int(stop[1].group(1))
    assert steps >= joined_from + TOGETHER_STEPS
    assert "Process 0 exit with status code 137" in job.output  # horovodrun saw rank 0 die
    print(f"\nrank loss: training went on {resumed_at - killed_at:.2f} s after the SIGKILL, "
          f"from step {rolled_back_to} (steps repeated: {repeated}, commit "
          f"every {COMMIT_EVERY}); back at 2 ranks {rejoined_at - killed_at:.1f} s after it, "
          f"at step {joined_from}")

    assert f"done: step {steps} on 2 rank(s)" in job.output
    rows = runlog.read_metrics(str(run))
    assert _steps(run) == list(range(1, steps + 1))  # every step once, never backwards
    ranks = [row["ranks"] for row in rows]
    first_alone = ranks.index(1)
    # The steps trained again after the rollback replace their first records.
    assert first_alone == rolled_back_to, ranks
    assert set(ranks[:first_alone]) == {2} and ranks[-1] == 2
    # A join costs nothing: the survivor trains alone up to the commit that takes the joiner
    # in, and the two go on from the step after it.
    assert joined_from % COMMIT_EVERY == 0
    assert set(ranks[first_alone:joined_from]) == {1} and set(ranks[joined_from:]) == {2}
    # The learning rate follows the number of ranks (warm-up is 5 steps, --lr 3e-3).
    assert all(row["learning_rate"] == pytest.approx(3e-3 * row["ranks"]) for row in rows[5:])
    # The songs were dealt out again: alone, the survivor trains on all of them.
    alone = job.line_matching(r"elastic: 1 rank.*rank 0 trains on (\d+) of (\d+) songs")[1]
    together = job.line_matching(r"elastic: 2 rank.*rank 0 trains on (\d+) of (\d+) songs",
                                 after=resumed_at)[1]
    assert alone.group(1) == alone.group(2) == together.group(2) == "4"
    assert together.group(1) == "2"
    digests = {m.group(1): m.group(2) for m in re.finditer(
        rf"rank (\d)/2: step {steps}, weights sha256 (\w+)", job.output)}
    assert set(digests) == {"0", "1"} and len(set(digests.values())) == 1, digests
    final = checkpoint.latest(str(run))
    assert checkpoint.read_config(final)["step"] == steps
    assert checkpoint_digest(final) == digests["0"]
    # Adam counts the updates it applied: none twice, none dropped, across kill and join.
    optimizer = dict(checkpoint.load_arrays(os.path.join(final, checkpoint.OPTIMIZER_NAME)))
    assert int(optimizer["adam/iteration"]) == steps


LAUNCHERS = {
    "horovodrun-gloo": [os.path.join(BIN, "horovodrun"), "-np", "2", "-H", "localhost:2",
                        "--gloo"],
    "horovodrun-mpi": [os.path.join(BIN, "horovodrun"), "-np", "2", "-H", "localhost:2",
                       "--mpi"],
}


def _rank_one(job: Job):
    return job.rank_where(HOROVOD_RANK="1") or job.rank_where(OMPI_COMM_WORLD_RANK="1")


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_without_elastic_a_lost_rank_ends_the_job_promptly_and_resume_continues(
        launcher, periodic_dataset, tmp_path, jobs):
    run = tmp_path / "run"
    job = Job([*LAUNCHERS[launcher], sys.executable, "-m", "rainforest.cli", "train",
               periodic_dataset, "--run", run, *TINY_TRAINING, *NO_TRIAL, "--target-length",
               "1024", "--steps", 100_000, "--checkpoint-every", 20, "--log-every", 1,
               "--val-every", 100_000])
    jobs.append(job)
    job.wait_for("a checkpoint and steps after it", lambda: checkpoint.list_checkpoints(str(run))
                 and last_logged_step(str(run)) >= 25, STARTUP_TIMEOUT)
    victim = job.wait_for("rank 1's process", lambda: _rank_one(job), 30)
    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    code = job.finish(LOST_RANK_EXIT_BOUND)
    took = time.monotonic() - killed_at
    print(f"\n{launcher}: exit {code} {took:.1f} s after rank 1 was SIGKILLed")
    assert code != 0

    state = TrainingState.from_checkpoint(checkpoint.latest(str(run)))  # checks its sha256s
    assert state.step % 20 == 0 and state.step >= 20
    before = runlog.read_metrics(str(run))
    resumed = subprocess.run(
        [sys.executable, "-m", "rainforest.cli", "train", str(periodic_dataset), "--run",
         str(run), "--resume", "--steps", str(state.step + 5), "--no-progress"],
        capture_output=True, text=True, env=rank_env(), timeout=STARTUP_TIMEOUT)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"resuming {state.resumed_from} at step {state.step}" in resumed.stdout
    # Steps logged after the checkpoint were lost with the job: their records go, and the
    # steps are trained again, so the file holds each step once.
    rows = runlog.read_metrics(str(run))
    assert [row["step"] for row in rows] == list(range(1, state.step + 6))
    assert rows[:state.step] == before[:state.step]
    if before[-1]["step"] > state.step:
        assert f"were trained after step {state.step}, which this run goes on from" \
            in resumed.stdout
    after = rows[state.step:]
    # The curve continues from the checkpoint's level, far below a fresh model's first loss.
    fresh, at_checkpoint = before[0]["loss_bits"], before[state.step - 1]["loss_bits"]
    assert after[0]["loss_bits"] < (fresh + at_checkpoint) / 2, (fresh, at_checkpoint, after[0])


def test_without_elastic_a_hung_rank_is_ended_by_the_stall_watchdog(periodic_dataset, tmp_path,
                                                                    jobs):
    # MPI collectives have no timeout: without the watchdog this job waits forever (measured:
    # still running 100 s after the SIGSTOP).
    run, stall = tmp_path / "run", 15
    job = Job([*LAUNCHERS["horovodrun-mpi"], sys.executable, "-m", "rainforest.cli", "train",
               periodic_dataset, "--run", run, *TINY_TRAINING, *NO_TRIAL, "--steps", 100_000,
               "--checkpoint-every", 20, "--log-every", 1, "--val-every", 100_000,
               "--stall-timeout", stall])
    jobs.append(job)
    job.wait_for("a checkpoint", lambda: checkpoint.list_checkpoints(str(run)), STARTUP_TIMEOUT)
    # Stop rank 0, the coordinator: only the other rank's watchdog can notice.
    victim = job.wait_for("rank 0's process", lambda: job.rank_where(
        OMPI_COMM_WORLD_RANK="0"), 30)
    stopped_at = time.monotonic()
    victim.send_signal(signal.SIGSTOP)
    code = job.finish(stall + LOST_RANK_EXIT_BOUND)
    took = time.monotonic() - stopped_at
    print(f"\nhung rank 0 under horovodrun --mpi: exit {code} {took:.1f} s after SIGSTOP "
          f"(--stall-timeout {stall})")
    assert code != 0 and took >= stall
    assert f"no training step finished on this rank in {stall} s" in job.output
    TrainingState.from_checkpoint(checkpoint.latest(str(run)))  # still valid (sha256s)


def test_discover_hosts_prints_the_hosts_file_as_horovod_reads_it(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# the cluster\nnode1:4\n\n  node2  # no slots given\nnode3:2")
    result = subprocess.run([ROOT / "launch" / "discover-hosts.sh", hosts], capture_output=True,
                            text=True, check=True)
    assert result.stdout.split() == ["node1:4", "node2:1", "node3:2"]
    missing = subprocess.run([ROOT / "launch" / "discover-hosts.sh", tmp_path / "none"],
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "cannot read" in missing.stderr


@pytest.mark.slurm
def test_slurm_discovery_leaves_out_a_node_slurm_drains_and_excluded_ones(tmp_path):
    from localslurm import LocalSlurm, available

    missing = available()
    if missing:
        pytest.fail(f"a real Slurm is needed: {missing}")
    excluded = tmp_path / "excluded"
    excluded.write_text("localhost\n")
    discover = ROOT / "launch" / "slurm-discover.sh"
    # The job drains its own node with Slurm, as an administrator would, and resumes it.
    script = tmp_path / "discover.sbatch"
    script.write_text(
        f"#!/bin/bash\n{discover} > {tmp_path}/all.txt\n"
        "scontrol update NodeName=localhost State=DRAIN Reason=drill\n"
        f"sinfo -h -N -o '%N %T' > {tmp_path}/state.txt\n"
        f"{discover} > {tmp_path}/drained.txt\n"
        "scontrol update NodeName=localhost State=RESUME\n"
        f"{discover} > {tmp_path}/resumed.txt\n"
        f"SLURM_DISCOVER_EXCLUDE={excluded} {discover} > {tmp_path}/excluded.txt\n")
    cluster = LocalSlurm(cpus=2).start()
    try:
        job = cluster.submit(str(script), "--ntasks=2", f"--output={tmp_path}/job.out")
        assert cluster.wait(job, 120) == "COMPLETED", (tmp_path / "job.out").read_text()
    finally:
        cluster.stop()
    assert (tmp_path / "all.txt").read_text().split() == ["localhost:2"]
    assert "drain" in (tmp_path / "state.txt").read_text().lower()  # Slurm really drained it
    assert (tmp_path / "drained.txt").read_text() == ""
    assert (tmp_path / "resumed.txt").read_text().split() == ["localhost:2"]
    assert (tmp_path / "excluded.txt").read_text() == ""


def test_stall_watchdog_waits_for_the_first_step_then_ends_a_stalled_process():
    script = (
        "import sys, time\n"
        "from rainforest.watchdog import arm_watchdog\n"
        "dog = arm_watchdog(0.5)\n"
        "time.sleep(2)  # the first step (graph tracing) may take long: not counted\n"
        "print('alive after the first step', flush=True)\n"
        "dog.beat()\n"
        "time.sleep(10)\n"
        "print('not ended', flush=True)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=rank_env(), timeout=60)
    assert result.returncode == 124, result.stdout + result.stderr
    assert result.stdout.split("\n")[:1] == ["alive after the first step"]
    assert "not ended" not in result.stdout
    assert "no training step finished on this rank in 0.5 s" in result.stderr
