#!/usr/bin/env bash
# Elastic training inside a Slurm job (sbatch or salloc), one rank per task: the ranks run on
# the nodes the job holds now (launch/slurm-discover.sh, asked again every few seconds), and
# training goes on when a node is lost or drained. Everything else is launch/elastic-local.sh.
#   sbatch -N2 --ntasks-per-node=1 --wrap "launch/elastic-slurm.sh DATASET --run RUN ..."
# NIC defaults to the interface on the route to the other nodes (as slurm/train.sbatch's).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="$here/../.venv/bin/python"
[ -x "$python" ] || python=python3
NIC=${NIC:-$("$python" -m rainforest.slurmjobs)} || exit 2
export NIC
exec "$here/elastic-local.sh" --discover "$here/slurm-discover.sh" "$@"
