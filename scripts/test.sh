#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh machine and run it (what CI runs):
#   bash scripts/test.sh                 # the whole suite
#   bash scripts/test.sh -k data -x      # extra arguments go to pytest
# Needs Debian with Python >= 3.10; as root it also starts the local SLURM cluster and installs
# buildah/debootstrap for the container test. Tests read ../shared/data (see its SOURCES.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first, pinned: the local CPU wheel, never the CUDA one from the registry
.venv/bin/python -m pip install -q -c .ci/constraints.txt torch==2.13.0
.venv/bin/python -m pip install -q -c .ci/constraints.txt -e '.[test]'

if [ "$(id -u)" = 0 ]; then
    need=()
    for tool in buildah debootstrap; do command -v "$tool" >/dev/null || need+=("$tool"); done
    if ((${#need[@]})); then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
    bash scripts/slurm-cluster.sh up >/dev/null
fi

.venv/bin/ruff check gpt2 tests launch benchmarks
.venv/bin/python -m pytest "$@"
