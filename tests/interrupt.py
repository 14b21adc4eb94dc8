"""Signal a running command at the moment a test chose, never after a fixed sleep.

A test waits for an event (a line on stderr, a file, a VM), then signals, then collects the
outputs, each step with a deadline. stderr is read as bytes while waiting, so a chatty
command never blocks on a full pipe and a partial UTF-8 sequence cannot break the read.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Callable


def read_until(process: subprocess.Popen, ready: Callable[[bytes], bool], *,
               seconds: float) -> bytes:
    """Read ``process.stderr`` (bytes) until ``ready(everything read so far)`` is true.

    Fails, with what was read, when the deadline passes or the command ends first.
    """
    seen = b""
    deadline = time.monotonic() + seconds
    descriptor = process.stderr.fileno()
    while not ready(seen):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"not ready within {seconds:g} s; stderr so far:\n"
                                 + seen.decode(errors="replace"))
        readable, _, _ = select.select([descriptor], [], [], min(left, 0.1))
        if readable:
            chunk = os.read(descriptor, 65536)
            if not chunk:
                process.wait(30)
                raise AssertionError(f"the command ended ({process.returncode}) before it "
                                     "was ready; stderr:\n" + seen.decode(errors="replace"))
            seen += chunk
    return seen


def signal_when(process: subprocess.Popen, ready: Callable[[bytes], bool], stop: int, *,
                seconds: float = 300, finish_seconds: float = 180) -> tuple[bytes, bytes]:
    """Send ``stop`` once ``ready`` holds (see :func:`read_until`), then wait for the command
    to end; returns its whole (stdout, stderr) as bytes. A command that does not end within
    ``finish_seconds`` is killed and the test fails."""
    try:
        seen = read_until(process, ready, seconds=seconds)
        process.send_signal(stop)
        try:
            stdout, stderr = process.communicate(timeout=finish_seconds)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {finish_seconds:g} s after signal {stop}"
                                 ) from None
        return stdout or b"", seen + (stderr or b"")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def when(condition: Callable[[], object]) -> Callable[[bytes], bool]:
    """A ``ready`` that ignores stderr and asks ``condition()`` (a file, a VM) instead."""
    return lambda seen: bool(condition())
