"""Helpers to run the trainer (one process or torchrun) and read what it logged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, run_cli, tiny_overrides


def torchrun_args(nproc: int, max_restarts: int = 0) -> list[str]:
    return ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--max-restarts={max_restarts}", "--monitor-interval=0.5"]


def train(tmp: Path, nproc: int = 1, extra: dict | None = None, max_restarts: int = 0,
          env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the demo config shrunk by `tiny_overrides`, in one process or under torchrun."""
    launcher = torchrun_args(nproc, max_restarts) if nproc > 1 else []
    args = [*launcher, "-m", "gpt2.train", "configs/demo.yaml", *tiny_overrides(tmp, **(extra or {}))]
    return run_cli(args, env={"TMPDIR": str(tmp), "OMP_NUM_THREADS": "1", **(env or {})})


def popen_train(tmp: Path, nproc: int = 1, extra: dict | None = None, max_restarts: int = 0,
                env: dict | None = None, log_name: str = "train.log") -> subprocess.Popen:
    """The trainer in the background, its output in `tmp / log_name`."""
    launcher = torchrun_args(nproc, max_restarts) if nproc > 1 else []
    args = [sys.executable, *launcher, "-m", "gpt2.train", "configs/demo.yaml", *tiny_overrides(tmp, **(extra or {}))]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(tmp), OMP_NUM_THREADS="1", **(env or {}))
    log = open(tmp / log_name, "w")
    return subprocess.Popen(args, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def steps(tmp: Path, log_dir: Path | None = None) -> dict[int, dict]:
    """The step records of the run's current trajectory, by step, as gpt2.status reads them."""
    from gpt2.metrics import current_steps, read_attempts

    log_dir = log_dir or tmp / "tb"
    text = (log_dir / "steps.jsonl").read_text() if (log_dir / "steps.jsonl").exists() else ""
    attempts = read_attempts((log_dir / "attempts.jsonl").read_text()) if (log_dir / "attempts.jsonl").exists() else []
    return current_steps(text, attempts)


def raw_steps(log_dir: Path) -> list[dict]:
    """Every line of steps.jsonl, in order (a restart, a rollback, a superseded writer: all of them)."""
    path = log_dir / "steps.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def losses(tmp: Path) -> list[float]:
    recs = steps(tmp)
    return [recs[s]["loss"] for s in sorted(recs)]


def worker_pids(agent_pid: int) -> list[int]:
    """The live child processes of a torchrun agent (an exited worker not yet reaped does not count)."""
    out = subprocess.run(["ps", "-o", "pid=,stat=", "--ppid", str(agent_pid)], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if line.split() and "Z" not in line.split()[1]]
