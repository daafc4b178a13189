"""A model (and its tokenizer) from a checkpoint, for inference and export."""

from __future__ import annotations

from typing import Any

from gpt2.checkpoint.store import load_checkpoint, resolve_checkpoint
from gpt2.config import from_dict
from gpt2.model import GPT, build_model
from gpt2.tokenizer import Tokenizer, get_tokenizer


def model_from_checkpoint(source: str, storage_options: dict[str, Any] | None = None,
                          tokenizer_dir: str | None = None) -> tuple[GPT, Tokenizer]:
    """(model, tokenizer) of a checkpoint directory, or of the newest one under a checkpoint root."""
    meta, state = load_checkpoint(resolve_checkpoint(source, storage_options), storage_options)
    cfg = from_dict(meta["config"])
    cfg.model.init_from = None  # the checkpoint holds the weights
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    return model, get_tokenizer(cfg.tokenizer.name, tokenizer_dir or cfg.tokenizer.files_dir)
