"""`python -m gpt2.chaos CONFIG [--seed S] [--faults N] [--kinds K,...] [--nproc P] [--dir DIR] [--store CMD]
[--store-fault-s S] [key=value ...]`

A training job under faults drawn from a seed, checked against an uninterrupted run of the same
config. The job runs under torchrun's elastic agent (`gpt2.launch.torchrun`, P workers, restarts
allowed) and is submitted again after a retryable exit, as SLURM's requeue or a pod restart would.
Each fault lands when the run reaches a step drawn from the seed, one at a time (the next waits
until the run trains again after the previous one):

    kill      SIGKILL of one worker (the out-of-memory killer, a lost GPU): torchrun restarts the group
    preempt   SIGTERM to the job (a preemption or an eviction): the trainers save and exit 200, and
              the job is submitted again
    preempt-save, preempt-eval  the same, timed to land while a periodic checkpoint is being saved
              (right after the step record before it), or while an evaluation runs (after that
              step's save, if any); the log must show it landed there
    freeze    SIGSTOP of one worker for good (a hung GPU, a frozen node): its peer's watchdog ends
              the group with 201 after about a minute and torchrun restarts it
    second    a second submission of the same run while it trains: refused, nothing disturbed
    skew      the same, from a newcomer whose clock is 10 minutes ahead (libfaketime): refused too,
              since no decision compares two hosts' clocks
    store-down    `CMD stop`, and `CMD start` --store-fault-s later (`--store CMD`; checkpoint.dir on
              that store): saves and lease renewals fail and retry, training rides it out
    store-freeze  `CMD freeze`, then `CMD thaw`: the store hangs (a stopped server, a hung mount); the
              same outcome, with every call bounded by its timeout

At the end it checks, and exits 1 naming every breach: every step of the current trajectory has
the uninterrupted run's loss and batch checksum, and the final model is bitwise the same; no step
twice, checkpoint generations never go back; every fault is in the ledger as what it was; no
process of the run is left. It prints recovery time per fault (injection to the next step trained)
and the goodput (`gpt2.goodput`). A store fault is recovered from at the first checkpoint saved
after the store is back; no attempt may end meanwhile.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2 import logs
from gpt2.checkpoint import CheckpointStore, load_checkpoint, read_lineage
from gpt2.config import load_config
from gpt2.errors import EXIT_HUNG, EXIT_OK, EXIT_PREEMPTED, RETRYABLE, ConfigError, Gpt2Error, exit_code
from gpt2.goodput import goodput
from gpt2.metrics import ATTEMPTS_FILE, STEPS_FILE, current_records, read_attempts, read_step_lines
from gpt2.storage import filesystem, with_retries

log = logging.getLogger("gpt2.chaos")  # also when run as __main__

KINDS = ("kill", "preempt", "preempt-save", "preempt-eval", "freeze", "second", "skew", "store-down", "store-freeze")
PREEMPTS = ("preempt", "preempt-save", "preempt-eval")
BUSY_WAIT_S = 300  # at most this long for the save or evaluation a timed preemption aims at
INTRUDERS = ("second", "skew")
STORE_ACTIONS = {"store-down": ("stop", "start"), "store-freeze": ("freeze", "thaw")}
# a newcomer's clock: ahead by far more than a lease's time to live, within the 15 minutes that
# object stores allow signed requests (further off, S3 refuses the host: a StorageError at start)
SKEW = "+10m"
STORE_FAULT_S = 45  # longer than a lease's ttl/2 (30 s with the defaults), after which its holder may not write
STORE_CMD_TIMEOUT_S = 120
# what a start refused by the run's lease says (gpt2.checkpoint.lease.LeaseHeld)
REFUSALS = ("another trainer holds this run", "still holds the lease of", "this start gives way and writes nothing")
POLL_S = 0.2
SLURM_POLL_S = 2.0
# sacct's states of a job that has ended for good (a requeued one goes back to PENDING)
SLURM_ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
JOB_TIMEOUT_S = 3600


class ChaosBreach(Gpt2Error, RuntimeError):
    """An invariant did not hold under the faults (the message lists every breach)."""


@dataclass
class Fault:
    kind: str
    at_step: int
    injected_at: float | None = None  # wall time (this host's), to find its records in the ledger
    injected_mono: float | None = None
    recovery_s: float | None = None  # injection to the next step trained (a store fault: to the next save)
    note: str = ""
    restore_mono: float | None = None  # a store fault: when the store comes back
    log_marks: tuple[int, int] = (0, 0)  # a store fault: retries and saves in the job's log before it
    recovered_at: float | None = None  # wall time (this host's)
    quiet_s: float = 0.0  # a store fault: the longest time the job wrote no step record meanwhile
    retried: int = 0  # a store fault: the job's storage calls that failed and were retried meanwhile


def draw(seed: int, n: int, max_steps: int, kinds: list[str]) -> list[Fault]:
    """`n` faults at distinct steps of the run's middle 80%, kinds drawn from `kinds`; a second
    submission lands in the first half, so that it meets the run alive (its start takes seconds)."""
    rng = random.Random(seed)
    span = range(max(1, max_steps // 10), max(2, max_steps * 9 // 10))
    faults = [Fault(rng.choice(kinds), s) for s in sorted(rng.sample(span, min(n, len(span))))]
    for f in faults:
        if f.kind in INTRUDERS:
            f.at_step = span.start + (f.at_step - span.start) // 2
    return sorted(faults, key=lambda f: f.at_step)


class Run:
    """One place of the chaos run (the reference or the job under faults): its dirs and records."""

    def __init__(self, root: Path, config: str, overrides: list[str], nproc: int, store: str | None = None):
        """`store`: where its checkpoints go, under its own name (default: `root/ckpt`)."""
        self.root, self.config, self.nproc = root, config, nproc
        self.ckpt = f"{store.rstrip('/')}/{root.name}" if store else str(root / "ckpt")
        self.tb = root / "tb"
        self.overrides = [*overrides, f"checkpoint.dir={self.ckpt}", f"logging.dir={self.tb}"]

    def torchrun(self, restarts: int) -> list[str]:
        return [sys.executable, "-m", "gpt2.launch.torchrun", "--standalone", f"--nproc-per-node={self.nproc}",
                f"--max-restarts={restarts}", "--monitor-interval=0.5", "-m", "gpt2.train", self.config,
                *self.overrides]

    def start(self, argv: list[str], job: str, log_name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        self.root.mkdir(parents=True, exist_ok=True)
        out = open(self.root / log_name, "ab")
        env = dict(os.environ, **(env or {}), GPT2_JOB_ID=job, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def records(self) -> tuple[list[dict], list[dict]]:
        def text(name: str) -> str:
            path = self.tb / name
            return path.read_text() if path.exists() else ""

        return read_attempts(text(ATTEMPTS_FILE)), read_step_lines(text(STEPS_FILE))

    def steps(self) -> dict[int, dict]:
        attempts, lines = self.records()
        return current_records(lines, attempts)

    def final_model(self) -> dict[str, torch.Tensor]:
        newest = CheckpointStore(self.ckpt).complete()[-1]
        return load_checkpoint(newest.url)[1]["model"]


def reference(run: Run) -> None:
    """The uninterrupted run."""
    proc = run.start(run.torchrun(restarts=0), "chaos-reference", "train.log")
    try:
        code = proc.wait(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        code = None
    finally:  # stopped, timed out or done: nothing of it runs on
        _kill_run(run.root)
    if code != EXIT_OK:
        raise ChaosBreach(f"the uninterrupted reference run failed (exit {code}); see {run.root / 'train.log'}")


class LocalJob:
    """The job as torchrun on this host, submitted again after a retryable exit (as SLURM's requeue
    or a pod's restart would)."""

    def __init__(self, run: Run, restarts: int, job_id: str | None = None):
        self.run, self.restarts = run, restarts
        self.job_id = job_id or f"chaos-{os.getpid()}"
        self.submissions = 0
        self.proc: subprocess.Popen | None = None

    def submit(self) -> None:
        self.submissions += 1
        self.proc = self.run.start(self.run.torchrun(self.restarts), self.job_id, "train.log")

    def poll(self) -> int | None:
        """None while the job runs (or was just submitted again), else its final exit code."""
        code = self.proc.poll() if self.proc else None
        if code in RETRYABLE:
            self.submit()
            return None
        return code

    def preempt(self) -> None:
        if self.proc:
            os.kill(self.proc.pid, signal.SIGTERM)

    def cancel(self) -> None:
        _kill_run(self.run.root)

    def owns(self, job_id: str | None) -> bool:
        """Whether a ledger record's job id is this job's."""
        return job_id == f"job:{self.job_id}"

    def log_files(self) -> list[Path]:
        return [self.run.root / "train.log"]

    def log_text(self) -> str:
        return "".join(_read(str(p)) for p in self.log_files())


class SlurmJob:
    """The job submitted through the SLURM launcher (`gpt2.launch.slurm`): one node per worker, one
    CPU process each. SLURM requeues it (submitit after the preemption signal, the task after a
    retryable exit); the ledger knows it by its SLURM job id."""

    def __init__(self, run: Run, restarts: int):
        self.run, self.restarts = run, restarts
        self.slurm_id = ""
        self._next_poll = 0.0
        self._sacct_failures = 0

    @property
    def job_id(self) -> str:
        return f"slurm-{self.slurm_id}"

    @property
    def submissions(self) -> int:
        """How often SLURM started it: the first start and each requeue."""
        out = _slurm(["sacct", "-X", "-n", "-D", "-j", self.slurm_id, "-o", "JobID"])
        return max(1, len(out.split()))

    def submit(self) -> None:
        argv = [sys.executable, "-m", "gpt2.launch.slurm", "--nodes", str(self.run.nproc), "--gpus", "0",
                "--config", self.run.config, "--time", f"{JOB_TIMEOUT_S // 60 + 10}",
                "--run-dir", str(self.run.root.parent), "--name", self.run.root.name,
                *self.run.overrides, f"launch.max_restarts={self.restarts}"]
        env = {k: v for k, v in os.environ.items() if k != "GPT2_JOB_ID"}  # its job id is SLURM's
        env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        # a stop (SIGINT, SIGTERM) waits until the job's id is known, so that cancel() can cancel it
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=STORE_CMD_TIMEOUT_S)
            found = re.search(r"submitted job (\d+)", r.stdout)
            self.slurm_id = found.group(1) if found else ""
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        if r.returncode != 0 or not found:
            raise ChaosBreach(f"the SLURM launcher did not submit the job (exit {r.returncode}): "
                              f"{(r.stdout + r.stderr)[-800:]}")
        log.info(f"chaos: SLURM job {self.slurm_id}")

    def poll(self) -> int | None:
        """None until the job has ended for good (pending, running, requeued); then 0 if it completed, else 1."""
        if time.monotonic() < self._next_poll:  # the accounting database, not 5 times a second
            return None
        self._next_poll = time.monotonic() + SLURM_POLL_S
        try:
            state = _slurm(["sacct", "-X", "-n", "-j", self.slurm_id, "-o", "State"], check=True).split()
            self._sacct_failures = 0
        except ChaosBreach:  # a busy controller now and then; for a minute, the accounting is not there
            self._sacct_failures += 1
            if self._sacct_failures * SLURM_POLL_S >= 60:
                raise
            return None
        if not state or state[0] not in SLURM_ENDED:
            return None
        return EXIT_OK if state[0] == "COMPLETED" else 1

    def preempt(self) -> None:
        """What SLURM does before a time limit or a preemption (submitit's --signal=USR2@delay)."""
        _slurm(["scancel", "--signal=USR2", self.slurm_id], check=True)

    def cancel(self) -> None:
        if self.slurm_id:
            _slurm(["scancel", self.slurm_id])
        _kill_run(self.run.root)

    def owns(self, job_id: str | None) -> bool:
        return bool(job_id) and job_id.startswith("slurm:") and job_id.endswith(f"/{self.slurm_id}")

    def log_files(self) -> list[Path]:
        """One per node and stream (submitit's), each in its own order."""
        return sorted((self.run.root / "submitit").glob("*/*_log.*"))

    def log_text(self) -> str:
        return "".join(_read(str(p)) for p in self.log_files())


