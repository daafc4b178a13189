"""Sampling text from a model, and `python -m gpt2.sample SOURCE`.

SOURCE is a checkpoint (a step directory or a checkpoint root, any fsspec URL), a local
Hugging Face GPT-2 directory, or a hub name such as gpt2 (needs network).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

import torch

from gpt2 import logs
from gpt2.errors import Gpt2Error, exit_code
from gpt2.loading import load_model
from gpt2.model import GPT, generate
from gpt2.tokenizer import Tokenizer

log = logging.getLogger("gpt2.sample")  # also when run as __main__


def sample_texts(model: GPT, tokenizer: Tokenizer, prompt: str, num_samples: int, max_new_tokens: int,
                 top_k: int, seed: int, device: torch.device | str = "cpu",
                 on_token: Callable[[], None] | None = None) -> list[str]:
    """`num_samples` continuations of `prompt`, reproducible for a given seed; `on_token()` after
    each new token (progress)."""
    ids = tokenizer.encode(prompt) or [tokenizer.eot]
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    out = generate(model, idx, max_new_tokens, top_k=top_k, generator=gen, on_token=on_token)
    return [tokenizer.decode(row.tolist()) for row in out]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gpt2.sample", description=__doc__.split("\n")[0])
    p.add_argument("source", help="checkpoint dir/URL, Hugging Face directory, or hub name")
    p.add_argument("--prompt", default="Hello this is AI model,")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32, help="new tokens per sample")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokenizer-dir", default=None, help="encoder.json + vocab.bpe for offline use")
    args = p.parse_args(argv)
    logs.setup()
    try:
        model, tokenizer = load_model(args.source, tokenizer_dir=args.tokenizer_dir)
    except Gpt2Error as err:
        log.error("cannot load %s: %s", args.source, err)
        sys.exit(exit_code(err))
    model.to(args.device)
    for i, text in enumerate(sample_texts(model, tokenizer, args.prompt, args.num_samples, args.tokens,
                                          args.top_k, args.seed, args.device)):
        print(f"sample {i}: {text}")


if __name__ == "__main__":
    main()
