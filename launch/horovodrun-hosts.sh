#!/usr/bin/env bash
# Train across machines with horovodrun: passwordless ssh between them, the same Python
# environment at the same path on each, and DATASET and RUN on storage every host can see
# (a shared filesystem, or s3:// for the dataset).
#   launch/horovodrun-hosts.sh "host1:4,host2:4" DATASET --run RUN [options...]
# Add --gloo (default here) or replace it with --mpi to use the MPI controller.
# rainforest's ssh with keepalives goes first on PATH: a host that loses power ends its ssh
# session within 15 s, and with it the job, instead of leaving horovodrun waiting forever.
set -euo pipefail
hosts=${1:?usage: $0 host1:slots,host2:slots DATASET --run RUN [options]}; shift
ranks=0
IFS=, read -ra entries <<<"$hosts"
for entry in "${entries[@]}"; do ranks=$((ranks + ${entry##*:})); done
bin="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
PATH="$("$bin/rainforest" hosts keepalive):$PATH"
exec "$bin/horovodrun" -np "$ranks" -H "$hosts" "${CONTROLLER:---gloo}" "$bin/rainforest" train "$@"
