"""`python -m gpt2.prepare CONFIG [key=value ...]`: text corpus -> uint16 token shards.

Streams documents from `data.source`, tokenizes them in parallel worker processes (ordered, with a
bounded number of batches in flight), prefixes each with end-of-text, and cuts the stream into
shards: the first `data.val_tokens` tokens are the val split, the rest train shards of
`data.shard_tokens`. Each shard is written atomically and recorded in the manifest with the
document position where it ends, so a killed run resumes after its last finished shard.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import socket
import sys
import time
from array import array
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import fsspec
import numpy as np

from gpt2 import logs
from gpt2.config import Config, cli_config
from gpt2.errors import EXIT_CONFIG, EXIT_ERROR, Gpt2Error, exit_code
from gpt2.shards import (
    DTYPE,
    MANIFEST,
    DataError,
    Manifest,
    npy_bytes,
    read_manifest,
    sha256_of,
    shard_name,
    wait_for_manifest,
    write_manifest,
)
from gpt2.storage import ensure_directory, filesystem, is_local, join, with_retries, write_bytes
from gpt2.tokenizer import Tokenizer, get_tokenizer
from gpt2.watchdog import beat, phase

log = logging.getLogger("gpt2.prepare")  # also when run as __main__

USAGE = """usage: python -m gpt2.prepare CONFIG [--redo SHARD_FILE | --add-hashes] [key=value ...]

Tokenizes data.source into shards under data.dir, e.g.
  python -m gpt2.prepare configs/gpt2-124m.yaml                     # FineWeb-Edu sample-10BT (network)
  python -m gpt2.prepare configs/gpt2-124m.yaml data.source='corpus/*.jsonl' data.dir=s3://bucket/edu
  python -m gpt2.prepare configs/demo.yaml                          # Python's built-in help texts
  python -m gpt2.prepare configs/demo.yaml --redo train_000003.npy  # one corrupt shard, from the source
  python -m gpt2.prepare configs/demo.yaml --add-hashes             # a manifest written before hashes
