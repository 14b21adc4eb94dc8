"""SIGTERM as a graceful stop, the one place every stage turns it into one.

A batch system stops a job with SIGTERM (``scancel``, a time limit, EC2 spot notices reach
users through ``kill``). Commands that already stop cleanly on Ctrl-C ask for SIGTERM to raise
``KeyboardInterrupt`` too; training, whose ranks must agree on the step they stop at, asks for
a flag that the loop reads between steps.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class StopRequest:
    """What a stop signal left behind: whether one came, and its name (for the log)."""

    requested: bool = False
    reason: str = ""

    def ask(self, reason: str) -> None:
        self.requested, self.reason = True, reason


@contextlib.contextmanager
def graceful_stop(*, interrupt: bool, also_ctrl_c: bool = False) -> Iterator[StopRequest]:
    """Within the block, SIGTERM stops the work the way Ctrl-C does; handlers are put back after.

    ``interrupt=True`` raises ``KeyboardInterrupt`` where the signal lands. ``interrupt=False``
    only records it in the yielded :class:`StopRequest` (and ``also_ctrl_c`` records SIGINT
    the same way), for a loop that finishes its step before it stops. Python delivers signals
    to the main thread alone, so elsewhere nothing is installed and the request stays unasked.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        if interrupt:
            raise KeyboardInterrupt
        request.ask(signal.Signals(signum).name)

    caught = (signal.SIGTERM, signal.SIGINT) if also_ctrl_c else (signal.SIGTERM,)
    previous = {signum: signal.signal(signum, handler) for signum in caught}
    try:
        yield request
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
