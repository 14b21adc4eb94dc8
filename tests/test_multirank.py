"""Training dynamics on real Horovod ranks (horovodrun --gloo on localhost).

The learning rate scaled by the rank count, the metric averaged over ranks, SIGTERM sent to
one rank only, ``--time-limit``, and resuming with a different number of ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from conftest import NO_TRIAL, RAINFOREST, TINY_TRAINING
from rainforest import checkpoint

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = str(Path(__file__).with_name("multirank_worker.py"))
BIN = os.path.dirname(sys.executable)
TWO_RANKS = [os.path.join(BIN, "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo"]
LR, WARMUP = 3e-3, 5  # what TINY_TRAINING sets


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def _run(*command, ranks=2) -> subprocess.CompletedProcess:
    prefix = TWO_RANKS if ranks == 2 else []
    result = subprocess.run([*prefix, *map(str, command)], capture_output=True, text=True,
                            env=_env(), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _train(dataset, run, *extra, ranks):
    return _run(*RAINFOREST, "train", dataset, "--run", run, *TINY_TRAINING, "--val-every",
                "0", *extra, ranks=ranks)


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def _only_checkpoint(run) -> dict:
    """The config of a run's one and only checkpoint, checked against its sha256s."""
    folders = checkpoint.list_checkpoints(str(run))
    assert len(folders) == 1, folders
    assert checkpoint.latest(str(run)) == folders[0]
    assert not [p for p in (Path(run) / "checkpoints").iterdir() if ".tmp-" in p.name]
    config = checkpoint.read_config(folders[0])
    checkpoint.verify(folders[0], config)
    return config


# --- one step of a Trainer on chosen batches --------------------------------------------


@pytest.fixture(scope="module")
def dynamics(tmp_path_factory):
    """The step of ``multirank_worker.py dynamics`` on one rank and on two ranks."""
    reports = {}
    for ranks in (1, 2):
        out = tmp_path_factory.mktemp(f"dynamics{ranks}")
        _run(sys.executable, WORKER, "dynamics", out, ranks=ranks)
        reports[ranks] = [json.loads((out / f"rank-{r}.json").read_text())
                          for r in range(ranks)]
    return reports


def test_the_loss_of_a_step_is_the_mean_of_the_ranks_losses(dynamics):
    [alone] = dynamics[1]
    loss_a, loss_b = alone["local_losses"]
    assert alone["loss"] == pytest.approx(loss_a, rel=1e-6)
    # The premise: the two batches' losses differ far more than the tolerance below.
    assert abs(loss_a - loss_b) > 1e-3
    for report in dynamics[2]:  # rank 0 stepped on batch A, rank 1 on batch B
        assert report["size"] == 2
        assert report["loss"] == pytest.approx((loss_a + loss_b) / 2, rel=2e-6, abs=0)


def test_the_learning_rate_is_scaled_by_the_ranks_after_warm_up(dynamics):
    # Without warm-up the first step already uses lr x ranks, and Adam's first update moves
    # every weight whose gradient is not tiny by exactly the rate.
    from multirank_worker import LEARNING_RATE

    [alone] = dynamics[1]
    assert alone["max_update"] == pytest.approx(LEARNING_RATE, rel=2e-3)
    for report in dynamics[2]:
        assert report["max_update"] == pytest.approx(2 * LEARNING_RATE, rel=2e-3)


# --- the train command on two ranks, then resumed on one and on two -----------------------


@pytest.fixture(scope="module")
def two_rank_run(periodic_dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("two-ranks") / "run"
    _train(periodic_dataset, run, "--steps", "12", "--checkpoint-every", "12", ranks=2)
    return run


def test_the_logged_and_applied_learning_rate_doubles_after_warm_up(two_rank_run):
    rows = _metrics(two_rank_run)
    assert [r["step"] for r in rows] == list(range(1, 13))
    expected = [LR * (1 + min(1.0, k / WARMUP)) for k in range(12)]  # step k+1 uses rate k
    assert [r["learning_rate"] for r in rows] == pytest.approx(expected, rel=1e-9)
    assert rows[-1]["learning_rate"] == pytest.approx(2 * LR)
    config = _only_checkpoint(two_rank_run)
    assert config["data"]["ranks"] == 2
    assert config["optimizer"]["learning_rate"] == pytest.approx(2 * LR)
    # The rate the optimizer itself last used, as saved with its state.
    folder = checkpoint.latest(str(two_rank_run))
    with h5py.File(Path(folder) / checkpoint.OPTIMIZER_NAME, "r") as handle:
        rates = [handle[k][()] for k in handle if handle[k].attrs["name"] == "adam/learning_rate"]
    assert rates == [pytest.approx(2 * LR, rel=1e-6)]


def _assert_loss_continues(rows, resumed_from):
    """The first resumed losses sit near the last ones before, far from the starting loss."""
    before = [r["loss_bits"] for r in rows if r["step"] <= resumed_from]
    after = [r["loss_bits"] for r in rows if r["step"] > resumed_from][:2]
    start, recent = before[0], sum(before[-3:]) / 3
    assert start - recent > 0.3, (start, recent)  # the premise: training had got somewhere
    assert after
    for loss in after:
        assert abs(loss - recent) < (start - recent) / 3, (start, recent, after)


@pytest.fixture(scope="module")
def resumed_on_one_rank(periodic_dataset, two_rank_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("resumed") / "run"
    shutil.copytree(two_rank_run, run)
    result = _train(periodic_dataset, run, "--resume", "--steps", "16", ranks=1)
    return run, result.stdout


def test_resume_from_two_ranks_on_one_continues(resumed_on_one_rank):
    run, stdout = resumed_on_one_rank
    assert "resuming" in stdout and "at step 12" in stdout
    assert "written by 2 rank(s) and this run has 1" in stdout
    assert "done: step 16 on 1 rank(s)" in stdout
    rows = _metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 17))
    _assert_loss_continues(rows, 12)
    assert [r["learning_rate"] for r in rows[12:]] == pytest.approx([LR] * 4)  # 1 rank: lr
    config = checkpoint.read_config(checkpoint.latest(str(run)))
    assert (config["step"], config["data"]["ranks"], config["data"]["next_step"]) == (16, 1, 16)