def _slurm(argv: list[str], check: bool = False) -> str:
    """A SLURM command's output (with a timeout: a controller that does not answer is a breach)."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=STORE_CMD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ChaosBreach(f"`{shlex.join(argv)}` failed: {err}") from err
    if check and r.returncode != 0:
        raise ChaosBreach(f"`{shlex.join(argv)}` exited {r.returncode}: {r.stderr[-500:]}")
    return r.stdout


LAUNCHERS = {"torchrun": LocalJob, "slurm": SlurmJob}


class Chaos:
    """The job under faults: submitted, faulted, submitted again after each retryable exit."""

    def __init__(self, run: Run, faults: list[Fault], restarts: int, store_cmd: str | None = None,
                 store_fault_s: float = STORE_FAULT_S, launcher: str = "torchrun", save_every: int = 0,
                 eval_every: int = 0):
        """`save_every`, `eval_every`: the config's checkpoint.every and eval.val_every (the steps at
        which a timed preemption can land in a save or an evaluation)."""
        self.run, self.faults = run, faults
        self.save_every, self.eval_every = save_every, eval_every
        self.job: LocalJob | SlurmJob = LAUNCHERS[launcher](run, restarts)
        self.store_cmd, self.store_fault_s = store_cmd, store_fault_s
        self.intruders: list[tuple[Fault, subprocess.Popen]] = []
        self._newest = (-1, time.monotonic())  # the newest step record seen, and when it appeared

    def go(self) -> None:
        try:
            self._go()
        except BaseException:  # stopped or failed: nothing of the job runs on (a clean end is checked instead)
            self.job.cancel()
            raise
        finally:  # and the store is back, whatever happened
            for fault in self.faults:
                if fault.restore_mono is not None:
                    try:
                        self._restore(fault, force=True)
                    except ChaosBreach as err:
                        log.error(f"chaos: could not bring the store back after {fault.kind}: {err}")

    def _go(self) -> None:
        pending, waiting = list(self.faults), []
        self.job.submit()
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            code = self.job.poll()
            if code is not None and code != EXIT_OK:
                raise ChaosBreach(f"the job exited {code}, which no launcher restarts; see its log in {self.run.root}")
            attempts, lines = self.run.records()
            self._watch_quiet(waiting, lines)
            for fault in waiting:
                self._restore(fault)
            self._recovered(waiting, attempts, lines)
            if code == EXIT_OK:
                return
            if pending and not waiting and not self._intruding() and \
                    self._training(attempts, lines) >= pending[0].at_step:  # one fault at a time
                fault = pending.pop(0)
                fault.at_step = self._training(attempts, lines)  # where it really lands
                self.inject(fault)
                if fault.kind not in INTRUDERS:
                    waiting.append(fault)
            time.sleep(POLL_S)
        raise ChaosBreach(f"the job did not finish within {JOB_TIMEOUT_S} s")

    def inject(self, fault: Fault) -> None:
        fault.injected_at, fault.injected_mono = time.time(), time.monotonic()
        workers = _workers(self.run.root)
        log.info(f"chaos: {fault.kind} at step {fault.at_step}")
        if fault.kind == "kill" and workers:
            os.kill(random.Random(fault.at_step).choice(workers), signal.SIGKILL)
        elif fault.kind == "freeze" and workers:
            os.kill(random.Random(fault.at_step).choice(workers), signal.SIGSTOP)
        elif fault.kind == "preempt":
            self.job.preempt()
        elif fault.kind in PREEMPTS:
            fault.note = self._preempt_when_busy(fault)
        elif fault.kind in INTRUDERS:  # the same run submitted again (another submission id), one process
            argv = [sys.executable, "-m", "gpt2.train", self.run.config, *self.run.overrides]
            env = skewed_clock(SKEW) if fault.kind == "skew" else None
            self.intruders.append((fault, self.run.start(argv, self.intruder_id(fault),
                                                         f"{fault.kind}-{fault.at_step}.log", env)))
        elif fault.kind in STORE_ACTIONS:
            fault.log_marks = self._log_marks()
            fault.restore_mono = float("inf")  # off from here on, even if the command fails halfway
            self._store(STORE_ACTIONS[fault.kind][0])
            fault.restore_mono = time.monotonic() + self.store_fault_s

    def intruder_id(self, fault: Fault) -> str:
        return f"{self.job.job_id}-{fault.kind}-{fault.at_step}"

    def _preempt_when_busy(self, fault: Fault) -> str:
        """Preempt the job when it next saves a periodic checkpoint (preempt-save) or evaluates
        (preempt-eval): right after the step record before it appears, and for an evaluation after
        that step's save too. Returns where the signal should land (`_landed` checks the log)."""
        save = fault.kind == "preempt-save"
        every = self.save_every if save else self.eval_every
        if every <= 0:
            return f"not timed: {'checkpoint.every' if save else 'eval.val_every'} is 0"
        steps = self.run.tb / STEPS_FILE
        offset, attempt = _size(steps), self._attempt()
        newest = max((r["step"] for r in read_step_lines(_read(str(steps))) if r.get("attempt") == attempt),
                     default=fault.at_step)
        target = (newest + 1) // every * every + every  # the step count whose save/evaluation comes next
        deadline = time.monotonic() + BUSY_WAIT_S
        while time.monotonic() < deadline:  # fast: a save or an evaluation of the demo takes milliseconds
            text = _read(str(steps), offset)
            if any(r.get("step") == target - 1 and r.get("attempt") == attempt for r in read_step_lines(text)):
                break
            time.sleep(0.002)
        if not save and self.save_every and target % self.save_every == 0:  # the save comes first
            saved = f"step-{target:08d}"
            while time.monotonic() < deadline and not any(
                    saved in line and "saved checkpoint" in line for line in self.job.log_text().splitlines()):
                time.sleep(0.005)
        self.job.preempt()
        fault.at_step = target
        return f"in the {'save' if save else 'evaluation'} of step {target}"

    def _attempt(self) -> int | None:
        attempts, _ = self.run.records()
        starts = [a["attempt"] for a in attempts if a.get("event") == "start"]
        return starts[-1] if starts else None

    def _log_marks(self) -> tuple[int, int]:
        """How many storage calls failed and were retried, and how many checkpoints were saved, by
        the job's log so far."""
        text = self.job.log_text()
        return text.count("; retrying in"), text.count("saved checkpoint ")

    def _watch_quiet(self, waiting: list[Fault], lines: list[dict]) -> None:
        """How long the job wrote no step record while a store fault was on (a save or a lease
        renewal waiting for the store, or records held back until the lease is renewed)."""
        now = time.monotonic()
        if len(lines) != self._newest[0]:
            self._newest = (len(lines), now)
        for fault in waiting:
            if fault.kind in STORE_ACTIONS and fault.restore_mono is not None:
                since = max(self._newest[1], fault.injected_mono or now)
                fault.quiet_s = max(fault.quiet_s, now - since)

    def _restore(self, fault: Fault, force: bool = False) -> None:
        """Bring the store back once a store fault's time is up; note what the fault did to the job."""
        if fault.restore_mono is None or (time.monotonic() < fault.restore_mono and not force):
            return
        retried, saved = self._log_marks()
        fault.retried = retried - fault.log_marks[0]
        fault.note = f"no step written for {fault.quiet_s:.0f} s, {fault.retried} storage calls failed and were retried"
        fault.log_marks = (retried, saved)  # a save held by the fault may log as it comes back
        self._store(STORE_ACTIONS[fault.kind][1])
        fault.restore_mono = None  # only once it is back
        log.info(f"chaos: the store is back after {fault.kind} ({fault.note})")

    def _store(self, action: str) -> None:
        argv = [*shlex.split(self.store_cmd or ""), action]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=STORE_CMD_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise ChaosBreach(f"the store command `{shlex.join(argv)}` failed: {err}") from err
        if r.returncode != 0:
            raise ChaosBreach(f"the store command `{shlex.join(argv)}` exited {r.returncode}: {r.stderr[-500:]}")

    def _intruding(self) -> bool:
        """A second submission is still starting: the next fault waits for its outcome (a preemption
        meanwhile would hand it the run)."""
        return any(proc.poll() is None for _, proc in self.intruders)

    def _training(self, attempts: list[dict], lines: list[dict]) -> int:
        """The step the job's newest attempt has reached, once it trains with all its workers (-1
        before: a fault lands in training, so the ledger can say what it did)."""
        starts = [a["attempt"] for a in attempts if a.get("event") == "start"]
        mine = [r["step"] for r in lines if starts and r.get("attempt") == starts[-1]]
        if not mine or len(_workers(self.run.root)) != self.run.nproc:
            return -1
        return max(mine)

    def _recovered(self, waiting: list[Fault], attempts: list[dict], lines: list[dict]) -> None:
        """A fault is recovered from once a step record appears from an attempt that began after it;
        a store fault, once a checkpoint is saved after the store came back."""
        for fault in list(waiting):
            if fault.kind in STORE_ACTIONS:
                done = fault.restore_mono is None and self._log_marks()[1] > fault.log_marks[1]
            else:
                later = {a["attempt"] for a in attempts if a.get("event") == "start" and
                         a["time"] > fault.injected_at}
                done = any(r.get("attempt") in later for r in lines)
            if done:
                fault.recovery_s = time.monotonic() - fault.injected_mono  # type: ignore[operator]
                fault.recovered_at = time.time()
                waiting.remove(fault)


