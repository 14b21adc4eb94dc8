"""The Python API: the stages at the package's top, loaded lazily, and the README's example."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import audiogen

README = Path(__file__).resolve().parent.parent / "README.md"
HEAVY = ("tensorflow", "keras", "horovod", "dask", "distributed", "numba", "matplotlib")


def _run(code: str, **kwargs) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, **kwargs)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_rainforest_stays_light():
    loaded = _run(f"import sys, rainforest; print(sorted(m for m in sys.modules "
                  f"if m.split('.')[0] in {HEAVY!r}))")
    assert loaded.strip() == "[]"


def test_each_stage_is_its_module_called_as_its_function_however_it_was_imported():
    # Importing rainforest.report loads rainforest.generate first: either order binds the
    # same callable module.
    out = _run("import sys, inspect, rainforest, rainforest.report, rainforest.train, "
               "rainforest.plan\n"
               "for name in ('fetch', 'preprocess', 'train', 'generate', 'report', 'plan'):\n"
               "    value = getattr(rainforest, name)\n"
               "    module = sys.modules['rainforest.' + name]\n"
               "    function = getattr(module, name)\n"
               "    print(name, value is module, callable(value), inspect.isfunction(function),"
               " inspect.signature(value) == inspect.signature(function))\n")
    assert out.split("\n")[:-1] == [f"{name} True True True True" for name in
                                    ("fetch", "preprocess", "train", "generate", "report",
                                     "plan")]


def test_import_as_gives_the_module_and_calling_it_runs_the_stage(tmp_path):
    out = _run("import rainforest.plan as m, rainforest.train as t, types\n"
               "print(isinstance(m, types.ModuleType), hasattr(m, 'PlanConfig'),"
               " hasattr(t, 'Trainer'))\n"
               "import rainforest\n"
               "rainforest.plan.plan = lambda *a, **k: ('stage called with', a, k)\n"
               "print(rainforest.plan(['x'], steps=3))\n")
    assert out.split("\n")[:2] == ["True True True", "('stage called with', (['x'],), "
                                                        "{'steps': 3})"]


def test_mock_patch_of_a_stage_module_patches_what_the_stage_uses():
    from unittest import mock

    import rainforest
    import rainforest.plan

    with mock.patch("rainforest.plan.read_headers", side_effect=RuntimeError("patched")):
        with pytest.raises(RuntimeError, match="patched"):
            rainforest.plan(["nowhere"], rainforest.PlanConfig(), steps=1)
    assert rainforest.plan.read_headers.__module__ == "rainforest.plan"  # restored


@pytest.mark.parametrize("stage", ["fetch", "preprocess", "train", "generate", "report",
                                   "plan"])
def test_python_m_of_a_stage_module_is_its_command(stage):
    module = subprocess.run([sys.executable, "-m", f"rainforest.{stage}", "--help"],
                            capture_output=True, text=True, timeout=300)
    command = subprocess.run([sys.executable, "-m", "rainforest.cli", stage, "--help"],
                             capture_output=True, text=True, timeout=300)
    assert module.returncode == 0, module.stderr
    assert module.stdout == command.stdout and f"usage: rainforest {stage}" in module.stdout


def test_unknown_names_are_attribute_errors():
    import rainforest

    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        rainforest.trian  # noqa: B018
    assert {"preprocess", "train", "generate", "TrainConfig"} <= set(dir(rainforest))


def _readme_example() -> str:
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```pycon\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the README's Python API section has one pycon example"
    return blocks[0]


@pytest.mark.slow
@pytest.mark.distributed
def test_readme_example_runs_as_written(tmp_path):
    (tmp_path / "songs").mkdir()
    for index in range(3):
        audiogen.write_song(tmp_path / "songs" / f"song{index}.ogg", seconds=3.0,
                            freq=220.0 * (index + 1), seed=index)
    (tmp_path / "example.txt").write_text(_readme_example())
    result = subprocess.run([sys.executable, "-m", "doctest", "example.txt"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "generated" / "stream-000.wav").is_file()
    assert (tmp_path / "report" / "index.html").is_file()
