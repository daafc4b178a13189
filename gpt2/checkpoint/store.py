"""The storage mechanics of checkpoints on any fsspec URL: atomic commit, keep-last-k, verified load.

Layout under `checkpoint.dir`:

    step-00000500/state-g3-1a2b3c4d.pt  one entry per part of the trainer (model, optimizer, progress, rng)
    step-00000500/COMMITTED             JSON: step, tokens, world size, config, lineage, writer, the
                                        state file's name, size and sha256

`COMMITTED` is written last, so a directory without it is a save that did not finish: it is
ignored by resume and deleted after the next successful save. The state file is named after its
writer (the lease generation and a token), so two writers never write the same file, and the
marker says which file is the checkpoint; checkpoints from before name none and use `state.pt`.
DDP replicas are identical, so rank 0 writes one file; loading it needs no particular world
size. Loads use `torch.load(weights_only=True)`, which unpickles no arbitrary objects, after
checking the hash. Checkpoints found corrupt, or abandoned by a rollback or start-over
(gpt2.checkpoint.lineage), are moved aside (`step-N.corrupt-TIME`, `step-N.abandoned-LINEAGE`),
never deleted.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gpt2.checkpoint.lineage import Lineage
from gpt2.errors import CheckpointError, CheckpointUnloadable, StorageError
from gpt2.storage import CHUNK, filesystem, heard, join, read_bytes, with_retries, write_bytes
from gpt2.watchdog import beat

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"  # the state file of checkpoints whose marker names none
MARKER = "COMMITTED"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
# Moved aside, never deleted: step-00000500.corrupt-1764000000, step-00000500.abandoned-0123456789ab
_MOVED_ASIDE = re.compile(r"^step-(\d{8})\.(corrupt|abandoned)-[0-9a-z]+(-\d+)?$")
_STATE = re.compile(r"^state(-[A-Za-z0-9-]+)?\.pt$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass
class CheckpointInfo:
    step: int
    url: str
    meta: dict[str, Any]


class CheckpointStore:
    """The step directories under one directory or URL: list, write (atomically), load, prune."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, retries: int = 5, keep: int = 2,
                 deadline: Callable[[], float] | None = None):
        """`deadline()`: no retry of a storage call starts after it (`time.monotonic()`; the writer's
        outage limit, `Lease.deadline`)."""
        self.url = url.rstrip("/")
        self.storage_options = storage_options or {}
        self.fs, self.root = filesystem(self.url, self.storage_options)
        self.retries, self.keep, self.deadline = retries, keep, deadline

    def _entries(self, pattern: re.Pattern) -> list[tuple[int, str]]:
        try:
            entries = with_retries(lambda: self.fs.ls(self.root, detail=False), f"listing {self.url}", self.retries,
                                   deadline=self.deadline)
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            raise StorageError(f"checkpoint.dir '{self.url}' cannot be used: it or a parent is a file, not a "
                               "directory; choose another path") from None
        out = []
        for path in entries:
            m = pattern.match(path.rstrip("/").rsplit("/", 1)[-1])
            if m:
                out.append((int(m.group(1)), path.rstrip("/")))
        return sorted(out)

    def _step_dirs(self) -> list[tuple[int, str]]:
        return self._entries(_STEP_DIR)

    def moved_aside(self, kind: str | None = None) -> list[str]:
        """Checkpoints moved aside (kind "corrupt" or "abandoned", or both), kept for inspection or
        repair; never deleted by us."""
        found = []
        for _, path in self._entries(_MOVED_ASIDE):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if kind is None or _MOVED_ASIDE.match(name).group(2) == kind:  # type: ignore[union-attr]
                found.append(self._url_of(path))
        return found

    def quarantined(self) -> list[str]:
        """Checkpoints moved aside as corrupt."""
        return self.moved_aside("corrupt")

    def _url_of(self, path: str) -> str:
        return f"{self.url}/{path.rstrip('/').rsplit('/', 1)[-1]}"

    def complete(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first."""
        return self.scan()[0]

    def scan(self) -> tuple[list[CheckpointInfo], list[str]]:
        """(committed checkpoints, oldest first; step directories whose marker is unreadable)."""
        out, damaged = [], []
        for step, path in self._step_dirs():
            url = self._url_of(path)
            try:
                meta = read_meta(url, self.storage_options, self.retries, self.deadline)
            except CheckpointError as err:
                marked = with_retries(lambda p=path: self.fs.exists(join(p, MARKER)), f"checking {url}/{MARKER}",
                                      self.retries, deadline=self.deadline)
                if marked:  # no marker: a save that did not finish, not worth a word
                    log.warning("ignoring %s: %s", url, err)
                    damaged.append(url)
                continue
            out.append(CheckpointInfo(step, url, meta))
        return out, damaged

    def write(self, state: dict[str, Any], step: int, meta: dict[str, Any], writer: str | None = None,
              fence: Callable[[], None] = lambda: None, owns: Callable[[dict[str, Any]], bool] = lambda meta: True,
              progress: Callable[[], None] | None = None) -> None:
        """Write `state` as step `step` into a state file of this writer's own (`writer`: a name
        part unique to it), commit it, then prune to the newest `keep` of the lineage (`owns`).
        `fence()` runs right before the commit marker and before pruning: a writer that was
        superseded raises there and its save is abandoned (its own state file removed). `progress()`
        after every chunk written."""
        t0 = time.monotonic()
        writer = writer or uuid.uuid4().hex[:8]
        path = join(self.root, step_dir_name(step))
        url, marker = self._url_of(path), join(path, MARKER)
        existing = self.marker_of(url)
        if existing is not None and existing.get("writer_tag") == writer:
            log.info("checkpoint %s was already saved by this trainer", url)
            return
        buf = _Serializing()
        torch.save(state, buf)
        data = buf.getvalue()
        state_file = f"state-{writer}.pt"
        meta = dict(meta, step=step, bytes=len(data), sha256=_sha256(data), state_file=state_file,
                    writer_tag=writer, saved_at=time.time())
        r = self.retries
        with_retries(lambda: self.fs.makedirs(path, exist_ok=True), f"creating {path}", r, deadline=self.deadline)
        with_retries(lambda: write_bytes(self.fs, join(path, state_file), data, progress),
                     f"writing {url}/{state_file}", r, deadline=self.deadline)
        try:
            fence()
        except BaseException:
            self._remove(join(path, state_file))
            raise
        if existing is not None:
            log.warning("replacing checkpoint %s (written by %s, %s) with this trainer's", url,
                        existing.get("writer", "an unknown writer"), Lineage.of(existing).describe())
        # The commit marker goes last (an atomic replace): only now is the checkpoint complete.
        with_retries(lambda: write_bytes(self.fs, marker, json.dumps(meta, indent=1).encode()), f"committing {url}", r,
                     deadline=self.deadline)
        log.info("saved checkpoint %s (%.1f MB in %.1fs)", url, len(data) / 1e6, time.monotonic() - t0)
        fence()
        self._prune(keep_step=step, owns=owns)

    def marker_of(self, url: str) -> dict[str, Any] | None:
        try:
            return read_meta(url, self.storage_options, self.retries, self.deadline)
        except CheckpointError:
            return None

    def _remove(self, path: str) -> None:
        try:
            with_retries(lambda: self.fs.rm(path), f"removing {path}", 0, deadline=self.deadline)
        except Exception as err:  # best effort: pruning removes it later
            log.debug("could not remove %s: %s", path, err)

    def _prune(self, keep_step: int, owns: Callable[[dict[str, Any]], bool]) -> None:
        """Delete partial saves and all but the newest `keep` complete checkpoints of the lineage
        (`owns`: so the checkpoint a run resumed from goes only once `keep` newer ones of its lineage
        are complete), never a checkpoint of another lineage (the next start moves those aside). In
        the checkpoints kept, state files their marker does not name (an abandoned save)."""
        complete = self.complete()
        ours = [c for c in complete if owns(c.meta)]
        keep = {c.step for c in ours[-self.keep:]} | {keep_step}
        keep |= {c.step for c in complete if not owns(c.meta)}
        named = {c.step: c.meta.get("state_file", STATE_FILE) for c in complete}
        for step, path in self._step_dirs():
            if step not in keep:
                try:
                    with_retries(lambda p=path: self.fs.rm(p, recursive=True), f"deleting {path}", self.retries,
                                 deadline=self.deadline)
                except (StorageError, OSError) as err:
                    log.warning("could not delete old checkpoint %s: %s", path, err)
            elif step in named and step != keep_step:
                for f in with_retries(lambda p=path: self.fs.ls(p, detail=False), f"listing {path}", self.retries,
                                      deadline=self.deadline):
                    name = f.rstrip("/").rsplit("/", 1)[-1]
                    if _STATE.match(name) and name != named[step]:
                        self._remove(f)

    def load(self, url: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(marker, state) of one checkpoint directory, the state verified against the marker."""
        return load_checkpoint(url, self.storage_options, self.retries)

    def move_aside(self, url: str, kind: str, tag: str | None = None) -> str:
        """Move a checkpoint directory aside as `kind` ("corrupt" or "abandoned"); returns its new URL."""
        path = join(self.root, url.rstrip("/").rsplit("/", 1)[-1])
        dest = f"{path}.{kind}-{tag or int(time.time())}"
        n = 0
        while with_retries(lambda d=dest: self.fs.exists(d), f"checking {dest}", self.retries):
            n += 1
            dest = f"{path}.{kind}-{tag or int(time.time())}-{n}"
        with_retries(lambda: self.fs.mv(path, dest, recursive=True), f"moving {path} aside", self.retries)
        return self._url_of(dest)


