"""Throughput, MFU, and the metrics logger (console, steps.jsonl, TensorBoard)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from gpt2.errors import EXIT_OK, EXIT_PREEMPTED, StorageError, StorageFull
from gpt2.storage import PERMANENT_ERRNOS, ensure_directory

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks in FLOP/s, from the vendors' datasheets (no sparsity).
# Matched against torch.cuda.get_device_name() in order; the first match wins.
BF16_PEAK_FLOPS: list[tuple[str, float]] = [
    ("H200", 989.4e12),
    ("GH200", 989.4e12),
    ("H100 NVL", 835.0e12),
    ("H100 PCIe", 756.0e12),
    ("H100", 989.4e12),  # SXM (reported as "NVIDIA H100 80GB HBM3")
    ("H800", 989.4e12),
    ("A100", 312.0e12),
    ("A800", 312.0e12),
    ("L40S", 362.0e12),
    ("L4", 121.0e12),
    ("A10G", 70.0e12),
    ("A10", 125.0e12),
    ("RTX 4090", 165.2e12),
    ("RTX 3090", 71.0e12),
]


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """(peak FLOP/s, device name) for MFU; None when the device's peak is not known to us.

    fp32 training on Ampere/Hopper runs on TF32 tensor cores at half the bf16 rate.
    """
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK_FLOPS:
        if key in name:
            return (peak if dtype == torch.bfloat16 else peak / 2), name
    return None, name


def mfu(tokens_per_sec: float, flops_per_tok: int, peak_flops: float | None, world_size: int) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices together."""
    if peak_flops is None:
        return None
    return tokens_per_sec * flops_per_tok / (peak_flops * world_size)


ATTEMPTS_FILE = "attempts.jsonl"
KILLED = ("killed: the previous attempt left no end record (SIGKILL, out of memory, a lost node, or a hang "
          "whose watchdog could not report)")


STEPS_FILE = "steps.jsonl"


def _json_lines(text: str) -> list[dict]:
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a kill
    return records


def read_attempts(text: str) -> list[dict]:
    """The records of an attempts.jsonl (a line cut short by a kill is skipped)."""
    return _json_lines(text)


def read_ledger(log_dir: str) -> list[dict]:
    """The records of the attempt ledger in (local) `log_dir`; none when there is none yet."""
    path = Path(log_dir) / ATTEMPTS_FILE
    return read_attempts(path.read_text()) if path.exists() else []


def failed_in_a_row(attempts: list[dict], job: str, resume_step: int) -> list[dict]:
    """The latest attempts of scheduler job `job` that each resumed from `resume_step` (0: from
    scratch) and failed, newest first, each with its end record under "end" (None: it left none).
    Failed: an exit other than finished (0) or preempted (200), or killed; not superseded."""
    ends = {r.get("attempt"): r for r in attempts if r.get("event") == "end"}
    streak = []
    for start in sorted((a for a in attempts if a.get("event") == "start"), key=ledger_order, reverse=True):
        end = ends.get(start.get("attempt"))
        failed = end is None or (end.get("exit_code") not in (EXIT_OK, EXIT_PREEMPTED)
                                 and not str(end.get("reason", "")).startswith("superseded"))
        if start.get("job_id") != job or (start.get("resumed_from_step") or 0) != resume_step or not failed:
            break
        streak.append({**start, "end": end})
    return streak


def ledger_order(record: dict) -> tuple[int, int]:
    """Where an attempt (or one of its step records) stands in the run: by lease generation, which
    only grows, then by attempt number (records from before generations were recorded come first)."""
    return record.get("generation") or 0, record.get("attempt") or 0


def read_step_lines(text: str) -> list[dict]:
    """Every record of a steps.jsonl, in order (a line cut short by a kill is skipped)."""
    return _json_lines(text)


def current_steps(steps_text: str, attempts: list[dict]) -> dict[int, dict]:
    """The step records of the run's current trajectory, by step, from a steps.jsonl and its ledger
    (`current_records`)."""
    return current_records(_json_lines(steps_text), attempts)


def current_records(records: list[dict], attempts: list[dict]) -> dict[int, dict]:
    """The step records of the run's current trajectory, by step, of every step record in order.

    A start that resumed at step r (0 from scratch: a first start or a start-over) discards every
    record at or after r of the attempts before it: a branch abandoned by a rollback, the steps a
    failed attempt trained after its last checkpoint, and whatever a superseded writer still wrote.
    Of the records left, the last one of each step counts."""
    starts = sorted((a for a in attempts if a.get("event") == "start"), key=ledger_order)
    cut, lowest = {}, math.inf
    for a in reversed(starts):
        cut[ledger_order(a)], lowest = lowest, min(lowest, a.get("resumed_from_step") or 0)
    steps: dict[int, dict] = {}
    for r in records:
        if r.get("attempt") is not None and r["step"] >= cut.get(ledger_order(r), math.inf):
            continue
        steps[r["step"]] = r
    return steps


