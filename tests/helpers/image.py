"""The project image, built once per test session with buildah from the Dockerfile (no Docker engine).

Registries cannot be reached here, so scripts/build-test-base.sh makes a local stand-in for the
PyTorch base image (Debian from the package mirror, python3, the CPU torch wheel) and the
Dockerfile is built on it through its BASE_IMAGE build argument.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from conftest import IN_CI, REPO

BUILDAH = ["buildah", "--storage-driver", "vfs"]
BASE = "localhost/gpt2-test-base:latest"
IMAGE = "localhost/gpt2:test"


def build_project_image() -> Iterator[str]:
    """Build IMAGE, yield its name, then remove it (the base stays, for the next run)."""
    if shutil.which("buildah") is None or os.geteuid() != 0:
        msg = "buildah (as root) is needed to build the image"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    r = subprocess.run(["bash", "scripts/build-test-base.sh"], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # vfs copies the whole file system per layer: no intermediate layers, and nothing left behind
    # but the base (reused by the next run), or repeated runs fill the disk
    subprocess.run([*BUILDAH, "rmi", "--prune"], capture_output=True)
    r = subprocess.run([*BUILDAH, "build", "--isolation", "chroot", "--layers=false", "--build-arg",
                        f"BASE_IMAGE={BASE}", "-t", IMAGE, "."], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    yield IMAGE
    subprocess.run([*BUILDAH, "rmi", IMAGE], capture_output=True)
    subprocess.run([*BUILDAH, "rmi", "--prune"], capture_output=True)
