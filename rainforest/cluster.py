"""Where the Dask work runs: a local cluster by default, or an existing scheduler.

``--cluster`` is open-ended on purpose; it takes:

- ``local`` (default) or ``local:N``: a LocalCluster of N single-threaded worker processes;
- ``tcp://host:port`` (or ``tls://``): a ``dask scheduler`` you already run;
- ``scheduler-file:PATH``: a scheduler that wrote its address to PATH (common on HPC);
- ``sync``: no cluster, everything in this process (for debugging and profiling).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from rainforest.errors import ParameterError

CLUSTER_HELP = (
    "where to run: 'local' (default, one worker process per core), 'local:N' (N workers), "
    "'tcp://HOST:PORT' (a running `dask scheduler`), 'scheduler-file:PATH', or 'sync' "
    "(in this process, for debugging)"
)


@contextlib.contextmanager
def connect(spec: str = "local", *, quiet: bool = False) -> Iterator[object | None]:
    """Yield a ``distributed.Client`` for ``spec`` (None for ``sync``), closed afterwards.

    Examples
    --------
    >>> with connect("local:2") as client:        # doctest: +SKIP
    ...     print(client.dashboard_link)
    """
    spec = spec.strip()
    if spec == "sync":
        yield None
        return
    from distributed import Client, LocalCluster

    if spec == "local" or spec.startswith("local:"):
        workers = os.cpu_count() or 1
        if spec.startswith("local:"):
            try:
                workers = int(spec.split(":", 1)[1])
            except ValueError:
                workers = 0
            if workers < 1:
                raise ParameterError(f"--cluster {spec!r}: the worker count must be >= 1")
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True,
            dashboard_address=":0", silence_logs=40 if quiet else 30,
        )
        with cluster, Client(cluster) as client:
            yield client
        return
    if spec.startswith(("tcp://", "tls://", "ucx://", "inproc://")):
        try:
            client = Client(spec, timeout="30s")
        except OSError as error:
            raise ParameterError(
                f"cannot reach the Dask scheduler at {spec}: {error}. Is `dask scheduler` "
                "running there, and does this machine reach that port?"
            ) from None
        with client:
            yield client
        return
    if spec.startswith("scheduler-file:"):
        path = spec.split(":", 1)[1]
        if not os.path.exists(path):
            raise ParameterError(f"scheduler file {path} does not exist")
        with Client(scheduler_file=path, timeout="30s") as client:
            yield client
        return
    raise ParameterError(f"unknown --cluster {spec!r}; {CLUSTER_HELP}")
