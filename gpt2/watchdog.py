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
  a step is fine as long as it moves;
* a phase that waits for `Work` done in any thread (a checkpoint save or load: its chunks and
  storage calls) is `phase(name, follows=work)`: the work's moves are progress, and one call of it
  that cannot report progress is waited for as long as it is allowed (`Work.allowing`: for a
  checkpoint's storage call, until the outage limit, `checkpoint.outage_s`);
* a phase that reports its progress from start to end (`follows=work`, or `measured=True`: a wait
  that beats while every rank lives) is held to the step-based limit even at start-up, before any
  step is timed (FLOOR_S then), so a peer that freezes while a resume loads is found in about a minute;
* a rank that waits in a collective (`in_collective()`) for a peer that works (a peer's step
  waiting for its shard copy, beating as the copy grows) is not hung either: each rank publishes
  with its heartbeat how long ago its own work last beat (`work_idle_s`, see gpt2.distributed),
  and a peer's work is progress for a rank in a collective (`peers_worked`), for at most the
  ceiling since its own last progress. Beats of a wait for other ranks are not work
  (`beat(waiting=True)`), so ranks that wait for one another are still found, and a rank stuck
  outside a collective is found at its own limit whatever its peers do. A step that waited for
  the peers' work is no measure of this rank's speed: it is not timed;
* a phase that cannot report progress at all (compilation, the start-up) is
  `phase(name, ceiling=True)` and gets the ceiling;
* the first steps after a (re)start are held to the step-based limit too: with the step times of
  the run's previous attempt where they are known, else, from the first micro-step on, with the
  micro-steps timed so far (the steps beat per micro-step, so a first step many times longer than
  the floor is progress while its micro-steps move); only the first micro-step of a run's first
  start, and until MIN_TIMED steps are timed a compiled model's first steps (which may still
  compile), get the ceiling. The ceiling phases' limit is
  `train.hang_timeout_s`, which is also the ceiling of the step-based limit (0 disables the watchdog).

