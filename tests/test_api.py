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


def test_stage_names_are_the_functions_even_after_their_modules_load():
    # Importing rainforest.report loads rainforest.generate, whose import would bind the
    # module over the function of the same name.
    out = _run("import sys, inspect, rainforest, rainforest.report, rainforest.train, "
               "rainforest.plan\n"
               "for name in ('fetch', 'preprocess', 'train', 'generate', 'report', 'plan'):\n"
               "    value = getattr(rainforest, name)\n"
               "    module = sys.modules['rainforest.' + name]\n"
               "    print(name, inspect.isfunction(value), value is getattr(module, name))\n")
    assert out.split("\n")[:-1] == [f"{name} True True" for name in
                                    ("fetch", "preprocess", "train", "generate", "report",
                                     "plan")]


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
