"""What the launchers share: the trainer's environment (defined once), optional launcher dependencies."""

from __future__ import annotations

import os
import re
import sys

import pytest
from conftest import REPO

from gpt2.launch.common import TRAINER_ENV, LaunchError, check_overrides, require


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


@pytest.mark.parametrize("override", [
    "checkpoint.storage_options.secret=hush", "data.storage_options.key=AKIA", "checkpoint.storage_options={a: b}",
    "checkpoint.storage_options.headers.Authorization=Bearer", "checkpoint.dir=s3://user:pw@host/bucket",
])
def test_credentials_never_go_on_a_job_command_line(override):
    with pytest.raises(LaunchError, match="environment variables"):
        check_overrides([override])


def test_public_storage_settings_may_go_on_the_command_line():
    overrides = ["checkpoint.storage_options.endpoint_url=http://127.0.0.1:8333", "train.max_steps=10"]
    assert check_overrides(overrides) == overrides


# ---- bad launcher input: a message, nothing rendered or submitted -------------------------------------


@pytest.mark.parametrize("options,message", [
    (dict(time="abc"), "--time 'abc' is not a SLURM time"),
    (dict(signal_delay_s=-10), "--signal-delay must be 0 or more"),
    (dict(mem="lots"), "--mem 'lots' is not a SLURM memory size"),
    (dict(partition="gpu\nevil"), "--partition 'gpu\\nevil' may hold only"),
    (dict(cpus_per_gpu=0), "--cpus-per-gpu must be at least 1"),
    (dict(gpus=-1), "--gpus >= 0"),
])
def test_slurm_options_are_checked(options, message):
    from gpt2.launch import slurm

    with pytest.raises(LaunchError) as err:
        slurm.plan(slurm.Options(**{"nodes": 2, "gpus": 8, **options}))
    assert message in str(err.value)


def test_slurm_times_in_every_form():
    from gpt2.launch.slurm import time_to_minutes

    assert [time_to_minutes(t) for t in ("90", "30:30", "24:00:00", "1-12", "1-12:00", "1-12:00:00")] == \
        [90, 31, 1440, 2160, 2160, 2160]


@pytest.mark.parametrize("options,message", [
    (dict(gpus=-1), r"--gpus must be 0 \(CPU\) or more"),
    (dict(name="My Job"), "--name 'My Job' is not a valid Kubernetes name"),
    (dict(name="a" * 51), "at most 50"),
    (dict(namespace="ML"), "--namespace 'ML' is not a valid Kubernetes name"),
    (dict(image="registry.example.com/gpt2:latest"), "moving tag 'latest'"),
])
def test_k8s_options_are_checked(options, message):
    from gpt2.launch import k8s_manifests

    with pytest.raises(LaunchError, match=message):
        k8s_manifests.render(k8s_manifests.Options(**options))


def test_k8s_render_into_a_file_is_refused(tmp_path):
    from gpt2.launch import k8s_manifests

    (tmp_path / "out").write_text("")
    with pytest.raises(LaunchError, match="is a file"):
        k8s_manifests.write(k8s_manifests.render(k8s_manifests.Options()), tmp_path / "out")


def test_launchers_leave_auto_to_the_trainer_and_fit_a_fixed_micro_batch_with_the_same_function():
    from gpt2.config import load_config
    from gpt2.launch.common import fit_micro_batch

    auto = load_config("configs/gpt2-124m.yaml")
    assert fit_micro_batch(auto, [], [8, 16]) == ([], None)
    with pytest.raises(LaunchError, match="world size 7 cannot keep the global batch"):
        fit_micro_batch(auto, [], [7])
    fixed = load_config("configs/gpt2-124m.yaml", ["train.micro_batch=4"])
    overrides, note = fit_micro_batch(fixed, [], [8, 16])  # 4 does not divide 30 rows a rank at 16 GPUs
    assert overrides == ["train.micro_batch=3"] and "keeps train.total_batch_tokens=491520 exact" in note
    with pytest.raises(LaunchError, match="cannot keep the global batch"):
        fit_micro_batch(fixed, ["train.micro_batch=4"], [8, 16])  # given on the command line: checked as given


def test_a_training_job_on_broken_data_is_refused(tmp_path):
    from gpt2.launch import slurm

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text("[1, 2]")
    opts = slurm.Options(nodes=1, gpus=0, config="configs/demo.yaml", run_dir=str(tmp_path),
                         overrides=[f"data.dir={tmp_path / 'data'}", "data.auto_prepare=false"])
    cfg = slurm.load_trainer_config(opts.config, opts.overrides)
    with pytest.raises(LaunchError, match="not a valid shard manifest.*would wait for GPUs, then fail"):
        slurm.check_data(slurm.plan(opts, cfg), cfg, opts)


