"""What each Dask worker reports before a run: package versions and access to the data.

It runs on the workers, shipped by value (``cluster.preflight`` registers this module with
cloudpickle), so it must work where rainforest itself cannot be imported, which is one of the
things it reports. Hence no rainforest imports here, only the standard library and fsspec.
"""

from __future__ import annotations

import importlib
import os
import socket
import sys
import uuid


def probe(packages: list[str], reads: list[str], write: str) -> dict:
    """This interpreter, the versions of ``packages``, what it cannot read or write, and
    where it runs (the host, and the Slurm job if any, to name the worker if it is lost)."""
    report: dict = {"python": sys.executable, "versions": {}, "missing": {}, "cannot": [],
                    "host": socket.gethostname(), "slurm_job": os.environ.get("SLURM_JOB_ID")}
    for name in packages:
        try:
            report["versions"][name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as error:
            report["missing"][name] = f"{type(error).__name__}: {error}"
    for url in reads:
        try:
            _check_readable(url)
        except Exception as error:
            report["cannot"].append(f"read {url} ({type(error).__name__}: {error})")
    try:
        _check_writable(write)
    except Exception as error:
        report["cannot"].append(f"write {write} ({type(error).__name__}: {error})")
    return report


def _remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _check_readable(url: str) -> None:
    if _remote(url):
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            raise FileNotFoundError(url)
    elif not os.access(url, os.R_OK):
        raise PermissionError(f"no such file or no read permission: {url}")


def _check_writable(folder: str) -> None:
    """Write and remove a small file of a name no run uses."""
    name = f".rainforest-preflight-{uuid.uuid4().hex}"
    if _remote(folder):
        import fsspec

        fs, path = fsspec.core.url_to_fs(folder)
        target = path.rstrip("/") + "/" + name
        fs.pipe_file(target, b"ok")
        fs.rm_file(target)
    else:
        os.makedirs(folder, exist_ok=True)
        target = os.path.join(folder, name)
        with open(target, "wb") as handle:
            handle.write(b"ok")
        os.remove(target)
