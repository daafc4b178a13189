"""A watchdog that ends a process which stops making progress.

A frozen peer, a stuck collective or a hung read block a rank forever (or for the process-group
timeout). The trainer calls `beat()` at every step and around long phases; when no beat comes for
`timeout_s`, the watchdog prints what it waited for and every thread's stack, then exits the process
with EXIT_HUNG. torchrun then restarts the group (or SLURM/Kubernetes the job), which resumes from
the last checkpoint instead of burning the allocation.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable

from gpt2.errors import EXIT_HUNG

log = logging.getLogger(__name__)


class Watchdog:
    def __init__(self, timeout_s: float, where: Callable[[], str], exit: Callable[[int], None] = os._exit):
        self.timeout_s, self.where, self._exit = timeout_s, where, exit
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Watchdog:
        if self.timeout_s > 0:
            self.beat()
            self._thread = threading.Thread(target=self._watch, name="gpt2-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def beat(self) -> None:
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                names = {t.ident: t.name for t in threading.enumerate()}
                stacks = "\n".join(f"Thread {names.get(ident, ident)}:\n{''.join(traceback.format_stack(frame))}"
                                   for ident, frame in sys._current_frames().items())
                log.error(f"no progress for {idle:.0f} s ({self.where()}; train.hang_timeout_s={self.timeout_s:g}): "
                          f"a peer is frozen or a collective or a read hangs. Exiting with {EXIT_HUNG} so that the "
                          f"job restarts from its last checkpoint. Stacks of this process:\n{stacks}")
                for handler in logging.getLogger("gpt2").handlers:
                    handler.flush()
                self._exit(EXIT_HUNG)
                return
