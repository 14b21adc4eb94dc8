"""``metrics.jsonl``: nothing in it is dropped or skipped without a word.

A torn last line is what a crash leaves, and is expected; any other line that is not a record
is reported with its line number, and a rewrite moves it to ``metrics.rejected.jsonl`` instead
of deleting it. The reader is fuzzed with Hypothesis: whatever the bytes, it returns records or
reports lines, and never raises.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import TINY_TRAINING, run_cli, tree_entries
from rainforest import runlog
from rainforest.runlog import METRICS_NAME, REJECTED_NAME, MetricsWarning


def _line(step: int, **scalars) -> str:
    """A record as RankZeroLog writes it."""
    return json.dumps({"step": step, "time": 1.5, "loss_bits": 8.0 - step / 10, **scalars})


def _read(run) -> tuple[list[int], list[str]]:
    """The steps read, and the warnings given while reading them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        steps = [row["step"] for row in runlog.read_metrics(str(run))]
    return steps, [str(w.message) for w in caught if w.category is MetricsWarning]


def test_a_torn_last_line_is_skipped_quietly(tmp_path):
    (tmp_path / METRICS_NAME).write_text(_line(1) + "\n" + _line(2) + '\n{"step": 3, "lo')
    assert _read(tmp_path) == ([1, 2], [])


@pytest.mark.parametrize("bad", ['{"step": 2, "loss_bits": 7', "garbage", '["step", 2]',
                                 '{"step": "two"}', '{"step": 2, "note": "text"}',
                                 '{"loss_bits": 1.0}', '{"step": -1}', '{"step": true}'])
def test_a_line_that_is_not_a_record_is_reported_with_its_number(tmp_path, bad):
    (tmp_path / METRICS_NAME).write_text(f"{_line(1)}\n{bad}\n{_line(3)}\n")
    steps, said = _read(tmp_path)
    assert steps == [1, 3]
    assert len(said) == 1 and "1 line(s) are not records" in said[0] and "line 2:" in said[0]
    assert str(tmp_path / METRICS_NAME) in said[0]


def test_a_bad_last_line_with_its_newline_is_not_a_torn_one(tmp_path):
    (tmp_path / METRICS_NAME).write_text(f"{_line(1)}\n{{broken\n")
    assert _read(tmp_path)[1] and "line 2:" in _read(tmp_path)[1][0]


def test_forgetting_steps_moves_bad_and_torn_lines_aside_and_says_so(tmp_path):
    """A job lost after its checkpoint of step 3 had logged steps 4 and 5, a damaged line in
    the middle and a torn one at the end: the resume forgets 4 and 5 (trained again), and the
    two other lines move to metrics.rejected.jsonl, never deleted."""
    metrics = tmp_path / METRICS_NAME
    rows = [_line(step) for step in range(1, 6)]
    metrics.write_text("\n".join(rows[:2]) + "\nnot json\n" + "\n".join(rows[2:]) +
                       '\n{"step": 6, "loss_')
    said = []
    assert runlog.forget_steps_after(str(tmp_path), 3, log=said.append) == [4, 5]
    assert metrics.read_text() == "\n".join(rows[:3]) + "\n"
    assert (tmp_path / REJECTED_NAME).read_text() == 'not json\n{"step": 6, "loss_\n'
    assert said == [f"{metrics}: line 3, a torn last line not a record; moved to "
                    f"{REJECTED_NAME}"]
    assert runlog.forget_steps_after(str(tmp_path), 3, log=said.append) == []  # nothing left
    assert len(said) == 1
    assert runlog.forget_steps_after(str(tmp_path / "new"), 0) == []  # no metrics yet


def test_a_log_started_after_a_crash_never_glues_a_record_to_the_torn_line(tmp_path):
    """Appending to a file that ends mid-line would make the first new record part of a line
    that no longer parses: the start seals the file first."""
    metrics = tmp_path / METRICS_NAME
    metrics.write_text(_line(1) + "\n" + _line(2) + '\n{"step": 3, "loss_b')
    said = []
    writer = runlog.RankZeroLog(str(tmp_path), 0, progress=False, log=said.append)
    writer.start(2, 10)
    writer.record(3, {"loss_bits": 7.7})
    assert _read(tmp_path) == ([1, 2, 3], [])
    assert (tmp_path / REJECTED_NAME).read_text() == '{"step": 3, "loss_b\n'
    assert any("a torn last line" in line for line in said), said


