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
    """The last record of each step in steps.jsonl (a restart may log a step twice)."""
    path = (log_dir or tmp / "tb") / "steps.jsonl"
    records: dict[int, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                records[r["step"]] = r
    return records


def losses(tmp: Path) -> list[float]:
    recs = steps(tmp)
    return [recs[s]["loss"] for s in sorted(recs)]


def worker_pids(agent_pid: int) -> list[int]:
    """The live child processes of a torchrun agent (an exited worker not yet reaped does not count)."""
    out = subprocess.run(["ps", "-o", "pid=,stat=", "--ppid", str(agent_pid)], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if line.split() and "Z" not in line.split()[1]]
