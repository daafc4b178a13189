"""The hang policy: a watchdog that ends a process which stops making progress.

A frozen peer, a stuck collective or a hung read block a rank forever (or for the process-group
timeout). The watchdog waits for progress, not for steps:

* during training steps, a step is overdue when it takes STEP_FACTOR x the slowest of the last
  RECENT_STEPS steps (the first steps after a start, which compile and fill caches, not counted),
  but never less than FLOOR_S; so a frozen rank is found in about a minute whatever the model
  size, and a step that is merely slower than usual is left alone;
* a long phase (evaluation, a checkpoint save or load, waiting for or preparing data, compiling)
  is named with `with phase(name):` and beats from inside its loops (`beat()` per batch or
  example group); between beats the same limit applies, so an evaluation many times longer than
  a step is fine as long as it moves; a phase that cannot beat from inside (one save, one load,
  compilation) is `phase(name, ceiling=True)` and gets the ceiling;
* before MIN_TIMED steps have been timed after a (re)start (unless the step times of the run's
  previous attempt are known: then those count from the first step), and for the ceiling phases,
  the limit is `train.hang_timeout_s`, which is also the ceiling of the step-based limit (0 disables the
  watchdog).

When the limit passes without progress, the watchdog logs the phase, how long it waited and every
thread's stack, calls `on_hang` (the attempt record) and `before_exit`, then exits the process with
EXIT_HUNG: torchrun restarts the group (or SLURM/Kubernetes the job), which resumes from the last
checkpoint. A thread that fails meanwhile (a peer's death ends its collective) yields to that exit.

A process that was suspended as a whole (SIGSTOP, a frozen VM) is not hung: its watchdog thread
did not run either. When the watchdog's own polls are SUSPENDED_S apart, it says so and starts
counting afresh; whether such a process may go on is for the run's lease to say.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from gpt2.errors import EXIT_HUNG

log = logging.getLogger(__name__)

STEP_FACTOR = 20
RECENT_STEPS = 20
MIN_TIMED = 3
FLOOR_S = 60.0
RECORD_DEADLINE_S = 10.0  # what the hang's record may take before the process exits without it
SUSPENDED_S = 10.0  # a gap this long between the watchdog's own polls (1 s apart): the process was suspended

_active: Watchdog | None = None  # the watchdog of this process while one is running (`with Watchdog(...)`)


class Watchdog:
    """Watches one process. `where()` says which rank and step, for the message."""

    def __init__(self, ceiling_s: float, where: Callable[[], str] = lambda: "",
                 on_hang: Callable[[str], None] = lambda phase: None, exit: Callable[[int], None] = os._exit,
                 floor_s: float = FLOOR_S, factor: float = STEP_FACTOR, recent: int = RECENT_STEPS,
                 before_exit: Callable[[], None] = lambda: None):
        self.ceiling_s, self.where, self.on_hang, self._exit = ceiling_s, where, on_hang, exit
        self.before_exit = before_exit
        self.fired = threading.Event()  # a hang was declared: the process is on its way out with EXIT_HUNG
        self.floor_s, self.factor = floor_s, factor
        self.recent: deque[float] = deque(maxlen=recent)
        self.phase_name = "start-up"
        self._ceiling_phase = True
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Watchdog:
        global _active
        self.beat()
        _active = self
        if self.ceiling_s > 0:
            self._thread = threading.Thread(target=self._watch, name="gpt2-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        global _active
        _active = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def beat(self) -> None:
        self._last = time.monotonic()

    def step_done(self, seconds: float, timed: bool = True) -> None:
        """A training step finished in `seconds`: progress, and (if `timed`) a measure for the limit."""
        if timed:
            self.recent.append(seconds)
        self.beat()

    @property
    def limit_s(self) -> float:
        """Seconds without progress after which the process counts as hung, now."""
        if self._ceiling_phase or len(self.recent) < MIN_TIMED:
            return self.ceiling_s
        return min(self.ceiling_s, max(self.floor_s, self.factor * max(self.recent)))

    @contextmanager
    def phase(self, name: str, ceiling: bool = False) -> Iterator[None]:
        previous = self.phase_name, self._ceiling_phase
        self.phase_name, self._ceiling_phase = name, ceiling or self._ceiling_phase
        self.beat()
        try:
            yield
        finally:
            self.phase_name, self._ceiling_phase = previous
            self.beat()

    def steps(self, before: Sequence[float] = ()) -> None:
        """From now on the steps' own limit applies (called once the start-up is over). `before`:
        the run's step times from its previous attempt, so that the first steps after a restart are
        held to that limit too instead of the ceiling (they are replaced as steps are timed)."""
        self.recent.extend(list(before)[-(self.recent.maxlen or len(before)):])
        self.phase_name, self._ceiling_phase = "training step", False
        self.beat()

    def _watch(self) -> None:
        polled = time.monotonic()
        while not self._stop.wait(min(1.0, self.ceiling_s / 4)):
            now = time.monotonic()
            if now - polled > SUSPENDED_S:
                log.warning(f"this process was suspended for {now - polled:.0f} s (SIGSTOP, a frozen VM or node): "
                            "not counted as a hang")
                self.beat()
            polled = now
            idle, limit = now - self._last, self.limit_s
            if idle > limit:
                self._fire(idle, limit)
                return

    def yield_to_hang_exit(self) -> None:
        """For a thread about to end the process for another reason: once a hang is declared, wait
        for the watchdog's own exit instead (EXIT_HUNG, the code the launchers restart on)."""
        if self.fired.is_set():
            time.sleep(RECORD_DEADLINE_S + 10)

    def _fire(self, idle: float, limit: float) -> None:
        self.fired.set()
        names = {t.ident: t.name for t in threading.enumerate()}
        stacks = "\n".join(f"Thread {names.get(ident, ident)}:\n{''.join(traceback.format_stack(frame))}"
                           for ident, frame in sys._current_frames().items())
        log.error(f"no progress for {idle:.0f} s in phase '{self.phase_name}' ({self.where()}; limit {limit:.0f} s: "
                  f"{self._why(limit)}): a peer is frozen or a collective or a read hangs. Exiting with {EXIT_HUNG} "
                  f"so that the job restarts from its last checkpoint. Stacks of this process:\n{stacks}")
        # the record is best effort under a deadline: the storage it goes to may be what hangs
        recorder = threading.Thread(target=self._record, name="gpt2-hang-record", daemon=True)
        recorder.start()
        recorder.join(RECORD_DEADLINE_S)
        if recorder.is_alive():
            log.error(f"could not record the hang within {RECORD_DEADLINE_S:g} s (the storage may hang too); exiting")
        try:
            self.before_exit()
        except Exception as err:  # the exit matters more
            log.error(f"before exiting: {type(err).__name__}: {err}")
        for handler in logging.getLogger("gpt2").handlers:
            handler.flush()
        self._exit(EXIT_HUNG)

    def _record(self) -> None:
        try:
            self.on_hang(self.phase_name)
        except Exception as err:  # the exit matters more than the record
            log.error(f"could not record the hang: {err}")

    def _why(self, limit: float) -> str:
        if limit >= self.ceiling_s:
            return f"train.hang_timeout_s={self.ceiling_s:g}"
        return (f"{self.factor:g} x the slowest of the last {len(self.recent)} steps ({max(self.recent):.2f} s), "
                f"at least {self.floor_s:g} s")


def beat() -> None:
    """Progress inside a long phase (an evaluation batch, a poll for data, a prepared batch). Only
    the main thread's progress counts: a background thread's work (a read-ahead, a copy) must not
    hide a main thread stuck elsewhere; whoever waits for that work in the main thread beats for it."""
    if _active is not None and threading.current_thread() is threading.main_thread():
        _active.beat()


@contextmanager
def phase(name: str, ceiling: bool = False) -> Iterator[None]:
    """Name what the process does now, for the limit and the message; a no-op without a watchdog."""
    if _active is None:
        yield
        return
    with _active.phase(name, ceiling):
        yield
