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
    """SIGKILL every process in ``namespace`` until none is left, killing again any that
    appear meanwhile (a daemon forking as it dies).

    Raises
    ------
    RuntimeError
        Naming the processes still alive after ``seconds``: a "power cut" that left some running
        would make any test of it meaningless.
    """
    deadline = time.monotonic() + seconds
    while left := pids(namespace):
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(left)} process(es) in namespace {namespace} survived "
                               f"SIGKILL for {seconds} s: {', '.join(map(_describe, left))}")
        time.sleep(0.05)


def _describe(pid: int) -> str:
    try:
        command = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    except OSError:
        command = "?"
    return f"{pid} ({command.strip()[:80]})"
