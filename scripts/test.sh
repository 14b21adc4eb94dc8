#!/usr/bin/env bash
# The test command: installs everything (scripts/install.sh), then runs the whole suite,
# slow and service-backed tests included. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/python -m pytest "$@"