When the limit passes without progress, the watchdog logs the phase, how long it waited and every
thread's stack, calls `on_hang` (the attempt record) and `before_exit`, then exits the process with
EXIT_HUNG (for a call that outlasted its allowance: its `Work`'s code): torchrun restarts the group
(or SLURM/Kubernetes the job), which resumes from the last checkpoint. A thread that fails
meanwhile (a peer's death ends its collective) yields to that exit.

A process that was suspended as a whole (SIGSTOP, a frozen VM) is not hung: its watchdog thread
did not run either. When the watchdog's own polls are SUSPENDED_S apart, it says so and starts
counting afresh; whether such a process may go on is for the run's lease to say.
"""

from __future__ import annotations

import logging
import math
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


class Work:
    """The progress of one piece of work that the main thread waits for (a checkpoint save), in
    whatever thread does it: `moved()` when it moves (a chunk written, a storage call that ended),
    and `allowing(s)` around one call that cannot report progress but may take up to s seconds. A
    phase that `follows` it counts its moves as progress and waits for such a call as allowed.
    `overdue` says what a call that outlasts its allowance means, and `code` is the exit code then."""

    def __init__(self, overdue: str = "a call that cannot report progress outlasted its allowance",
                 code: int = EXIT_HUNG) -> None:
        self.overdue, self.code = overdue, code
        self.moved_at = time.monotonic()
        self._until: list[float] = []  # the deadlines of the calls in flight (time.monotonic())
        self._lock = threading.Lock()

    def moved(self) -> None:
        self.moved_at = time.monotonic()

    @contextmanager
    def allowing(self, seconds: float) -> Iterator[None]:
        """One call that may take up to `seconds` from now without a move (its start and its end are
        moves); the deadline is absolute: a phase that begins to follow the work later does not extend it."""
        self.moved()
        until = time.monotonic() + seconds
        with self._lock:
            self._until.append(until)
        try:
            yield
        finally:
            with self._lock:
                self._until.remove(until)
            self.moved()

    def calls_in_flight(self) -> tuple[bool, float]:
        """(whether a call is in flight, the latest deadline of the calls in flight)."""
        with self._lock:
            return bool(self._until), max(self._until, default=-math.inf)


class Watchdog:
    """Watches one process. `where()` says which rank and step, for the message."""

    def __init__(self, ceiling_s: float, where: Callable[[], str] = lambda: "",
                 on_hang: Callable[[str], None] = lambda phase: None, exit: Callable[[int], None] = os._exit,
                 floor_s: float = FLOOR_S, factor: float = STEP_FACTOR, recent: int = RECENT_STEPS,
                 before_exit: Callable[[], None] = lambda: None):
        self.ceiling_s, self.where, self.on_hang, self._exit = ceiling_s, where, on_hang, exit
        self.before_exit = before_exit
        self.fired = threading.Event()  # a hang was declared: the process is on its way out with `exit_code`
        self.exit_code, self.cause = EXIT_HUNG, ""  # set when a hang is declared
        self.floor_s, self.factor = floor_s, factor
        self.recent: deque[float] = deque(maxlen=recent)
        self.phase_name = "start-up"
        self._ceiling_phase = True
        self._measured = False  # the phase reports its progress throughout: the step-based limit, always
        self._slow_start = False  # the first steps may be slower than any later one: the ceiling until MIN_TIMED
        self._slowest_micro_step: float | None = None  # since the steps began: a measure before steps are timed
        self._follows: Work | None = None
        self._last = time.monotonic()
        self.work_done_at = self._last  # this process's own work's last beat (not a wait for others): for its peers
        self._in_collective = False  # the main thread waits in a collective: its peers' work is progress for it
        self._peers_worked_at = -math.inf  # the latest move of another rank's own work seen (time.monotonic())
        self._peers_late_s = 0.0  # how late a move of another rank's work may be seen here
        self._carried = False  # this step waited in a collective for the peers' work: not a measure of its speed
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

    def beat(self, waiting: bool = False) -> None:
        """Progress; `waiting`: of a wait for other ranks, not of this rank's own work."""
        self._last = time.monotonic()
        if not waiting:
            self.work_done_at = self._last

    @contextmanager
    def in_collective(self) -> Iterator[None]:
        """The main thread waits in a collective: the other ranks' work (`peers_worked`) is progress."""
        previous, self._in_collective = self._in_collective, True
        try:
            yield
        finally:
            self._in_collective = previous

    def collective_wait_s(self) -> float | None:
        """Seconds since the last progress while the main thread waits in a collective, else None."""
        return time.monotonic() - self._last if self._in_collective else None

    def peers_worked(self, at: float, late_s: float = 0.0) -> None:
        """Another rank's own work moved at `at` (time.monotonic() of this process), seen from any
        thread; such a move may be seen up to `late_s` late, which the limit then allows for."""
        self._peers_worked_at, self._peers_late_s = max(self._peers_worked_at, at), late_s
        if self._in_collective and at > self._last:
            self._carried = True

    def step_done(self, seconds: float, timed: bool = True) -> None:
        """A training step finished in `seconds`: progress, and (if `timed`, and it did not wait for
        the other ranks' work) a measure for the limit."""
        if timed and not self._carried:
            self.recent.append(seconds)
        self._carried = False
        self.beat()

    def micro_step_done(self, seconds: float) -> None:
        """A micro-step's forward and backward took `seconds`: progress, and a measure for the first steps."""
        if not self._carried:
            self._slowest_micro_step = max(seconds, self._slowest_micro_step or 0.0)
        self.beat()

    @property
    def limit_s(self) -> float:
        """Seconds without progress after which the process counts as hung, now."""
        if self._measured:
            return self._step_limit()
        first_steps = len(self.recent) < MIN_TIMED
        unmeasured = not self.recent and self._slowest_micro_step is None  # nothing known of this device's speed
        if self._ceiling_phase or (first_steps and (self._slow_start or unmeasured)):
            return self.ceiling_s
        return self._step_limit()

    def _slowest(self) -> float:
        """The measure of the step-based limit: the slowest recent step; until MIN_TIMED steps are
        timed, the slowest micro-step too."""
        slowest = max(self.recent, default=0.0)
        if len(self.recent) < MIN_TIMED:
            slowest = max(slowest, self._slowest_micro_step or 0.0)
        return slowest

    def _step_limit(self) -> float:
        return min(self.ceiling_s, max(self.floor_s, self.factor * self._slowest()))

    @contextmanager
    def phase(self, name: str, ceiling: bool = False, follows: Work | None = None,
              measured: bool = False) -> Iterator[None]:
        previous = self.phase_name, self._ceiling_phase, self._measured, self._follows
        self.beat()  # first: a poll while the fields change must not judge an old beat by the new limit
        measured = not ceiling and (measured or follows is not None)
        # a measured phase inside a ceiling phase (a resume's load during the start-up) has its own limit
        self.phase_name, self._ceiling_phase = name, ceiling or (self._ceiling_phase and not measured)
        self._measured, self._follows = measured, follows
        self.beat()
        try:
            yield
        finally:
            self.phase_name, self._ceiling_phase, self._measured, self._follows = previous
            self.beat()

    def _idle_and_limit(self, now: float) -> tuple[float, float, bool]:
        """(seconds without progress, the limit now, whether a call of the followed work is in flight)."""
        work, limit = self._follows, self.limit_s
        last = self._last
        if self._in_collective and now - self._last < self.ceiling_s and self._peers_worked_at > last:
            # the peers' work, for at most the ceiling; its next move is seen late: the limit allows for it
            last, limit = self._peers_worked_at, limit + self._peers_late_s
        if work is None:
            return now - last, limit, False
        in_call, until = work.calls_in_flight()
        last = max(last, work.moved_at)
        return now - last, max(limit, until - last), in_call

    def steps(self, before: Sequence[float] = (), compiled: bool = False) -> None:
        """From now on the steps' own limit applies (called once the start-up is over). `before`:
        the run's step times from its previous attempt, which hold the first steps after a restart
        to their limit (they are replaced as steps are timed); without them, the micro-steps timed
        so far (`micro_step_done`) do, from the first one on. With `compiled`, the ceiling instead
        until MIN_TIMED steps are timed (the first steps may still compile; `before` is not used)."""
        if not compiled:
            self.recent.extend(list(before)[-(self.recent.maxlen or len(before)):])
        self._slow_start = compiled
        self.phase_name, self._ceiling_phase = "training step", False
        self._slowest_micro_step = None
        self.beat()

    def _watch(self) -> None:
        polled = time.monotonic()
        while not self._stop.wait(min(1.0, self.ceiling_s / 4)):
            now = time.monotonic()
            if now - polled > SUSPENDED_S:
                log.warning(f"this process was suspended for {now - polled:.0f} s (SIGSTOP, a frozen VM or node): "
                            "not counted as a hang")
                self.beat(waiting=True)  # a fresh count, not work that its peers may wait for
            polled = now
            idle, limit, in_call = self._idle_and_limit(now)
            if idle > limit:
                self._fire(idle, limit, in_call)
                return

    def yield_to_hang_exit(self) -> None:
        """For a thread about to end the process for another reason: once a hang is declared, wait
        for the watchdog's own exit instead (EXIT_HUNG, the code the launchers restart on)."""
        if self.fired.is_set():
            time.sleep(RECORD_DEADLINE_S + 10)

    def _fire(self, idle: float, limit: float, in_call: bool = False) -> None:
        self.fired.set()
        names = {t.ident: t.name for t in threading.enumerate()}
        stacks = "\n".join(f"Thread {names.get(ident, ident)}:\n{''.join(traceback.format_stack(frame))}"
                           for ident, frame in sys._current_frames().items())
        work = self._follows if in_call else None  # the call in flight is the cause
        code = work.code if work is not None else EXIT_HUNG
        cause = work.overdue if work is not None else "a peer is frozen or a collective or a read hangs"
        own = time.monotonic() - self._last
        carried = ""
        if own > idle + 1:
            carried = f"; its own progress {own:.0f} s ago, the other ranks' work since"
        elif self._in_collective and own >= self.ceiling_s and self._peers_worked_at > self._last:
            carried = (f"; the other ranks' work moved since its own progress, which counts for at most "
                       f"train.hang_timeout_s={self.ceiling_s:g}")
        log.error(f"no progress for {idle:.0f} s in phase '{self.phase_name}' ({self.where()}; limit {limit:.0f} s: "
                  f"{self._why(limit, in_call)}{carried}): {cause}. Exiting with {code} so that the job restarts "
                  f"from its last checkpoint. Stacks of this process:\n{stacks}")
        self.exit_code, self.cause = code, cause
        record_within_deadline(lambda: self.on_hang(self.phase_name), "the hang")
        try:
            self.before_exit()
        except Exception as err:  # the exit matters more
            log.error(f"before exiting: {type(err).__name__}: {err}")
        for handler in logging.getLogger("gpt2").handlers:
            handler.flush()
        self._exit(code)

    def _why(self, limit: float, in_call: bool = False) -> str:
        if in_call:
            return "what the call in flight was allowed, or the step-based limit if longer"
        if limit >= self.ceiling_s:
            return f"train.hang_timeout_s={self.ceiling_s:g}"
        if len(self.recent) < MIN_TIMED and self._slowest() > max(self.recent, default=0.0):
            return (f"{self.factor:g} x the slowest micro-step so far ({self._slowest():.2f} s), "
                    f"at least {self.floor_s:g} s")
        if not self.recent:
            return f"at least {self.floor_s:g} s, no step timed yet"
        return (f"{self.factor:g} x the slowest of the last {len(self.recent)} steps ({max(self.recent):.2f} s), "
                f"at least {self.floor_s:g} s")


def record_within_deadline(record: Callable[[], None], what: str) -> None:
    """Run `record` (a last record before the process exits) for at most RECORD_DEADLINE_S: the
    storage it goes to may be what hangs. A failure is logged: the exit matters more."""
    def run() -> None:
        try:
            record()
        except Exception as err:
            log.error(f"could not record {what}: {err}")

    recorder = threading.Thread(target=run, name="gpt2-last-record", daemon=True)
    recorder.start()
    recorder.join(RECORD_DEADLINE_S)
    if recorder.is_alive():
        log.error(f"could not record {what} within {RECORD_DEADLINE_S:g} s (the storage may hang too); exiting")


def beat(waiting: bool = False) -> None:
    """Progress inside a long phase (an evaluation batch, a poll for data, a prepared batch). Only
    the main thread's progress counts: a background thread's work (a read-ahead, a copy) must not
    hide a main thread stuck elsewhere; whoever waits for that work in the main thread beats for it.
    `waiting`: a wait for other ranks (while they live), which is not work a peer may wait for."""
    if _active is not None and threading.current_thread() is threading.main_thread():
        _active.beat(waiting)


@contextmanager
def in_collective() -> Iterator[None]:
    """The main thread waits in a collective: the other ranks' work is progress for it (see
    `Watchdog.in_collective`); a no-op without a watchdog."""
    active = _active
    if active is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    with active.in_collective():
        yield


def work_idle_s() -> float | None:
    """Seconds since this process's own work last beat (for its peers), or None without a watchdog."""
    active = _active
    return None if active is None else time.monotonic() - active.work_done_at


def collective_wait_s() -> float | None:
    """Seconds the main thread has waited in a collective without progress, or None (not in one, no watchdog)."""
    active = _active
    return None if active is None else active.collective_wait_s()


def peers_worked(at: float, late_s: float = 0.0) -> None:
    """Another rank's own work moved at `at` (time.monotonic() of this process), which may be seen up
    to `late_s` late; a no-op without a watchdog."""
    active = _active
    if active is not None:
        active.peers_worked(at, late_s)


@contextmanager
def phase(name: str, ceiling: bool = False, follows: Work | None = None, measured: bool = False) -> Iterator[None]:
    """Name what the process does now, for the limit and the message (`follows`: the work this
    phase waits for, see `Work`; `measured`: the phase beats throughout, so the step-based limit
    applies from the start-up on); a no-op without a watchdog."""
    if _active is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    with _active.phase(name, ceiling, follows, measured):
        yield
