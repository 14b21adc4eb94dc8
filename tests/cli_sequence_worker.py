"""Run several ``rainforest`` commands one after another in one Python process.

    python tests/cli_sequence_worker.py OUT_DIR COMMANDS.json

``COMMANDS.json`` holds a list of argument lists. Each is run by ``rainforest.cli.main``, as
the ``rainforest`` command would run it, with its stdout in ``OUT_DIR/run-K.stdout``; the
exit statuses go to ``OUT_DIR/status.json``. Sharing the process shares the TensorFlow
import (several seconds) between the runs. Before each run a line ``=== run K`` goes to the
process's own stderr, so TensorFlow's C++ log lines can be told apart by run.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

from rainforest.cli import main


def run_all(out: str, commands: list[list[str]]) -> list[int]:
    statuses = []
    for index, argv in enumerate(commands):
        sys.stderr.flush()
        os.write(2, f"=== run {index}\n".encode())
        with open(os.path.join(out, f"run-{index}.stdout"), "w") as stdout, \
                contextlib.redirect_stdout(stdout):
            statuses.append(main(argv))
    with open(os.path.join(out, "status.json"), "w") as handle:
        json.dump(statuses, handle)
    return statuses


if __name__ == "__main__":
    with open(sys.argv[2]) as handle:
        run_all(sys.argv[1], json.load(handle))
