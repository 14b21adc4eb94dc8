#!/usr/bin/env bash
# Elastic training over Gloo: ranks may die or join while training goes on.
#   launch/elastic-local.sh HOSTS_FILE DATASET --run RUN [rainforest train options...]
#   launch/elastic-local.sh --discover SCRIPT DATASET --run RUN [options...]
# HOSTS_FILE lists one host:slots per line (see launch/discover-hosts.sh) and is read again
# every few seconds; --discover names any other discovery script (launch/elastic-slurm.sh passes
# launch/slurm-discover.sh). On one machine give each slot its own name for the same machine
# ("localhost:1" and "127.0.0.1:1"): Horovod blacklists a failing *host*, so with
# "localhost:2" one lost rank would end the job. MIN_NP (default 1) and MAX_NP (default: the
# slots listed now) bound the ranks; NIC (default lo) is the interface the ranks talk on;
# a failed host stays blacklisted for COOLDOWN seconds (default "5 10": a random time between).
# horovodrun reaches other hosts by ssh; rainforest's ssh with keepalives goes first on its PATH,
# so a host that loses power is given up within 15 s instead of never.
set -euo pipefail
usage="usage: $0 HOSTS_FILE|--discover SCRIPT DATASET --run RUN [options]"
here="$(cd "$(dirname "$0")" && pwd)"
bin="$(cd "$here/.." && pwd)/.venv/bin"
[ -x "$bin/horovodrun" ] || bin="$(dirname "$(command -v horovodrun)")"
if [ "${1:?$usage}" = --discover ]; then
  discover=${2:?$usage}; shift 2
else
  discover="$here/discover-hosts.sh $(realpath "$1")"; shift
fi
PATH="$("$bin/rainforest" hosts keepalive):$PATH"
slots=0
while IFS=: read -r _ n; do slots=$((slots + n)); done < <($discover)
[ "$slots" -gt 0 ] || { echo "elastic-local: $discover lists no host" >&2; exit 1; }
exec "$bin/horovodrun" -np "$slots" --min-np "${MIN_NP:-1}" --max-np "${MAX_NP:-$slots}" \
  --host-discovery-script "$discover" --network-interface "${NIC:-lo}" \
  --gloo-timeout-seconds "${GLOO_TIMEOUT:-10}" --blacklist-cooldown-range ${COOLDOWN:-5 10} --gloo \
  "$bin/rainforest" train --elastic "$@"