def skewed_clock(offset: str) -> dict[str, str]:
    """The environment that moves a process's clocks by `offset` (libfaketime, preloaded directly:
    the `faketime` wrapper's semaphore clashes across pid namespaces)."""
    lib = _libfaketime()
    if lib is None:
        raise ConfigError("the skew fault needs libfaketime (Debian: apt-get install faketime); "
                          "or leave it out with --kinds")
    return {"LD_PRELOAD": lib, "FAKETIME": offset}


def _libfaketime() -> str | None:
    libs = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
    return str(libs[0]) if libs else None


def _run_pids(root: Path) -> list[int]:
    """The processes of a run: those whose command line names its directory (torchrun starts each
    worker in a session of its own, so no process group has them all)."""
    return [p for p in _pids() if f"{root}/" in _read(f"/proc/{p}/cmdline")]  # not /x/chaos2 for /x/chaos


def _kill_run(root: Path) -> None:
    """SIGKILL every process of a run (stopped ones too)."""
    for pid in _run_pids(root):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _workers(root: Path) -> list[int]:
    """The trainers of a run's job: the children of its torchrun agents (one per node)."""
    agents = [p for p in _run_pids(root) if "gpt2.launch.torchrun" in _read(f"/proc/{p}/cmdline")]
    return [int(c) for p in agents for c in _read(f"/proc/{p}/task/{p}/children").split()]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read(path: str, offset: int = 0) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def check(ref: Run, chaos: Chaos) -> list[str]:
    """Every breach of the invariants, as sentences."""
    breaches = _not_injected(chaos)
    want, got = ref.steps(), chaos.run.steps()
    if sorted(got) != sorted(want):
        missing = sorted(set(want) - set(got))[:5]
        breaches.append(f"the trajectory has {len(got)} steps, the reference {len(want)} (missing e.g. {missing})")
    for s in sorted(set(want) & set(got)):
        if (got[s]["loss"], got[s]["batch_hash"]) != (want[s]["loss"], want[s]["batch_hash"]):
            breaches.append(f"step {s}: loss {got[s]['loss']!r} / batch {got[s]['batch_hash']}, uninterrupted "
                            f"{want[s]['loss']!r} / {want[s]['batch_hash']}")
            break
    a, b = ref.final_model(), chaos.run.final_model()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    if differ:
        breaches.append(f"the final model differs from the uninterrupted run's in {len(differ)} tensors "
                        f"(e.g. {differ[0]})")
    breaches += _lineage_breaches(chaos.run)
    breaches += _ledger_breaches(chaos)
    left = _run_pids(chaos.run.root)
    if left:
        breaches.append(f"processes of the run are left running: {left}")
        _kill_run(chaos.run.root)
    return breaches


