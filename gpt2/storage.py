"""Storage on any fsspec URL (local paths, s3://, gs://, ...): atomic writes and retries."""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from gpt2.errors import StorageError, StorageFull, StorageUnavailable

if TYPE_CHECKING:
    from gpt2.watchdog import Work

log = logging.getLogger(__name__)
T = TypeVar("T")
# A full disk, a quota, a read-only file system: not transient
PERMANENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
# a storage call without an answer for this long says so, and again every as long: a hung store
# shows itself (a call may never end: s3fs against a frozen S3 server gave no answer in 12 minutes)
SLOW_CALL_S = 10.0
MAX_BACKOFF_S = 30.0  # the longest back-off between two tries: well under the watchdog's floor



def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path inside it."""
    options = dict(storage_options or {})
    if "://" in url and not url.startswith(("file://", "local://")):
        # other processes (ranks, restarted jobs) write here too: never trust a cached listing
        options.setdefault("use_listings_cache", False)
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as err:
        raise StorageError(
            f"no fsspec back-end for '{url}': {err} (for s3:// install s3fs: pip install 'gpt2[s3]')"
        ) from None
    return fs, path.rstrip("/") or path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def ensure_directory(url: str, storage_options: dict[str, Any] | None = None, what: str = "directory") -> None:
    """Create a local directory (object stores have none to create); StorageError, naming the
    culprit, when a file stands where it or one of its parents should be."""
    fs, path = filesystem(url, storage_options)
    if not is_local(fs):
        return
    try:
        os.makedirs(path, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [path, *map(str, Path(path).parents)] if os.path.isfile(p)), path)
        raise StorageError(f"{what} '{url}' cannot be created: {blocker} is a file, not a directory; "
                           "choose another path") from None
    except PermissionError as err:
        raise StorageError(f"{what} '{url}' cannot be created: {err}") from None


def join(path: str, *parts: str) -> str:
    return "/".join([path.rstrip("/"), *parts])


def with_retries(fn: Callable[[], T], what: str, retries: int = 5, base_delay: float = 0.5,
                 deadline: Callable[[], float] | None = None) -> T:
    """Run `fn`, retrying transient failures with exponential backoff (at most MAX_BACKOFF_S a
    pause; a pause is allowed to the `Work` this thread reports to, as a call is); StorageUnavailable
    at the end, or once `deadline()` (a `time.monotonic()` value, read at each failure) has passed:
    the last back-off is cut short so that one try lands at the deadline.

    FileNotFoundError is not transient: it is raised at once. Neither is a refusal (StorageError at
    once, naming what to check), a full disk, a quota or a read-only file system (StorageFull).
    """
    for attempt in range(retries + 1):
        try:
            with _in_flight.call(what):
                return fn()
        except PermissionError as err:
            raise StorageError(f"{what} was refused ({err}): check the permissions or credentials for that place; "
                               "an object store also refuses a host whose clock is more than about 15 minutes off "
                               "(signed requests carry the time)") from err
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, MemoryError):
            raise
        except Exception as err:  # network errors come in many types across back-ends
            if isinstance(err, OSError) and err.errno in PERMANENT_ERRNOS:
                raise StorageFull(f"{what} failed: {os.strerror(err.errno)}; free space there (or choose another "
                                  "place), then start again: retrying would not help") from err
            tries = f"{attempt + 1} attempt{'s' if attempt else ''}"
            if attempt == retries:
                raise StorageUnavailable(f"{what} failed after {tries}: {type(err).__name__}: {err}") from err
            left = deadline() - time.monotonic() if deadline is not None else math.inf
            if left <= 0:
                raise StorageUnavailable(f"{what} failed after {tries}, with no time left to try again: "
                                         f"{type(err).__name__}: {err}") from err
            delay = min(base_delay * 2**attempt, MAX_BACKOFF_S, left)
            log.warning("%s failed (%s: %s); retrying in %.1fs", what, type(err).__name__, err, delay)
            with _in_flight.pausing(delay):
                time.sleep(delay)
    raise AssertionError("unreachable")


@dataclass
class _Call:
    what: str
    heard_at: float  # its last answer (its start, or a chunk of a transfer)
    said_at: float  # its last notice


class _InFlight:
    """The storage calls in flight in this process, watched by one daemon thread (started with the
    first call) that says which has waited SLOW_CALL_S without an answer. No thread per call: a call
    costs microseconds, and a process short of memory can still make it. A thread that reports to
    a `Work` (`reporting_to`) moves it at each call's end and each chunk, and allows each call as
    long as its allowance says."""

    def __init__(self) -> None:
        self.calls: dict[int, _Call] = {}
        self.lock = threading.Lock()
        self.watcher: threading.Thread | None = None
        self.local = threading.local()  # this thread's call in flight (for `heard`) and its Work, if any

    @contextlib.contextmanager
    def call(self, what: str) -> Iterator[None]:
        now = time.monotonic()
        call, outer = _Call(what, now, now), getattr(self.local, "call", None)  # a call inside a call: restored
        self.local.call = call
        with self.lock:
            self.calls[id(call)] = call
            self._ensure_watcher()
        report = getattr(self.local, "report", None)
        try:
            with report[0].allowing(report[1]()) if report else contextlib.nullcontext():
                yield
        finally:
            with self.lock:
                del self.calls[id(call)]
            self.local.call = outer

    def pausing(self, seconds: float) -> contextlib.AbstractContextManager[None]:
        """A back-off of `seconds` between two tries: allowed to this thread's `Work`, not a stall."""
        report = getattr(self.local, "report", None)
        return report[0].allowing(seconds + 1.0) if report else contextlib.nullcontext()

    def heard(self) -> None:
        call = getattr(self.local, "call", None)
        if call is not None:
            call.heard_at = time.monotonic()
        report = getattr(self.local, "report", None)
        if report is not None:
            report[0].moved()

    @contextlib.contextmanager
    def reporting_to(self, work: Work, allowed: Callable[[], float]) -> Iterator[None]:
        outer, self.local.report = getattr(self.local, "report", None), (work, allowed)
        try:
            yield
        finally:
            self.local.report = outer

    def _ensure_watcher(self) -> None:
        if self.watcher is None or not self.watcher.is_alive():
            watcher = threading.Thread(target=self._watch, name="storage-wait-notice", daemon=True)
            try:
                watcher.start()
            except RuntimeError:  # no thread to be had (memory): the call goes on unwatched
                return
            self.watcher = watcher

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, SLOW_CALL_S / 4))
            now = time.monotonic()
            with self.lock:
                due = [c for c in self.calls.values() if now - max(c.heard_at, c.said_at) >= SLOW_CALL_S]
                for call in due:
                    call.said_at = now
            for call in due:
                log.warning("%s: no answer for %.0f s; still waiting", call.what,
                            now - call.heard_at)


