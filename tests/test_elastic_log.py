"""The elastic run's log across a lost rank 0, without launching ranks: each step once.

A rank 0 killed after a step's allreduce but before its log line leaves that step trained on
every survivor and missing from ``metrics.jsonl`` (seen in CI: step 35 of 400 missing). The
new rank 0 must write it from the scalars every rank keeps.
"""

from __future__ import annotations

from rainforest import runlog
from rainforest.elastic import SkipLoggedSteps


def _writer(run, rank, recent):
    writer = SkipLoggedSteps(str(run), rank, 2, recent, progress=False, log=print)
    writer.start(0, 10)
    return writer


def _scalars(step):
    return {"loss_bits": 8.0 - step / 10, "grad_norm": 1.0, "learning_rate": 1e-3}


def test_a_new_rank_0_logs_the_steps_its_dead_predecessor_trained_but_did_not_log(tmp_path):
    run = tmp_path / "run"
    old_rank_0, survivor_recent = _writer(run, 0, {}), {}
    survivor = _writer(run, 1, survivor_recent)
    for step in range(1, 6):  # both ranks train 1..5; rank 0 dies before logging step 5
        if step < 5:
            old_rank_0.record(step, _scalars(step))
        survivor.record(step, _scalars(step))
    assert [row["step"] for row in runlog.read_metrics(str(run))] == [1, 2, 3, 4]

    # The survivor committed at step 5 and goes on as rank 0, with the same memory.
    new_rank_0 = _writer(run, 0, survivor_recent)
    for step in (6, 7):
        new_rank_0.record(step, _scalars(step))
    rows = runlog.read_metrics(str(run))
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert rows[4]["loss_bits"] == _scalars(5)["loss_bits"] and rows[4]["ranks"] == 2


def test_steps_repeated_after_a_rollback_are_not_logged_twice(tmp_path):
    run, recent = tmp_path / "run", {}
    writer = _writer(run, 0, recent)
    for step in range(1, 8):
        writer.record(step, _scalars(step))
    again = _writer(run, 0, recent)  # rolled back to the commit at step 5
    for step in range(6, 10):
        again.record(step, _scalars(step))
    assert [row["step"] for row in runlog.read_metrics(str(run))] == list(range(1, 10))
