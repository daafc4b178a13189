"""tinyshakespeare as a prepared corpus, shared by the preparation, loader and S3 tests."""

from __future__ import annotations

import json
from pathlib import Path

from gpt2.config import Config, load_config


def shakespeare_docs(text: str) -> list[str]:
    return [d for d in text.split("\n\n") if d.strip()]


def write_corpus(text: str, path: Path) -> Path:
    """tinyshakespeare as a .jsonl of documents (one per blank-line section)."""
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in shakespeare_docs(text)))
    return path


def cfg_for(corpus, out, bpe_dir, **extra) -> Config:
    overrides = [f"data.source={corpus}", f"data.dir={out}", "data.shard_tokens=50000", "data.val_tokens=30000",
                 "tokenizer.name=gpt2", f"tokenizer.files_dir={bpe_dir}"] + [f"{k}={v}" for k, v in extra.items()]
    return load_config("configs/demo.yaml", overrides)


def shard_bytes(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def train_shards(prepared, bpe_dir):
    from gpt2.shards import open_split
    from gpt2.tokenizer import get_tokenizer

    return open_split(str(prepared), "train", get_tokenizer("gpt2", str(bpe_dir)).fingerprint)
