#!/usr/bin/env bash
# Print the job's hosts as horovodrun wants them, "node1:N,node2:N" (N = tasks per node),
# from `scontrol show hostnames` of the allocation. Run it inside a Slurm job:
#   horovodrun -np "$SLURM_NTASKS" -H "$(launch/slurm-hosts.sh)" --gloo rainforest train ...
# `launch/slurm-hosts.sh --hostfile` prints an OpenMPI hostfile ("node slots=N") instead.
set -euo pipefail
: "${SLURM_JOB_NODELIST:?run this inside a Slurm job}"
per_node=${SLURM_NTASKS_PER_NODE:-${SLURM_NTASKS:-1}}
per_node=${per_node%%(*}  # "2(x3)" means 2 tasks on each of 3 nodes
hosts=()
while read -r host; do
  if [ "${1:-}" = "--hostfile" ]; then echo "$host slots=$per_node"; else hosts+=("$host:$per_node"); fi
done < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
if [ "${1:-}" != "--hostfile" ]; then (IFS=,; echo "${hosts[*]}"); fi
