"""`python -m gpt2.chaos CONFIG [--seed S] [--faults N] [--kinds K,...] [--nproc P] [--dir DIR] [key=value ...]`

A training job under faults drawn from a seed, checked against an uninterrupted run of the same
config. The job runs under torchrun's elastic agent (`gpt2.launch.torchrun`, P workers, restarts
allowed) and is submitted again after a retryable exit, as SLURM's requeue or a pod restart would.
Each fault lands when the run reaches a step drawn from the seed, one at a time (the next waits
until the run trains again after the previous one):

    kill      SIGKILL of one worker (the out-of-memory killer, a lost GPU): torchrun restarts the group
    preempt   SIGTERM to the job (a preemption or an eviction): the trainers save and exit 200, and
              the job is submitted again
    freeze    SIGSTOP of one worker for good (a hung GPU, a frozen node): its peer's watchdog ends
              the group with 201 after about a minute and torchrun restarts it
    second    a second submission of the same run while it trains: refused, nothing disturbed

At the end it checks, and exits 1 naming every breach: every step of the current trajectory has
the uninterrupted run's loss and batch checksum, and the final model is bitwise the same; no step
twice, checkpoint generations never go back; every fault is in the ledger as what it was; no
process of the run is left. It prints recovery time per fault (injection to the next step trained)
and the goodput (`gpt2.goodput`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2 import logs
from gpt2.checkpoint import CheckpointStore, load_checkpoint, read_lineage
from gpt2.config import load_config
from gpt2.errors import EXIT_HUNG, EXIT_OK, EXIT_PREEMPTED, RETRYABLE, ConfigError, Gpt2Error, exit_code
from gpt2.goodput import goodput
from gpt2.metrics import ATTEMPTS_FILE, STEPS_FILE, current_records, read_attempts, read_step_lines

log = logging.getLogger("gpt2.chaos")  # also when run as __main__

KINDS = ("kill", "preempt", "freeze", "second")
POLL_S = 0.2
JOB_TIMEOUT_S = 3600


class ChaosBreach(Gpt2Error, RuntimeError):
    """An invariant did not hold under the faults (the message lists every breach)."""


@dataclass
class Fault:
    kind: str
    at_step: int
    injected_at: float | None = None  # wall time (this host's), to find its records in the ledger
    injected_mono: float | None = None
    recovery_s: float | None = None  # injection to the next step trained
    note: str = ""


def draw(seed: int, n: int, max_steps: int, kinds: list[str]) -> list[Fault]:
    """`n` faults at distinct steps of the run's middle 80%, kinds drawn from `kinds`; a second
    submission lands in the first half, so that it meets the run alive (its start takes seconds)."""
    rng = random.Random(seed)
    span = range(max(1, max_steps // 10), max(2, max_steps * 9 // 10))
    faults = [Fault(rng.choice(kinds), s) for s in sorted(rng.sample(span, min(n, len(span))))]
    for f in faults:
        if f.kind == "second":
            f.at_step = span.start + (f.at_step - span.start) // 2
    return sorted(faults, key=lambda f: f.at_step)


class Run:
    """One place of the chaos run (the reference or the job under faults): its dirs and records."""

    def __init__(self, root: Path, config: str, overrides: list[str], nproc: int):
        self.root, self.config, self.nproc = root, config, nproc
        self.ckpt, self.tb = root / "ckpt", root / "tb"
        self.overrides = [*overrides, f"checkpoint.dir={self.ckpt}", f"logging.dir={self.tb}"]

    def torchrun(self, restarts: int) -> list[str]:
        return [sys.executable, "-m", "gpt2.launch.torchrun", "--standalone", f"--nproc-per-node={self.nproc}",
                f"--max-restarts={restarts}", "--monitor-interval=0.5", "-m", "gpt2.train", self.config,
                *self.overrides]

    def start(self, argv: list[str], job: str, log_name: str) -> subprocess.Popen:
        self.root.mkdir(parents=True, exist_ok=True)
        out = open(self.root / log_name, "ab")
        env = dict(os.environ, GPT2_JOB_ID=job, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
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
        newest = CheckpointStore(str(self.ckpt)).complete()[-1]
        return load_checkpoint(newest.url)[1]["model"]


def reference(run: Run) -> None:
    """The uninterrupted run."""
    proc = run.start(run.torchrun(restarts=0), "chaos-reference", "train.log")
    if proc.wait(timeout=JOB_TIMEOUT_S) != EXIT_OK:
        raise ChaosBreach(f"the uninterrupted reference run failed (exit {proc.returncode}); see "
                          f"{run.root / 'train.log'}")


class Chaos:
    """The job under faults: submitted, faulted, submitted again after each retryable exit."""

    def __init__(self, run: Run, faults: list[Fault], restarts: int):
        self.run, self.faults, self.restarts = run, faults, restarts
        self.job_id = f"chaos-{os.getpid()}"
        self.submissions = 0
        self.intruders: list[tuple[Fault, subprocess.Popen]] = []

    def submit(self) -> subprocess.Popen:
        self.submissions += 1
        return self.run.start(self.run.torchrun(self.restarts), self.job_id, "train.log")

    def go(self) -> None:
        job, pending, waiting = self.submit(), list(self.faults), []
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            code = job.poll()
            if code is not None and code != EXIT_OK and code not in RETRYABLE:
                raise ChaosBreach(f"the job exited {code}, which no launcher restarts; see {self.run.root}/train.log")
            attempts, lines = self.run.records()
            self._recovered(waiting, attempts, lines)
            if code == EXIT_OK:
                return
            if code is not None:  # a requeue, as SLURM or the pod's restart policy does
                job = self.submit()
            elif pending and not waiting and not self._intruding() and \
                    self._training(attempts, lines, job) >= pending[0].at_step:  # one fault at a time
                fault = pending.pop(0)
                fault.at_step = self._training(attempts, lines, job)  # where it really lands
                self.inject(fault, job)
                if fault.kind != "second":
                    waiting.append(fault)
            time.sleep(POLL_S)
        raise ChaosBreach(f"the job did not finish within {JOB_TIMEOUT_S} s")

    def inject(self, fault: Fault, job: subprocess.Popen) -> None:
        fault.injected_at, fault.injected_mono = time.time(), time.monotonic()
        workers = _children(job.pid, depth=1)
        log.info(f"chaos: {fault.kind} at step {fault.at_step}")
        if fault.kind == "kill" and workers:
            os.kill(random.Random(fault.at_step).choice(workers), signal.SIGKILL)
        elif fault.kind == "freeze" and workers:
            os.kill(random.Random(fault.at_step).choice(workers), signal.SIGSTOP)
        elif fault.kind == "preempt":
            os.kill(job.pid, signal.SIGTERM)
        elif fault.kind == "second":  # the same run submitted again (another submission id), one process
            argv = [sys.executable, "-m", "gpt2.train", self.run.config, *self.run.overrides]
            self.intruders.append((fault, self.run.start(argv, f"{self.job_id}-second", "second.log")))

    def _intruding(self) -> bool:
        """A second submission is still starting: the next fault waits for its outcome (a preemption
        meanwhile would hand it the run)."""
        return any(proc.poll() is None for _, proc in self.intruders)

    def _training(self, attempts: list[dict], lines: list[dict], job: subprocess.Popen) -> int:
        """The step the job's newest attempt has reached, once it trains with all its workers (-1
        before: a fault lands in training, so the ledger can say what it did)."""
        starts = [a["attempt"] for a in attempts if a.get("event") == "start"]
        mine = [r["step"] for r in lines if starts and r.get("attempt") == starts[-1]]
        if not mine or len(_children(job.pid, depth=1)) != self.run.nproc:
            return -1
        return max(mine)

    def _recovered(self, waiting: list[Fault], attempts: list[dict], lines: list[dict]) -> None:
        """A fault is recovered from once a step record appears from an attempt that began after it."""
        for fault in list(waiting):
            later = {a["attempt"] for a in attempts if a.get("event") == "start" and a["time"] > fault.injected_at}
            if any(r.get("attempt") in later for r in lines):
                fault.recovery_s = time.monotonic() - fault.injected_mono  # type: ignore[operator]
                waiting.remove(fault)


def _children(pid: int, depth: int) -> list[int]:
    """The processes `depth` generations below `pid` (torchrun's workers: depth 1)."""
    level = [pid]
    for _ in range(depth):
        level = [int(c) for p in level for c in _read(f"/proc/{p}/task/{p}/children").split()]
    return level


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def check(ref: Run, chaos: Chaos) -> list[str]:
    """Every breach of the invariants, as sentences."""
    breaches: list[str] = []
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
    left = [p for p in _pids() if str(chaos.run.root) in _read(f"/proc/{p}/cmdline").replace("\0", " ")]
    if left:
        breaches.append(f"processes of the run are left running: {left}")
    return breaches


def _lineage_breaches(run: Run) -> list[str]:
    lineage = read_lineage(str(run.ckpt))
    found = [c for c in CheckpointStore(str(run.ckpt)).complete() if lineage is None or lineage.owns(c.meta)]
    generations = [(c.step, (c.meta.get("writer") or {}).get("generation") or 0) for c in found]
    back = [(s, g) for (s, g), (_, h) in zip(generations[1:], generations) if g < h]
    return [f"checkpoint generations go back at steps {back}"] if back else []


def _ledger_breaches(chaos: Chaos) -> list[str]:
    intruders = [(fault, proc.wait(timeout=300)) for fault, proc in chaos.intruders]  # their records first
    attempts, _ = chaos.run.records()
    ends = [a for a in attempts if a.get("event") == "end"]
    starts = [a for a in attempts if a.get("event") == "start"]
    mine = [a for a in starts if a.get("job_id") == f"job:{chaos.job_id}"]
    finished = max((e["time"] for e in ends if e["attempt"] == mine[-1]["attempt"]), default=None) if mine else None
    breaches = []
    if len({a["attempt"] for a in starts}) != len(starts) or len(ends) != len(starts):
        breaches.append(f"the ledger has {len(starts)} starts and {len(ends)} ends")
    # another submission may hold the run only once the job has ended (it then finds training complete)
    if any(a not in mine and (finished is None or a["time"] < finished) for a in starts):
        breaches.append("an attempt of another submission is in the ledger while the job ran")
    expected = {"kill": lambda e: e.get("exit_code") != EXIT_OK,
                "preempt": lambda e: e.get("exit_code") == EXIT_PREEMPTED,
                "freeze": lambda e: e.get("exit_code") == EXIT_HUNG or e.get("inferred")}
    for fault in chaos.faults:
        if fault.kind in expected:
            after = [e for e in ends if e["time"] >= fault.injected_at]
            if not after or not expected[fault.kind](after[0]):
                breaches.append(f"{fault.kind} at step {fault.at_step}: the ledger's next end is {after[:1]}")
    for fault, code in intruders:
        text = (chaos.run.root / "second.log").read_text()
        refused = code == 1 and "lease" in text
        came_late = code == EXIT_OK and "training already complete" in text
        fault.note = "refused, run undisturbed" if refused else "came after the run ended" if came_late else \
            f"exited {code}"
        if not (refused or came_late):
            breaches.append(f"the second submission at step {fault.at_step} exited {code}, not refused")
    return breaches


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]


