"""The Slurm path on a real single-node Slurm (slurmctld + slurmd + munged on 127.0.0.1).

Every ``slurm/*.sbatch`` file is submitted as a user would, unchanged; the settings travel in
environment variables, as the files document. With 2 CPUs a 2-task job fills the node, so the
tests run one after another on one cluster.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile

import audiogen
from conftest import NO_TRIAL, TINY_TRAINING, assert_same_tree, run_cli
from localslurm import LocalSlurm, available
from rainforest import checkpoint
from rainforest.cluster import SlurmSettings
from rainforest.preprocess import preprocess

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent
pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def slurm():
    missing = available()
    if missing:
        pytest.fail(f"a real Slurm is needed: {missing}")
    # KillWait 30 s, as at many sites: a preempted job's ranks get that long to checkpoint.
    cluster = LocalSlurm(cpus=os.cpu_count(), kill_wait=30).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def songs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slurm-songs")
    for genre in ("genre0", "genre1"):
        (folder / genre).mkdir()
    for index in range(6):
        audiogen.write_song(folder / f"genre{index % 2}" / f"song{index}.flac",
                            seconds=1.5 + 0.3 * index, rate=22050 + 11025 * (index % 2),
                            channels=1 + index % 2, leading_silence=0.2, trailing_silence=0.3,
                            freq=200.0 + 50 * index, seed=index)
    return folder


def _env(**values) -> dict:
    # The job runs this interpreter's environment (VENV) and this checkout's rainforest.
    return {"VENV": str(VENV), "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
            **{k: str(v) for k, v in values.items()}}


def _output(path: Path) -> str:
    return path.read_text() if path.exists() else "(no output file)"


def test_preprocess_sbatch_gives_the_dataset_of_a_local_run(slurm, songs, tmp_path):
    out = tmp_path / "from-slurm"
    log = tmp_path / "job.out"
    job = slurm.submit(str(REPO / "slurm/preprocess.sbatch"), "--ntasks=2",
                       "--mem-per-cpu=100M", f"--output={log}", f"--chdir={tmp_path}",
                       env=_env(SONGS=songs, OUT=out, SHARED_TMP=tmp_path))
    assert slurm.wait(job, timeout=300) == "COMPLETED", _output(log)
    assert "preflight: 2 worker(s)" in _output(log)
    preprocess([str(songs)], str(tmp_path / "local"), cluster="local:1", progress=False,
               log=lambda line: None)
    assert_same_tree(out, tmp_path / "local")
    assert not list(tmp_path.glob(".rainforest-dask-*.json")), "scheduler file left behind"


@pytest.fixture(scope="module")
def slurm_dataset(songs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("slurm-data") / "dataset"
    preprocess([str(songs)], str(out), cluster="sync", labels="parent", progress=False,
               log=lambda line: None)
    return out


def _metrics(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


TRAIN = [*TINY_TRAINING, "--val-fraction", "0.34", "--val-every", "50"]


def _submit_training(slurm, run: Path, log: Path, dataset: Path, *options: str,
                     launcher: str = "srun") -> str:
    return slurm.submit(str(REPO / "slurm/train.sbatch"), "--ntasks-per-node=2",
                        f"--output={log}", f"--chdir={run.parent}", script_args=options,
                        env=_env(DATASET=dataset, RUN=run, LAUNCHER=launcher))


@pytest.mark.parametrize("launcher", ["srun", "mpirun", "horovodrun"])
def test_train_sbatch_trains_on_two_ranks(launcher, slurm, slurm_dataset, tmp_path):
    run, log = tmp_path / "run", tmp_path / "job.out"
    job = _submit_training(slurm, run, log, slurm_dataset, *TRAIN, "--steps", "6",
                           launcher=launcher)
    assert slurm.wait(job, timeout=400) == "COMPLETED", _output(log)
    assert "done: step 6 on 2 rank(s)" in _output(log)
    saved = checkpoint.read_config(checkpoint.latest(str(run)))
    assert saved["step"] == 6 and saved["data"]["ranks"] == 2


def _wait_for_steps(run: Path, count: int, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").exists() and len(_metrics(run)) >= count:
            return
        time.sleep(0.2)
    raise TimeoutError(f"training did not reach step {count}:\n{_output(log)}")


def test_a_preempted_train_job_is_requeued_and_loses_no_step(slurm, slurm_dataset, tmp_path):
    """Preemption as Slurm signals it (``scancel -b --signal=TERM``, then a requeue);
    ``scontrol requeue`` of a running job is tests/test_multinode.py's, on two nodes."""
    run, log = tmp_path / "run", tmp_path / "job.out"
    steps = 300
    # No periodic checkpoint: only the one written on SIGTERM can carry the run over.
    job = _submit_training(slurm, run, log, slurm_dataset, *TRAIN, *NO_TRIAL, "--steps",
                           str(steps), "--checkpoint-every", "100000")
    _wait_for_steps(run, 20, timeout=300, log=log)
    slurm.run("scancel", "-b", "--signal=TERM", job)
    assert slurm.wait(job, timeout=600) == "COMPLETED", _output(log)
    assert slurm.job_field(job, "Restarts") == "1", _output(log)
    text = _output(log)
    assert "start 1," in text and "resuming" in text, text
    assert _metrics(run) == list(range(1, steps + 1)), "a step was lost or repeated"
    assert checkpoint.read_config(checkpoint.latest(str(run)))["step"] == steps


