"""A real ``dask scheduler`` and ``dask worker`` processes on 127.0.0.1, for tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class DaskProcesses:
    """A scheduler started at once; workers added one by one, each in its own session.

    Use as a context manager; every process is stopped on exit.
    """

    def __init__(self, folder: Path) -> None:
        # Started in ``folder``: `python -m` puts the working directory first on sys.path, and
        # the checkout's own rainforest/ there would shadow what the environment installed.
        self.folder = Path(folder)
        self.scheduler_file = self.folder / "scheduler.json"
        self.workers: dict[str, subprocess.Popen] = {}
        self._scheduler = self._start([
            sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
            "--port", "0", "--no-dashboard", "--scheduler-file", str(self.scheduler_file)])
        deadline = time.monotonic() + 60
        while not self.scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.address = json.loads(self.scheduler_file.read_text())["address"]

    def _start(self, command, env=None) -> subprocess.Popen:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env, cwd=self.folder, start_new_session=True)

    def add_worker(self, name: str, *, env: dict | None = None, prefix=()) -> None:
        """A single-threaded worker; ``prefix`` wraps its command (e.g. ``unshare -m ...``)."""
        command = [*prefix, sys.executable, "-m", "distributed.cli.dask_worker", self.address,
                   "--nthreads", "1", "--name", name, "--no-dashboard"]
        self.workers[name] = self._start(command, env={**os.environ, **(env or {})})

    def wait_for_workers(self, count: int, timeout: float = 60) -> None:
        from distributed import Client

        with Client(self.address, timeout="30s") as client:
            client.wait_for_workers(count, timeout=timeout)

    def kill(self, name: str) -> None:
        """SIGKILL a worker: its nanny and the worker process, with no chance to clean up."""
        os.killpg(self.workers[name].pid, signal.SIGKILL)
        self.workers[name].wait()

    def __enter__(self) -> DaskProcesses:
        return self

    def __exit__(self, *exc) -> None:
        for process in [*self.workers.values(), self._scheduler]:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in [*self.workers.values(), self._scheduler]:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
