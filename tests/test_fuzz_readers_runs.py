"""Every reader of a run's documents survives anything (property-based, Hypothesis): a
checkpoint's config.json with its ``files`` index of sha256s, the ``latest`` pointer, and a
``plan --json`` output read back by ``plan --from``; and every reader of every document
refuses a foreign format or another version.

As in tests/test_fuzz_readers.py: a document written by the project's own writer reads back
exactly, and a damaged one (tests/fuzzing.py) reads as a usable value or raises
:class:`~rainforest.errors.RainforestError` naming the file, never anything else, never
skipping a checksum, never writing outside the run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile
from fuzzing import (
    NASTY_NAMES,
    VALUES,
    Scratch,
    changed_outside,
    damage_in_copy,
    damaged,
    damaged_bytes,
    header_ok,
    outcome,
    sha256_file,
    template_document,
    tree,
)
from hypothesis import assume, given
from hypothesis import strategies as st
from test_fuzz_readers import (  # noqa: F401 (fixtures, for the format test)
    AUDIO,
    dataset_template,
    fetch_server,
    fetch_template,
)

from rainforest import checkpoint
from rainforest.config import AudioConfig, Config
from rainforest.dataset import (
    MANIFEST_NAME,
    PLAN_NAME,
    read_manifest,
    read_plan,
    read_shard_records,
    shard_record_path,
)
from rainforest.errors import RainforestError
from rainforest.fetch import FETCH_NAME, read_fetch_manifest
from rainforest.model_config import ModelConfig
from rainforest.plan import PlanConfig, format_plan, from_earlier, plan

pytestmark = pytest.mark.slow  # some seconds per test under the default profile


# --- checkpoints: config.json, its files index, the latest pointer ----------------------------

@dataclass(frozen=True)
class TrainSettings(Config):
    """Stands in for rainforest.train.TrainConfig (whose module needs TensorFlow's stack)."""

    batch_size: int = 2
    target_length: int = 256


TINY = ModelConfig(dilations=(1, 2), residual_channels=4, gate_channels=4, skip_channels=8,
                   classes=16)


def write_checkpoint(run: str, step: int, *, model: ModelConfig = TINY,
                     audio: AudioConfig | None = None, learning_rate: float = 1e-3,
                     metrics: dict | None = None, data: dict | None = None) -> dict:
    """A checkpoint through checkpoint.write, as training writes one; returns its document."""
    document = checkpoint.config_document(
        model=model, audio=audio or AudioConfig(), train=TrainSettings(), next_step=step,
        learning_rate=learning_rate, data=data or {"dataset": "/data/set", "ranks": 1},
        metrics=metrics or {"loss": 1.5})

    def save(folder: str) -> None:
        checkpoint.save_arrays(os.path.join(folder, checkpoint.WEIGHTS_NAME),
                               [("kernel", np.arange(6, dtype=np.float32) * step)])
        checkpoint.save_arrays(os.path.join(folder, checkpoint.OPTIMIZER_NAME),
                               [("moment", np.full(3, step, np.float32))])

    checkpoint.write(run, step, document, save, keep=2)
    return document


def use_checkpoint(run: str) -> dict:
    """What ``generate`` and a resumed ``train`` do with a run's newest checkpoint."""
    folder = checkpoint.latest(run)
    document = checkpoint.read_config(folder)
    checkpoint.verify(folder, document)
    checkpoint.saved_shape(folder, document)
    checkpoint.load_arrays(os.path.join(folder, checkpoint.WEIGHTS_NAME))
    return document


@pytest.fixture(scope="module")
def run_template(tmp_path_factory) -> Path:
    """A run with two checkpoints, steps 2 and 3 (``latest`` names step 3)."""
    run = tmp_path_factory.mktemp("run-template") / "run"
    for step in (2, 3):
        write_checkpoint(str(run), step)
    return run


LATEST_CONFIG = f"{checkpoint.CHECKPOINT_DIR}/{checkpoint.step_name(3)}/{checkpoint.CONFIG_NAME}"
MODELS = st.builds(ModelConfig, dilations=st.lists(st.integers(1, 64), min_size=1,
                                                   max_size=4).map(tuple),
                   residual_channels=st.integers(1, 8), gate_channels=st.integers(1, 8),
                   skip_channels=st.integers(1, 8), classes=st.integers(2, 256),
                   labels=st.lists(st.text(max_size=6), max_size=3, unique=True).map(tuple),
                   condition_channels=st.integers(1, 8))
FINITE = st.floats(allow_nan=False, allow_infinity=False)


@given(st.integers(0, 2**40), MODELS, AUDIO, FINITE,
       st.dictionaries(st.text(max_size=8), FINITE, max_size=3))
def test_checkpoints_written_by_the_writer_read_back_exactly(step, model, audio, rate,
                                                             metrics):
    with Scratch() as root:
        run = str(root / "run")
        document = write_checkpoint(run, step, model=model, audio=audio, learning_rate=rate,
                                    metrics=metrics)
        folder = checkpoint.latest(run)
        assert folder == os.path.join(run, checkpoint.CHECKPOINT_DIR, checkpoint.step_name(step))
        saved = use_checkpoint(run)
        files = {name: sha256_file(os.path.join(folder, name))
                 for name in (checkpoint.WEIGHTS_NAME, checkpoint.OPTIMIZER_NAME)}
        assert saved == {"format": checkpoint.FORMAT, "version": checkpoint.VERSION,
                         "step": step, **document, "files": files}
        assert checkpoint.saved_shape(folder, saved) == (model, audio)


@given(st.data())
def test_a_damaged_checkpoint_config_is_read_or_refused_and_never_skips_a_checksum(
        run_template, data):
    damage = data.draw(damaged(template_document(run_template, LATEST_CONFIG), "files",
                               checkpoint.WEIGHTS_NAME, "step", "model", "audio"),
                       label="config.json")
    with Scratch() as root:
        run = damage_in_copy(run_template, root, LATEST_CONFIG, damage)
        folder = run / checkpoint.CHECKPOINT_DIR / checkpoint.step_name(3)
        before = tree(root)
        document = outcome(lambda: use_checkpoint(str(run)), names=str(folder))
        if not header_ok(damage, checkpoint.FORMAT, checkpoint.VERSION):
            assert isinstance(document, RainforestError), "a wrong format or version was read"
        assert changed_outside(root, before) == []
        if not isinstance(document, RainforestError):  # read: its weights were checked
            assert document["files"][checkpoint.WEIGHTS_NAME] == sha256_file(
                folder / checkpoint.WEIGHTS_NAME)
            for name in document["files"]:
                assert os.path.dirname(os.path.realpath(folder / name)) == str(folder)


@given(st.data())
def test_a_damaged_weight_file_fails_its_sha256(run_template, data):
    name = data.draw(st.sampled_from([checkpoint.WEIGHTS_NAME, checkpoint.OPTIMIZER_NAME]))
    path = f"{checkpoint.CHECKPOINT_DIR}/{checkpoint.step_name(3)}/{name}"
    original = (run_template / path).read_bytes()
    damage = data.draw(damaged_bytes(original), label=name)
    assume(damage != original)  # two changes may undo each other
    with Scratch() as root:
        run = damage_in_copy(run_template, root, path, damage)
        with pytest.raises(RainforestError, match="sha256") as refused:
            use_checkpoint(str(run))
        assert str(run / path) in str(refused.value)


LATEST = st.one_of(
    st.sampled_from(NASTY_NAMES).map(lambda name: name.encode("utf-8", "surrogatepass")),
    st.sampled_from([f"{checkpoint.step_name(3)}/../{checkpoint.step_name(2)}",
                     f"{checkpoint.step_name(3)}/.", f"{checkpoint.step_name(3)}/../../..",
                     checkpoint.step_name(2), checkpoint.step_name(4), "step-"]).map(
        str.encode),
    damaged_bytes(checkpoint.step_name(3).encode() + b"\n"))


@given(LATEST)
def test_a_damaged_latest_pointer_names_a_checkpoint_of_the_run_or_is_refused(pointer):
    with Scratch() as root:
        run = root / "run"
        for step in (2, 3):
            write_checkpoint(str(run), step)
        latest_path = Path(checkpoint.checkpoint_root(str(run)), checkpoint.LATEST)
        latest_path.write_bytes(pointer)
        before = tree(root)
        folder = outcome(lambda: checkpoint.latest(str(run)), names=str(latest_path))
        if not isinstance(folder, RainforestError):
            assert os.path.dirname(folder) == checkpoint.checkpoint_root(str(run))
            assert os.path.basename(folder) in {checkpoint.step_name(2),
                                                checkpoint.step_name(3)}
            checkpoint.read_config(folder)
        assert changed_outside(root, before) == []


# --- plan --from: the output of `rainforest plan --json` -------------------------------------

RUN = {"ranks": 1, "step_seconds": 0.25, "allreduce_seconds": 0.0, "start_seconds": 9.0,
       "validation_seconds": 1.5, "validation_trace_seconds": 0.5, "validation_passes": 16,
       "checkpoint_seconds": 0.3, "sample_seconds": 0.0, "end_seconds": 2.0}
FIGURES = {"preprocessing": {"decode_seconds": {"WAV": 0.002}, "hash_seconds_per_byte": 1e-9,
                             "task_overhead_seconds": 0.05, "fixed_seconds": 4.0,
                             "source": "a test"},
           "training": {"model": "tiny", "batch_size": 2, "target_length": 1024,
                        "step_choice": "fused/float32", "gradient_bytes": 129664,
                        "runs": [RUN, {**RUN, "ranks": 2, "allreduce_seconds": 0.01}],
                        "source": "a test"}}


@dataclass
class PlanInputs:
    song: str  # a source for the plan (its header is read)
    figures: str  # an earlier plan with every figure, so that nothing is calibrated
    printed: Path  # what `rainforest plan --json` printed


def printed_plan(inputs_song: str, earlier: list[str]) -> dict:
    """``rainforest plan SONG --from ... --json``, as its document and as printed."""
    return plan([inputs_song], PlanConfig(workers=(1, 2)), steps=100, earlier=earlier,
                log=lambda line: None)


def print_plan(document: dict, path: Path) -> None:
    path.write_text(json.dumps(document, indent=1))  # as cli.cmd_plan prints --json


@pytest.fixture(scope="module")
def plan_inputs(tmp_path_factory) -> PlanInputs:
    root = tmp_path_factory.mktemp("plan-template")
    song = root / "song.wav"
    soundfile.write(song, np.sin(np.arange(8000) / 9.0).astype(np.float32) / 2, 8000)
    figures = root / "figures.json"
    figures.write_text(json.dumps({"format": "rainforest-plan", "version": 2,
                                   "calibration": FIGURES}))
    printed = root / "plan.json"
    print_plan(printed_plan(str(song), [str(figures)]), printed)
    return PlanInputs(str(song), str(figures), printed)


def use_earlier_plan(inputs: PlanInputs, path: str) -> dict:
    """``rainforest plan SONG --from FIGURES --from PATH``: figures, prediction, table."""
    found = from_earlier(path)
    format_plan(printed_plan(inputs.song, [inputs.figures, path]))
    return found


TIMES = st.floats(0.0, 1e6)
RUNS = st.fixed_dictionaries({
    "ranks": st.integers(1, 64), "validation_passes": st.integers(0, 1000),
    **{name: TIMES for name in RUN if name not in ("ranks", "validation_passes")}})
CALIBRATIONS = st.fixed_dictionaries({
    "preprocessing": st.fixed_dictionaries({
        "decode_seconds": st.dictionaries(st.text(), TIMES).map(
            lambda codecs: {**codecs, "WAV": 0.003}),  # the song's codec, always priced
        **{name: TIMES for name in ("hash_seconds_per_byte", "task_overhead_seconds",
                                    "fixed_seconds")},
        "source": st.text()}),
    "training": st.fixed_dictionaries({
        "model": st.text(), "batch_size": st.integers(1, 2**20),
        "target_length": st.integers(1, 2**20), "step_choice": st.text(),
        "gradient_bytes": st.integers(0, 2**40), "runs": st.lists(RUNS, min_size=1, max_size=3),
        "source": st.text()})})


@given(CALIBRATIONS)
def test_plans_printed_by_plan_json_read_back_exactly_with_from(plan_inputs, figures):
    with Scratch() as root:
        earlier = root / "earlier.json"
        earlier.write_text(json.dumps({"format": "rainforest-plan", "version": 2,
                                       "calibration": figures}))
        document = printed_plan(plan_inputs.song, [str(earlier)])
        printed = root / "plan.json"
        print_plan(document, printed)
        found = from_earlier(str(printed))
        assert found == document["calibration"]
        runs = sorted(figures["training"]["runs"], key=lambda run: run["ranks"])
        unmeasured = {"s3_latency_seconds": None, "s3_bytes_per_second": None}  # local songs
        assert found == {"preprocessing": {**figures["preprocessing"], **unmeasured},
                         "training": {**figures["training"], "runs": runs}}
        again = printed_plan(plan_inputs.song, [str(printed)])
        assert again["rows"] == document["rows"]


@given(st.data())
def test_a_damaged_plan_gives_usable_figures_or_is_refused_naming_it(plan_inputs, data):
    damage = data.draw(damaged(json.loads(plan_inputs.printed.read_text()), "calibration",
                               *FIGURES), label="plan")
    with Scratch() as root:
        path = root / "plan.json"
        path.write_bytes(damage)
        before = tree(root)
        found = outcome(lambda: use_earlier_plan(plan_inputs, str(path)), names=str(path))
        if not header_ok(damage, "rainforest-plan", 2):
            assert isinstance(found, RainforestError), "a wrong format or version was read"
        if not isinstance(found, RainforestError):
            assert set(found) <= {"preprocessing", "training"}
        assert changed_outside(root, before) == []


# --- every reader: a foreign format or another version is never read -------------------------

@dataclass
class Reader:
    template: str  # the fixture holding the folder the reader reads
    name: str  # the document, relative to that folder
    read: object  # the reader, given the folder copied


READERS = {
    "manifest": Reader("dataset_template", MANIFEST_NAME, lambda f: read_manifest(str(f))),
    "shard record": Reader("dataset_template", shard_record_path("part-00001"),
                           lambda f: read_shard_records(str(f))),
    "dataset plan": Reader("dataset_template", PLAN_NAME, lambda f: read_plan(str(f))),
    "fetch.json": Reader("fetch_template", FETCH_NAME, lambda f: read_fetch_manifest(str(f))),
    "checkpoint config": Reader("run_template", LATEST_CONFIG, lambda f: checkpoint.read_config(
        str(f / checkpoint.CHECKPOINT_DIR / checkpoint.step_name(3)))),
    "plan --from": Reader("plan_folder", "plan.json", lambda f: from_earlier(
        str(f / "plan.json"))),
}
WRONG_VERSIONS = st.one_of(VALUES, st.sampled_from([True, 1.0, "1", 2, 0, -1, [1], 2**64 + 1]))


@pytest.fixture(scope="module")
def templates(dataset_template, fetch_template, run_template,  # noqa: F811
              plan_inputs) -> dict[str, Path]:
    return {"dataset_template": dataset_template, "fetch_template": fetch_template,
            "run_template": run_template, "plan_folder": plan_inputs.printed.parent}


@given(st.sampled_from(sorted(READERS)), st.data())
def test_no_reader_takes_a_foreign_format_or_another_version(templates, reader, data):
    spec = READERS[reader]
    template = templates[spec.template]
    document = template_document(template, spec.name)
    kind = data.draw(st.sampled_from(["version", "format", "both"]))
    if kind in ("version", "both"):
        current = document["version"]  # 1, or 2 for a plan
        version = data.draw(WRONG_VERSIONS.filter(
            lambda v: not (type(v) is int and v == current)))
        document = {**document, "version": version}
    if kind in ("format", "both"):
        if data.draw(st.booleans()):
            document = {k: v for k, v in document.items() if k != "format"}
        else:
            document = {**document, "format": data.draw(VALUES.filter(
                lambda v: v != document["format"]))}
    with Scratch() as root:
        folder = damage_in_copy(template, root, spec.name, json.dumps(document).encode())
        with pytest.raises(RainforestError) as refused:
            spec.read(folder)
        assert str(folder / spec.name) in str(refused.value)
