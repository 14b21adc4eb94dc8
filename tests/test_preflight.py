"""The preflight: workers from another environment, or that cannot see the data, stop the run
with a message naming them, before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli
from daskprocs import DaskProcesses
from rainforest import __version__

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# Imported by a worker's interpreter at start-up (site imports sitecustomize from sys.path).
HIDE_RAINFOREST = '''
import sys
class _HideRainforest:
    def find_spec(self, name, path=None, target=None):
        if name == "rainforest" or name.startswith("rainforest."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, _HideRainforest())
'''


def _preprocess(song_dir, out, address):
    return run_cli("preprocess", song_dir, "--out", out, "--cluster", address,
                   "--no-progress", check=False)


def _assert_stopped_before_any_work(result, out: Path, *expected: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "the workers are not ready for this run, so nothing was processed" in result.stderr
    for text in expected:
        assert text in result.stderr, (text, result.stderr)
    assert "Traceback" not in result.stderr
    assert not (out / "plan.json").exists() and not (out / "shards").exists()


def test_a_worker_without_rainforest_is_named(song_dir, tmp_path):
    hidden = tmp_path / "site"
    hidden.mkdir()
    (hidden / "sitecustomize.py").write_text(HIDE_RAINFOREST)
    with DaskProcesses(tmp_path) as dask:
        dask.add_worker("good")
        dask.add_worker("bare", env={"PYTHONPATH": str(hidden)})
        dask.wait_for_workers(2)
        result = _preprocess(song_dir, tmp_path / "out", dask.address)
    _assert_stopped_before_any_work(result, tmp_path / "out", "cannot import rainforest",
                                    "ModuleNotFoundError")
    assert result.stderr.count("cannot import") == 1, "only the bare worker is named"


def test_a_worker_with_another_rainforest_version_is_named(song_dir, tmp_path):
    other = tmp_path / "other" / "rainforest"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text('__version__ = "0.0.0+elsewhere"\n')
    with DaskProcesses(tmp_path) as dask:
        dask.add_worker("other", env={"PYTHONPATH": str(other.parent)})
        dask.wait_for_workers(1)
        result = _preprocess(song_dir, tmp_path / "out", dask.address)
    _assert_stopped_before_any_work(
        result, tmp_path / "out", f"runs rainforest 0.0.0+elsewhere, this process {__version__}")


def test_a_worker_that_cannot_see_the_data_is_named(song_dir, tmp_path):
    # The worker's own mount namespace hides the songs and makes the output read-only, as a
    # compute node without the login node's filesystem would.
    songs = tmp_path / "home" / "songs"
    songs.parent.mkdir()
    song_dir.rename(songs)
    out = tmp_path / "scratch" / "dataset"
    out.parent.mkdir()
    hide = (f"mount -t tmpfs -o ro none {songs.parent} && "
            f"mount -t tmpfs -o ro none {out.parent} && exec \"$@\"")
    with DaskProcesses(tmp_path) as dask:
        dask.add_worker("elsewhere", prefix=["unshare", "-m", "sh", "-c", hide, "sh"])
        dask.wait_for_workers(1)
        result = _preprocess(songs, out, dask.address)
    _assert_stopped_before_any_work(result, out, f"cannot read {songs}",
                                    f"cannot write {out}")