def report(chaos: Chaos, breaches: list[str]) -> str:
    attempts, lines = chaos.run.records()
    lines_out = [f"{'fault':8} {'at step':>7}  recovery"]
    for f in chaos.faults:
        took = f.note if f.kind == "second" else f"{f.recovery_s:.1f} s" if f.recovery_s is not None else "not seen"
        lines_out.append(f"{f.kind:8} {f.at_step:>7}  {took}")
    lines_out += goodput(attempts, lines).describe()
    lines_out.append(f"{len(chaos.faults)} faults, {chaos.submissions} submissions: "
                     + ("every invariant holds" if not breaches else f"{len(breaches)} BREACHES"))
    lines_out += [f"BREACH: {b}" for b in breaches]
    return "\n".join(lines_out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt2.chaos", description=__doc__.split("\n")[2])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--faults", type=int, default=4)
    p.add_argument("--kinds", default=",".join(KINDS), help=f"a comma-separated subset of {','.join(KINDS)}")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--dir", default=None, help="where both runs write (default runs/chaos-SEED)")
    args = p.parse_intermixed_args(argv)
    logs.setup()
    try:
        kinds = args.kinds.split(",")
        if not kinds or set(kinds) - set(KINDS) or args.faults < 0 or args.nproc < 1:
            raise ConfigError(f"--kinds must be a comma-separated subset of {','.join(KINDS)} (got {args.kinds!r}), "
                              f"--faults 0 or more, --nproc 1 or more")
        cfg = load_config(args.config, args.overrides)  # a bad config fails here, before any run
        root = Path(args.dir or f"runs/chaos-{args.seed}").resolve()
        ref = Run(root / "reference", args.config, args.overrides, args.nproc)
        chaos = Chaos(Run(root / "chaos", args.config, args.overrides, args.nproc),
                      draw(args.seed, args.faults, cfg.train.max_steps, kinds), restarts=args.faults + 3)
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
    return 1 if breaches else 0


if __name__ == "__main__":
    sys.exit(main())