def load_state(url: str, storage_options: dict[str, Any] | None = None, retries: int = 3) -> dict[str, Any]:
    """The state of one checkpoint, verified against its marker (`load_checkpoint`)."""
    return load_checkpoint(url, storage_options, retries)[1]


class _Serializing(io.BytesIO):
    """A buffer whose every write is progress: serializing a large state takes a while (3.7 s/GB
    measured on 2 CPU cores), and the save's phase follows its moves."""

    def write(self, b: Any) -> int:
        heard()
        return super().write(b)


def _sha256(data: bytes | bytearray) -> str:
    """The hex sha256 of `data`, each CHUNK hashed being progress."""
    digest, view = hashlib.sha256(), memoryview(data)
    for start in range(0, len(view), CHUNK):
        digest.update(view[start:start + CHUNK])
        heard()
    return digest.hexdigest()


class _InPlace(io.RawIOBase):
    """A reader over bytes in memory that does not copy them (io.BytesIO copies a bytearray): a
    checkpoint is held once while torch.load reads it. Every read is progress (a load's phase follows it)."""

    def __init__(self, data: bytes | bytearray):
        self._view, self._pos = memoryview(data), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), len(self._view) - self._pos))
        b[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        heard()
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence] + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


def load_checkpoint(url: str, storage_options: dict[str, Any] | None = None,
                    retries: int = 3) -> tuple[dict[str, Any], dict[str, Any]]:
    """(marker, state): `url/state.pt` read and verified against `url/COMMITTED`; CheckpointError
    if it does not match."""
    fs, path = filesystem(url, storage_options)
    meta = read_meta(url, storage_options, retries)
    name = meta.get("state_file", STATE_FILE)
    if not isinstance(name, str) or not _STATE.match(name):
        raise CheckpointError(f"{url}/{MARKER} names no valid state file ({name!r}) (corrupt)")
    try:
        data = with_retries(lambda: read_bytes(fs, join(path, name), beat), f"reading {url}/{name}", retries)
    except FileNotFoundError:
        raise CheckpointError(f"{url}/{name} is missing") from None
    except MemoryError:
        raise CheckpointUnloadable(f"{url}/{name} ({meta.get('bytes', 0) / 1e9:.2f} GB) could not be read: out of "
                                   "host memory. Give the process more memory (the job's memory request or limit); "
                                   "the checkpoint is kept as it is") from None
    if len(data) != meta.get("bytes"):
        raise CheckpointError(f"{url}/{name} is {len(data)} bytes, its marker says {meta.get('bytes')} (truncated)")
    if _sha256(data) != meta.get("sha256"):
        raise CheckpointError(f"{url}/{name} does not match the sha256 in its marker (corrupt)")
    try:
        return meta, torch.load(_InPlace(data), map_location="cpu", weights_only=True)
    except (MemoryError, RuntimeError) as err:
        if not isinstance(err, MemoryError) and "can't allocate memory" not in str(err):
            raise _unloadable(url, name, err) from None
        raise CheckpointUnloadable(
            f"{url}/{name} ({len(data) / 1e9:.2f} GB, its bytes intact: the sha256 matches) could not be loaded: out "
            "of host memory. Give the process more memory (the job's memory request or limit); the checkpoint is "
            "kept as it is") from None
    except Exception as err:
        raise _unloadable(url, name, err) from None


