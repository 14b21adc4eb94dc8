"""Peak memory of a fresh child process, measured by the child itself.

VmHWM from /proc/self/status, not getrusage's ru_maxrss: Linux carries ru_maxrss over from
the forking parent, so a child of a pytest process that has loaded TensorFlow would start at
that process's peak and hide any growth below it. VmHWM belongs to the child's own address
space (exec replaces it), so it starts from the child's own size.
"""

from __future__ import annotations

import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))


def own_peak_kb() -> int:
    """This process's own peak resident set size, in kB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def run_child(code: str, *args) -> str:
    """Run ``code`` in a fresh Python that can ``import peak_memory``; its stdout."""
    prelude = f"import sys; sys.path.insert(0, {TESTS!r})\n"
    result = subprocess.run([sys.executable, "-c", prelude + code, *map(str, args)],
                            capture_output=True, text=True, check=True)
    return result.stdout
