#!/usr/bin/env bash
# Train on this machine with N ranks under plain OpenMPI mpirun.
#   launch/mpirun-local.sh N DATASET --run RUN [rainforest train options...]
# As root (containers), OpenMPI needs the two OMPI_ALLOW_RUN_AS_ROOT variables set below.
set -euo pipefail
ranks=${1:?usage: $0 N DATASET --run RUN [options]}; shift
bin="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
if [ "$(id -u)" = 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
# --bind-to none: each rank sizes its own thread pool; OpenMPI's core binding would starve it.
exec mpirun -np "$ranks" --bind-to none -x PATH -x LD_LIBRARY_PATH "$bin/rainforest" train "$@"