def _not_injected(chaos: Chaos) -> list[str]:
    skipped = [f"{f.kind} at step {f.at_step}" for f in chaos.faults if f.injected_at is None]
    missed = [f"{f.kind} at step {f.at_step} ({f.note})" for f in chaos.faults
              if f.kind in ("preempt-save", "preempt-eval") and f.injected_at is not None and not _landed(chaos, f)]
    return ([f"faults never injected (the run ended first): {skipped}"] if skipped else []) + \
        ([f"timed preemptions that did not land where aimed: {missed}"] if missed else [])


def _landed(chaos: Chaos, fault: Fault) -> bool:
    """Whether a timed preemption's signal reached the trainers inside the save or evaluation it
    aimed at: in the job's log, a trainer says it received the signal after the work began (after
    the save before it, and for an evaluation after that step's own save) and before the work's
    own line (the save's, the validation loss's)."""
    target = fault.at_step

    def saved(step: int) -> Callable[[str], bool]:
        return lambda line: "saved checkpoint " in line and f"step-{step:08d}" in line

    def evaluated(step: int) -> Callable[[str], bool]:
        return lambda line: f"step {step}: val loss" in line

    if fault.kind == "preempt-save":
        began, done = saved(target - chaos.save_every), saved(target)
    else:
        saves_first = chaos.save_every and target % chaos.save_every == 0
        began, done = saved(target) if saves_first else evaluated(target - chaos.eval_every), evaluated(target)
    for path in chaos.job.log_files():
        lines = _read(str(path)).splitlines()
        end = next((i for i, line in enumerate(lines) if done(line)), None)
        if end is not None:
            start = max((i for i, line in enumerate(lines[:end]) if began(line)), default=-1)
            return any("received SIG" in line for line in lines[start + 1:end])
    return False


