"""The checkpoint policy of a run: what to resume from, when to save, async saves, which failures
are fatal. `CheckpointStore` (gpt2.checkpoint.store) does the storage."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from gpt2 import distributed
from gpt2.checkpoint.lease import Lease
from gpt2.checkpoint.store import CheckpointStore, load_checkpoint
from gpt2.config import CheckpointConfig
from gpt2.errors import CheckpointError, LeaseLost
from gpt2.storage import ensure_directory
from gpt2.watchdog import phase

log = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class ResumePoint:
    """The checkpoint a start resumes from: its URL and commit marker on every rank; its state on the
    rank that picked it (the others read it when restoring)."""

    url: str
    meta: dict[str, Any]
    state: dict[str, Any] | None = None


def find_resume_point(cfg: CheckpointConfig, is_writer: bool) -> ResumePoint | None:
    """What a resume would load, per `checkpoint.resume`: the one answer, used by every start-up step
    that depends on it (the micro-batch choice) and by the resume itself. The writer picks (newest
    loadable, moving corrupt ones aside) and tells the other ranks; None: start from scratch."""
    with phase("checkpoint load", ceiling=True):
        point = _pick(cfg) if is_writer else None
        shared = distributed.broadcast_object((point.url, point.meta) if point else None)
    if shared is None:
        return None
    return point or ResumePoint(*shared)  # type: ignore[misc]


def _pick(cfg: CheckpointConfig) -> ResumePoint | None:
    if cfg.resume == "never":
        return None
    if cfg.resume != "auto":
        return ResumePoint(cfg.resume, *load_checkpoint(cfg.resume, cfg.storage_options, cfg.retries))
    found = CheckpointStore(cfg.dir, cfg.storage_options, cfg.retries).newest_loadable()
    return ResumePoint(*found) if found else None


def to_cpu(obj: Any) -> Any:
    """A deep copy of a state dict with every tensor copied to host memory."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def non_finite(obj: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a state dict that hold a NaN or an infinity."""
    if isinstance(obj, torch.Tensor):
        return [prefix] if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else []
    if isinstance(obj, dict):
        return [n for k, v in obj.items() for n in non_finite(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, (list, tuple)):
        return [n for i, v in enumerate(obj) for n in non_finite(v, f"{prefix}[{i}]")]
    return []


class Checkpointer:
    """The checkpoint policy of a training run over the trainer's `parts`.

    The trainer calls `restore(point)` once when resuming, `step_end(step)` after every optimizer step (saves every
    `checkpoint.every` steps, async if configured; a failure is logged and the next save tries
    again) and `save_final(step, why)` when it stops (blocking; a failure is fatal).
    """

    def __init__(self, cfg: CheckpointConfig, parts: dict[str, Stateful],
                 describe: Callable[[int], dict[str, Any]], is_writer: bool = True, lease: Lease | None = None):
        self.cfg, self.parts, self.describe, self.is_writer, self.lease = cfg, parts, describe, is_writer, lease
        self.store = CheckpointStore(cfg.dir, cfg.storage_options, cfg.retries, cfg.keep)
        if is_writer:
            ensure_directory(cfg.dir, cfg.storage_options, "checkpoint.dir")
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def restore(self, point: ResumePoint) -> None:
        """Load the checkpoint at `point` (`find_resume_point`) into the parts, on every rank."""
        with phase("checkpoint load", ceiling=True):
            state = point.state if point.state is not None else self.store.load(point.url)[1]
        for name, part in self.parts.items():
            try:
                part.load_state_dict(state[name])
            except (KeyError, RuntimeError, ValueError) as err:
                detail = str(err).strip().splitlines()[0] if str(err).strip() else f"no '{name}' entry"
                raise CheckpointError(
                    f"{point.url} does not fit this run's {name} ({detail}): it was written by a run with another "
                    "configuration (e.g. another model size). Resume with the config it was written with "
                    "(python -m gpt2.checkpoint inspect shows it), or start apart with another checkpoint.dir"
                ) from None
        point.state = None  # the parts hold it now

    def check_lease(self) -> None:
        """Per step: LeaseLost once another attempt took the run over (no storage access unless this
        process was frozen; see gpt2.checkpoint.lease)."""
        if self.lease is not None:
            self.lease.check()

    def step_end(self, step: int) -> None:
        """Save on the interval; a failed periodic save does not stop training (a superseded writer does)."""
        if step % self.cfg.every:
            return
        with phase("checkpoint save", ceiling=True):
            for attempt in (self.wait, lambda: self.save(step, blocking=not self.cfg.async_save)):
                try:
                    attempt()
                except LeaseLost:
                    raise
                except Exception as err:
                    log.error("CHECKPOINT SAVE FAILED: %s; training goes on and the next save tries again", err)
            distributed.barrier()  # the other ranks wait here, in this phase, not in the next step's collective

    def save_final(self, step: int, why: str) -> None:
        """The save a stopping run depends on (end, preemption, stop_at_step): CheckpointError if it fails."""
        try:
            self.wait()
        except Exception as err:  # this save supersedes the failed one
            log.error("CHECKPOINT SAVE FAILED: %s", err)
        with phase("checkpoint save", ceiling=True):
            try:
                self.save(step, blocking=True)
            except LeaseLost:
                raise
            except Exception as err:
                raise CheckpointError(f"the {why} checkpoint could not be saved to {self.cfg.dir}: {err}") from err
            finally:
                distributed.barrier()

    def save(self, step: int, blocking: bool) -> None:
        """Save the parts as step `step` (rank 0 only). Non-blocking saves copy to host memory, then
        write in a thread, whose error the next `wait()` raises."""
        if not self.is_writer:
            return
        self.wait()
        if self.lease is not None:
            self.lease.verify()  # fencing: a superseded writer must not write
        state = {name: part.state_dict() for name, part in self.parts.items()}
        bad = non_finite(state)
        if bad:
            raise CheckpointError(f"not saving step {step}: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} "
                                  "hold NaN or infinite values (a checkpoint must never carry a diverged model)")
        state = to_cpu(state)
        meta = self.describe(step)
        if self.lease is not None:
            meta["writer"] = self.lease.describe()
        if blocking:
            self.store.write(state, step, meta)
            return
        self._thread = threading.Thread(target=self._write_in_thread, args=(state, step, meta),
                                        name=f"checkpoint-{step}", daemon=True)
        self._thread.start()

    def _write_in_thread(self, state: dict[str, Any], step: int, meta: dict[str, Any]) -> None:
        try:
            self.store.write(state, step, meta)
        except BaseException as err:  # raised by wait()
            self._error = err

    def wait(self) -> None:
        """Block until the save in flight (if any) is finished; raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        err, self._error = self._error, None
        if err is not None:
            raise err

    def close(self) -> None:
        try:
            self.wait()
        except Exception as err:
            log.error("CHECKPOINT SAVE FAILED: %s", err)
