#!/usr/bin/env bash
# The main job end to end on the embedded default: real songs from a Debian package (cached),
# preprocessed on a local Dask cluster, trained with 2 Horovod ranks (horovodrun, Gloo,
# localhost), then 2 songs generated from the trained run. Extra arguments go to
# `rainforest demo`, e.g. `scripts/demo.sh --songs ~/music` to use your own folder.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/rainforest demo "$@"
