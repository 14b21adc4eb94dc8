#!/usr/bin/env bash
# Installs everything rainforest needs on a fresh Debian-like machine with Python 3.11:
# system packages (a C++ toolchain and OpenMPI for Horovod), a virtual environment with
# tensorflow-cpu 2.18.1 and Horovod 0.28.1 built with Gloo and MPI, and rainforest itself.
# Idempotent: a finished step leaves a stamp in the venv and is skipped next time.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
stamp() { echo "$VENV/.stamp-$1"; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# --- system packages -------------------------------------------------------------------
# g++/make/cmake build Horovod; OpenMPI is its MPI controller. Slurm (slurmctld, slurmd, the
# client commands), munge and PMIx: the tests start a real single-node Slurm, and a login node
# needs sbatch for --cluster slurm. openssh-server, openssh-client and iproute2: the
# multi-node tests give each simulated node (a network namespace) its own sshd. Nothing is started or configured system-wide. chromium
# (headless) opens the `rainforest report` page in its test.
SYSTEM_PACKAGES="g++ make openmpi-bin libopenmpi-dev slurmctld slurmd slurm-client munge libpmix-dev openssh-server openssh-client iproute2 chromium"
missing=""
for pkg in $SYSTEM_PACKAGES; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  echo "[install] apt-get install:$missing"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends $missing
fi

# --- python environment ----------------------------------------------------------------
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
if [ ! -f "$(stamp base)" ]; then
  $PIP install -q --upgrade pip wheel setuptools
  # Horovod 0.28.1 compiles against TF <= 2.18 only; CMake 4 refuses its bundled gloo.
  $PIP install -q "tensorflow-cpu==2.18.1" "cmake<4"
  touch "$(stamp base)"
fi
if [ ! -f "$(stamp horovod)" ]; then
  echo "[install] building horovod 0.28.1 (about 4 minutes on 2 cores; pip caches the wheel)"
  PATH="$PWD/$VENV/bin:$PATH" \
  HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
  HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 CMAKE_POLICY_VERSION_MINIMUM=3.5 \
    $PIP install -q --no-build-isolation "horovod==0.28.1"
  "$VENV/bin/horovodrun" --check-build | tee "$VENV/horovod-check-build.txt"
  for need in "TensorFlow" "MPI" "Gloo"; do
    grep -qE "\[X\] $need" "$VENV/horovod-check-build.txt" \
      || { echo "[install] horovod was built without $need" >&2; exit 1; }
  done
  touch "$(stamp horovod)"
fi
$PIP install -q -e ".[test]"
echo "[install] ready: $VENV"
