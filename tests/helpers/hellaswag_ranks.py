"""Run under torchrun: HellaSwag on a tiny seeded model across ranks; rank 0 prints the counts."""

from __future__ import annotations

import json
import sys

import torch


def tiny_model():
    from gpt2.config import ModelConfig
    from gpt2.model import GPT

    torch.manual_seed(0)
    return GPT(ModelConfig(block_size=128, vocab_size=257, n_layer=1, n_head=2, n_embd=32)).eval()


def main() -> None:
    from gpt2 import distributed, hellaswag
    from gpt2.tokenizer import ByteTokenizer

    d = distributed.init("cpu")
    r = hellaswag.score(tiny_model(), ByteTokenizer(), sys.argv[1], d.device, d.rank, d.world_size,
                           limit=int(sys.argv[2]), max_len=128)
    if d.is_main:
        print(json.dumps([r.total, r.correct, r.correct_norm]))
    distributed.teardown()


if __name__ == "__main__":
    sys.path.insert(0, __import__("os").path.dirname(__file__) + "/../..")
    main()
