#!/usr/bin/env bash
# Train on this machine with N Horovod ranks over Gloo (no MPI needed).
#   launch/horovodrun-local.sh N DATASET --run RUN [rainforest train options...]
# Each rank gets cores/N intra-op threads, so N=cores/2..cores is a good start on a CPU box.
set -euo pipefail
ranks=${1:?usage: $0 N DATASET --run RUN [options]}; shift
bin="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
exec "$bin/horovodrun" -np "$ranks" -H "localhost:$ranks" --gloo "$bin/rainforest" train "$@"