"""

DOCS_PER_BATCH = 4096
CHARS_PER_BATCH = 1 << 20
SHARED_VIEW_S = 120.0  # how long a new manifest may take to show on another node of a shared file system


# ---- sources: iterators of documents -------------------------------------------------------------


def iter_documents(source: str, text_field: str = "text", txt_split: str = "file",
                   storage_options: dict[str, Any] | None = None) -> Iterator[str]:
    """Documents from a source spec: `hf:REPO:NAME`, `builtin:pydoc`, or files by path/glob/URL."""
    if source.startswith("hf:"):
        yield from _hub_documents(source, text_field)
    elif source == "builtin:pydoc":
        import pydoc_data.topics

        for key in sorted(pydoc_data.topics.topics):
            yield pydoc_data.topics.topics[key]
    else:
        yield from _file_documents(source, text_field, txt_split, storage_options or {})


def _hub_documents(source: str, text_field: str) -> Iterator[str]:
    parts = source.split(":")
    repo, name = parts[1], (parts[2] if len(parts) > 2 else None)
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError("streaming from the hub needs `datasets`: pip install 'gpt2[hub]'") from None
    try:
        ds = load_dataset(repo, name=name, split="train", streaming=True)
        for row in ds:
            yield row[text_field]
    except Exception as err:
        raise DataError(
            f"cannot stream {repo} ({name}) from the Hugging Face hub: {type(err).__name__}: {err}. "
            "Offline, download the parquet files elsewhere and set data.source to their path."
        ) from None


def _expand(source: str, storage_options: dict[str, Any]) -> list[str]:
    if "://" in source:
        fs, path = filesystem(source, storage_options)
        protocol = source.split("://")[0]
        paths = sorted(fs.glob(path)) if any(c in path for c in "*?[") else [path]
        return [f"{protocol}://{p}" for p in paths]
    return sorted(glob.glob(source)) if any(c in source for c in "*?[") else [source]


def _file_documents(source: str, text_field: str, txt_split: str, storage_options: dict[str, Any]) -> Iterator[str]:
    paths = _expand(source, storage_options)
    if not paths:
        raise DataError(f"data.source '{source}' matches no files")
    for path in paths:
        name = path.removesuffix(".gz").removesuffix(".zst")
        try:
            if name.endswith(".parquet"):
                yield from _parquet_documents(path, text_field, storage_options)
                continue
            with fsspec.open(path, "rt", encoding="utf-8", compression="infer", **storage_options) as f:
                if name.endswith((".jsonl", ".json")):
                    for lineno, line in enumerate(f, 1):
                        if line.strip():
                            yield _json_text(line, text_field, path, lineno)
                elif txt_split == "paragraph":
                    for para in f.read().split("\n\n"):
                        if para.strip():
                            yield para
                else:
                    yield f.read()
        except FileNotFoundError:
            raise DataError(f"input file {path} not found (data.source='{source}')") from None
        except UnicodeDecodeError as err:
            raise DataError(f"input file {path} is not UTF-8 text ({err.reason} at byte {err.start}); "
                            "convert it (e.g. iconv -t utf-8) or leave it out of data.source") from None


def _json_text(line: str, text_field: str, path: str, lineno: int) -> str:
    try:
        text = json.loads(line)[text_field]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{path}:{lineno} is not a JSON object with a '{text_field}' field ({err}); "
                        "set data.text_field to the field that holds the text") from None
    if not isinstance(text, str):
        raise DataError(f"{path}:{lineno}: the '{text_field}' field is {json.dumps(text)}, not a string; "
                        "fix or drop that line, or set data.text_field to the field that holds the text")
    return text


def _parquet_documents(path: str, text_field: str, storage_options: dict[str, Any]) -> Iterator[str]:
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb", **storage_options) as f:
        pf = pq.ParquetFile(f)
        for i in range(pf.num_row_groups):
            for text in pf.read_row_group(i, columns=[text_field]).column(text_field).to_pylist():
                if not isinstance(text, str):
                    raise DataError(f"{path}: row group {i} has a '{text_field}' value {text!r}, not a string")
                yield text


# ---- tokenization in workers ----------------------------------------------------------------------

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def tokenize_batch(docs: list[str], tokenizer: Tokenizer | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize documents, each prefixed by end-of-text: (concatenated uint16 tokens, per-doc lengths).

    The whole batch becomes one array (no per-document arrays), so little crosses the process
    boundary and the writer copies whole batches. A token id >= 65536 raises OverflowError.
    """
    tok = tokenizer or _worker_tokenizer
    assert tok is not None
    flat = array("H")  # uint16: an id >= 65536 raises OverflowError
    lengths = np.empty(len(docs), dtype=np.int64)
    for i, doc in enumerate(docs):
        # encode() per document: tiktoken's encode_ordinary_batch costs ~4x more on short documents
        ids = tok.encode(doc)
        flat.append(tok.eot)
        flat.extend(ids)
        lengths[i] = len(ids) + 1
    return np.frombuffer(flat, dtype=DTYPE), lengths