def recent_step_times(log_dir: str, world_size: int, n: int) -> list[float]:
    """Seconds of the last `n` timed steps of the run's current trajectory at `world_size`, from
    the (local) `log_dir`: what a restart expects its steps to take."""
    path = Path(log_dir) / STEPS_FILE
    if not path.exists():
        return []
    kept = current_records(read_step_lines(path.read_text()), read_ledger(log_dir))
    times = [r["step_time_ms"] / 1000 for _, r in sorted(kept.items())
             if not r.get("warmup") and r.get("world_size") == world_size]
    return times[-n:]


@dataclass(kw_only=True)
class StepRecord:
    step: int
    loss: float
    lr: float
    grad_norm: float
    step_time_ms: float
    tokens_per_sec: float
    mfu: float | None
    batch_hash: int
    world_size: int
    tokens_seen: int = 0  # after this step
    data_share: float = 0.0  # share of the step spent reading and copying batches on the host
    peak_memory_gib: float | None = None  # device memory, CUDA only
    warmup: bool = False  # the first steps after a (re)start: compilation and caches, not throughput
    # the attempt's clock after this step (gpt2.goodput): seconds since its process started, and
    # its running totals of checkpoint stalls and evaluation
    attempt_s: float = 0.0
    checkpoint_s: float = 0.0
    eval_s: float = 0.0


class WriteGate(Protocol):
    """Whether this process may write the run's records now (gpt2.checkpoint.lease.Lease)."""

    def may_write(self) -> bool: ...

    def fence(self) -> None: ...

    @property
    def superseded(self) -> bool: ...


