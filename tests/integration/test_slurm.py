"""SLURM: the submitit launcher and slurm/train.sbatch on a real two-node SLURM cluster (loopback)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import IN_CI, REPO, run_cli, shared_file, tiny_overrides
from helpers.runs import steps

pytestmark = pytest.mark.slurm

# the chaos run's job: long enough that four faults, one after another, land in training
CHAOS = {"train.max_steps": 1000, "train.log_every": 50, "checkpoint.every": 50, "eval.val_every": 100}
SLOW = {"model.n_layer": 2, "model.n_embd": 128, "model.n_head": 4, "train.max_steps": 30,
        "checkpoint.every": 5, "model.block_size": 64, "train.seq_len": 64, "train.total_batch_tokens": 1024}


def cluster_up() -> bool:
    return shutil.which("scontrol") is not None and subprocess.run(
        ["scontrol", "ping"], capture_output=True).returncode == 0 and "idle" in subprocess.run(
        ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def slurm():
    if not cluster_up() and os.geteuid() == 0:
        subprocess.run(["bash", str(REPO / "scripts" / "slurm-cluster.sh"), "up"], capture_output=True, timeout=600)
    if not cluster_up():
        msg = "no SLURM cluster (scripts/slurm-cluster.sh up starts one, as root)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)


def overrides(tmp: Path, **extra) -> list[str]:
    return [o for o in tiny_overrides(tmp, **extra) if not o.startswith(("checkpoint.dir=", "logging.dir="))]


def launch(tmp: Path, *args: str, extra: dict | None = None, follow: bool = True) -> subprocess.CompletedProcess:
    cmd = ["launch/slurm.py", "--nodes", "2", "--gpus", "0", "--config", "configs/demo.yaml", "--time", "00:20:00",
           "--run-dir", str(tmp / "runs"), "--name", "tiny", *args]
    if follow:
        cmd.append("--follow")
    # one thread per process: two "nodes" share this machine's cores, and CPU math is bitwise only unoversubscribed
    return run_cli([*cmd, *overrides(tmp, **(extra or {}))], env={"TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"})


def run_steps(tmp: Path) -> dict[int, dict]:
    return steps(tmp, tmp / "runs" / "tiny" / "tensorboard")  # logging.dir = <run dir>/<name>/tensorboard


def wait_job(job_id: str, timeout: float = 300) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["sacct", "-X", "-n", "-j", job_id, "-o", "State"], capture_output=True, text=True).stdout
        state = out.split()[0] if out.split() else "PENDING"
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not end")


def test_chaos_through_slurm_every_invariant_holds(slurm, tmp_path):
    """The chaos run with its job submitted through the launcher to the two-node cluster (one worker
    per node), shipped defaults. Seed 76 draws a second submission (refused by the lease),
    a killed worker (torchrun restarts the group on both nodes), a frozen worker (its peer's watchdog
    ends the group; the frozen worker's own agent, on the other node, kills it at once instead of
    waiting torchrun's 30 s) and a preemption (`scancel --signal=USR2`: the trainers save, submitit
    requeues the job, the requeued job resumes). Every step's loss and the final model are the
    uninterrupted run's, bitwise."""
    chaos = tmp_path / "chaos"
    r = run_cli(["-m", "gpt2.chaos", "configs/demo.yaml", "--launcher", "slurm", "--seed", "76", "--faults", "4",
                 "--kinds", "kill,preempt,second,freeze", "--dir", str(chaos),
                 *overrides(tmp_path, **CHAOS)], env={"TMPDIR": str(tmp_path)}, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    record = json.loads((chaos / "chaos.json").read_text())
    faults = {f["kind"]: f for f in record["faults"]}
    assert [f["kind"] for f in record["faults"]] == ["second", "kill", "freeze", "preempt"], record["faults"]
    assert all(f["injected_at"] for f in record["faults"]) and record["breaches"] == []
    assert "refused, run undisturbed" in r.stdout and "every invariant holds" in r.stdout
    # the ledger knows the job by its SLURM id, which the requeue kept
    attempts = [json.loads(line) for line in (chaos / "chaos" / "tb" / "attempts.jsonl").read_text().splitlines()]
    job_id = re.search(r"SLURM job (\d+)", r.stdout + r.stderr).group(1)
    assert {a["job_id"] for a in attempts if a["event"] == "start"} == {f"slurm:gpt2test/{job_id}"}, attempts
    runs = subprocess.run(["sacct", "-X", "-n", "-D", "-j", job_id, "-o", "State"], capture_output=True,
                          text=True).stdout.split()
    assert len(runs) >= 2, runs  # preempted and requeued, then completed
    log = "\n".join(p.read_text() for p in (chaos / "chaos" / "submitit").glob("*/*_log.*"))
    assert "received SIGUSR2: saving a checkpoint" in log and "requeueing" in log, log[-3000:]
    # one process group across the two nodes, with TensorBoard's events
    assert "gpt2n1" in log and "--nnodes=2" in log, log[-3000:]
    steps_of_run = [json.loads(line) for line in (chaos / "chaos" / "tb" / "steps.jsonl").read_text().splitlines()]
    assert {rec["world_size"] for rec in steps_of_run} == {2}
    assert list((chaos / "chaos" / "tb").glob("events.out.tfevents.*"))
    # the frozen worker's agent did not wait 30 s for it: the watchdog's minute, then a restart
    assert "killed stopped worker(s)" in log and faults["freeze"]["recovery_s"] < 90, faults["freeze"]


def test_plain_sbatch_script_runs_the_same_command_and_run(slurm, tmp_path):
    """slurm/train.sbatch runs the launcher's very command (the same training, as the chaos test
    above shows the launcher's is the uninterrupted run's) to the end on two nodes."""
    env = dict(os.environ, GPUS="0", CONFIG="configs/demo.yaml", RUN_DIR=str(tmp_path / "runs"),
               PYTHON=str(Path(os.sys.executable)), TMPDIR=str(tmp_path), OMP_NUM_THREADS="1")
    out = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--job-name=tiny", f"--output={tmp_path}/job-%j.out",
                          "slurm/train.sbatch", *overrides(tmp_path, **SLOW)],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True)
    job_id = out.stdout.strip().split(";")[0]
    state = wait_job(job_id)
    log = (tmp_path / f"job-{job_id}.out").read_text()
    assert state == "COMPLETED", log[-4000:]
    sbatch_cmd = log.split(f"[gpt2] job {job_id} (requeue 0) on gpt2n[1-2]: ")[1].splitlines()[0]
    # the launcher's command for the same job, as the submitit task would run it
    launcher = run_cli(["-m", "gpt2.launch.slurm", "--print-torchrun", "--nodes", "2", "--gpus", "0", "--config",
                        "configs/demo.yaml", "--run-dir", str(tmp_path / "runs"), "--name", "tiny",
                        *overrides(tmp_path, **SLOW)], env={"MASTER_HOST": "gpt2n1", "SLURM_JOB_ID": job_id})
    assert shlex.split(sbatch_cmd) == shlex.split(launcher.stdout.strip())
    got = run_steps(tmp_path)
    assert sorted(got) == list(range(30)) and {rec["world_size"] for rec in got.values()} == {2}
    assert (tmp_path / "runs" / "tiny" / "checkpoints" / "step-00000030" / "COMMITTED").exists()


