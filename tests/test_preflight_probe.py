"""The worker preflight probe on its own, in this process (tests/test_preflight.py sends it to
real workers)."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy

from rainforest import preflight_probe


def test_probe_reports_versions_missing_packages_and_what_it_cannot_read_or_write(tmp_path):
    blocked = tmp_path / "file-in-the-way"
    blocked.write_text("a file where the output folder should go")
    report = preflight_probe.probe(["numpy", "no_such_package_here"],
                                   [str(tmp_path), str(tmp_path / "missing.wav")],
                                   str(blocked / "out"))
    assert report["versions"] == {"numpy": numpy.__version__}
    assert list(report["missing"]) == ["no_such_package_here"]
    assert "ModuleNotFoundError" in report["missing"]["no_such_package_here"]
    assert len(report["cannot"]) == 2
    assert report["cannot"][0].startswith(f"read {tmp_path / 'missing.wav'} (PermissionError")
    assert report["cannot"][1].startswith(f"write {blocked / 'out'} (")


def test_probe_writes_nothing_it_leaves_behind(tmp_path):
    report = preflight_probe.probe([], [str(tmp_path)], str(tmp_path / "out"))
    assert report["cannot"] == []
    assert os.listdir(tmp_path / "out") == []


def test_probe_module_imports_nothing_of_rainforest():
    tree = ast.parse(Path(preflight_probe.__file__).read_text())
    names = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names]
    names += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert names and not [name for name in names if name.split(".")[0] == "rainforest"]
