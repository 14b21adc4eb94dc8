"""A per-rank watchdog: end a rank whose training steps have stopped finishing.

A rank that hangs (stopped, swapping, stuck in a driver) leaves the others waiting in a
collective. Under Gloo that ends after the Gloo timeout, but MPI collectives have no timeout,
so the job would wait forever. Each rank therefore ends itself when no step has finished for
``stall_timeout`` seconds, counted from its first finished step; the launcher (mpirun,
horovodrun, srun) then ends the job, and ``--resume`` continues from the last checkpoint.
Whichever rank hangs, the other ranks' watchdogs fire, so the hung one need not be able to
run anything. The watchdog stays armed while an elastic job re-forms its ring, so a
rendezvous that never completes ends too.
"""

from __future__ import annotations

import os
import sys
import threading
import time

#: The exit status of a rank ended by its watchdog (the one timeout(1) uses).
EXIT_STALLED = 124


class StepWatchdog:
    """Ends the process with :data:`EXIT_STALLED` when armed and not beaten for ``seconds``.

    The count starts at the first beat after arming: the first step of a run includes graph
    tracing and compilation, which can take minutes on a large model and a loaded machine.
    Arming an armed watchdog (an elastic reset) keeps the count going.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self._last = time.monotonic()
        self._armed = self._counting = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float) -> StepWatchdog:
        with self._lock:
            if not self._armed:
                self._counting = False
            self.seconds, self._armed = float(seconds), seconds > 0
            if self._armed and self._thread is None:
                self._thread = threading.Thread(target=self._watch, daemon=True,
                                                name="rainforest-watchdog")
                self._thread.start()
        return self

    def beat(self) -> None:
        self._last, self._counting = time.monotonic(), True

    def disarm(self) -> None:
        self._armed = False

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, max(self.seconds, 0.1) / 4))
            if (self._armed and self._counting
                    and time.monotonic() - self._last > self.seconds):
                sys.stderr.write(
                    f"rainforest: no training step finished on this rank in {self.seconds:g} s"
                    " (--stall-timeout): another rank hangs or died. Ending this rank so the "
                    "launcher ends the job; continue with --resume\n")
                sys.stderr.flush()
                os._exit(EXIT_STALLED)


_WATCHDOG = StepWatchdog()


def arm_watchdog(seconds: float) -> StepWatchdog:
    """Arm (or re-arm) this process's watchdog; ``seconds=0`` leaves it off."""
    return _WATCHDOG.arm(seconds)