def _batches(docs: Iterator[str], max_docs: int = DOCS_PER_BATCH, max_chars: int = CHARS_PER_BATCH
             ) -> Iterator[list[str]]:
    """Batches of documents, cut by count or by total size (FineWeb documents are long, others short)."""
    batch: list[str] = []
    chars = 0
    for d in docs:
        batch.append(d)
        chars += len(d)
        if len(batch) == max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def tokenized_batches(docs: Iterator[str], tokenizer: Tokenizer, workers: int,
                      executor_kind: str = "process") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens, doc lengths) per batch of `docs`, in order; at most 2 x workers batches in flight."""
    if workers <= 1:
        for batch in _batches(docs):
            yield tokenize_batch(batch, tokenizer)
        return
    pool: Executor
    if executor_kind == "process":
        pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(tokenizer,))
        submit = lambda b: pool.submit(tokenize_batch, b)  # noqa: E731
    else:
        pool = ThreadPoolExecutor(workers)
        submit = lambda b: pool.submit(tokenize_batch, b, tokenizer)  # noqa: E731
    with pool:
        pending: deque = deque()
        for batch in _batches(docs):
            pending.append(submit(batch))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ---- the shard writer -----------------------------------------------------------------------------


@dataclass
class Summary:
    documents: int = 0
    tokens: int = 0
    shards: int = 0
    skipped_shards: int = 0
    seconds: float = 0.0
    shard_files: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        return (f"prepared {self.documents:,} documents, {self.tokens:,} new tokens, {self.shards} shards "
                f"({self.skipped_shards} already done) in {self.seconds:.1f}s ({rate:,.0f} tokens/s)")


class Progress:
    """A progress line every REPORT_EVERY_S seconds with tokens/s and an ETA when the total is known
    (lines, not a redrawn one: cluster logs are files)."""

    REPORT_EVERY_S = 10.0

    def __init__(self, total_tokens: int | None, enabled: bool):
        self.total, self.enabled = total_tokens, enabled
        self.start = self.last = time.monotonic()

    def update(self, tokens: int, shards: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < self.REPORT_EVERY_S and not force):
            return
        self.last = now
        rate = tokens / max(now - self.start, 1e-9)
        eta = ""
        if self.total:
            eta = f", ETA {max(self.total - tokens, 0) / max(rate, 1):.0f}s"
        log.info(f"{tokens:,} tokens, {shards} shards, {rate:,.0f} tokens/s{eta}")


def prepare(cfg: Config, workers: int | None = None, executor_kind: str | None = None,
            progress: bool = True, total_tokens_hint: int | None = None) -> Summary:
    """Prepare `cfg.data.source` into shards under `cfg.data.dir`, resuming a killed run."""
    d = cfg.data
    tokenizer = get_tokenizer(cfg.tokenizer.name, cfg.tokenizer.files_dir)
    if tokenizer.n_vocab > 2**16:
        raise DataError(f"tokenizer {tokenizer.name} has {tokenizer.n_vocab} ids; uint16 shards hold 65536")
    workers = workers or d.workers or _cpu_count()
    executor_kind = executor_kind or d.executor
    fs, root = filesystem(d.dir, d.storage_options)
    manifest = read_manifest(d.dir, d.storage_options)
    fresh = Manifest(tokenizer=tokenizer.fingerprint, source=d.source, shard_tokens=d.shard_tokens,
                     val_tokens=d.val_tokens, shards=[])
    if manifest is None:
        manifest = fresh
    else:
        mine = (fresh.tokenizer, fresh.source, fresh.shard_tokens, fresh.val_tokens)
        theirs = (manifest.tokenizer, manifest.source, manifest.shard_tokens, manifest.val_tokens)
        if mine != theirs:
            raise DataError(f"{d.dir} holds shards prepared with other settings (tokenizer, source, shard_tokens, "
                f"val_tokens = {theirs}, now {mine}); use another data.dir or delete that one"
            )
        if manifest.complete:
            log.info(f"{d.dir} is already fully prepared ({len(manifest.shards)} shards); nothing to do")
            return Summary(skipped_shards=len(manifest.shards))

    summary = Summary(skipped_shards=len(manifest.shards))
    start = time.monotonic()
    next_doc, next_offset = 0, 0
    if manifest.shards:
        next_doc, next_offset = manifest.shards[-1]["next_doc"], manifest.shards[-1]["next_offset"]
        log.info(f"resuming: {len(manifest.shards)} shards already written, continuing at document {next_doc:,}")

    def plan(index: int) -> tuple[str, int]:
        """Split and size of shard number `index` of the whole sequence."""
        val_shards = -(-d.val_tokens // d.shard_tokens)
        if index < val_shards:
            return "val", min(d.shard_tokens, d.val_tokens - index * d.shard_tokens)
        return "train", d.shard_tokens

    def split_index(split: str) -> int:
        return sum(1 for s in manifest.shards if s["split"] == split)

    buf = np.empty(d.shard_tokens, dtype=DTYPE)
    fill = 0
    split, size = plan(len(manifest.shards))

    def flush(doc_index: int, offset: int) -> None:
        nonlocal fill, split, size
        name = shard_name(split, split_index(split))
        data = npy_bytes(buf[:fill].copy())
        with_retries(lambda: write_bytes(fs, join(root, name), data), f"writing {d.dir}/{name}")
        manifest.shards.append(dict(file=name, split=split, tokens=int(fill), next_doc=doc_index, next_offset=offset,
                                    sha256=hashlib.sha256(data).hexdigest()))
        manifest.documents = doc_index
        write_manifest(d.dir, manifest, d.storage_options)
        summary.shards += 1
        summary.shard_files.append(name)
        fill = 0
        split, size = plan(len(manifest.shards))

    docs = iter_documents(d.source, d.text_field, d.txt_split, d.storage_options)
    # read the first document before creating anything: a bad source must leave no empty data.dir
    first = next(docs, None)
    docs = _skip(chain([] if first is None else [first], docs), next_doc)
    ensure_directory(d.dir, d.storage_options, "data.dir")
    if is_local(fs):  # a preparation killed mid-write leaves its temporary file behind
        for stale in glob.glob(os.path.join(root, ".*.tmp-*")):
            os.remove(stale)
    with_retries(lambda: fs.makedirs(root, exist_ok=True), f"creating {d.dir}")
    meter = Progress(total_tokens_hint, progress)
    first_doc = next_doc  # index of the first document of the current batch
    skip = next_offset  # tokens of the first document already in finished shards
    for tokens, lengths in tokenized_batches(docs, tokenizer, workers, executor_kind):
        ends = np.cumsum(lengths)
        pos, skip = skip, 0
        while pos < tokens.size:
            take = min(size - fill, tokens.size - pos)
            buf[fill:fill + take] = tokens[pos:pos + take]
            fill += take
            pos += take
            summary.tokens += take
            if fill == size:
                done = int(np.searchsorted(ends, pos, side="right"))  # documents finished by this shard
                flush(first_doc + done, pos - (int(ends[done - 1]) if done else 0))
        first_doc += lengths.size
        summary.documents += lengths.size
        beat()
        meter.update(summary.tokens, len(manifest.shards))
    doc_index = first_doc
    if not any(s["split"] == "train" for s in manifest.shards) and fill == 0:
        raise DataError(f"the corpus ended after {summary.tokens:,} tokens, before any train shard "
            f"(data.val_tokens={d.val_tokens:,}); lower data.val_tokens or add text"
        )
    if fill:
        if split == "val":
            raise DataError(f"the corpus has only {summary.tokens:,} tokens, fewer than data.val_tokens="
                f"{d.val_tokens:,}; lower data.val_tokens so that train shards remain"
            )
        flush(doc_index, 0)
    manifest.complete = True
    manifest.documents = doc_index
    write_manifest(d.dir, manifest, d.storage_options)
    meter.update(summary.tokens, len(manifest.shards), force=True)
    summary.seconds = time.monotonic() - start
    return summary


def redo_shard(cfg: Config, file: str, workers: int | None = None) -> str:
    """Write shard `file` of `cfg.data.dir` again from the source, from where its manifest entry says
    it begins, and check it against the manifest's sha256 (a source that changed since is refused)."""
    d = cfg.data
    manifest = read_manifest(d.dir, d.storage_options)
    names = [s["file"] for s in manifest.shards] if manifest else []
    if file not in names:
        raise DataError(f"{d.dir}/{MANIFEST} lists no shard {file!r} (it lists {len(names)}, e.g. "
                        f"{', '.join(names[:3]) or 'none'}); name one of its files")
    index = names.index(file)
    entry, before = manifest.shards[index], manifest.shards[index - 1] if index else None
    tokenizer = get_tokenizer(cfg.tokenizer.name, cfg.tokenizer.files_dir)
    if tokenizer.fingerprint != manifest.tokenizer:
        raise DataError(f"{d.dir} was tokenized with '{manifest.tokenizer}', the config's tokenizer is "
                        f"'{tokenizer.fingerprint}'; redo the shard with the config it was prepared with")
    first_doc, skip = (before["next_doc"], before["next_offset"]) if before else (0, 0)
    need, fill = int(entry["tokens"]), 0
    buf = np.empty(need, dtype=DTYPE)
    docs = _skip(iter_documents(manifest.source, d.text_field, d.txt_split, d.storage_options), first_doc)
    for tokens, _ in tokenized_batches(docs, tokenizer, workers or d.workers or _cpu_count(), d.executor):
        pos, skip = skip, 0
        take = max(min(need - fill, tokens.size - pos), 0)
        buf[fill:fill + take] = tokens[pos:pos + take]
        fill += take
        beat()
        if fill == need:
            break
    data = npy_bytes(buf[:fill])
    digest = hashlib.sha256(data).hexdigest()
    if fill < need or digest != entry.get("sha256", digest):
        raise DataError(f"{manifest.source} no longer gives the tokens of {file} (it did when prepared: "
                        f"{'it ended early' if fill < need else 'another sha256'}); the source changed, so "
                        "prepare the whole corpus again into a new data.dir")
    fs, root = filesystem(d.dir, d.storage_options)
    with_retries(lambda: write_bytes(fs, join(root, file), data), f"writing {d.dir}/{file}")
    if "sha256" not in entry:
        entry["sha256"] = digest
        write_manifest(d.dir, manifest, d.storage_options)
    return f"{d.dir}/{file}: {fill:,} tokens written again from {manifest.source}, sha256 {digest[:16]}... matches"


