#!/usr/bin/env bash
# Print the running EC2 VMs that carry a run tag as a horovodrun host list, "ip1:N,ip2:N"
# (N = slots, i.e. ranks, per VM), or with --hostfile as an OpenMPI hostfile ("ip slots=N").
#   launch/ec2-hosts.sh RUN [SLOTS] [--hostfile]
#   horovodrun -np 8 -H "$(launch/ec2-hosts.sh my-run 4)" --gloo rainforest train ...
#   launch/ec2-hosts.sh my-run 4 --hostfile > hosts; mpirun -np 8 --hostfile hosts ...
# A VM belongs to RUN when its tag $TAG_KEY (default rainforest-run, the tag --cluster ec2
# puts on its VMs) has the value RUN; tag your own training VMs the same way
# (aws ec2 run-instances --tag-specifications 'ResourceType=instance,Tags=[{Key=rainforest-run,Value=my-run}]').
# Private addresses by default (ranks talk inside the VPC); ADDRESS=public for public ones.
# It is `rainforest hosts ec2` (see its --help) with rainforest's venv found next to launch/;
# it needs AWS credentials, and honours AWS_ENDPOINT_URL.
set -euo pipefail
run=${1:?usage: $0 RUN [SLOTS] [--hostfile]}
options=(--slots "${2:-1}" ${3:+"$3"})
[ -n "${TAG_KEY:-}" ] && options+=(--tag-key "$TAG_KEY")
[ "${ADDRESS:-private}" = public ] && options+=(--public)
venv_python="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"
python=${PYTHON:-$([ -x "$venv_python" ] && echo "$venv_python" || echo python3)}
exec "$python" -m rainforest.cli hosts ec2 "$run" "${options[@]}"