def _lineage_breaches(run: Run) -> list[str]:
    lineage = read_lineage(run.ckpt)
    found = [c for c in CheckpointStore(run.ckpt).complete() if lineage is None or lineage.owns(c.meta)]
    generations = [(c.step, (c.meta.get("writer") or {}).get("generation") or 0) for c in found]
    back = [(s, g) for (s, g), (_, h) in zip(generations[1:], generations) if g < h]
    return [f"checkpoint generations go back at steps {back}"] if back else []


def _ledger_breaches(chaos: Chaos) -> list[str]:
    intruders = [(fault, proc.wait(timeout=300)) for fault, proc in chaos.intruders]  # their records first
    attempts, _ = chaos.run.records()
    ends = [a for a in attempts if a.get("event") == "end"]
    starts = [a for a in attempts if a.get("event") == "start"]
    mine = [a for a in starts if chaos.job.owns(a.get("job_id"))]
    finished = max((e["time"] for e in ends if e["attempt"] == mine[-1]["attempt"]), default=None) if mine else None
    breaches = []
    if len({a["attempt"] for a in starts}) != len(starts) or len(ends) != len(starts):
        breaches.append(f"the ledger has {len(starts)} starts and {len(ends)} ends")
    # another submission may hold the run only once the job has ended (it then finds training complete)
    if any(a not in mine and (finished is None or a["time"] < finished) for a in starts):
        breaches.append("an attempt of another submission is in the ledger while the job ran")
    expected = {"kill": lambda e: e.get("exit_code") != EXIT_OK,
                "preempt": lambda e: e.get("exit_code") == EXIT_PREEMPTED,
                "preempt-save": lambda e: e.get("exit_code") == EXIT_PREEMPTED,
                "preempt-eval": lambda e: e.get("exit_code") == EXIT_PREEMPTED,
                "freeze": lambda e: e.get("exit_code") == EXIT_HUNG or e.get("inferred")}
    for fault in chaos.faults:
        if fault.kind in expected and fault.injected_at is not None:
            after = [e for e in ends if e["time"] >= fault.injected_at]
            if not after or not expected[fault.kind](after[0]):
                breaches.append(f"{fault.kind} at step {fault.at_step}: the ledger's next end is {after[:1]}")
    return breaches + _store_breaches(chaos, ends) + _intruder_breaches(chaos, intruders, starts)


