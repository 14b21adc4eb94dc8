"""A Dask worker preload (``distributed.worker.preload``) that tells a test which worker ran what.

Each worker writes the key of every task it finished to ``$TASK_RECORDER_DIR/<job>.tasks``
(``<job>``: its Slurm job id, else its pid). Before it registers with the scheduler it waits
until ``$TASK_RECORDER_WORKERS`` workers have started, so that work is dealt over all of them
rather than to whichever came first; at most 45 s, less than the 60 s a dask-jobqueue worker
waits for its scheduler before it gives up (its ``--death-timeout``).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from distributed import WorkerPlugin


class _Recorder(WorkerPlugin):
    def __init__(self, path: Path) -> None:
        self.path = path

    def transition(self, key, start, finish, **kwargs) -> None:
        if start == "executing" and finish == "memory":
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(f"{key}\n")


async def dask_setup(worker) -> None:
    folder = Path(os.environ["TASK_RECORDER_DIR"])
    name = os.environ.get("SLURM_JOB_ID") or str(os.getpid())
    (folder / f"{name}.started").touch()
    wanted = int(os.environ.get("TASK_RECORDER_WORKERS", "1"))
    deadline = time.monotonic() + 45
    while len(list(folder.glob("*.started"))) < wanted and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await worker.plugin_add(_Recorder(folder / f"{name}.tasks"), name="task-recorder")
