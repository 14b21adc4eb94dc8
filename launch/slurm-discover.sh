#!/usr/bin/env bash
# Host discovery for elastic training inside a Slurm job: print "node:slots" for each node
# the job holds now, for
#   horovodrun --min-np 1 --host-discovery-script launch/slurm-discover.sh --gloo \
#     rainforest train --elastic ...
# A node that fails or is taken from the job drops out of the list; one added to it joins. A
# node that Slurm drains (`scontrol update NodeName=... State=DRAIN`) is left out, so its ranks
# stop at the next commit while the job goes on; resumed, it joins again.
# SLURM_DISCOVER_EXCLUDE names a file of nodes to leave out as well (one per line).
# horovodrun reaches the other nodes by ssh, and an ssh without keepalives waits forever on a
# node that lost power: this refuses such nodes (exit 1, saying what to add) unless horovodrun
# runs with `rainforest hosts keepalive` first on its PATH or ~/.ssh/config sets
# ServerAliveInterval. launch/elastic-slurm.sh starts horovodrun that way.
# It is `rainforest hosts slurm --discover` with rainforest's venv found next to launch/.
set -euo pipefail
venv_python="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"
python=${PYTHON:-$([ -x "$venv_python" ] && echo "$venv_python" || echo python3)}
exec "$python" -m rainforest.cli hosts slurm --discover "$@"