# --- stopping: SIGTERM to one rank, and --time-limit --------------------------------------


def _start_worker(out: Path, dataset, run, *extra) -> subprocess.Popen:
    """``rainforest train`` on two ranks for (nearly) ever, each rank reporting its end."""
    out.mkdir()
    command = [*TWO_RANKS, sys.executable, WORKER, "cli", str(out), "train", str(dataset),
               "--run", str(run), *TINY_TRAINING, *NO_TRIAL, "--steps", "100000",
               "--checkpoint-every", "100000", "--val-every", "0", "--log-every", "1", *extra]
    with open(out / "stdout", "w") as stdout, open(out / "stderr", "w") as stderr:
        # A session of its own, so that a test that times out can end all of its processes.
        return subprocess.Popen(command, stdout=stdout, stderr=stderr, env=_env(),
                                start_new_session=True)


def _finish(process, out: Path) -> tuple[list[dict], str]:
    try:
        process.wait(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # horovodrun and both ranks
        process.wait()
        raise
    stdout = (out / "stdout").read_text()
    assert process.returncode == 0, stdout[-3000:] + (out / "stderr").read_text()[-3000:]
    results = [json.loads((out / f"result-{r}.json").read_text()) for r in range(2)]
    assert [r["exit_status"] for r in results] == [0, 0]
    return results, stdout


def _assert_stopped_together(results, run, stdout, *, first=0) -> int:
    """Every rank stopped after the same step, and exactly one checkpoint was added for it."""
    steps = {r["step"] for r in results}
    assert len(steps) == 1, results
    [step] = steps
    assert first < step < 100000
    earlier = [f for f in checkpoint.list_checkpoints(str(run))
               if int(os.path.basename(f).split("-")[1]) <= first]
    folders = checkpoint.list_checkpoints(str(run))
    assert [os.path.basename(f) for f in folders] == [
        *map(os.path.basename, earlier), checkpoint.step_name(step)]
    assert checkpoint.latest(str(run)) == folders[-1]
    assert not [p for p in (Path(run) / "checkpoints").iterdir() if ".tmp-" in p.name]
    config = checkpoint.read_config(folders[-1])
    checkpoint.verify(folders[-1], config)
    assert config["step"] == config["data"]["next_step"] == step
    assert [r["step"] for r in _metrics(run)] == list(range(1, step + 1))
    assert stdout.count(f"at step {step}; checkpoint written") == 1  # rank 0 alone says so
    return step


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(periodic_dataset, tmp_path):
    out, run = tmp_path / "out", tmp_path / "run"
    process = _start_worker(out, periodic_dataset, run)
    deadline = time.monotonic() + 300
    metrics = run / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert process.poll() is None, (out / "stderr").read_text()[-3000:]
        assert time.monotonic() < deadline, "training did not reach step 3"
        time.sleep(0.2)
    os.kill(int((out / "pid-1").read_text()), signal.SIGTERM)  # rank 1 only, not the writer
    results, stdout = _finish(process, out)
    step = _assert_stopped_together(results, run, stdout)
    assert step >= 3
    assert [r["stopped_by"] for r in results] == ["another rank", "SIGTERM"]
    assert f"stopped by another rank at step {step}" in stdout


def test_time_limit_on_two_ranks_resumed_from_one(periodic_dataset, resumed_on_one_rank,
                                                  tmp_path):
    out, run = tmp_path / "out", tmp_path / "run"
    shutil.copytree(resumed_on_one_rank[0], run)
    process = _start_worker(out, periodic_dataset, run, "--resume", "--time-limit", "0.05")
    results, stdout = _finish(process, out)  # 0.05 minutes: 3 s
    assert "written by 1 rank(s) and this run has 2" in stdout
    step = _assert_stopped_together(results, run, stdout, first=16)
    reasons = [r["stopped_by"] for r in results]
    assert set(reasons) <= {"the time limit", "another rank"} and "the time limit" in reasons
    rows = _metrics(run)
    _assert_loss_continues(rows, 16)
    assert [r["learning_rate"] for r in rows[16:]] == pytest.approx([2 * LR] * (step - 16))
    assert checkpoint.read_config(checkpoint.latest(str(run)))["data"]["ranks"] == 2