def add_hashes(cfg: Config) -> str:
    """Record the sha256 of every shard a manifest written before hashes lacks. It trusts the files
    as they are now: run it where the shards are known to be good."""
    d = cfg.data
    manifest = read_manifest(d.dir, d.storage_options)
    if manifest is None:
        raise DataError(f"{d.dir}/{MANIFEST} not found; prepare the data with python -m gpt2.prepare")
    fs, root = filesystem(d.dir, d.storage_options)
    added = 0
    for entry in manifest.shards:
        if "sha256" not in entry:
            entry["sha256"] = with_retries(lambda e=entry: sha256_of(fs, join(root, e["file"])),
                                           f"reading {d.dir}/{entry['file']}")
            added += 1
    write_manifest(d.dir, manifest, d.storage_options)
    return f"{d.dir}/{MANIFEST}: sha256 recorded for {added} shards ({len(manifest.shards) - added} had one)"


def wait_for_data(cfg: Config) -> None:
    """With data.wait_for_data_s (and no data.auto_prepare): wait for another job to prepare the data."""
    d = cfg.data
    if d.wait_for_data_s and not d.auto_prepare:
        with phase("waiting for data"):
            wait_for_manifest(d.dir, d.storage_options, d.wait_for_data_s)


def prepare_missing(cfg: Config) -> None:
    """With data.auto_prepare, rank 0's part: prepare what data.dir lacks (the other ranks wait for
    it, then `see_prepared_data`)."""
    d = cfg.data
    if not d.auto_prepare:
        return
    with phase("preparing data"):
        manifest = read_manifest(d.dir, d.storage_options)
        if manifest is None or not manifest.complete:
            log.info(f"preparing {d.source} into {d.dir} (data.auto_prepare=true)")
            log.info(str(prepare(cfg, progress=False)))