_in_flight = _InFlight()


def heard() -> None:
    """A chunk of a long transfer went through: the storage answers (no notice of waiting)."""
    _in_flight.heard()


def reporting_to(work: Work, allowed: Callable[[], float]) -> contextlib.AbstractContextManager[None]:
    """This thread's storage calls (`with_retries`) report to `work` (gpt2.watchdog.Work), which a
    phase of the main thread follows: a call's end and each chunk it moves are moves, and a call may
    go `allowed()` seconds (read as it starts) without one before the process counts as stuck."""
    return _in_flight.reporting_to(work, allowed)


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, write: Callable[[Any], None]) -> None:
    """Write a file so that readers see either nothing or the complete file.

    Locally: write a temporary sibling, fsync, rename. On object stores a single PUT (or a
    completed multipart upload) is already atomic, so the object is written directly.
    """
    if is_local(fs):
        with _synced_sibling(path, write) as tmp:
            os.replace(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            write(f)


@contextlib.contextmanager
def _synced_sibling(path: str, write: Callable[[Any], None]) -> Iterator[str]:
    """A temporary file beside local `path`, written by `write` and fsynced, removed afterwards
    unless the caller renamed it."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        yield tmp
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


CHUNK = 16 << 20  # reads and writes of large files go in pieces this big, each one progress


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes,
                progress: Callable[[], None] | None = None) -> None:
    """Write `data` atomically; `progress()` after every CHUNK written (a long save is not a hang)."""
    def write(f: Any) -> None:
        view = memoryview(data)
        for start in range(0, len(view), CHUNK):
            f.write(view[start:start + CHUNK])
            heard()
            if progress is not None:
                progress()

    atomic_write(fs, path, write)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str,
               progress: Callable[[], None] | None = None) -> bytes | bytearray:
    """The whole file; `progress()` after every CHUNK read (a long load is not a hang), into one
    buffer of the file's size (read it in place: io.BytesIO would copy a bytearray)."""
    if progress is None:
        return fs.cat_file(path)
    size = fs.size(path)
    buf = bytearray(size)
    view, have = memoryview(buf), 0
    with fs.open(path, "rb") as f:
        while have < size and (n := f.readinto(view[have:have + CHUNK])):
            have += n
            heard()
            progress()
    view.release()
    return buf if have == size else buf[:have]


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create `path` holding `data` unless it exists: True if this call created it, False if the
    file was there (someone else created it first). Readers see nothing or the whole file.

    Locally (and on NFS) a complete temporary sibling is hard-linked to `path`, which fails if it
    exists; elsewhere a conditional PUT (`If-None-Match: *`). Only use the latter on a store that
    `supports_exclusive_create`. A create whose answer was lost (a timeout, then the retry finds
    the file) counts as ours when the file holds our bytes.
    """
    if is_local(fs):
        with _synced_sibling(path, lambda f: f.write(data)) as tmp:
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
    try:
        fs.pipe_file(path, data, mode="create")
        return True
    except FileExistsError:
        return False
    except Exception as err:
        try:
            existing = fs.cat_file(path)
        except FileNotFoundError:
            raise err from None  # the create itself failed: the caller retries
        return existing == data


def supports_exclusive_create(fs: fsspec.AbstractFileSystem, directory: str) -> bool:
    """Whether `create_exclusive` really is exclusive on this store: a probe object is created
    twice; a store that ignores the condition (some S3-compatible servers) lets the second through."""
    if is_local(fs):
        return True
    probe = join(directory, f".exclusive-probe-{uuid.uuid4().hex}")
    try:
        first = create_exclusive(fs, probe, b"first")
        second = create_exclusive(fs, probe, b"second")
    except Exception as err:  # e.g. a back-end without mode="create"
        log.debug("exclusive create probe failed: %s", err)
        return False
    finally:
        try:
            fs.rm(probe)
        except Exception:
            pass
    return first and not second