def _unloadable(url: str, name: str, err: Exception) -> CheckpointUnloadable:
    if "weights_only" in str(err):  # torch advises weights_only=False, i.e. running code from the file: never
        return CheckpointUnloadable(
            f"{url}/{name} cannot be loaded safely: it holds objects other than tensors. Only checkpoints "
            "written by this trainer are loaded; do not load files from untrusted sources")
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return CheckpointUnloadable(
        f"{url}/{name} (its bytes intact: the sha256 matches) could not be loaded: {type(err).__name__}: "
        f"{first_line}. This is not corruption (the checkpoint is kept as it is): a torch version that cannot "
        f"read it (this is torch {torch.__version__}), or a failing host. Resume with the version that wrote it")


def read_meta(url: str, storage_options: dict[str, Any] | None = None, retries: int = 3,
              deadline: Callable[[], float] | None = None) -> dict[str, Any]:
    """The commit marker of a checkpoint directory; CheckpointError if it is missing or not a JSON object."""
    fs, path = filesystem(url, storage_options)
    try:
        meta = json.loads(with_retries(lambda: fs.cat_file(join(path, MARKER)), f"reading {url}/{MARKER}", retries,
                                       deadline=deadline))
    except FileNotFoundError:
        raise CheckpointError(f"{url} is not a complete checkpoint (no {MARKER} marker)") from None
    except ValueError as err:
        raise CheckpointError(f"{url}/{MARKER} is unreadable: {err}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{url}/{MARKER} is not a JSON object (corrupt)")
    return meta


def state_path(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """The path of a checkpoint's state file, as its marker names it."""
    fs, path = filesystem(url, storage_options)
    return join(path, read_meta(url, storage_options).get("state_file", STATE_FILE))


def resolve_checkpoint(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """A checkpoint directory as given, or the newest complete one under a checkpoint root."""
    fs, path = filesystem(url, storage_options)
    if fs.exists(join(path, MARKER)):
        return url.rstrip("/")
    found = CheckpointStore(url, storage_options).complete()
    if not found:
        raise CheckpointError(f"no complete checkpoint at or under {url}")
    return found[-1].url


def is_checkpoint(source: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether `source` is a checkpoint directory or a root holding step directories."""
    try:
        fs, path = filesystem(source, storage_options)
        if fs.exists(join(path, MARKER)):
            return True
        return fs.isdir(path) and any(_STEP_DIR.match(p.rstrip("/").rsplit("/", 1)[-1])
                                      for p in fs.ls(path, detail=False))
    except (OSError, StorageError):
        return False
