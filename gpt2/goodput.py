"""Goodput: the share of a run's wall time that trained the model, and where the rest went.

Computed from the run's own records, across every attempt: the ledger (`attempts.jsonl`: wall time
only at attempt boundaries) and the step records (`steps.jsonl`: monotonic durations). Each step
record carries its attempt's clock (`attempt_s`, seconds since the process started) and the
attempt's running totals of checkpoint stalls and evaluation (`checkpoint_s`, `eval_s`), so even
an attempt killed without an end record is accounted for up to its last step.

    productive   the step time of every step of the current trajectory, each counted once
    lost         the step time of steps trained and then redone (after a restart, a rollback, or
                 by a superseded writer)
    startup      process start to the first step, per attempt: imports, rendezvous, data checks,
                 checkpoint load, compilation
    checkpoint   the training loop blocked by saves
    evaluation   val loss, HellaSwag, samples
    between      the gaps between attempts: queueing, rescheduling, restarts
    other        the rest (an attempt's last moments after its last record, logging)

goodput = productive / wall, wall = first process start to the last record.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gpt2.logs import duration
from gpt2.metrics import ATTEMPTS_FILE, STEPS_FILE, current_records, ledger_order, read_attempts, read_step_lines

PARTS = ("productive", "lost", "startup", "checkpoint", "evaluation", "between", "other")


def process_age_s() -> float:
    """Seconds since this process started, by the kernel's boot-time clock (not the wall clock);
    0 where /proc is not there."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[-1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)


@dataclass
class Goodput:
    wall_s: float = 0.0
    parts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))
    attempts: list[dict] = field(default_factory=list)  # per attempt: its number and its parts

    @property
    def goodput(self) -> float | None:
        return self.parts["productive"] / self.wall_s if self.wall_s > 0 else None

    def to_json(self) -> str:
        return json.dumps({"goodput": self.goodput, **asdict(self)}, indent=1)

    def scalars(self) -> dict[str, float | None]:
        """For TensorBoard: goodput and each part's share of the wall time."""
        shares = {f"goodput/{k}_share": v / self.wall_s for k, v in self.parts.items()} if self.wall_s > 0 else {}
        return {"goodput/goodput": self.goodput, "goodput/wall_hours": self.wall_s / 3600, **shares}

    def describe(self) -> list[str]:
        if self.goodput is None:
            return ["goodput: no step recorded yet"]
        shares = ", ".join(f"{k} {duration(v)} ({100 * v / self.wall_s:.1f}%)" for k, v in self.parts.items()
                           if k != "productive" and v >= 0.5)
        return [f"goodput {100 * self.goodput:.1f}%: {duration(self.parts['productive'])} of {duration(self.wall_s)} "
                f"trained the model" + (f"; the rest: {shares}" if shares else "")]


def goodput(attempts: list[dict], step_lines: list[dict]) -> Goodput:
    """The breakdown of a run from its ledger records and every line of its steps.jsonl."""
    kept = {id(r) for r in current_records(step_lines, attempts).values()}
    by_attempt: dict[int | None, list[dict]] = {}
    for r in step_lines:
        by_attempt.setdefault(r.get("attempt"), []).append(r)
    ends = {r.get("attempt"): r for r in attempts if r.get("event") == "end"}
    result, spans = Goodput(), []
    for start in sorted((a for a in attempts if a.get("event") == "start"), key=ledger_order):
        records = by_attempt.get(start.get("attempt"), [])
        end = ends.get(start.get("attempt"))
        begin = start["time"] - start.get("process_s", 0.0)
        totals = end if end is not None and "attempt_s" in end else (records[-1] if records else None)
        if totals is not None and "attempt_s" in totals:
            finish = begin + totals["attempt_s"]
        else:  # nothing timed: an attempt before these records existed, or one that never stepped
            finish = max(begin, end["time"]) if end is not None and not end.get("inferred") else begin
        parts = dict.fromkeys(PARTS, 0.0)
        for r in records:
            parts["productive" if id(r) in kept else "lost"] += r.get("step_time_ms", 0.0) / 1000
        if totals is not None:
            parts["checkpoint"] = totals.get("checkpoint_s", 0.0)
            parts["evaluation"] = totals.get("eval_s", 0.0)
        first = next((r for r in records if "attempt_s" in r), None)
        parts["startup"] = (first["attempt_s"] - first["step_time_ms"] / 1000 - first.get("eval_s", 0.0)
                            - first.get("checkpoint_s", 0.0)) if first else finish - begin
        parts["other"] = max(finish - begin - sum(parts.values()), 0.0)
        spans.append((begin, finish))
        result.attempts.append({"attempt": start.get("attempt"), **parts})
        for k, v in parts.items():
            result.parts[k] += v
    if spans:
        first_begin, last_finish = spans[0][0], max(f for _, f in spans)
        result.wall_s = last_finish - first_begin
        reached = first_begin
        for begin, finish in spans:
            result.parts["between"] += max(begin - reached, 0.0)
            reached = max(reached, finish)
    return result


def run_goodput(log_dir: str) -> Goodput:
    """The breakdown of the run whose records are in (local) `log_dir`."""

    def text(name: str) -> str:
        path = Path(log_dir) / name
        return path.read_text() if path.exists() else ""

    return goodput(read_attempts(text(ATTEMPTS_FILE)), read_step_lines(text(STEPS_FILE)))
