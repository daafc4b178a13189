"""The checkpoint policy of a run: what to resume from and which lineage it continues, when to
save, async saves, fencing, which failures are fatal. `CheckpointStore` (gpt2.checkpoint.store) does
the storage, `Lease` (gpt2.checkpoint.lease) says who may write, `Lineage` which checkpoints belong."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from gpt2 import distributed
from gpt2.checkpoint.lease import Lease
from gpt2.checkpoint.lineage import Lineage, read_lineage, write_lineage
from gpt2.checkpoint.store import CheckpointInfo, CheckpointStore, load_checkpoint
from gpt2.config import CheckpointConfig
from gpt2.errors import EXIT_STORAGE, CheckpointError, CheckpointUnloadable, LeaseLost, StorageFull
from gpt2.storage import ensure_directory, reporting_to
from gpt2.watchdog import Work, phase

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

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))


@dataclass
class ResumePlan:
    """What a start resumes from, which lineage it trains, and what it moves aside: decided before
    the lease is taken, without writing anything (`plan_resume`), done after it (`apply_plan`)."""

    point: ResumePoint | None
    lineage: Lineage
    begins: str | None = None  # why a new lineage begins here (a rollback, a start-over, a first start)
    move_aside: list[tuple[str, str]] = field(default_factory=list)  # (url, "corrupt" | "abandoned")


def find_resume_point(cfg: CheckpointConfig, is_writer: bool) -> ResumePoint | None:
    """What a resume would load, per `checkpoint.resume` (see `plan_resume`)."""
    return plan_resume(cfg, is_writer).point


def plan_resume(cfg: CheckpointConfig, is_writer: bool, submission: str | None = None) -> ResumePlan:
    """The one answer to "what would a resume load", used by every start-up step that depends on
    it (the micro-batch choice) and by the resume itself. The writer decides (reading only) and tells
    the other ranks, who get the point's URL and marker."""

    def decide() -> ResumePlan:
        with _following(_storage_work(cfg), "checkpoint load", lambda: float(cfg.outage_s)):
            return _plan(cfg, submission)

    plan, shared = distributed.decided_on_rank_0(
        decide, is_writer, "checkpoint load: waiting for rank 0",
        share=lambda plan: (plan.point.url, plan.point.meta) if plan.point else None)
    if plan is not None:
        return plan
    return ResumePlan(ResumePoint(*shared) if shared else None, Lineage("?"))  # type: ignore[misc]


def _plan(cfg: CheckpointConfig, submission: str | None) -> ResumePlan:
    store = CheckpointStore(cfg.dir, cfg.storage_options, cfg.retries)
    current = read_lineage(cfg.dir, cfg.storage_options, cfg.retries)
    found, damaged = store.scan()
    corrupt = [(url, "corrupt") for url in damaged]
    if cfg.resume == "never" and not (current and current.began_by("never", submission)):
        lineage = Lineage.new(request="never", by=submission)
        return ResumePlan(None, lineage, "a start-over (checkpoint.resume=never)",
                          [(c.url, "abandoned") for c in found] + corrupt)
    if cfg.resume not in ("never", "auto") and not (current and current.began_by(_url(cfg.resume), submission)):
        plan = _plan_rollback(cfg, _url(cfg.resume), found, submission)
    else:
        plan = _plan_auto(cfg, store, current, found, corrupt)
    return plan


def _storage_work(cfg: CheckpointConfig) -> Work:
    """The progress of a checkpoint's storage work (a save or a load, see gpt2.watchdog.Work): a
    call without an answer is waited for until the outage limit, then the attempt ends with EXIT_STORAGE."""
    return Work(f"checkpoint.dir {cfg.dir} has not answered within checkpoint.outage_s ({cfg.outage_s} s; for a "
                "save, counted from the lease's last renewal; a resume may read a checkpoint elsewhere: the notices "
                "above name the call); check that storage. A later attempt resumes from the last checkpoint",
                EXIT_STORAGE)


@contextlib.contextmanager
def _following(work: Work, name: str, allowed: Callable[[], float]) -> Iterator[None]:
    """Phase `name` of the main thread, following `work`, to which this thread's storage calls report
    (each allowed `allowed()` seconds without an answer)."""
    with phase(name, follows=work), reporting_to(work, allowed):
        yield


def _url(path: str) -> str:
    return path.rstrip("/")


