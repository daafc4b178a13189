"""Loading a model for inference, shared by the CLIs: a checkpoint, a Hugging Face directory or a hub name."""

from __future__ import annotations

from typing import Any

from gpt2.checkpoint import is_checkpoint
from gpt2.checkpoint.weights import model_from_checkpoint
from gpt2.model import GPT
from gpt2.tokenizer import Tokenizer, get_tokenizer


def load_model(source: str, storage_options: dict[str, Any] | None = None,
               tokenizer_dir: str | None = None) -> tuple[GPT, Tokenizer]:
    """(model, tokenizer) from a checkpoint (dir or root, any fsspec URL), a local HF directory, or a hub name."""
    if is_checkpoint(source, storage_options):
        return model_from_checkpoint(source, storage_options, tokenizer_dir)
    return GPT.from_pretrained(source), get_tokenizer("gpt2", tokenizer_dir)
