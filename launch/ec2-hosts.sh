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
# Needs boto3 (in rainforest's venv) and AWS credentials; AWS_ENDPOINT_URL is honoured.
set -euo pipefail
run=${1:?usage: $0 RUN [SLOTS] [--hostfile]}
slots=${2:-1}
format=${3:-}
venv_python="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"
python=${PYTHON:-$([ -x "$venv_python" ] && echo "$venv_python" || echo python3)}
exec "$python" - "$run" "$slots" "$format" "${TAG_KEY:-rainforest-run}" "${ADDRESS:-private}" <<'PY'
import sys

import boto3

run, slots, form, tag, kind = sys.argv[1:6]
pages = boto3.client("ec2").get_paginator("describe_instances").paginate(Filters=[
    {"Name": f"tag:{tag}", "Values": [run]},
    {"Name": "instance-state-name", "Values": ["running"]}])
key = "PublicIpAddress" if kind == "public" else "PrivateIpAddress"
hosts = sorted({i[key] for page in pages for r in page["Reservations"] for i in r["Instances"]
                if i.get(key)}, key=lambda ip: tuple(int(part) for part in ip.split(".")))
if not hosts:
    sys.exit(f"no running EC2 VM carries the tag {tag}={run}")
if form == "--hostfile":
    print("\n".join(f"{host} slots={slots}" for host in hosts))
else:
    print(",".join(f"{host}:{slots}" for host in hosts))
PY
