"""The elastic run's log across a lost rank 0 and a rollback, without launching ranks.

A rank 0 killed after a step's allreduce but before its log line leaves that step trained on
every survivor and missing from ``metrics.jsonl`` (seen in CI: step 35 of 400 missing). The
new rank 0 must write it from the scalars every rank keeps. Steps trained again after a
rollback replace their first records, as a resume from a checkpoint does.
"""

from __future__ import annotations

from rainforest import runlog
from rainforest.elastic import ElasticLog


def _writer(run, rank, recent, first):
    """A membership's log, going on from the commit at step ``first``."""
    writer = ElasticLog(str(run), rank, 2, recent, progress=False, log=print)
    writer.start(first, 10)
    return writer


def _scalars(step, loss=None):
    return {"loss_bits": loss if loss is not None else 8.0 - step / 10, "grad_norm": 1.0,
            "learning_rate": 1e-3}


def test_a_new_rank_0_logs_the_steps_its_dead_predecessor_trained_but_did_not_log(tmp_path):
    run = tmp_path / "run"
    old_rank_0, survivor_recent = _writer(run, 0, {}, 0), {}
    survivor = _writer(run, 1, survivor_recent, 0)
    for step in range(1, 6):  # both ranks train 1..5; rank 0 dies before logging step 5
        if step < 5:
            old_rank_0.record(step, _scalars(step))
        survivor.record(step, _scalars(step))
    assert [row["step"] for row in runlog.read_metrics(str(run))] == [1, 2, 3, 4]

    # The survivor committed at step 5 and goes on as rank 0, with the same memory.
    new_rank_0 = _writer(run, 0, survivor_recent, 5)
    for step in (6, 7):
        new_rank_0.record(step, _scalars(step))
    rows = runlog.read_metrics(str(run))
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert rows[4]["loss_bits"] == _scalars(5)["loss_bits"] and rows[4]["ranks"] == 2


def test_steps_trained_again_after_a_rollback_replace_their_first_records(tmp_path, capsys):
    run, recent = tmp_path / "run", {}
    writer = _writer(run, 0, recent, 0)
    for step in range(1, 8):
        writer.record(step, _scalars(step))
    again = _writer(run, 0, recent, 5)  # rolled back to the commit at step 5
    for step in range(6, 10):
        again.record(step, _scalars(step, loss=1.0))
    rows = runlog.read_metrics(str(run))
    assert [row["step"] for row in rows] == list(range(1, 10))
    assert [row["loss_bits"] for row in rows[5:]] == [1.0] * 4  # the second records
    assert [row["loss_bits"] for row in rows[:5]] == [_scalars(s)["loss_bits"] for s in
                                                      range(1, 6)]
    assert "steps 6-7 were trained after step 5" in capsys.readouterr().out