class MetricsLogger:
    """Every output channel of a run's measurements: the console step line (through the `gpt2`
    logger, gpt2.logs), `steps.jsonl`, the attempt ledger and TensorBoard.

    A no-op off rank 0 (`enabled=False`). `steps.jsonl` holds one JSON line per step at full
    float precision, tagged with its attempt; `current_steps` reads the current trajectory back.
    TensorBoard's `purge_step` drops events of a previous attempt at or after the resume step,
    so curves never double back. With a `gate` (the run's lease) the records are written only while
    it allows: held back while the lease is unconfirmed, dropped once it is lost.
    """

    def __init__(self, log_dir: str, enabled: bool, max_steps: int, log_every: int = 1,
                 purge_step: int | None = None, gate: WriteGate | None = None):
        self.enabled, self.max_steps, self.log_every, self.gate = enabled, max_steps, log_every, gate
        self.log_dir = log_dir
        self.writer = None
        self.steps_path: Path | None = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            ensure_directory(log_dir, what="logging.dir")
            self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)
            self.steps_path = Path(log_dir) / STEPS_FILE
        self.attempts_path = Path(log_dir) / ATTEMPTS_FILE
        self.attempt: int | None = None
        self.generation: int | None = None  # the lease generation of this attempt
        self._held: list[Callable[[], None]] = []

    def _persist(self, write: Callable[[], None]) -> None:
        """Write now if the gate allows, else hold back (until it does) or drop (superseded)."""
        gate = self.gate
        if gate is not None and gate.superseded:
            self._held.clear()
            return
        if gate is not None and not gate.may_write():
            if not self._held:
                log.warning("the run's lease is unconfirmed: holding back step records until it is renewed")
            self._held.append(write)
            return
        held, self._held = self._held, []
        try:
            for w in (*held, write):
                w()
        except OSError as err:  # a full or vanished logging disk: one message, not a traceback per record
            kind = StorageFull if err.errno in PERMANENT_ERRNOS else StorageError
            raise kind(f"cannot write the run's records to logging.dir {self.log_dir}: {err.strerror or err}; free "
                       "space there (or set another logging.dir), then start again") from err

    def step(self, r: StepRecord) -> None:
        """One optimizer step: a jsonl line, the scalars, and the console line every `log_every` steps."""
        if not self.enabled:
            return
        line = json.dumps({**r.__dict__, "attempt": self.attempt, "generation": self.generation}) + "\n"

        def write() -> None:
            with open(self.steps_path, "a") as f:  # type: ignore[arg-type]
                f.write(line)
            self._scalars(r.step, {
                "train/loss": r.loss, "train/lr": r.lr, "train/grad_norm": r.grad_norm,
                "perf/step_time_ms": r.step_time_ms, "perf/data_share": r.data_share,
                "perf/peak_memory_gib": r.peak_memory_gib,
            })
            if not r.warmup:  # throughput without the compile/warm-up steps, which would dwarf the curve
                self._scalars(r.step, {"perf/tokens_per_sec": r.tokens_per_sec, "perf/mfu": r.mfu})

        self._persist(write)
        if r.step % self.log_every == 0 or r.step == self.max_steps - 1:
            util = f"MFU {100 * r.mfu:.1f}%" if r.mfu is not None else "MFU n/a"
            log.info(f"step {r.step:6d}/{self.max_steps} | loss {r.loss:.6f} | lr {r.lr:.3e} | "
                      f"norm {r.grad_norm:.4f} | {r.step_time_ms:.1f} ms | {r.tokens_per_sec:,.0f} tok/s | {util}"
                      + (" (warm-up)" if r.warmup else ""))

    def start(self, step: int, hparams: dict[str, float | int | str], micro_batch: int, accum: int) -> None:
        """What a run is, once per (re)start: the hparams plugin's row (its metrics are the final val loss
        and HellaSwag), a chart with train and val loss together, and the batch layout in use."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        def write() -> None:
            metrics = {"val/loss": float("nan"), "eval/hellaswag_acc_norm": float("nan")}  # values: the scalars
            for summary in hparams_summary(hparams, metrics):
                self.writer.file_writer.add_summary(summary)  # type: ignore[union-attr]
            self.writer.add_custom_scalars(  # type: ignore[union-attr]
                {"loss": {"train and val loss": ["Multiline", ["train/loss", "val/loss"]]}})
            self._scalars(step, {"train/micro_batch": micro_batch, "train/grad_accum": accum})

        self._persist(write)

    def attempt_started(self, step: int, record: dict, generation: int | None = None,
                        superseded: tuple[int, str] | None = None) -> None:
        """The attempt ledger (`attempts.jsonl`, and TensorBoard text): a start record, after an end
        record for each earlier attempt that left none: `superseded` (the lease generation this
        start took over from, and why) names the one this start superseded, any other was killed.
        With a gate, the lease is confirmed on the storage first: a start superseded in the
        meantime records nothing (LeaseLost)."""
        if not self.enabled:
            return
        if self.gate is not None:
            self.gate.fence()
        previous = read_ledger(self.log_dir)
        starts = [r for r in previous if r.get("event") == "start"]
        ended = {r.get("attempt") for r in previous if r.get("event") == "end"}
        self.attempt, self.generation = len(starts) + 1, generation
        for start in starts:
            if start["attempt"] in ended:
                continue
            if superseded is not None and start.get("generation") == superseded[0]:
                reason = f"superseded by attempt {self.attempt}: {superseded[1]}"
            else:
                reason = KILLED
            log.warning(f"attempt {start['attempt']} of this run (started {start.get('time_text', '?')}) left no end "
                        f"record: {reason}")
            self._append({"event": "end", "attempt": start["attempt"], "time": time.time(), "exit_code": None,
                          "reason": reason, "inferred": True})
        self._append({"event": "start", "attempt": self.attempt, "generation": generation, "time": time.time(),
                      "time_text": time.strftime("%Y-%m-%d %H:%M:%S"), **record})
        self.text("attempts", f"attempt {self.attempt} started: {json.dumps(record)}", step)

    def attempt_ended(self, step: int, exit_code: int, reason: str, unconfirmed: bool = False,
                      clock: dict[str, float] | None = None) -> None:
        """How this attempt ended: its exit code and why (not written by a superseded trainer), and
        its clock (`clock`: attempt_s, checkpoint_s, eval_s, as in the step records).
        `unconfirmed`: written although the lease is unconfirmed (an outage ended the attempt),
        unless a successor already recorded this attempt's end."""
        if not self.enabled or self.attempt is None:
            return
        record = {"event": "end", "attempt": self.attempt, "time": time.time(), "step": step,
                  "exit_code": exit_code, "reason": reason, **(clock or {})}
        if unconfirmed and self.gate is not None and not self.gate.superseded:
            ended = {r.get("attempt") for r in read_attempts(self.attempts_path.read_text())
                     if r.get("event") == "end"} if self.attempts_path.exists() else set()
            if self.attempt not in ended:
                with open(self.attempts_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            self.attempt = None
            return
        self._append(record)
        self.text("attempts", f"attempt {self.attempt} ended at step {step}: exit {exit_code}, {reason}", step)
        self._persist(lambda: self.writer.flush() if self.writer is not None else None)
        self.attempt = None

    def _append(self, record: dict) -> None:
        line = json.dumps(record) + "\n"

        def write() -> None:
            with open(self.attempts_path, "a") as f:
                f.write(line)

        self._persist(write)

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        self._persist(lambda: self._scalars(step, values))

    def _scalars(self, step: int, values: dict[str, float | None]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self._persist(lambda: self.writer.add_text(tag, text, step))  # type: ignore[union-attr]

    def close(self) -> None:
        if self._held:
            log.warning(f"{len(self._held)} step records held back (the run's lease was never confirmed again) "
                        "are not written")
            self._held.clear()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
