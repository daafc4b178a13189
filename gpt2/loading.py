"""Loading a model for inference, shared by the CLIs: a checkpoint, a Hugging Face directory or a hub name."""

from __future__ import annotations

from typing import Any

from gpt2.checkpoint import is_checkpoint, load_state, read_meta, resolve_checkpoint
from gpt2.config import from_dict
from gpt2.model import GPT, build_model
from gpt2.tokenizer import Tokenizer, get_tokenizer


def load_model(source: str, storage_options: dict[str, Any] | None = None,
               tokenizer_dir: str | None = None) -> tuple[GPT, Tokenizer]:
    """(model, tokenizer) from a checkpoint (dir or root, any fsspec URL), a local HF directory, or a hub name."""
    if is_checkpoint(source, storage_options):
        url = resolve_checkpoint(source, storage_options)
        cfg = from_dict(read_meta(url, storage_options)["config"])
        cfg.model.init_from = None  # the checkpoint holds the weights
        model = build_model(cfg.model)
        model.load_state_dict(load_state(url, storage_options)["model"])
        return model, get_tokenizer(cfg.tokenizer.name, tokenizer_dir or cfg.tokenizer.files_dir)
    return GPT.from_pretrained(source), get_tokenizer("gpt2", tokenizer_dir)