@pytest.mark.parametrize("args,env,message", [
    (["--partition", "nosuch"], {}, "partition 'nosuch' does not exist; partitions: debug"),
    (["--gpus", "4"], {}, "--gpus 4 is more than the nodes of the default partition have (0 GPUs per node)"),
    (["--nodes", "4"], {}, "--nodes 4 is more than the cluster has (2)"),
    (["train.max_step=3"], {}, "did you mean 'train.max_steps'"),
    ([], {"PATH": "/nonexistent"}, "sbatch is not on PATH"),
    (["--cpus-per-gpu", "8"], {}, "asks 8 CPUs per node, but the nodes of the default partition have 2"),
])
def test_bad_input_is_refused_before_submitting(slurm, tmp_path, args, env, message):
    before = subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout
    nodes = [] if "--nodes" in args else ["--nodes", "2"]
    cmd = ["launch/slurm.py", *nodes, "--gpus", "0", "--config", "configs/demo.yaml", "--run-dir", str(tmp_path), *args]
    r = run_cli(cmd, env=env)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout == before
    assert not (tmp_path / "demo").exists()


def test_dry_run_prints_the_script_and_command(tmp_path):
    r = run_cli(["launch/slurm.py", "--nodes", "2", "--gpus", "8", "--dry-run", "--partition", "gpu",
                 "--run-dir", str(tmp_path), "train.max_steps=10"], env={"PATH": "/nonexistent"})
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --nodes=2" in r.stdout and "#SBATCH --gpus-per-node=8" in r.stdout
    assert "#SBATCH --signal=USR2@120" in r.stdout and "#SBATCH --partition=gpu" in r.stdout
    assert "--nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d" in r.stdout and "train.max_steps=10" in r.stdout


