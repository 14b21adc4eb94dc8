#!/usr/bin/env bash
# Host discovery for elastic training inside a Slurm job: print "node:slots" for each node
# the job holds now (`scontrol show hostnames` of its current node list), for
#   horovodrun --min-np 1 --host-discovery-script launch/slurm-discover.sh --gloo \
#     rainforest train --elastic ...
# Slots per node come from SLURM_NTASKS_PER_NODE (or SLURM_NTASKS on one node). A node that
# fails or is taken from the job drops out of the list; one added to it joins. A node that
# Slurm drains (`scontrol update NodeName=... State=DRAIN`) is left out, so its ranks stop at
# the next commit while the job goes on; resumed, it joins again.
# SLURM_DISCOVER_EXCLUDE names a file of nodes to leave out as well (one per line).
set -euo pipefail
: "${SLURM_JOB_ID:?run this inside a Slurm job}"
per_node=${SLURM_NTASKS_PER_NODE:-${SLURM_NTASKS:-1}}
per_node=${per_node%%(*}  # "2(x3)" means 2 tasks on each of 3 nodes
nodes=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *NodeList=\([^ ]*\).*/\1/p' | head -n1)
nodes=${nodes:-${SLURM_JOB_NODELIST:?no node list for job $SLURM_JOB_ID}}
exclude=${SLURM_DISCOVER_EXCLUDE:-}
drained=$(sinfo -h -N -t drain -o %N)  # draining and drained nodes
while read -r host; do
  if [ -n "$exclude" ] && [ -r "$exclude" ] && grep -qxF "$host" "$exclude"; then continue; fi
  if grep -qxF "$host" <<< "$drained"; then continue; fi
  echo "$host:$per_node"
done < <(scontrol show hostnames "$nodes")