def _store_breaches(chaos: Chaos, ends: list[dict]) -> list[str]:
    """A store fault (shorter than checkpoint.outage_s) reaches the job and is ridden out."""
    breaches = []
    for fault in chaos.faults:
        if fault.kind not in STORE_ACTIONS or fault.injected_at is None:
            continue
        where = f"{fault.kind} at step {fault.at_step}"
        if fault.recovered_at is None:
            breaches.append(f"{where}: never recovered from (no checkpoint saved after the store came back)")
            continue
        ended = [e for e in ends if fault.injected_at <= e["time"] <= fault.recovered_at]
        if ended:
            breaches.append(f"{where}: an attempt ended meanwhile ({ended[0]})")
        if fault.retried == 0 and fault.quiet_s < chaos.store_fault_s / 2:
            breaches.append(f"{where}: the job did not notice (no storage call failed, step records went on); is "
                            "checkpoint.dir on the store that --store acts on?")
    return breaches


def _intruder_breaches(chaos: Chaos, intruders: list[tuple[Fault, int]], starts: list[dict]) -> list[str]:
    """A second submission is refused by the lease, or comes after the job ended (training complete)."""
    breaches = []
    for fault, code in intruders:
        text = (chaos.run.root / f"{fault.kind}-{fault.at_step}.log").read_text()
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        refused = code == 1 and any(r in e for e in errors for r in REFUSALS)
        came_late = code == EXIT_OK and "training already complete" in text
        fault.note = "refused, run undisturbed" if refused else "came after the run ended" if came_late else \
            f"exited {code}"
        if not (refused or came_late):
            breaches.append(f"the {fault.kind} submission at step {fault.at_step} exited {code}, not refused by the "
                            f"lease ({errors[-1] if errors else 'no error line'})")
        # by its records, whatever its clock says
        if not came_late and any(a.get("job_id") == f"job:{chaos.intruder_id(fault)}" for a in starts):
            breaches.append(f"the {fault.kind} submission at step {fault.at_step} has an attempt in the ledger")
    return breaches


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]


