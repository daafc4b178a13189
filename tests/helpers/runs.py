"""Helpers to run the trainer (one process or torchrun) and read what it logged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, run_cli, tiny_overrides


def torchrun_args(nproc: int, max_restarts: int = 0, launcher: str = "torch.distributed.run") -> list[str]:
    return ["-m", launcher, "--standalone", f"--nproc-per-node={nproc}",
            f"--max-restarts={max_restarts}", "--monitor-interval=0.5"]


def train(tmp: Path, nproc: int = 1, extra: dict | None = None, max_restarts: int = 0,
          env: dict | None = None, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run the demo config shrunk by `tiny_overrides`, in one process or under torchrun; `prefix`
    runs it under another command (faketime)."""
    launcher = torchrun_args(nproc, max_restarts) if nproc > 1 else []
    args = [*launcher, "-m", "gpt2.train", "configs/demo.yaml", *tiny_overrides(tmp, **(extra or {}))]
    full_env = {"TMPDIR": str(tmp), "OMP_NUM_THREADS": "1", **(env or {})}
    if prefix:
        return subprocess.run([*prefix, sys.executable, *args], cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1",
                              **full_env), capture_output=True, text=True, timeout=600)
    return run_cli(args, env=full_env)


def popen_train(tmp: Path, nproc: int = 1, extra: dict | None = None, max_restarts: int = 0,
                env: dict | None = None, log_name: str = "train.log", prefix: list[str] | None = None,
                launcher: str = "torch.distributed.run") -> subprocess.Popen:
    """The trainer in the background, its output in `tmp / log_name`; `prefix` runs it under another
    command (faketime, unshare); `launcher`: the torchrun module for `nproc` > 1."""
    launcher_args = torchrun_args(nproc, max_restarts, launcher) if nproc > 1 else []
    args = [*(prefix or []), sys.executable, *launcher_args, "-m", "gpt2.train", "configs/demo.yaml",
            *tiny_overrides(tmp, **(extra or {}))]
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


def rank_pid(agent_pid: int, rank: int) -> int:
    """The process of one rank of a torchrun agent."""
    for pid in worker_pids(agent_pid):
        if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return pid
    raise AssertionError(f"no worker of rank {rank} under {agent_pid}")


def wait_until(predicate, what: str, proc: subprocess.Popen | None = None, log: Path | None = None,
               timeout: float = 180) -> float:
    """Poll `predicate` until it holds (returns the seconds it took); fail if `proc` exits first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {what}: {log.read_text()[-3000:] if log else ''}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: {log.read_text()[-3000:] if log else ''}")


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun's workers run in sessions of their own)."""
    found, level = [], [pid]
    while level:
        level = [int(c) for p in level for c in _read(f"/proc/{p}/task/{p}/children").split()]
        found += level
    return found


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def stop(proc: subprocess.Popen) -> None:
    """Kill a process started with start_new_session, and everything it started (also workers in
    sessions of their own, and a stopped one)."""
    below = descendants(proc.pid)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
