"""Network namespaces for tests: the processes in one, and killing them all by pid."""

from __future__ import annotations

import os
import signal
import subprocess
import time


def pids(namespace: str) -> list[int]:
    """Every process in the network namespace ``namespace``."""
    result = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True,
                            check=False)
    return [int(pid) for pid in result.stdout.split()]


def kill_all(namespace: str, seconds: float = 10) -> None:
    """SIGKILL every process in ``namespace`` and wait (up to ``seconds``) until none is left."""
    for pid in pids(namespace):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + seconds
    while pids(namespace) and time.monotonic() < deadline:
        time.sleep(0.05)