def _plan_rollback(cfg: CheckpointConfig, url: str, found: list[CheckpointInfo], submission: str | None
                   ) -> ResumePlan:
    """checkpoint.resume=PATH: a new lineage from that checkpoint; what the directory holds beyond
    it, or off its lineage, is abandoned."""
    meta, state = load_checkpoint(url, cfg.storage_options, cfg.retries)
    step = int(meta.get("step", 0))
    lineage = Lineage.new(step, parent=Lineage.of(meta), url=url, request=url, by=submission)
    abandoned = [(c.url, "abandoned") for c in found if c.url.rstrip("/") != url and not lineage.owns(c.meta)]
    return ResumePlan(ResumePoint(url, meta, state), lineage, f"a rollback to step {step} ({url})", abandoned)


def _plan_auto(cfg: CheckpointConfig, store: CheckpointStore, current: Lineage | None,
               found: list[CheckpointInfo], corrupt: list[tuple[str, str]]) -> ResumePlan:
    """checkpoint.resume=auto: the newest loadable checkpoint of the current lineage (corrupt ones
    are moved aside), else the checkpoint the lineage began from, else scratch."""
    lineage = current or (Lineage.of(found[-1].meta) if found else None)
    if lineage is None and not corrupt:
        return ResumePlan(None, Lineage.new(), "a first start")
    lineage = lineage or Lineage.new()
    ours = [c for c in found if lineage.owns(c.meta)]
    move = [(c.url, "abandoned") for c in found if not lineage.owns(c.meta)] + corrupt
    for c in reversed(ours):
        try:
            return ResumePlan(ResumePoint(c.url, *store.load(c.url)), lineage, None, move)
        except CheckpointUnloadable:
            raise  # its bytes are intact: what failed is the load, and the message says what to do
        except CheckpointError as err:
            log.warning("checkpoint %s is corrupt (%s); it will be moved aside and the previous one tried", c.url, err)
            move.append((c.url, "corrupt"))
    if any(kind == "corrupt" for _, kind in move) or store.quarantined():
        corrupt = [u for u, kind in move if kind == "corrupt"] + store.quarantined()
        raise CheckpointError(
            f"no loadable checkpoint under {store.url}: the ones there are corrupt ({', '.join(corrupt)}; moved "
            "aside as step-N.corrupt-TIME when a start goes on). Training would start over from step 0; if that is "
            "what you want, run with checkpoint.resume=never (or another checkpoint.dir); to resume from a copy, set "
            "checkpoint.resume=PATH_TO_A_CHECKPOINT")
    parent = lineage.began.get("from")
    if parent:  # a lineage begun from a checkpoint elsewhere, with no checkpoint of its own yet
        return ResumePlan(ResumePoint(parent, *load_checkpoint(parent, cfg.storage_options, cfg.retries)), lineage,
                          None, move)
    return ResumePlan(None, lineage, None, move)


def check_fits(point: ResumePoint, parts: dict[str, torch.nn.Module]) -> None:
    """CheckpointError if the state at `point` does not fit these modules (names and shapes), e.g. a
    model of another size: before anything is loaded, moved or recorded. Modules on the meta device
    do."""
    for name, module in parts.items():
        theirs = (point.state or {}).get(name)
        if not isinstance(theirs, dict):
            raise _misfit(point, name, KeyError(f"no '{name}' entry"))
        ours = module.state_dict()
        for key, tensor in ours.items():
            if key not in theirs or tuple(theirs[key].shape) != tuple(tensor.shape):
                got = tuple(theirs[key].shape) if key in theirs else "nothing"
                raise _misfit(point, name, ValueError(f"{key}: {got} in the checkpoint, {tuple(tensor.shape)} here"))


def _misfit(point: ResumePoint, name: str, err: Exception) -> CheckpointError:
    detail = str(err).strip().splitlines()[0] if str(err).strip() else f"no '{name}' entry"
    return CheckpointError(
        f"{point.url} does not fit this run's {name} ({detail}): it was written by a run with another "
        "configuration (e.g. another model size). Resume with the config it was written with "
        "(python -m gpt2.checkpoint inspect shows it), or start apart with another checkpoint.dir")


