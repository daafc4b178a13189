"""The storage mechanics of checkpoints on any fsspec URL: atomic commit, keep-last-k, verified load.

Layout under `checkpoint.dir`:

    step-00000500/state.pt      one entry per part of the trainer (model, optimizer, progress, rng)
    step-00000500/COMMITTED     JSON: step, tokens, world size, config, size and sha256 of state.pt

`COMMITTED` is written last, so a directory without it is a save that did not finish: it is
ignored by resume and deleted after the next successful save. DDP replicas are identical, so
rank 0 writes one file; loading it needs no particular world size. Loads use
`torch.load(weights_only=True)`, which unpickles no arbitrary objects, after checking the hash.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import torch

from gpt2.errors import CheckpointError, StorageError
from gpt2.storage import filesystem, join, with_retries, write_bytes

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
MARKER = "COMMITTED"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
# A checkpoint found corrupt is moved aside, never deleted: step-00000500.corrupt-1764000000
_QUARANTINED = re.compile(r"^step-(\d{8})\.corrupt-\d+$")



def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass
class CheckpointInfo:
    step: int
    url: str
    meta: dict[str, Any]


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

    def load(self, url: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(marker, state) of one checkpoint directory, the state verified against the marker."""
        return load_checkpoint(url, self.storage_options, self.retries)

    def newest_loadable(self) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
        """The newest checkpoint that loads. A corrupt one is moved aside (so that it neither counts
        for keep-last-k nor blocks a new save at its step) and the previous one is tried. None when
        there is no checkpoint; CheckpointError when there are only corrupt ones, now or from before:
        starting over must be asked for (checkpoint.resume=never), never happen silently.
        Returns (url, marker, state)."""
        for _, path in reversed(self._step_dirs()):
            if not self.fs.exists(join(path, MARKER)):
                continue  # a save that did not finish
            url = self._url_of(path)
            try:
                return (url, *self.load(url))
            except CheckpointError as err:
                moved = self.quarantine(path)
                log.warning("checkpoint %s is corrupt (%s); moved it to %s and trying the previous one",
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


def load_state(url: str, storage_options: dict[str, Any] | None = None, retries: int = 3) -> dict[str, Any]:
    """The state of one checkpoint, verified against its marker (`load_checkpoint`)."""
    return load_checkpoint(url, storage_options, retries)[1]


def load_checkpoint(url: str, storage_options: dict[str, Any] | None = None,
                    retries: int = 3) -> tuple[dict[str, Any], dict[str, Any]]:
    """(marker, state): `url/state.pt` read and verified against `url/COMMITTED`; CheckpointError
    if it does not match."""
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
        return meta, torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
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