def report(chaos: Chaos, breaches: list[str]) -> str:
    attempts, lines = chaos.run.records()
    lines_out = [f"{'fault':12} {'at step':>7}  recovery"]
    for f in chaos.faults:
        took = f"{f.recovery_s:.1f} s" if f.recovery_s is not None else "not seen"
        took = f.note if f.kind in INTRUDERS else f"{took} ({f.note})" if f.note else took
        lines_out.append(f"{f.kind:12} {f.at_step:>7}  {took}")
    lines_out += goodput(attempts, lines).describe()
    lines_out.append(f"{len(chaos.faults)} faults, {chaos.job.submissions} submissions: "
                     + ("every invariant holds" if not breaches else f"{len(breaches)} BREACHES"))
    lines_out += [f"BREACH: {b}" for b in breaches]
    return "\n".join(lines_out)


def _ensure_fresh(root: Path, checkpoints: list[str], storage_options: dict) -> None:
    """Both runs start from nothing: an earlier chaos run's records or checkpoints would be resumed."""
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"{root} holds an earlier chaos run: remove it or choose another --dir")
    for url in checkpoints:
        fs, path = filesystem(url, storage_options)
        if with_retries(lambda fs=fs, path=path: fs.exists(path), f"looking for {url}"):
            raise ConfigError(f"{url} holds an earlier run's checkpoints: remove it or choose another checkpoint.dir")


def _absolute_data_dir(data_dir: str) -> list[str]:
    """Both runs read the same data, wherever their processes start (a SLURM job puts a relative
    data.dir under its run directory)."""
    return [] if "://" in data_dir else [f"data.dir={Path(data_dir).resolve()}"]


def _stopped(signum: int, frame: object) -> None:
    raise ChaosBreach(f"the chaos run was stopped ({signal.Signals(signum).name}); its job was killed")