def apply_plan(cfg: CheckpointConfig, plan: ResumePlan, fence: Callable[[], None] = lambda: None) -> None:
    """After the lease: move aside what the plan abandons or found corrupt, and record a new
    lineage, saying what was done (the writer only)."""
    store = CheckpointStore(cfg.dir, cfg.storage_options, cfg.retries)
    if plan.begins or plan.move_aside:
        fence()
    for url, kind in plan.move_aside:
        moved = store.move_aside(url, kind, tag=Lineage.of(store.marker_of(url) or {}).id if kind == "abandoned"
                                 else None)
        log.warning(f"moved {url} aside to {moved}: " + (
            "it is corrupt" if kind == "corrupt" else f"it is not part of the lineage this start trains "
                                                      f"({plan.begins or 'written by another lineage'})"))
    if plan.begins:
        write_lineage(cfg.dir, plan.lineage, cfg.storage_options, cfg.retries)
        log.info(f"{plan.begins}: lineage {plan.lineage.id} begins")


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
    again) and `save_final(step, why)` when it stops (blocking; a failure is fatal). Every save is
    fenced by the lease (`Lease.fence`) right before its commit marker and before pruning; a
    superseded writer's save in flight is abandoned, never committed or waited for.
    """

    def __init__(self, cfg: CheckpointConfig, parts: dict[str, Stateful],
                 describe: Callable[[int], dict[str, Any]], is_writer: bool = True, lease: Lease | None = None,
                 lineage: Lineage | None = None, stopping: Callable[[], bool] = lambda: False):
        """`stopping()`: whether this process was told to stop (a signal), for the wait for every rank."""
        self.cfg, self.parts, self.describe, self.is_writer, self.lease = cfg, parts, describe, is_writer, lease
        self.stopping = stopping
        self.lineage = lineage or Lineage.new()
        self.store = CheckpointStore(cfg.dir, cfg.storage_options, cfg.retries, cfg.keep,
                                     deadline=lease.deadline if lease is not None else None)
        self.writer = lease.tag if lease is not None else None
        self.stalled_s = 0.0  # the training loop blocked by saves in this attempt (for goodput)
        if is_writer:
            ensure_directory(cfg.dir, cfg.storage_options, "checkpoint.dir")
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        # a save's or load's progress, in whichever thread does it: the phase follows it, so a save
        # that stops moving outside a storage call (a stuck copy) is found at the step-based limit,
        # and a storage call without an answer is waited for as an outage is (checkpoint.outage_s)
        self._work = _storage_work(cfg)

    def _outage_left(self) -> float:
        """What a storage call of a save may wait for an answer: until the outage limit."""
        deadline = self.store.deadline() if self.store.deadline is not None else math.inf
        return min(deadline - time.monotonic(), float(self.cfg.outage_s))

    def _saving(self) -> contextlib.AbstractContextManager[None]:
        """The phase of a save in the main thread, following the save's work (its own or the thread's)."""
        return _following(self._work, "checkpoint save", self._outage_left)

    def restore(self, point: ResumePoint) -> None:
        """Load the checkpoint at `point` (`plan_resume`) into the parts, on every rank."""
        with _following(self._work, "checkpoint load", lambda: float(self.cfg.outage_s)):
            state = point.state if point.state is not None else self.store.load(point.url)[1]
        # rank 0 had the state already: it waits for the others' loads here as long as they live,
        # not in the first step's collective under the step-based limit
        distributed.wait_for_all(phase_name="checkpoint load: waiting for every rank")
        for name, part in self.parts.items():
            try:
                part.load_state_dict(state[name])
            except (KeyError, RuntimeError, ValueError) as err:
                raise _misfit(point, name, err) from None
        point.state = None  # the parts hold it now

    def check_lease(self) -> None:
        """Per step: LeaseLost once another attempt took the run over (no storage access; see
        gpt2.checkpoint.lease)."""
        if self.lease is not None:
            self.lease.check()

    def step_end(self, step: int) -> None:
        """Save on the interval; a failed periodic save does not stop training (a superseded writer does)."""
        if step % self.cfg.every:
            return
        t0 = time.monotonic()
        with self._saving():
            for attempt in (self.wait, lambda: self.save(step, blocking=not self.cfg.async_save)):
                try:
                    attempt()
                except (LeaseLost, StorageFull):  # superseded; a full disk, which no later save can fix
                    raise
                except Exception as err:
                    log.error("CHECKPOINT SAVE FAILED: %s; training goes on and the next save tries again", err)
        self._wait_for_all()
        self.stalled_s += time.monotonic() - t0

    def _wait_for_all(self) -> None:
        """The other ranks wait for rank 0's save here, not in the next step's collective: as long as
        every rank lives, under the step-based limit (a frozen or cut-off rank 0 is found in about a
        minute, not at the ceiling)."""
        distributed.wait_for_all(self.stopping, phase_name="checkpoint save: waiting for every rank")

    def save_final(self, step: int, why: str) -> None:
        """The save a stopping run depends on (end, preemption, stop_at_step): CheckpointError if it fails.
        The lease says `stopping` first, so that a start that finds it waits for its release."""
        t0 = time.monotonic()
        try:
            with self._saving():
                if self.lease is not None:  # a storage call too: the save's limits apply
                    self.lease.mark_stopping()
                self.wait()
        except LeaseLost:
            raise
        except Exception as err:  # this save supersedes the failed one
            log.error("CHECKPOINT SAVE FAILED: %s", err)
        try:
            with self._saving():
                self.save(step, blocking=True)
        except LeaseLost:
            raise
        except Exception as err:
            raise CheckpointError(f"the {why} checkpoint could not be saved to {self.cfg.dir}: {err}") from err
        finally:
            self._wait_for_all()
            self.stalled_s += time.monotonic() - t0

    def save(self, step: int, blocking: bool) -> None:
        """Save the parts as step `step` (rank 0 only). Non-blocking saves copy to host memory, then
        write in a thread, whose error the next `wait()` raises."""
        if not self.is_writer:
            return
        self.wait()
        self._fence()  # a superseded writer does not even start
        state = {name: part.state_dict() for name, part in self.parts.items()}
        bad = non_finite(state)
        if bad:
            raise CheckpointError(f"not saving step {step}: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} "
                                  "hold NaN or infinite values (a checkpoint must never carry a diverged model)")
        state = to_cpu(state)
        meta = dict(self.describe(step), lineage=self.lineage.record())
        if self.lease is not None:
            meta["writer"] = self.lease.describe()
        if blocking:  # its storage calls and chunks report to the save's work (`_saving`)
            self._write(state, step, meta)
            return
        self._thread = threading.Thread(target=self._write_in_thread, args=(state, step, meta),
                                        name=f"checkpoint-{step}", daemon=True)
        self._thread.start()

    def _fence(self) -> None:
        if self.lease is not None:
            self.lease.fence()

    def _write(self, state: dict[str, Any], step: int, meta: dict[str, Any]) -> None:
        try:
            self.store.write(state, step, meta, writer=self.writer, fence=self._fence, owns=self.lineage.owns)
        except LeaseLost:
            log.error(f"abandoned the save of step {step}: this trainer was superseded (nothing was committed)")
            raise

    def _write_in_thread(self, state: dict[str, Any], step: int, meta: dict[str, Any]) -> None:
        try:
            with reporting_to(self._work, self._outage_left):
                self._write(state, step, meta)
        except BaseException as err:  # raised by wait()
            self._error = err

    def _superseded(self) -> bool:
        return self.lease is not None and self.lease.lost is not None

    def wait(self) -> None:
        """Block until the save in flight (if any) is finished; raise its error. A superseded
        writer does not wait: its save abandons itself at the fence."""
        if self._superseded():
            self._thread = None
            raise LeaseLost(f"{self.lease.lost}; its save in flight is abandoned")  # type: ignore[union-attr]
        if self._thread is not None:
            self._thread.join()  # in a phase that follows the thread's work (or the ceiling's, when finishing)
            self._thread = None
        err, self._error = self._error, None
        if err is not None:
            raise err

    def close(self) -> None:
        """The end of the attempt: wait for a save in flight (an error's exit path), but not past the
        outage limit, and not at all once it has passed: an exiting process never waits on storage
        that does not answer (the thread is a daemon; what it did not commit is not a checkpoint)."""
        if self._thread is not None and not self._superseded():
            self._thread.join(timeout=max(0.0, self._outage_left()))
            if self._thread.is_alive():
                log.error("CHECKPOINT SAVE FAILED: the save in flight did not finish within checkpoint.outage_s; "
                          "it is left unfinished (not committed)")
                self._thread = None
                return
        try:
            self.wait()
        except LeaseLost:
            pass
        except Exception as err:
            log.error("CHECKPOINT SAVE FAILED: %s", err)