def see_prepared_data(cfg: Config) -> None:
    """On a rank other than 0, once rank 0 has prepared data.dir: its manifest must show here too
    (a shared file system may take a while to show a new file); DataError when it does not, for
    data.dir is then not shared with rank 0's node."""
    d = cfg.data
    with phase("preparing data: looking for rank 0's manifest"):
        try:
            wait_for_manifest(d.dir, d.storage_options, SHARED_VIEW_S, poll_s=1.0, quiet=True)
        except DataError as err:
            raise DataError(
                f"rank 0 prepared the data in {d.dir}, but this rank ({socket.gethostname()}) does not see its "
                f"{MANIFEST} after {SHARED_VIEW_S:g} s: data.dir must be storage that every node shares (a shared "
                "file system or an object store), not a node's local disk") from err


def _skip(docs: Iterator[str], n: int) -> Iterator[str]:
    for i, doc in enumerate(docs):
        if i >= n:
            yield doc


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def main(argv: list[str] | None = None) -> None:
    logs.setup()
    args = list(sys.argv[1:] if argv is None else argv)
    redo, add = None, "--add-hashes" in args
    if add:
        args.remove("--add-hashes")
    if "--redo" in args:
        at = args.index("--redo")
        if at + 1 >= len(args) or "=" in args[at + 1]:
            log.error("--redo needs the shard's file name, e.g. --redo train_000003.npy")
            sys.exit(EXIT_CONFIG)
        redo = args.pop(at + 1)
        args.pop(at)
    cfg = cli_config(args, USAGE)
    try:
        if redo or add:
            log.info(redo_shard(cfg, redo) if redo else add_hashes(cfg))
            return
        summary = prepare(cfg)
    except Gpt2Error as err:
        log.error("%s", err)
        sys.exit(exit_code(err))
    except OSError as err:  # the file system itself (a full disk, a read-only mount): no traceback either
        log.error("%s: %s", type(err).__name__, err)
        sys.exit(EXIT_ERROR)
    log.info(str(summary))
    log.info(f"shards in {cfg.data.dir}")


if __name__ == "__main__":
    main()
