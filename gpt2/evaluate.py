"""Evaluation: validation loss (during training) and `python -m gpt2.evaluate SOURCE` for HellaSwag."""

from __future__ import annotations

import argparse
from contextlib import AbstractContextManager, nullcontext

import torch

from gpt2 import hellaswag
from gpt2.data import ValLoader
from gpt2.distributed import all_reduce_sum


@torch.no_grad()
def val_loss(model: torch.nn.Module, loader: ValLoader, device: torch.device, rank: int, world_size: int,
             autocast: AbstractContextManager | None = None) -> float:
    """Mean loss over the fixed validation batches, split across ranks and all-reduced."""
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for k in loader.batch_ids(rank, world_size):
        x, y = loader.batch(k, device)
        with autocast or nullcontext():
            _, loss = model(x, y)
        sums += torch.stack([loss.detach().double(), torch.ones((), dtype=torch.float64, device=device)])
    model.train()
    all_reduce_sum(sums)
    return float(sums[0] / sums[1])


def main(argv: list[str] | None = None) -> None:
    from gpt2.checkpoint import load_model

    p = argparse.ArgumentParser(prog="python -m gpt2.evaluate", description="HellaSwag acc and acc_norm of a model.")
    p.add_argument("source", help="checkpoint dir/URL, Hugging Face directory, or hub name")
    p.add_argument("--hellaswag", default=None, help="local hellaswag_val.jsonl (default: download and cache)")
    p.add_argument("--limit", type=int, default=0, help="only the first N examples")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokenizer-dir", default=None, help="encoder.json + vocab.bpe for offline use")
    args = p.parse_args(argv)
    try:
        model, tokenizer = load_model(args.source, tokenizer_dir=args.tokenizer_dir)
        path = hellaswag.data_path(args.hellaswag)
    except Exception as err:
        raise SystemExit(f"error: {err}") from None
    device = torch.device(args.device)
    model.to(device).eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    result = hellaswag.evaluate(model, tokenizer, path, device, limit=args.limit,
                                max_len=model.config.block_size, autocast=autocast)
    print(f"HellaSwag: {result.total} examples, acc {result.acc:.4f}, acc_norm {result.acc_norm:.4f}")


if __name__ == "__main__":
    main()