def _kinds(args: argparse.Namespace) -> list[str]:
    """The fault kinds to draw from, checked."""
    timed = ("preempt-save", "preempt-eval")
    usable = [k for k in KINDS if (args.store or k not in STORE_ACTIONS) and
              (args.launcher != "slurm" or k not in timed)]
    if args.kinds is None and not _libfaketime():
        log.warning("chaos: no skew faults: libfaketime is not installed (Debian: apt-get install faketime)")
        usable.remove("skew")
    kinds = args.kinds.split(",") if args.kinds is not None else usable
    if not kinds or set(kinds) - set(KINDS) or args.faults < 0 or args.nproc < 1:
        raise ConfigError(f"--kinds must be a comma-separated subset of {','.join(KINDS)} (got {args.kinds!r}), "
                          f"--faults 0 or more, --nproc 1 or more")
    if args.launcher == "slurm" and set(kinds) & set(timed):
        raise ConfigError("preempt-save and preempt-eval need --launcher torchrun: where the signal landed is read "
                          "from the order of one log, and SLURM's logs split stdout from stderr (use preempt)")
    if set(kinds) - set(usable):
        raise ConfigError(f"the faults {sorted(set(kinds) - set(usable))} need --store CMD (a command that stops, "
                          "starts, freezes and thaws the store checkpoint.dir is on)")
    return kinds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt2.chaos", description=__doc__.split("\n")[2])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--faults", type=int, default=4)
    p.add_argument("--kinds", default=None, help=f"a comma-separated subset of {','.join(KINDS)} (default: all; "
                   "the store's only with --store)")
    p.add_argument("--nproc", type=int, default=2, help="workers (with --launcher slurm: nodes, one CPU process each)")
    p.add_argument("--launcher", choices=sorted(LAUNCHERS), default="torchrun",
                   help="torchrun on this host, or a job through the SLURM launcher (gpt2.launch.slurm)")
    p.add_argument("--dir", default=None, help="where both runs write (default runs/chaos-SEED)")
    p.add_argument("--store", default=None, metavar="CMD",
                   help="a command that takes stop, start, freeze or thaw and does it to the store that "
                        "checkpoint.dir (given as an override) is on")
    p.add_argument("--store-fault-s", type=float, default=STORE_FAULT_S, help="how long a store fault lasts")
    args = p.parse_intermixed_args(argv)
    logs.setup()
    previous = signal.signal(signal.SIGTERM, _stopped)  # so that the job and the store are cleaned up
    try:
        kinds = _kinds(args)
        cfg = load_config(args.config, args.overrides)  # a bad config fails here, before any run
        if args.store and not 0 < args.store_fault_s < cfg.checkpoint.outage_s:
            limit = cfg.checkpoint.outage_s
            raise ConfigError(f"--store-fault-s must be above 0 and below checkpoint.outage_s ({limit} s; a longer "
                              f"outage ends the attempt), got {args.store_fault_s}")
        if "skew" in kinds:
            skewed_clock(SKEW)  # libfaketime is there, or say so now
        if args.launcher == "slurm" and shutil.which("sbatch") is None:
            raise ConfigError("--launcher slurm needs a SLURM cluster: sbatch is not on PATH (run this on a login "
                              "node; scripts/slurm-cluster.sh up starts a local one)")
        root = Path(args.dir or f"runs/chaos-{args.seed}").resolve()
        store = cfg.checkpoint.dir if any(o.startswith("checkpoint.dir=") for o in args.overrides) else None
        if args.store and store is None:
            raise ConfigError("--store acts on the store that checkpoint.dir is on: give checkpoint.dir=URL (a "
                              "place on that store) as an override")
        overrides = [*args.overrides, *_absolute_data_dir(cfg.data.dir)]
        ref = Run(root / "reference", args.config, overrides, args.nproc, store)
        chaos = Chaos(Run(root / "chaos", args.config, overrides, args.nproc, store),
                      draw(args.seed, args.faults, cfg.train.max_steps, kinds), restarts=args.faults + 3,
                      store_cmd=args.store, store_fault_s=args.store_fault_s, launcher=args.launcher,
                      save_every=cfg.checkpoint.every, eval_every=cfg.eval.val_every)
        _ensure_fresh(root, [ref.ckpt, chaos.run.ckpt], cfg.checkpoint.storage_options)
        log.info(f"chaos: seed {args.seed}, faults {[(f.kind, f.at_step) for f in chaos.faults]}, in {root}")
        log.info("chaos: the uninterrupted reference run")
        reference(ref)
        log.info("chaos: the run under faults")
        chaos.go()
        breaches = check(ref, chaos)
        print(report(chaos, breaches))
        (root / "chaos.json").write_text(json.dumps({
            "seed": args.seed, "faults": [f.__dict__ for f in chaos.faults], "breaches": breaches}, indent=1))
    except Gpt2Error as err:
        log.error("%s", err)
        return exit_code(err)
    finally:
        signal.signal(signal.SIGTERM, previous)  # main() called in a process that goes on (the tests)
    return 1 if breaches else 0


if __name__ == "__main__":
    sys.exit(main())
