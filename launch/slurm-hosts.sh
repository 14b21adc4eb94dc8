#!/usr/bin/env bash
# Print the job's hosts as horovodrun wants them, "node1:N,node2:N" (N = tasks per node).
# Run it inside a Slurm job:
#   horovodrun -np "$SLURM_NTASKS" -H "$(launch/slurm-hosts.sh)" --gloo rainforest train ...
# `launch/slurm-hosts.sh --hostfile` prints an OpenMPI hostfile ("node slots=N") instead.
# It is `rainforest hosts slurm` (see its --help) with rainforest's venv found next to launch/.
set -euo pipefail
venv_python="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"
python=${PYTHON:-$([ -x "$venv_python" ] && echo "$venv_python" || echo python3)}
exec "$python" -m rainforest.cli hosts slurm "$@"
