"""`python -m gpt2.status RUN_OR_LOG_DIR`: a run at a glance.

Step and tokens, last and best val loss, HellaSwag, throughput and ETA, goodput and where the rest
of the time went (`gpt2.goodput`; `--json` for scripts), the newest checkpoint of
the current lineage, and every attempt (start, hosts, world size, job, where it resumed, how it
ended) from the run's `attempts.jsonl`. Steps are those of the current trajectory
(`gpt2.metrics.current_steps`): an abandoned branch or a superseded writer's records do not count.
RUN_OR_LOG_DIR is the run's `logging.dir` or a directory above it holding `tensorboard/`; a local
path or any fsspec URL.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from gpt2 import logs
from gpt2.checkpoint import CheckpointStore, read_lineage
from gpt2.errors import Gpt2Error, StatusError, exit_code
from gpt2.goodput import Goodput, goodput
from gpt2.logs import duration
from gpt2.metrics import ATTEMPTS_FILE, STEPS_FILE, current_records, read_attempts, read_step_lines
from gpt2.storage import filesystem, join

log = logging.getLogger("gpt2.status")  # also when run as __main__


@dataclass
class Run:
    log_dir: str
    steps: dict[int, dict[str, Any]]  # the current trajectory
    attempts: list[dict[str, Any]]
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    step_lines: list[dict[str, Any]] = field(default_factory=list)  # every step record, in order

    @property
    def goodput(self) -> Goodput:
        return goodput(self.attempts, self.step_lines)


def find_log_dir(url: str) -> str:
    """The directory holding steps.jsonl: `url` itself or its `tensorboard/`."""
    url = url.rstrip("/")
    fs, path = filesystem(url)
    for candidate, sub in ((path, url), (join(path, "tensorboard"), f"{url}/tensorboard")):
        if fs.exists(join(candidate, STEPS_FILE)) or fs.exists(join(candidate, ATTEMPTS_FILE)):
            return sub
    raise StatusError(f"no {STEPS_FILE} or {ATTEMPTS_FILE} under {url}: give a run's logging.dir (its TensorBoard "
                      "directory) or the directory above it")


def read_run(log_dir: str) -> Run:
    fs, path = filesystem(log_dir)

    def text(name: str) -> str:
        p = join(path, name)
        return fs.cat_file(p).decode() if fs.exists(p) else ""

    attempts, lines = read_attempts(text(ATTEMPTS_FILE)), read_step_lines(text(STEPS_FILE))
    return Run(log_dir, current_records(lines, attempts), attempts, read_scalars(log_dir), lines)


def read_scalars(log_dir: str, tags: tuple[str, ...] = ("val/loss", "eval/hellaswag_acc_norm")
                 ) -> dict[str, list[tuple[int, float]]]:
    """Scalars from the TensorBoard event files (copied first when remote)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.ERROR)  # its notes on purged restarts are expected
    fs, path = filesystem(log_dir)
    with tempfile.TemporaryDirectory(prefix="gpt2-status-") as tmp:
        for f in fs.glob(join(path, "events.out.tfevents.*")):
            fs.get(f, join(tmp, f.rsplit("/", 1)[-1]))
        acc = EventAccumulator(tmp, size_guidance={"scalars": 0})
        acc.Reload()
        present = set(acc.Tags().get("scalars", []))
        return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags if t in present}


