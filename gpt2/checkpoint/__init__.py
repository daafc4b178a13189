"""Checkpoints on any fsspec URL: atomic commit, keep-last-k, async save, verified load, resume.

Layout under `checkpoint.dir`:

    step-00000500/state.pt      one entry per part of the trainer (model, optimizer, progress, rng)
    step-00000500/COMMITTED     JSON: step, tokens, world size, config, size and sha256 of state.pt

`COMMITTED` is written last, so a directory without it is a save that did not finish: it is
ignored by resume and deleted after the next successful save. DDP replicas are identical, so
rank 0 writes one file; loading it needs no particular world size. Loads use
`torch.load(weights_only=True)`, which unpickles no arbitrary objects, after checking the hash.

`CheckpointStore` is the storage mechanics of one directory; `Checkpointer` is the policy the
trainer uses (interval, keep, async, which failures are fatal, what to resume from).
CLI: `python -m gpt2.checkpoint list|inspect|export DIR_OR_URL [...]`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from gpt2 import distributed
from gpt2.config import CheckpointConfig
from gpt2.storage import StorageError, ensure_directory, filesystem, join, with_retries, write_bytes

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
MARKER = "COMMITTED"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
# A checkpoint found corrupt is moved aside, never deleted: step-00000500.corrupt-1764000000
_QUARANTINED = re.compile(r"^step-(\d{8})\.corrupt-\d+$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt, or a save that must succeed failed."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass
class CheckpointInfo:
    step: int
    url: str
    meta: dict[str, Any]


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


class CheckpointStore:
    """The step directories under one directory or URL: list, write (atomically), load, prune."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, retries: int = 5, keep: int = 2):
        self.url = url.rstrip("/")
        self.storage_options = storage_options or {}
        self.fs, self.root = filesystem(self.url, self.storage_options)
        self.retries, self.keep = retries, keep

    def _entries(self, pattern: re.Pattern) -> list[tuple[int, str]]:
        try:
            entries = with_retries(lambda: self.fs.ls(self.root, detail=False), f"listing {self.url}", self.retries)
        except FileNotFoundError:
            return []
        out = []
        for path in entries:
            m = pattern.match(path.rstrip("/").rsplit("/", 1)[-1])
            if m:
                out.append((int(m.group(1)), path.rstrip("/")))
        return sorted(out)

    def _step_dirs(self) -> list[tuple[int, str]]:
        return self._entries(_STEP_DIR)

    def quarantined(self) -> list[str]:
        """Checkpoints moved aside as corrupt (kept for inspection or repair; never deleted by us)."""
        return [self._url_of(path) for _, path in self._entries(_QUARANTINED)]

    def _url_of(self, path: str) -> str:
        return f"{self.url}/{path.rstrip('/').rsplit('/', 1)[-1]}"

    def complete(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first."""
        out = []
        for step, path in self._step_dirs():
            url = self._url_of(path)
            try:
                meta = read_meta(url, self.storage_options, self.retries)
            except CheckpointError as err:
                if self.fs.exists(join(path, MARKER)):  # no marker: a save that did not finish, not worth a word
                    log.warning("ignoring %s: %s", url, err)
                continue
            out.append(CheckpointInfo(step, url, meta))
        return out

    def write(self, state: dict[str, Any], step: int, meta: dict[str, Any]) -> None:
        """Write `state` as step `step`, commit it, then prune to the newest `keep`."""
        t0 = time.time()
        path = join(self.root, step_dir_name(step))
        marker = join(path, MARKER)
        if self.fs.exists(marker):
            log.info("checkpoint %s already committed; not written again", self._url_of(path))
            return
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        meta = dict(meta, step=step, bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), saved_at=time.time())
        r = self.retries
        with_retries(lambda: self.fs.makedirs(path, exist_ok=True), f"creating {path}", r)
        with_retries(lambda: write_bytes(self.fs, join(path, STATE_FILE), data), f"writing {path}/{STATE_FILE}", r)
        # The commit marker goes last: only now is the checkpoint complete.
        with_retries(lambda: write_bytes(self.fs, marker, json.dumps(meta, indent=1).encode()), f"committing {path}", r)
        log.info("saved checkpoint %s (%.1f MB in %.1fs)", self._url_of(path), len(data) / 1e6, time.time() - t0)
        self._prune(keep_step=step)

    def _prune(self, keep_step: int) -> None:
        """Delete partial saves and all but the newest `keep` complete checkpoints."""
        complete = {c.step for c in self.complete()}
        keep = set(sorted(complete)[-self.keep:]) | {keep_step}
        for step, path in self._step_dirs():
            if step not in keep:
                try:
                    with_retries(lambda p=path: self.fs.rm(p, recursive=True), f"deleting {path}", self.retries)
                except (StorageError, OSError) as err:
                    log.warning("could not delete old checkpoint %s: %s", path, err)

    def load(self, url: str) -> dict[str, Any]:
        """Load one checkpoint directory (verified against its commit marker)."""
        return load_state(url, self.storage_options, self.retries)

    def newest_loadable(self) -> tuple[str, dict[str, Any]] | None:
        """The newest checkpoint that loads. A corrupt one is moved aside (so that it neither counts
        for keep-last-k nor blocks a new save at its step) and the previous one is tried. None when
        there is no checkpoint; CheckpointError when there are only corrupt ones, now or from before:
        starting over must be asked for (checkpoint.resume=never), never happen silently."""
        for _, path in reversed(self._step_dirs()):
            if not self.fs.exists(join(path, MARKER)):
                continue  # a save that did not finish
            url = self._url_of(path)
            try:
                return url, self.load(url)
            except CheckpointError as err:
                moved = self.quarantine(path)
                log.warning("WARNING: checkpoint %s is corrupt (%s); moved it to %s and trying the previous one",
                            url, err, moved)
        if self.quarantined():
            raise CheckpointError(
                f"no loadable checkpoint under {self.url}: the ones there are corrupt and were moved aside "
                f"({', '.join(self.quarantined())}). Training would start over from step 0; if that is what you "
                "want, run with checkpoint.resume=never (or another checkpoint.dir); to resume from a copy, "
                "set checkpoint.resume=PATH_TO_A_CHECKPOINT")
        return None

    def quarantine(self, path: str) -> str:
        """Move a checkpoint directory aside as corrupt; returns its new URL."""
        dest = f"{path}.corrupt-{int(time.time())}"
        with_retries(lambda: self.fs.mv(path, dest, recursive=True), f"moving {path} aside", self.retries)
        return self._url_of(dest)


class Checkpointer:
    """The checkpoint policy of a training run over the trainer's `parts`.

    The trainer calls `resume()` once, `step_end(step)` after every optimizer step (saves every
    `checkpoint.every` steps, async if configured; a failure is logged and the next save tries
    again) and `save_final(step, why)` when it stops (blocking; a failure is fatal).
    """

    def __init__(self, cfg: CheckpointConfig, parts: dict[str, Stateful],
                 describe: Callable[[int], dict[str, Any]], is_writer: bool = True):
        self.cfg, self.parts, self.describe, self.is_writer = cfg, parts, describe, is_writer
        self.store = CheckpointStore(cfg.dir, cfg.storage_options, cfg.retries, cfg.keep)
        if is_writer:
            ensure_directory(cfg.dir, cfg.storage_options, "checkpoint.dir")
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def resume(self) -> str | None:
        """Load the checkpoint rank 0 picks (per `checkpoint.resume`) into the parts on every rank;
        returns its URL, or None when there is nothing to resume from."""
        found = self._pick() if self.is_writer else None
        target = distributed.broadcast_object(found[0] if found else None)
        if target is None:
            return None
        state = found[1] if found else self.store.load(target)  # type: ignore[arg-type]
        for name, part in self.parts.items():
            try:
                part.load_state_dict(state[name])
            except (KeyError, RuntimeError, ValueError) as err:
                detail = str(err).strip().splitlines()[0] if str(err).strip() else f"no '{name}' entry"
                raise CheckpointError(
                    f"{target} does not fit this run's {name} ({detail}): it was written by a run with another "
                    "configuration (e.g. another model size). Resume with the config it was written with "
                    "(python -m gpt2.checkpoint inspect shows it), or start apart with another checkpoint.dir"
                ) from None
        return target  # type: ignore[return-value]

    def _pick(self) -> tuple[str, dict[str, Any]] | None:
        if self.cfg.resume == "never":
            return None
        if self.cfg.resume != "auto":
            return self.cfg.resume, self.store.load(self.cfg.resume)
        return self.store.newest_loadable()

    def step_end(self, step: int) -> None:
        """Save on the interval; a failed periodic save does not stop training."""
        if step % self.cfg.every:
            return
        for attempt in (self.wait, lambda: self.save(step, blocking=not self.cfg.async_save)):
            try:
                attempt()
            except Exception as err:
                log.error("CHECKPOINT SAVE FAILED: %s; training goes on and the next save tries again", err)

    def save_final(self, step: int, why: str) -> None:
        """The save a stopping run depends on (end, preemption, stop_at_step): CheckpointError if it fails."""
        try:
            self.wait()
        except Exception as err:  # this save supersedes the failed one
            log.error("CHECKPOINT SAVE FAILED: %s", err)
        try:
            self.save(step, blocking=True)
        except Exception as err:
            raise CheckpointError(f"the {why} checkpoint could not be saved to {self.cfg.dir}: {err}") from err

    def save(self, step: int, blocking: bool) -> None:
        """Save the parts as step `step` (rank 0 only). Non-blocking saves copy to host memory, then
        write in a thread, whose error the next `wait()` raises."""
        if not self.is_writer:
            return
        self.wait()
        state = {name: part.state_dict() for name, part in self.parts.items()}
        bad = non_finite(state)
        if bad:
            raise CheckpointError(f"not saving step {step}: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} "
                                  "hold NaN or infinite values (a checkpoint must never carry a diverged model)")
        state = to_cpu(state)
        meta = self.describe(step)
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


def load_state(url: str, storage_options: dict[str, Any] | None = None, retries: int = 3) -> dict[str, Any]:
    """Read and verify `url/state.pt` against `url/COMMITTED`; CheckpointError if it does not match."""
    fs, path = filesystem(url, storage_options)
    meta = read_meta(url, storage_options, retries)
    try:
        data = with_retries(lambda: fs.cat_file(join(path, STATE_FILE)), f"reading {url}/{STATE_FILE}", retries)
    except FileNotFoundError:
        raise CheckpointError(f"{url}/{STATE_FILE} is missing") from None
    if len(data) != meta.get("bytes"):
        raise CheckpointError(
            f"{url}/{STATE_FILE} is {len(data)} bytes, its marker says {meta.get('bytes')} (truncated)"
        )
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"{url}/{STATE_FILE} does not match the sha256 in its marker (corrupt)")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        # torch's message advises weights_only=False, i.e. running code from the file: never pass that on
        reason = str(err).splitlines()[0] if "weights_only" not in str(err) else "it holds objects other than tensors"
        raise CheckpointError(f"{url}/{STATE_FILE} cannot be loaded safely: {reason}. Only checkpoints written "
                              "by this trainer are loaded; do not load files from untrusted sources") from None


def read_meta(url: str, storage_options: dict[str, Any] | None = None, retries: int = 3) -> dict[str, Any]:
    """The commit marker of a checkpoint directory; CheckpointError if it is missing or not a JSON object."""
    fs, path = filesystem(url, storage_options)
    try:
        meta = json.loads(with_retries(lambda: fs.cat_file(join(path, MARKER)), f"reading {url}/{MARKER}", retries))
    except FileNotFoundError:
        raise CheckpointError(f"{url} is not a complete checkpoint (no {MARKER} marker)") from None
    except ValueError as err:
        raise CheckpointError(f"{url}/{MARKER} is unreadable: {err}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{url}/{MARKER} is not a JSON object (corrupt)")
    return meta


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
