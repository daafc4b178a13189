"""Checkpoints on any fsspec URL: atomic commit, keep-last-k, async save, verified load.

Layout under `checkpoint.dir`:

    step-00000500/state.pt      model, optimizer, step, tokens, RNG states (torch.save, weights only)
    step-00000500/COMMITTED     JSON: step, tokens, world size, config, size and sha256 of state.pt

`COMMITTED` is written last, so a directory without it is a save that did not finish: it is
ignored by resume and deleted after the next successful save. DDP replicas are identical, so
rank 0 writes one file; loading it needs no particular world size. Loads use
`torch.load(weights_only=True)`, which unpickles no arbitrary objects, after checking the hash.

CLI: `python -m gpt2.checkpoint list|inspect|export DIR_OR_URL [...]`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from gpt2.config import CheckpointConfig
from gpt2.storage import StorageError, filesystem, join, with_retries, write_bytes

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
MARKER = "COMMITTED"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


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


class Checkpointer:
    """Saves (rank 0) and finds/loads (every rank) the checkpoints under one directory or URL."""

    def __init__(self, cfg: CheckpointConfig, is_writer: bool = True):
        self.cfg = cfg
        self.url = cfg.dir.rstrip("/")
        self.fs, self.root = filesystem(self.url, cfg.storage_options)
        self.is_writer = is_writer
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # ---- listing ---------------------------------------------------------------------------

    def _step_dirs(self) -> list[tuple[int, str]]:
        try:
            entries = with_retries(lambda: self.fs.ls(self.root, detail=False), f"listing {self.url}",
                                   self.cfg.retries)
        except FileNotFoundError:
            return []
        out = []
        for path in entries:
            m = _STEP_DIR.match(path.rstrip("/").rsplit("/", 1)[-1])
            if m:
                out.append((int(m.group(1)), path.rstrip("/")))
        return sorted(out)

    def complete(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first."""
        out = []
        for step, path in self._step_dirs():
            marker = join(path, MARKER)
            if self.fs.exists(marker):
                try:
                    meta = json.loads(self.fs.cat_file(marker))
                except (ValueError, OSError) as err:
                    log.warning("ignoring %s: unreadable commit marker (%s)", marker, err)
                    continue
                out.append(CheckpointInfo(step, self._url_of(path), meta))
        return out

    def _url_of(self, path: str) -> str:
        return f"{self.url}/{path.rstrip('/').rsplit('/', 1)[-1]}"

    # ---- saving ----------------------------------------------------------------------------

    def save(self, state: dict[str, Any], step: int, meta: dict[str, Any], blocking: bool) -> None:
        """Save `state` as step `step`. Non-blocking saves copy to host memory, then write in a
        thread; a previous save is always finished first. A failure raises in blocking mode; in
        non-blocking mode it is logged and raised by the next `wait(raise_errors=True)`."""
        if not self.is_writer:
            return
        self.wait(raise_errors=False)
        host_state = to_cpu(state)
        if blocking:
            self._write(host_state, step, meta)
            return
        self._thread = threading.Thread(target=self._write_in_thread, args=(host_state, step, meta),
                                        name=f"checkpoint-{step}", daemon=True)
        self._thread.start()

    def _write_in_thread(self, state: dict[str, Any], step: int, meta: dict[str, Any]) -> None:
        try:
            self._write(state, step, meta)
        except BaseException as err:  # reported by wait()
            self._error = err
            log.error("CHECKPOINT SAVE FAILED at step %d: %s (training goes on; the next save retries)", step, err)

    def _write(self, state: dict[str, Any], step: int, meta: dict[str, Any]) -> None:
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
        r = self.cfg.retries
        with_retries(lambda: self.fs.makedirs(path, exist_ok=True), f"creating {path}", r)
        with_retries(lambda: write_bytes(self.fs, join(path, STATE_FILE), data), f"writing {path}/{STATE_FILE}", r)
        # The commit marker goes last: only now is the checkpoint complete.
        with_retries(lambda: write_bytes(self.fs, marker, json.dumps(meta, indent=1).encode()), f"committing {path}", r)
        log.info("saved checkpoint %s (%.1f MB in %.1fs)", self._url_of(path), len(data) / 1e6, time.time() - t0)
        self._cleanup(keep_step=step)

    def _cleanup(self, keep_step: int) -> None:
        """Delete partial saves and all but the newest `keep` complete checkpoints."""
        complete = {c.step for c in self.complete()}
        keep = set(sorted(complete)[-self.cfg.keep:]) | {keep_step}
        for step, path in self._step_dirs():
            if step not in keep:
                try:
                    with_retries(lambda p=path: self.fs.rm(p, recursive=True), f"deleting {path}", self.cfg.retries)
                except (StorageError, OSError) as err:
                    log.warning("could not delete old checkpoint %s: %s", path, err)

    def wait(self, raise_errors: bool = True) -> None:
        """Block until the save in flight (if any) is finished; raise its error if asked."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        err, self._error = self._error, None
        if err is not None and raise_errors:
            raise err

    # ---- loading ---------------------------------------------------------------------------

    def load(self, url: str) -> dict[str, Any]:
        """Load one checkpoint directory (verified against its commit marker)."""
        return load_state(url, self.cfg.storage_options, self.cfg.retries)

    def resume_target(self) -> str | None:
        """What to resume from per `checkpoint.resume`: auto -> newest complete, never, or a path."""
        mode = self.cfg.resume
        if mode == "never":
            return None
        if mode != "auto":
            return mode
        found = self.complete()
        return found[-1].url if found else None

    def load_for_resume(self) -> tuple[str, dict[str, Any]] | None:
        """The newest loadable checkpoint; a corrupt one is skipped with a warning naming it."""
        if self.cfg.resume != "auto":
            target = self.resume_target()
            return None if target is None else (target, self.load(target))
        for info in reversed(self.complete()):
            try:
                return info.url, self.load(info.url)
            except CheckpointError as err:
                log.warning("WARNING: skipping corrupt checkpoint %s: %s; trying the previous one", info.url, err)
        return None


def load_state(url: str, storage_options: dict[str, Any] | None = None, retries: int = 3) -> dict[str, Any]:
    """Read and verify `url/state.pt` against `url/COMMITTED`; CheckpointError if it does not match."""
    fs, path = filesystem(url, storage_options)
    try:
        meta = json.loads(with_retries(lambda: fs.cat_file(join(path, MARKER)), f"reading {url}/{MARKER}", retries))
    except FileNotFoundError:
        raise CheckpointError(f"{url} is not a complete checkpoint (no {MARKER} marker)") from None
    except ValueError as err:
        raise CheckpointError(f"{url}/{MARKER} is unreadable: {err}") from None
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
        raise CheckpointError(f"{url}/{STATE_FILE} cannot be loaded: {err}") from None


def read_meta(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    fs, path = filesystem(url, storage_options)
    try:
        return json.loads(fs.cat_file(join(path, MARKER)))
    except FileNotFoundError:
        raise CheckpointError(f"{url} is not a complete checkpoint (no {MARKER} marker)") from None


def resolve_checkpoint(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """A checkpoint directory as given, or the newest complete one under a checkpoint root."""
    fs, path = filesystem(url, storage_options)
    if fs.exists(join(path, MARKER)):
        return url.rstrip("/")
    from gpt2.config import CheckpointConfig

    found = Checkpointer(CheckpointConfig(dir=url, storage_options=storage_options or {})).complete()
    if not found:
        raise CheckpointError(f"no complete checkpoint at or under {url}")
    return found[-1].url


def load_model(source: str, storage_options: dict[str, Any] | None = None, tokenizer_dir: str | None = None):
    """(model, tokenizer) from a checkpoint (dir or root, any fsspec URL), a local HF directory, or a hub name."""
    from gpt2.config import from_dict
    from gpt2.model import GPT
    from gpt2.tokenizer import get_tokenizer
    from gpt2.train import build_model

    if _is_checkpoint(source, storage_options):
        url = resolve_checkpoint(source, storage_options)
        meta = read_meta(url, storage_options)
        cfg = from_dict(meta["config"])
        cfg.model.init_from = None
        model = build_model(cfg)
        model.load_state_dict(load_state(url, storage_options)["model"])
        files_dir = tokenizer_dir or cfg.tokenizer.files_dir
        return model, get_tokenizer(cfg.tokenizer.name, files_dir)
    return GPT.from_pretrained(source), get_tokenizer("gpt2", tokenizer_dir)


def _is_checkpoint(source: str, storage_options: dict[str, Any] | None) -> bool:
    try:
        fs, path = filesystem(source, storage_options)
        if fs.exists(join(path, MARKER)):
            return True
        return fs.isdir(path) and any(_STEP_DIR.match(p.rstrip("/").rsplit("/", 1)[-1])
                                      for p in fs.ls(path, detail=False))
    except (OSError, StorageError):
        return False


# ---- command line -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gpt2.checkpoint",
                                     description="List, inspect and export checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="complete checkpoints under a directory or URL")
    p_list.add_argument("url")
    p_inspect = sub.add_parser("inspect", help="step, tokens and config of one checkpoint (or the newest)")
    p_inspect.add_argument("url")
    p_export = sub.add_parser("export", help="write a checkpoint as a Hugging Face GPT-2 directory")
    p_export.add_argument("url")
    p_export.add_argument("out_dir")
    p_export.add_argument("--tokenizer-dir", default=None, help="copy encoder.json/vocab.bpe from here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        if args.command == "list":
            found = Checkpointer(CheckpointConfig(dir=args.url)).complete()
            if not found:
                print(f"no complete checkpoints under {args.url}")
            for c in found:
                print(f"{c.url}  step {c.step}  tokens {c.meta.get('tokens_seen', '?'):,}  "
                      f"world {c.meta.get('world_size', '?')}  {c.meta.get('bytes', 0) / 1e6:.1f} MB")
        elif args.command == "inspect":
            url = resolve_checkpoint(args.url)
            meta = read_meta(url)
            config = meta.pop("config", {})
            print(f"checkpoint {url}")
            for k, v in meta.items():
                print(f"  {k}: {v}")
            print("config:")
            print(json.dumps(config, indent=2))
        else:
            from gpt2.model import export_hf

            model, _ = load_model(args.url, tokenizer_dir=args.tokenizer_dir)
            out = export_hf(model, args.out_dir, tokenizer_dir=args.tokenizer_dir)
            print(f"exported {args.url} to {out} (transformers.GPT2LMHeadModel.from_pretrained('{out}'))")
    except (CheckpointError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
