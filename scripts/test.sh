#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh machine and run it (what CI runs):
#   bash scripts/test.sh                 # the whole suite
#   bash scripts/test.sh -k data -x      # extra arguments go to pytest
# Needs Debian with Python >= 3.10; as root it also starts the local SLURM cluster and a local
# Kubernetes (scripts/k8s-cluster.sh; about 10 minutes to build the first time) and installs
# buildah/debootstrap for the container test, faketime for the skewed-clock tests and bindfs (FUSE)
# for a hanging checkpoint directory. Tests read ../shared/data (see its SOURCES.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first, pinned: the local CPU wheel, never the CUDA one from the registry
.venv/bin/python -m pip install -q -c .ci/constraints.txt torch==2.13.0
.venv/bin/python -m pip install -q -c .ci/constraints.txt -e '.[test]'

if [ "$(id -u)" = 0 ]; then
    need=()
    for tool in buildah debootstrap faketime bindfs; do command -v "$tool" >/dev/null || need+=("$tool"); done
    if ((${#need[@]})); then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
    bash scripts/slurm-cluster.sh up >/dev/null
    # a real single-node Kubernetes (built once, cached in /var/cache/gpt2-k8s); stopped again at the
    # end when this run started it, since it changes host settings (sysctls, a bridge, cgroups)
    if ! bash scripts/k8s-cluster.sh status >/dev/null 2>&1; then
        trap 'bash scripts/k8s-cluster.sh down >/dev/null 2>&1 || true' EXIT
        if ! bash scripts/k8s-cluster.sh up >/tmp/gpt2-k8s-up.log 2>&1; then
            tail -20 /tmp/gpt2-k8s-up.log >&2
            if [ "${CI:-}" = true ]; then echo "error: the Kubernetes cluster did not come up" >&2; exit 1; fi
            echo "warning: no Kubernetes cluster (see above); its tests will skip" >&2
        fi
    fi
fi

.venv/bin/ruff check gpt2 tests launch benchmarks
.venv/bin/python -m pytest --durations=25 "$@"