def test_generate_sbatch_writes_a_wav(slurm, slurm_dataset, tmp_path):
    run, log = tmp_path / "run", tmp_path / "train.out"
    job = _submit_training(slurm, run, log, slurm_dataset, *TRAIN, "--steps", "2", "--condition")
    assert slurm.wait(job, timeout=400) == "COMPLETED", _output(log)
    out, log = tmp_path / "songs", tmp_path / "generate.out"
    job = slurm.submit(str(REPO / "slurm/generate.sbatch"), "--cpus-per-task=2",
                       f"--output={log}", f"--chdir={tmp_path}", script_args=(
                           "--seconds", "0.25", "--streams", "2", "--label", "genre1"),
                       env=_env(RUN=run, OUT=out))
    assert slurm.wait(job, timeout=300) == "COMPLETED", _output(log)
    for stream in range(2):
        info = soundfile.info(str(out / f"stream-{stream:03d}.wav"))
        assert (info.samplerate, info.frames, info.subtype) == (16000, 4000, "PCM_16")


def test_cluster_slurm_runs_through_worker_jobs_that_slurm_started(slurm, songs, tmp_path):
    out, recorded = tmp_path / "dataset", tmp_path / "tasks"
    recorded.mkdir()
    # Each worker records the tasks it ran (tests/task_recorder.py, a Dask worker preload).
    env = {**slurm.env, **_env(), "TASK_RECORDER_DIR": str(recorded),
           "TASK_RECORDER_WORKERS": "2", "DASK_DISTRIBUTED__WORKER__PRELOAD":
           repr([str(Path(__file__).with_name("task_recorder.py"))])}
    result = run_cli("preprocess", songs, "--out", out, "--cluster", "slurm", "--no-progress",
                     "--songs-per-shard", "1",
                     "--slurm-cores", "1", "--slurm-memory", "500MB", "--slurm-interface", "lo",
                     "--slurm-walltime", "00:10:00", "--slurm-min-jobs", "2",
                     "--slurm-max-jobs", "2", f"--slurm-directive=--chdir={tmp_path}",
                     env=env, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "preflight:" in result.stdout
    jobs = slurm.run("sacct", "-c", "-n", "-P", "-o", "JobID,JobName,NodeList").stdout
    workers = {line.split("|")[0] for line in jobs.splitlines()
               if line.split("|")[1:] == ["dask-worker", "localhost"]}
    assert len(workers) == 2, jobs
    # The shards (one song each) each worker job built: the partitions of the bag it ran.
    shards_by_job = {job: {int(found) for found in re.findall(
        r"process-[0-9a-f]+', (\d+)\)", (recorded / f"{job}.tasks").read_text()
        if (recorded / f"{job}.tasks").exists() else "")} for job in workers}
    assert all(shards_by_job.values()), shards_by_job  # each worker job built shards
    assert set().union(*shards_by_job.values()) == set(range(len(list(songs.rglob("*.flac")))))
    preprocess([str(songs)], str(tmp_path / "local"), cluster="sync", songs_per_shard=1,
               progress=False, log=lambda line: None)
    assert_same_tree(out, tmp_path / "local")


def test_slurm_worker_job_script_carries_the_settings():
    from dask_jobqueue import SLURMCluster

    settings = SlurmSettings(queue="short", account="music", cores=2, memory="1GB",
                             walltime="00:30:00", directives=("--constraint=avx512",),
                             skip_directives=("--mem",), prologue=("module load python/3.11",),
                             interface="lo", lifetime="25m")
    with SLURMCluster(**settings.cluster_arguments()) as cluster:
        script = cluster.job_script()
    lines = script.splitlines()
    for expected in ("#SBATCH -p short", "#SBATCH -A music", "#SBATCH --cpus-per-task=2",
                     "#SBATCH -t 00:30:00", "#SBATCH --constraint=avx512",
                     "module load python/3.11"):
        assert expected in lines, (expected, script)
    assert not [line for line in lines if line.startswith("#SBATCH --mem")], script
    command = lines[-1]
    assert command.startswith(sys.executable)
    assert "--nworkers 2" in command and "--nthreads 1" in command
    assert "--lifetime 25m" in command and "--interface lo" in command


SBATCH = sorted((REPO / "slurm").glob("*.sbatch"))


@pytest.mark.parametrize("script", SBATCH, ids=[p.name for p in SBATCH])
def test_sbatch_files_parse_and_document_their_settings(script):
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "#SBATCH --job-name=rainforest-" in text and "#SBATCH --output=" in text
    header = "\n".join(line for line in text.splitlines()[1:] if line.startswith("# "))
    read = set(re.findall(r"\$\{([A-Z_]+)[:}]", text))
    assert read - {v for v in read if v.startswith("SLURM_")}, "reads no settings?"
    for variable in read:
        if not variable.startswith("SLURM_"):
            assert variable in header, (script.name, variable)


def test_train_sbatch_requeues_and_hands_the_time_limit_signal_to_its_shell():
    text = (REPO / "slurm/train.sbatch").read_text()
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:TERM@120", "#SBATCH --open-mode=append"):
        assert line in text.splitlines()
    assert "--resume-if-any" in text and "trap on_term TERM" in text


def test_cluster_slurm_without_a_controller_says_what_slurm_said(songs, tmp_path):
    """A Slurm whose controller is not running (a configuration, no daemons): the refusal
    quotes sinfo's and scontrol's own words instead of a guess about network interfaces."""
    cluster = LocalSlurm(cpus=2)  # written, never started
    try:
        result = run_cli("preprocess", songs, "--out", tmp_path / "data", "--cluster", "slurm",
                         "--no-progress", env=cluster.env, check=False, timeout=120)
    finally:
        cluster.stop()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "`sinfo -h -N -o %o` failed: slurm_load_partitions: Unable to contact slurm " \
           "controller" in result.stderr, result.stderr
    assert "`scontrol show config` failed" in result.stderr, result.stderr
    assert not (tmp_path / "data").exists()