@pytest.mark.slow
def test_resume_and_report_name_the_line_that_is_not_a_record(periodic_dataset, tmp_path):
    run = tmp_path / "run"
    run_cli("train", periodic_dataset, "--run", run, *TINY_TRAINING, "--steps", "4",
            "--log-every", "1", "--val-every", "4")
    metrics = run / METRICS_NAME
    lines = metrics.read_text().splitlines()
    lines[1] = lines[1][:-5] + "#oops"  # a damaged record of step 2
    metrics.write_text("\n".join(lines) + "\n")
    report = run_cli("report", run, "--out", tmp_path / "page")
    assert f"{metrics}: 1 line(s) are not records and were left out: line 2: not JSON" \
        in report.stdout + report.stderr
    resumed = run_cli("train", periodic_dataset, "--run", run, "--resume", "--steps", "6",
                      "--no-progress")
    assert f"{metrics}: line 2 not a record; moved to {REJECTED_NAME}" in resumed.stdout
    assert (run / REJECTED_NAME).read_text() == lines[1] + "\n"
    assert _read(run) == ([1, 3, 4, 5, 6], [])


# --- fuzzing ---------------------------------------------------------------------------

_NUMBERS = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True,
                                                          allow_infinity=True))
_RECORD = st.builds(lambda step, scalars: {"step": step, **scalars}, st.integers(0, 10**9),
                    st.dictionaries(st.text(max_size=8).filter(lambda k: k != "step"),
                                    _NUMBERS, max_size=4))
_JUNK = st.one_of(st.text(max_size=40), st.binary(max_size=40).map(
    lambda b: b.decode("latin-1")), st.recursive(
    st.none() | st.booleans() | _NUMBERS | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                   max_size=3),
    max_leaves=6).map(json.dumps))


def _equal(left: dict, right: dict) -> bool:
    return left.keys() == right.keys() and all(
        left[k] == right[k] or (isinstance(left[k], float) and math.isnan(left[k])
                                and math.isnan(right[k])) for k in left)


@given(st.lists(_RECORD, max_size=8))
def test_records_round_trip_exactly(records):
    text = "".join(json.dumps(record) + "\n" for record in records)
    parsed = runlog.parse_metrics(text.encode())
    assert parsed.rejected == [] and parsed.torn is None
    assert len(parsed.rows) == len(records)
    assert all(_equal(a, b) for a, b in zip(parsed.rows, records, strict=True))


@given(st.lists(st.one_of(_RECORD.map(json.dumps), _JUNK), max_size=10), st.booleans())
def test_every_line_is_a_record_or_reported_by_its_number(lines, newline_at_end):
    text = "\n".join(line.replace("\n", " ") for line in lines)
    data = (text + "\n" if newline_at_end and lines else text).encode("utf-8", "surrogatepass")
    parsed = runlog.parse_metrics(data)
    physical = data.decode("utf-8", "replace").split("\n")
    for number, line, _ in parsed.rejected:
        assert physical[number - 1] == line and line.strip()
    accounted = len(parsed.rows) + len(parsed.rejected) + (parsed.torn is not None)
    assert accounted == sum(1 for line in physical if line.strip())
    for row in parsed.rows:
        assert isinstance(row["step"], int) and not isinstance(row["step"], bool)
        assert row["step"] >= 0 and all(isinstance(v, int | float) for v in row.values())


@given(st.binary(max_size=300), st.integers(0, 50))
def test_forgetting_keeps_every_line_in_the_run_folder(tmp_path_factory, data, step):
    run = tmp_path_factory.mktemp("run")
    (run / METRICS_NAME).write_bytes(data)
    before = runlog.parse_metrics(data)
    said = []
    dropped = runlog.forget_steps_after(str(run), step, log=said.append)
    assert set(tree_entries(run)) <= {METRICS_NAME, REJECTED_NAME}
    after = runlog.parse_metrics((run / METRICS_NAME).read_bytes())
    assert after.rejected == [] and after.torn is None
    assert [r["step"] for r in after.rows] == [r["step"] for r in before.rows
                                               if r["step"] <= step]
    assert dropped == [r["step"] for r in before.rows if r["step"] > step]
    rejected = run / REJECTED_NAME
    aside = rejected.read_bytes().decode().split("\n")[:-1] if rejected.exists() else []
    assert aside == [line for _, line, _ in before.rejected] + (
        [before.torn] if before.torn else [])
    assert bool(aside) == bool(said)
