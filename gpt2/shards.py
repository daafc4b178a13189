"""Token shards on disk: uint16 `.npy` files plus a `manifest.json` that says what they hold.

Layout of a data directory (local or any fsspec URL):

    manifest.json      tokenizer, dtype, source, per-shard token counts and sha256, and `complete`
    val_000000.npy     the first `val_tokens` tokens of the corpus
    train_000000.npy   the rest, `shard_tokens` per shard (the last one may be shorter)
    ...

Remote shards are fetched into a local cache keyed by their sha256 (verified on the way in; in
chunks, resumable, once per host, the next one ahead in the background: gpt2.fetch);
local shards are memory-mapped and verified before their first read. Manifests written before
shards had hashes still load (checked by size only, with a warning).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpt2.errors import DataError
from gpt2.fetch import Fetch
from gpt2.storage import filesystem, heard, is_local, join, with_retries, write_bytes
from gpt2.watchdog import beat

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "gpt2-shards/1"
DTYPE = np.uint16



HASH_CHUNK = 8 << 20


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.npy"


def npy_bytes(tokens: np.ndarray) -> bytes:
    """A shard's file content: a standard .npy of uint16 tokens."""
    if tokens.dtype != DTYPE:
        raise ValueError(f"shards hold uint16 tokens, got {tokens.dtype}")
    buf = io.BytesIO()
    np.save(buf, tokens, allow_pickle=False)
    return buf.getvalue()


