"""What the launchers share: the trainer's environment (defined once), optional launcher dependencies."""

from __future__ import annotations

import re
import sys

import pytest
from conftest import REPO

from gpt2.launch.common import TRAINER_ENV, LaunchError, require


def test_dockerfile_sets_the_trainer_environment():
    text = (REPO / "Dockerfile").read_text()
    env = dict(re.findall(r"^\s*(?:ENV\s+)?([A-Z_][A-Z0-9_]*)=(\S+?)\s*\\?$", text, re.M))
    assert {k: env.get(k) for k in TRAINER_ENV} == TRAINER_ENV


def test_sbatch_script_exports_the_trainer_environment():
    text = (REPO / "slurm" / "train.sbatch").read_text()
    env = dict(re.findall(r"^export ([A-Z_][A-Z0-9_]*)=(\S+)$", text, re.M))
    assert {k: env.get(k) for k in TRAINER_ENV} == TRAINER_ENV


def test_a_missing_launcher_dependency_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # what `import submitit` meets when it is not installed
    with pytest.raises(LaunchError, match=r"pip install 'gpt2\[slurm\]'"):
        require("submitit", "slurm")


def test_manifests_render_without_the_kubernetes_client(monkeypatch):
    monkeypatch.setitem(sys.modules, "kubernetes", None)
    from gpt2.launch import k8s_manifests

    rendered = k8s_manifests.render(k8s_manifests.Options())
    assert rendered["pytorchjob.yaml"][0]["kind"] == "PyTorchJob"
    assert rendered["pytorchjob.yaml"][0]["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"][
        "containers"][0]["image"] == "ghcr.io/gpt2-cluster/gpt2:0.1.0"  # launch.image of the config


def test_k8s_cli_without_the_client_says_which_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "kubernetes", None)
    from gpt2.launch import k8s

    assert k8s.main(["create", "--kubeconfig", str(tmp_path / "none")]) == 2
    assert "pip install 'gpt2[k8s]'" in capsys.readouterr().err