def test_a_job_that_can_never_start_is_recognised(slurm, tmp_path):
    from gpt2.launch.slurm import never_starts

    out = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=64", f"--output={tmp_path}/x.out", "--wrap", "true"],
                         capture_output=True, text=True)
    if out.returncode != 0:  # some SLURM versions refuse it at once, which is as good
        assert "CPU" in out.stderr or "configuration" in out.stderr, out.stderr
        return
    job_id = out.stdout.strip().split(";")[0]
    try:
        deadline = time.time() + 30
        reason = None
        while reason is None and time.time() < deadline:
            reason = never_starts(job_id)
            time.sleep(1)
        assert reason is not None and reason.startswith("PartitionConfig"), reason
    finally:
        subprocess.run(["scancel", job_id])


# ---- the data preparation as a job of its own (issue: the whole job on a cluster) ---------------------

NO_AUTO = {"data.auto_prepare": "false"}


def data_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if not p.name.startswith(".")}


def queue() -> str:
    return subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout


def test_prepare_job_produces_the_shards(slurm, tmp_path):
    r = run_cli(["launch/slurm.py", "prepare", "--config", "configs/demo.yaml", "--run-dir", str(tmp_path / "runs"),
                 "--time", "00:10:00", "--follow", *overrides(tmp_path)], env={"TMPDIR": str(tmp_path)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ended: COMPLETED" in r.stdout and "data.workers=2" in r.stdout  # a whole node's CPUs
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) >= 2


def test_training_with_missing_data_is_refused_and_nothing_queued(slurm, tmp_path):
    before = queue()
    r = launch(tmp_path, extra=NO_AUTO)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{tmp_path / 'data'}/manifest.json is missing" in r.stderr and "launch/slurm.py prepare" in r.stderr
    assert "--prepare" in r.stderr and queue() == before


def test_prepare_then_train_in_one_command(slurm, tmp_path):
    r = launch(tmp_path, "--prepare", extra=dict(NO_AUTO, **{"train.max_steps": 6}))
    assert r.returncode == 0, r.stdout + r.stderr
    ids = [line.split("submitted job ")[1].split(":")[0] for line in r.stdout.splitlines() if "submitted job" in line]
    assert len(ids) == 2 and f"after job {ids[0]} succeeds" in r.stdout
    times = {}
    for job_id in ids:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State,Start,End"],
                             capture_output=True, text=True).stdout.split()[0].split("|")
        assert out[0] == "COMPLETED", out
        times[job_id] = out[1:]
    assert times[ids[1]][0] >= times[ids[0]][1]  # training started once the preparation had ended
    assert sorted(run_steps(tmp_path)) == list(range(6))


def test_a_preempted_preparation_is_requeued_and_writes_the_same_bytes(slurm, tmp_path):
    text = shared_file("tinyshakespeare.txt").read_text()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join([text] * 100))
    settings = [f"data.source={corpus}", "data.txt_split=paragraph", "tokenizer.name=gpt2",
                f"tokenizer.files_dir={shared_file('gpt2_encoder.json').parent}", "model.vocab_size=50257",
                "data.shard_tokens=500000", "data.val_tokens=500000"]
    ref = run_cli(["-m", "gpt2.prepare", "configs/demo.yaml", f"data.dir={tmp_path / 'ref'}", "data.workers=2",
                   *settings])
    assert ref.returncode == 0, ref.stderr
    r = run_cli(["launch/slurm.py", "prepare", "--config", "configs/demo.yaml", "--run-dir", str(tmp_path / "runs"),
                 "--time", "00:20:00", f"data.dir={tmp_path / 'data'}", *settings], env={"TMPDIR": str(tmp_path)})
    assert r.returncode == 0, r.stdout + r.stderr
    job_id = r.stdout.split("submitted job ")[1].split(":")[0]
    manifest = tmp_path / "data" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 3):
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    state = wait_job(job_id, timeout=400)
    log = "\n".join(p.read_text() for p in (tmp_path / "runs").rglob("*_log.*"))
    assert state == "COMPLETED", log[-4000:]
    assert "requeueing" in log and "resuming:" in log, log[-4000:]
    assert data_files(tmp_path / "data") == data_files(tmp_path / "ref")