def npy_size(n_tokens: int) -> int:
    """Size in bytes of the .npy file of `n_tokens` uint16 tokens."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<u2", "fortran_order": False, "shape": (n_tokens,)})
    return buf.tell() + 2 * n_tokens


def sha256_of(fs: Any, path: str | os.PathLike, progress: Callable[[], None] = beat) -> str:
    """The sha256 of a file (`fs`: an fsspec file system, None for a local path), read in chunks
    (each one is `progress`, by default for the watchdog)."""
    digest = hashlib.sha256()
    with (fs.open(path, "rb") if fs is not None else open(path, "rb")) as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
            heard()
            progress()
    return digest.hexdigest()


def redo_command(url: str, file: str) -> str:
    """How to re-prepare one shard of the data directory `url` (gpt2.prepare --redo)."""
    return f"python -m gpt2.prepare CONFIG data.dir={url} --redo {file}"


@dataclass
class Manifest:
    tokenizer: str  # tokenizer fingerprint
    source: str
    shard_tokens: int
    val_tokens: int
    shards: list[dict[str, Any]]
    complete: bool = False
    documents: int = 0
    dtype: str = "uint16"
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not a valid shard manifest ({err}); prepare the data again") from None
        if not isinstance(data, dict):
            raise DataError(f"{where}: not a valid shard manifest (a JSON {type(data).__name__}, not an object); "
                            "prepare the data again")
        if data.get("format") != FORMAT:
            raise DataError(f"{where}: unknown shard format {data.get('format')!r}, expected {FORMAT!r}")
        try:
            manifest = cls(**data)
        except TypeError as err:
            raise DataError(f"{where}: not a valid shard manifest ({err}); prepare the data again") from None
        for i, shard in enumerate(manifest.shards if isinstance(manifest.shards, list) else [None]):
            if not (isinstance(shard, dict) and isinstance(shard.get("file"), str)
                    and shard.get("split") in ("train", "val") and isinstance(shard.get("tokens"), int)):
                raise DataError(f"{where}: shard entry {i} ({shard!r}) lacks a file, split or token count; "
                                "prepare the data again")
        return manifest

    def split(self, split: str) -> list[dict[str, Any]]:
        return [s for s in self.shards if s["split"] == split]

    @property
    def hashed(self) -> bool:
        """Whether every shard has its sha256 (manifests written before hashes have none)."""
        return all(isinstance(s.get("sha256"), str) for s in self.shards)


def read_manifest(url: str, storage_options: dict[str, Any] | None = None) -> Manifest | None:
    fs, root = filesystem(url, storage_options)
    path = join(root, MANIFEST)
    if not fs.exists(path):
        return None
    return Manifest.from_json(fs.cat_file(path).decode(), f"{url}/{MANIFEST}")


def wait_for_manifest(url: str, storage_options: dict[str, Any] | None, timeout_s: float,
                      poll_s: float = 10.0, quiet: bool = False) -> None:
    """Wait until `url` holds a complete manifest, saying what it waits for (every minute, unless
    `quiet`); DataError when `timeout_s` passes first."""
    start = time.monotonic()
    said = -math.inf
    while True:
        beat()  # waiting is progress: the watchdog leaves it alone
        manifest = read_manifest(url, storage_options)
        if manifest is not None and manifest.complete:
            return
        waited = time.monotonic() - start
        state = "missing" if manifest is None else f"incomplete ({len(manifest.shards)} shards so far)"
        if waited >= timeout_s:
            raise DataError(
                f"{url}/{MANIFEST} is still {state} after waiting {waited:.0f} s (data.wait_for_data_s="
                f"{timeout_s:g}); prepare the data (python -m gpt2.prepare CONFIG data.dir={url}, "
                "python launch/slurm.py prepare, or the gpt2-prepare Job on Kubernetes) or wait longer")
        if waited - said >= 60 and not quiet:
            log.info(f"waiting for data: {url}/{MANIFEST} is {state}; waiting up to {timeout_s - waited:.0f} s more "
                "(data.wait_for_data_s)")
            said = waited
        time.sleep(min(poll_s, max(timeout_s - waited, 0.1)))


def write_manifest(url: str, manifest: Manifest, storage_options: dict[str, Any] | None = None) -> None:
    fs, root = filesystem(url, storage_options)
    with_retries(lambda: write_bytes(fs, join(root, MANIFEST), manifest.to_json().encode()), "writing manifest")


def default_cache_dir() -> Path:
    return Path(os.environ.get("GPT2_CACHE_DIR", Path.home() / ".cache" / "gpt2"))


class ShardSet:
    """The shards of one split, read as one contiguous token stream.

    `read(start, n)` returns tokens [start, start + n) of the stream, across shard boundaries.
    """

    def __init__(self, url: str, split: str, manifest: Manifest, storage_options: dict[str, Any] | None,
                 cache_dir: str | None):
        self.url = url
        self.split = split
        self.entries = manifest.split(split)
        self.storage_options = storage_options or {}
        self.fs, self.root = filesystem(url, self.storage_options)
        self.local = is_local(self.fs)
        # by content: one cache serves any number of corpora and never serves one's file for another's
        self.cache = Path(cache_dir) if cache_dir else default_cache_dir() / "shards"
        # a shard without a hash (an older manifest) is cached by its URL, and reused on its size
        self.legacy_cache = self.cache / "by-url" / hashlib.sha1(url.encode()).hexdigest()[:16]
        self._verified: set[int] = set()
        sizes = [int(e["tokens"]) for e in self.entries]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._arrays: dict[int, np.ndarray] = {}
        self._fetches: dict[int, Fetch] = {}
        self._fetch_lock = threading.Lock()
        self._awaited: Fetch | None = None  # the copy the reader waits for now
        self._hashed = 0  # chunks of local shards hashed by the reader so far

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def check_files(self, min_tokens: int) -> None:
        """Every shard exists with the size its manifest says; raise DataError naming the file if not."""
        for e in self.entries:
            where = f"{self.url}/{e['file']}"
            if int(e["tokens"]) < min_tokens:
                raise DataError(
                    f"{where} holds {e['tokens']} tokens, fewer than one sequence ({min_tokens}); "
                    "prepare with a larger data.shard_tokens"
                )
            path = join(self.root, e["file"])
            try:
                size = self.fs.size(path)
            except FileNotFoundError:
                raise DataError(f"shard {where} listed in the manifest is missing; prepare the data again") from None
            expected = npy_size(int(e["tokens"]))
            if size != expected:
                raise DataError(
                    f"shard {where} is {size} bytes but {e['tokens']} uint16 tokens need {expected} "
                    "(truncated, or written with another dtype); prepare the data again"
                )
            if self.local:
                self._array(self.entries.index(e))

    def _cache_path(self, i: int) -> Path:
        sha = self.entries[i].get("sha256")
        return self.cache / "sha256" / f"{sha}.npy" if sha else self.legacy_cache / self.entries[i]["file"]

    def _cached(self, i: int) -> bool:
        target = self._cache_path(i)
        # a hashed file was verified when it entered the cache; an unhashed one is trusted on its size
        return target.exists() and (bool(self.entries[i].get("sha256"))
                                    or target.stat().st_size == npy_size(int(self.entries[i]["tokens"])))

    def _fetch(self, i: int) -> Fetch:
        """The copy of remote shard `i` into the cache, started in the background if it was not."""
        with self._fetch_lock:
            # a copy that failed, or whose file left the cache since: copy again
            if i not in self._fetches or (self._fetches[i].done and not self._cached(i)):
                if self._cache_path(i).exists() and not self._cached(i):  # an unhashed file of another size
                    self._cache_path(i).unlink()
                name, sha = self.entries[i]["file"], self.entries[i].get("sha256")
                check = (lambda path: self._check_hash(i, path)) if sha else None
                self._fetches[i] = Fetch(self.fs, join(self.root, name), self._cache_path(i),
                                         npy_size(int(self.entries[i]["tokens"])), f"{self.url}/{name}", check).start()
            return self._fetches[i]

    def _local_path(self, i: int) -> str:
        if self.local:
            return join(self.root, self.entries[i]["file"])
        if not self._cached(i):
            self._awaited = self._fetch(i)
            try:
                self._awaited.wait()
            finally:
                self._awaited = None
        self._verified.add(i)  # verified on its way into the cache
        self._prefetch(i)
        return str(self._cache_path(i))

    def reader_progress(self) -> tuple[int, int, int] | None:
        """What the reader's I/O has done (it changes as the reader moves), or None when it is not
        copying or verifying a shard: whoever waits for the reader (in another thread) beats for it."""
        awaited = self._awaited
        if awaited is None and not self._hashed:
            return None
        return (self._hashed, id(awaited), awaited.progress if awaited is not None else 0)

    def _hash_chunk(self) -> None:
        self._hashed += 1
        beat()

    def _prefetch(self, i: int) -> None:
        """Start copying the shard after `i` while `i` is read, so that a step rarely waits for one."""
        if not self.local and i + 1 < len(self.entries) and not self._cached(i + 1):
            self._fetch(i + 1)

    def _check_hash(self, i: int, path: str | os.PathLike, progress: Callable[[], None] = beat) -> None:
        """DataError naming the shard and how to re-prepare it when its bytes are not the manifest's."""
        entry = self.entries[i]
        got = sha256_of(None, path, progress)
        if got != entry["sha256"]:
            raise DataError(
                f"shard {self.url}/{entry['file']} is corrupt: its sha256 is {got[:16]}..., the manifest says "
                f"{entry['sha256'][:16]}... (a flipped or zeroed region, or another corpus's file); re-prepare just "
                f"that shard with {redo_command(self.url, entry['file'])}, or copy it again from where it came from")

    def _array(self, i: int) -> np.ndarray:
        if i not in self._arrays:
            path = self._local_path(i)
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError as err:
                raise DataError(f"shard {path} cannot be read ({err}); prepare the data again") from None
            if arr.dtype != DTYPE or arr.ndim != 1:
                raise DataError(
                    f"shard {path} holds {arr.dtype} of shape {arr.shape}, expected 1-D uint16; "
                    "prepare the data again with gpt2.prepare"
                )
            if arr.shape[0] != int(self.entries[i]["tokens"]):
                expected = self.entries[i]["tokens"]
                raise DataError(f"shard {path} holds {arr.shape[0]} tokens, its manifest says {expected}")
            self._arrays[i] = arr
        return self._arrays[i]

    def _verified_array(self, i: int) -> np.ndarray:
        """Shard `i`, its bytes checked against the manifest's sha256 before its first read."""
        arr = self._array(i)
        if i not in self._verified:
            if self.entries[i].get("sha256"):
                self._check_hash(i, self._local_path(i), self._hash_chunk)
            self._verified.add(i)
        return arr

    def read(self, start: int, n: int) -> np.ndarray:
        out = np.empty(n, dtype=DTYPE)
        filled = 0
        while filled < n:
            pos = start + filled
            i = int(np.searchsorted(self.offsets, pos, side="right")) - 1
            arr = self._verified_array(i)
            local = pos - int(self.offsets[i])
            take = min(n - filled, arr.shape[0] - local)
            out[filled:filled + take] = arr[local:local + take]
            filled += take
        return out


