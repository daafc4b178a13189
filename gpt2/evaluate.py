"""`python -m gpt2.evaluate SOURCE`: HellaSwag acc and acc_norm of a checkpoint or a Hugging Face model."""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from gpt2 import hellaswag, logs
from gpt2.errors import Gpt2Error, exit_code
from gpt2.loading import load_model
from gpt2.runtime import autocast_for

log = logging.getLogger("gpt2.evaluate")  # also when run as __main__


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gpt2.evaluate", description="HellaSwag acc and acc_norm of a model.")
    p.add_argument("source", help="checkpoint dir/URL, Hugging Face directory, or hub name")
    p.add_argument("--hellaswag", default=None, help="local hellaswag_val.jsonl (default: download and cache)")
    p.add_argument("--limit", type=int, default=0, help="only the first N examples")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokenizer-dir", default=None, help="encoder.json + vocab.bpe for offline use")
    args = p.parse_args(argv)
    logs.setup()
    try:
        model, tokenizer = load_model(args.source, tokenizer_dir=args.tokenizer_dir)
        path = hellaswag.data_path(args.hellaswag)
    except Gpt2Error as err:
        log.error("cannot evaluate %s: %s", args.source, err)
        sys.exit(exit_code(err))
    device = torch.device(args.device)
    model.to(device).eval()
    autocast = autocast_for(device, torch.bfloat16)
    result = hellaswag.score(model, tokenizer, path, device, limit=args.limit,
                                max_len=model.config.block_size, autocast=autocast)
    print(f"HellaSwag: {result.total} examples, acc {result.acc:.4f}, acc_norm {result.acc_norm:.4f}")


if __name__ == "__main__":
    main()