def summary(run: Run, now: float | None = None) -> str:
    """The status text."""
    now = time.time() if now is None else now
    starts = [a for a in run.attempts if a.get("event") == "start"]
    last_start = starts[-1] if starts else {}
    max_steps = last_start.get("max_steps")
    batch = last_start.get("total_batch_tokens")
    lines = [f"run {run.log_dir}"]
    done = max(run.steps) + 1 if run.steps else 0
    step_line = f"step {done:,}" + (f" of {max_steps:,} ({100 * done / max_steps:.1f}%)" if max_steps else "")
    tokens = run.steps[done - 1].get("tokens_seen") if run.steps else None
    if tokens or batch:
        step_line += f", {tokens or done * batch:,} tokens"
    lines.append(step_line)
    recent = [r for s, r in sorted(run.steps.items())[-50:] if not r.get("warmup")]
    if recent:
        tps = statistics.median(r["tokens_per_sec"] for r in recent)
        step_s = statistics.median(r["step_time_ms"] for r in recent) / 1000
        last = run.steps[max(run.steps)]
        eta = f", ETA {duration((max_steps - done) * step_s)}" if max_steps and done < max_steps else ""
        lines.append(f"train loss {last['loss']:.4f}; {tps:,.0f} tokens/s, {step_s * 1000:.0f} ms/step (median of "
                     f"the last {len(recent)} steps){eta}")
    val = run.scalars.get("val/loss", [])
    if val:
        best = min(val, key=lambda x: x[1])
        lines.append(f"val loss {val[-1][1]:.4f} at step {val[-1][0]} (best {best[1]:.4f} at step {best[0]})")
    hs = run.scalars.get("eval/hellaswag_acc_norm", [])
    if hs:
        lines.append(f"HellaSwag acc_norm {hs[-1][1]:.4f} at step {hs[-1][0]}")
    lines.extend(run.goodput.describe())
    lines.append(_newest_checkpoint(last_start.get("checkpoint_dir")))
    lines.append("")
    lines.extend(attempts_table(run.attempts, now))
    return "\n".join(lines)


def _newest_checkpoint(directory: str | None) -> str:
    """The newest checkpoint of the current lineage, and the lineage."""
    if not directory:
        return "checkpoints: unknown (no attempt recorded)"
    try:
        store = CheckpointStore(directory)
        found, lineage, aside = store.complete(), read_lineage(directory), store.moved_aside()
    except (Gpt2Error, OSError) as err:
        return f"checkpoints: {directory} cannot be read ({err})"
    if lineage is not None:
        found = [c for c in found if lineage.owns(c.meta)]
    lines = [] if lineage is None else [lineage.describe()]
    if aside:
        lines.append(f"moved aside: {len(aside)} ({', '.join(u.rsplit('/', 1)[-1] for u in aside[-4:])})")
    if not found:
        return "\n".join([f"checkpoints: none yet in {directory}", *lines])
    c = found[-1]
    age = duration(time.time() - c.meta.get("saved_at", time.time()))
    return "\n".join([f"newest checkpoint: {c.url} (step {c.step}, saved {age} ago; {len(found)} kept)", *lines])


def attempts_table(attempts: list[dict[str, Any]], now: float) -> list[str]:
    """One row per attempt: when, where, from which step, how it ended."""
    ends = {a["attempt"]: a for a in attempts if a.get("event") == "end"}
    starts = [a for a in attempts if a.get("event") == "start"]
    if not starts:
        return ["attempts: none recorded"]
    rows = [("#", "started", "hosts", "world", "job", "micro", "resumed from", "ran", "ended")]
    for a in starts:
        end = ends.get(a["attempt"])
        ran = duration((end["time"] if end else now) - a["time"])
        if end is None:
            outcome = "running (or killed: no end record yet)"
        else:
            code = end.get("exit_code")
            outcome = f"exit {code}: {end.get('reason')}" if code is not None else str(end.get("reason"))
            if end.get("step") is not None:
                outcome = f"step {end['step']}, {outcome}"
        resumed = a.get("resumed_from_step")
        began = a.get("began") or ""
        kind = next((f" ({k})" for k in ("rollback", "start-over") if began.startswith(f"a {k}")), "")
        rows.append((str(a["attempt"]), a.get("time_text", "?"), ",".join(a.get("hosts") or []) or "?",
                     str(a.get("world_size", "?")), str(a.get("job_id") or "-"), str(a.get("micro_batch", "?")),
                     ("scratch" if resumed is None else f"step {resumed}") + kind, ran, outcome))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt2.status", description=__doc__.split("\n")[0])
    p.add_argument("path", help="a run's logging.dir, or a directory above it (local or an fsspec URL)")
    p.add_argument("--json", action="store_true", help="print the goodput breakdown as JSON (for scripts)")
    args = p.parse_args(argv)
    logs.setup()
    try:
        run = read_run(find_log_dir(args.path))
        print(run.goodput.to_json() if args.json else summary(run))
    except Gpt2Error as err:
        log.error("%s", err)
        return exit_code(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