def open_split(url: str, split: str, tokenizer_fingerprint: str, storage_options: dict[str, Any] | None = None,
               cache_dir: str | None = None, min_tokens: int = 1) -> ShardSet:
    """Open and check one split of a prepared data directory; every problem is a DataError."""
    fs, root = filesystem(url, storage_options)
    if not with_retries(lambda: fs.exists(root), f"looking for {url}"):
        raise DataError(
            f"data directory {url} does not exist; prepare it first: python -m gpt2.prepare CONFIG "
            f"(or set data.dir to where your shards are)"
        )
    manifest = read_manifest(url, storage_options)
    if manifest is None:
        found = [p for p in fs.ls(root, detail=False) if p.endswith(".npy")]
        detail = f"it has {len(found)} .npy files but no manifest" if found else "it holds no shards"
        raise DataError(f"{url}/{MANIFEST} not found ({detail}); prepare the data with python -m gpt2.prepare")
    if not manifest.complete:
        raise DataError(
            f"{url} was only partly prepared ({len(manifest.shards)} shards so far); "
            "run python -m gpt2.prepare again to finish it (it resumes)"
        )
    if manifest.dtype != "uint16":
        raise DataError(f"{url}/{MANIFEST} says dtype {manifest.dtype}; this trainer reads uint16 shards")
    if manifest.tokenizer != tokenizer_fingerprint:
        raise DataError(
            f"{url} was tokenized with '{manifest.tokenizer}' but the config's tokenizer is "
            f"'{tokenizer_fingerprint}'; set tokenizer.name to match or prepare the data again"
        )
    if not manifest.hashed and split == "train":  # said once per start (val is opened too)
        log.warning(f"{url}/{MANIFEST} records no sha256 per shard (prepared before shards had hashes): its shards "
                    "are checked by size only. Add the hashes once with python -m gpt2.prepare CONFIG "
                    f"data.dir={url} --add-hashes")
    shards = ShardSet(url, split, manifest, storage_options, cache_dir)
    if not shards.entries:
        raise DataError(f"{url} has no {split} shards; prepare the data again")
    shards.check_files(min_tokens)
    return shards