def test_render_sets_every_resource_request_and_cpu_only_asks_no_gpu():
    from gpt2.launch import k8s_manifests as m

    opts = m.Options(config="configs/demo.yaml", gpus=0, nodes=1, prepare_cpus=1, prepare_memory="1Gi",
                     worker_cpus="1", worker_memory="2Gi", tensorboard_cpus="100m", tensorboard_memory="256Mi",
                     shm_size="256Mi")
    out = m.render(opts)
    pod = out["pytorchjob.yaml"][0]["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert pod["containers"][0]["resources"] == {"requests": {"cpu": "1", "memory": "2Gi"}}
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "256Mi"}} in pod["volumes"]
    prep = out["prepare-job.yaml"][0]["spec"]["template"]["spec"]["containers"][0]
    assert prep["resources"] == {"requests": {"cpu": "1", "memory": "1Gi"}}
    tb = out["tensorboard.yaml"][0]["spec"]["template"]["spec"]["containers"][0]
    assert tb["resources"] == {"requests": {"cpu": "100m", "memory": "256Mi"}}
    assert "nvidia.com/gpu" not in str(out)


@pytest.mark.parametrize("flag,field", [("--worker-memory", "worker_memory"), ("--shm-size", "shm_size"),
                                        ("--tensorboard-cpus", "tensorboard_cpus")])
def test_a_bad_resource_quantity_names_the_flag(flag, field):
    from gpt2.launch import k8s_manifests as m

    with pytest.raises(LaunchError, match=f"{flag} '2 GB' is not a Kubernetes quantity"):
        m.render(m.Options(config="configs/demo.yaml", gpus=0, **{field: "2 GB"}))


def test_torchrun_exit_codes_keep_a_signal_retryable():
    from gpt2.launch.torchrun import exit_code_of

    assert exit_code_of(2) == 2 and exit_code_of(200) == 200
    assert exit_code_of(-9) == 137 and exit_code_of(-15) == 143


def test_the_exit_code_of_a_failed_group_is_its_cause_not_a_consequence():
    """torchrun's first failure is the frozen worker that its peer killed (SIGKILL, -9); the exit code
    is the peer's 201 (retryable: SLURM requeues on it), not 137. A worker that failed for good (a
    bug, exit 1) is the cause of its peers' 201s (their collective lost it), also within the same
    second (torchrun's timestamps are whole seconds) and whichever rank it is: the job fails with 1."""
    from types import SimpleNamespace as Failure

    from gpt2.launch.torchrun import decisive_failure, exit_code_of

    killed_then_hung = {0: Failure(exitcode=-9, timestamp=100), 1: Failure(exitcode=201, timestamp=100)}
    assert decisive_failure(killed_then_hung) == (1, 201)
    config_error = {0: Failure(exitcode=2, timestamp=100), 1: Failure(exitcode=201, timestamp=101)}
    assert decisive_failure(config_error) == (0, 2)
    bug_on_rank_1 = {0: Failure(exitcode=201, timestamp=100), 1: Failure(exitcode=1, timestamp=100)}
    assert decisive_failure(bug_on_rank_1) == (1, 1)
    killed_alone = {0: Failure(exitcode=-9, timestamp=100), 1: Failure(exitcode=-15, timestamp=100)}
    assert decisive_failure(killed_alone) == (0, -9) and exit_code_of(-9) == 137
    two_lost = {0: Failure(exitcode=201, timestamp=101), 1: Failure(exitcode=202, timestamp=100)}
    assert decisive_failure(two_lost) == (1, 202)


def _on_path(tmp_path, monkeypatch, name: str, body: str) -> None:
    """A program `name` first on PATH (a real process, as a stuck or failing SLURM command is)."""
    (tmp_path / name).write_text(f"#!/bin/sh\n{body}\n")
    (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")


def test_a_slurm_command_that_fails_or_never_answers_is_an_error_naming_it(tmp_path, monkeypatch):
    """sinfo that cannot reach slurmctld is a LaunchError with its message (not an empty cluster,
    which read as 'partition does not exist'); one that never answers is cut off at SLURM_CALL_S
    (here 1 s instead of 60: the timeout is what is tested); squeue's hang in a follow loop is a
    warning and no verdict."""
    from gpt2.launch import slurm

    _on_path(tmp_path, monkeypatch, "sinfo", "echo 'sinfo: error: Unable to contact slurm controller' >&2; exit 1")
    with pytest.raises(LaunchError, match="`sinfo -h -o '%P %G %D %c'` failed: sinfo: error: Unable to contact"):
        slurm.slurm_command(["sinfo", "-h", "-o", "%P %G %D %c"])
    monkeypatch.setattr(slurm, "SLURM_CALL_S", 1.0)
    _on_path(tmp_path, monkeypatch, "squeue", "exec sleep 60")
    with pytest.raises(LaunchError, match=r"`squeue -h` gave no answer within 1 s: slurmctld is down or overloaded"):
        slurm.slurm_command(["squeue", "-h"])
    assert slurm.never_starts("42") is None
