"""Copying a remote file into a local cache: in chunks, resumable, once per host, with progress.

A shard on an object store is copied whole before its first read, and over a slow link that
takes minutes. So the copy shows what it does instead of leaving the watchdog to guess:

* a `Fetch` copies in a background thread, in ranged reads sized to take about CHUNK_S each,
  appended to `<target>.partial`; an interrupted copy (a killed process, a failed read) resumes
  from there instead of starting over;
* one process per host copies (an exclusive lock on `<target>.lock`); the host's other processes
  wait for that copy;
* whoever waits for it (`wait()`) beats the watchdog whenever the partial file grew, so a slow copy
  is progress and a stalled one is a hang, and says every PROGRESS_EVERY_S how far it is;
* the target appears complete and checked, by one rename.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from gpt2.errors import DataError, StorageFull
from gpt2.storage import PERMANENT_ERRNOS, with_retries
from gpt2.watchdog import beat

log = logging.getLogger(__name__)

MB = 1 << 20
CHUNK_S = 2.0  # a ranged read should take about this long: progress every few seconds at any speed
# 64 KB takes 16 s at 32 kbit/s, well inside the 60 s step limit; 8 MB at most, so that a link that
# slows down 30x in the middle of a read still shows progress in time
MIN_CHUNK, MAX_CHUNK = 64 << 10, 8 << 20
POLL_S = 0.5
PROGRESS_EVERY_S = 30.0


class Fetch:
    """Copy `src` (a path in the fsspec file system `fs`, `size` bytes) to the local `target`.
    `check(path)` may raise to refuse the copied bytes (they are then deleted, not resumed)."""

    def __init__(self, fs: Any, src: str, target: Path, size: int, what: str,
                 check: Callable[[Path], None] | None = None):
        self.fs, self.src, self.target, self.size, self.what, self.check = fs, src, target, size, what, check
        self.partial = target.with_name(target.name + ".partial")
        self._lock_path = target.with_name(target.name + ".lock")
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Fetch:
        """Start copying in the background (a daemon thread: a hung store never keeps the process alive)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gpt2-fetch", daemon=True)
            self._thread.start()
        return self

    @property
    def done(self) -> bool:
        """Whether the copy ended (copied, or failed: `wait()` says which)."""
        return self._done.is_set()

    @property
    def progress(self) -> int:
        """Bytes copied so far (by this process or the one of this host that copies): grows with the copy."""
        return self.size if self.done else self._have()

    def wait(self) -> Path:
        """The target once it is there; the copy's error if it failed. Beats while the copy grows."""
        self.start()
        t0 = time.monotonic()
        seen, said = -1, t0
        while not self._done.wait(POLL_S):
            have = self._have()
            if have != seen:
                beat()
                seen = have
            if time.monotonic() - said >= PROGRESS_EVERY_S:
                said = time.monotonic()
                log.info(f"fetching {self.what}: {have / MB:.1f} of {self.size / MB:.1f} MB after "
                         f"{said - t0:.0f} s of waiting")
        if self._error is not None:
            raise self._error
        return self.target

    def _have(self) -> int:
        try:
            return self.partial.stat().st_size
        except FileNotFoundError:
            return 0

    def _run(self) -> None:
        try:
            self._once_per_host()
        except BaseException as err:  # handed to whoever waits
            self._error = err
        finally:
            self._done.set()

    def _once_per_host(self) -> None:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a") as lock:
            while not self.target.exists():
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # another process of this host copies it: wait for that
                    time.sleep(POLL_S)
                    continue
                try:
                    if not self.target.exists():
                        self._copy()
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    def _copy(self) -> None:
        if self.check is None:  # nothing would tell a stale prefix from a good one: start over
            self.partial.unlink(missing_ok=True)
        while True:
            resumed = self._have() > 0
            try:
                self._append_rest()
                if self.check is not None:
                    self.check(self.partial)
                break
            except DataError:
                self.partial.unlink(missing_ok=True)  # wrong bytes: never resumed from
                if not resumed:
                    raise
                # what was there was not a prefix of this file (a crash lost its tail, the file changed)
                log.warning(f"the resumed copy of {self.what} did not match; copying it again from the start")
        self.partial.replace(self.target)

    def _append_rest(self) -> None:
        have = self._have()
        if have > self.size:  # not a prefix of this file
            self.partial.unlink()
            have = 0
        if have:
            log.info(f"resuming the copy of {self.what} at {have / MB:.1f} of {self.size / MB:.1f} MB")
        chunk = MIN_CHUNK
        try:
            with open(self.partial, "ab") as out:
                while have < self.size:
                    t0 = time.monotonic()
                    start, end = have, min(have + chunk, self.size)
                    data = with_retries(partial(self.fs.cat_file, self.src, start=start, end=end),
                                        f"fetching {self.what} (bytes {start}-{end})")
                    if not data or len(data) > end - start:
                        raise DataError(f"{self.what}: asked for bytes {start}-{end} of {self.size}, got "
                                        f"{len(data)} (the file is shorter than its manifest says, or the store "
                                        "ignores ranged reads); prepare the data again or check the store")
                    out.write(data)
                    out.flush()
                    have += len(data)
                    rate = len(data) / max(time.monotonic() - t0, 1e-3)
                    chunk = int(min(MAX_CHUNK, max(MIN_CHUNK, rate * CHUNK_S)))
        except OSError as err:
            if err.errno in PERMANENT_ERRNOS:
                raise StorageFull(f"copying {self.what} into {self.partial.parent} failed: {os.strerror(err.errno)}; "
                                  "free space there or set data.cache_dir to a larger disk") from err
            raise
