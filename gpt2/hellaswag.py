"""HellaSwag (validation split) scored as build-nanogpt and llm.c do.

Each example is a context and 4 endings. An ending's score is the model's loss over the ending's
tokens only: the summed loss gives `acc`, the mean per token gives `acc_norm` (lowest wins).
Examples are split across ranks (example i on rank i % world) and the counts all-reduced.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from gpt2.distributed import all_reduce_sum
from gpt2.errors import HellaSwagUnavailable
from gpt2.shards import default_cache_dir
from gpt2.tokenizer import Tokenizer
from gpt2.watchdog import beat

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
NUM_VAL_EXAMPLES = 10_042
DOWNLOAD_TIMEOUT_S = 30.0  # per connection attempt and per read



def download(url: str, path: Path, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Copy `url` to `path` in chunks, each one progress for the watchdog; a read that waits longer
    than `timeout_s` is an OSError."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response, open(path, "wb") as out:
        while chunk := response.read1(1 << 20):  # what has arrived: progress even on a slow link
            out.write(chunk)
            beat()


def data_path(configured: str | None) -> Path:
    """The validation file: the configured path, or a cached download of the official one."""
    if configured:
        path = Path(configured)
        if not path.is_file():
            raise HellaSwagUnavailable(f"eval.hellaswag_path={configured} does not exist")
        return path
    cached = default_cache_dir() / "hellaswag" / "hellaswag_val.jsonl"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        try:
            download(URL, tmp)
            os.replace(tmp, cached)
        except (OSError, http.client.HTTPException) as err:  # a cut-off transfer is an IncompleteRead
            raise HellaSwagUnavailable(
                f"cannot download HellaSwag ({err}); set eval.hellaswag_path to a local hellaswag_val.jsonl"
            ) from None
        finally:
            tmp.unlink(missing_ok=True)
    return cached


def iter_examples(path: Path, limit: int = 0) -> Iterator[dict]:
    with open(path) as f:
        for i, line in enumerate(f):
            if limit and i >= limit:
                return
            yield json.loads(line)


@dataclass
class Rendered:
    tokens: torch.Tensor  # (4, L) context + ending, right-padded
    mask: torch.Tensor  # (4, L) 1 on ending tokens
    label: int


def render(example: dict, tokenizer: Tokenizer, max_len: int) -> Rendered:
    """Token rows for the 4 candidate completions (left-truncated to `max_len`)."""
    ctx = tokenizer.encode(example["ctx"])
    rows, masks = [], []
    for ending in example["endings"]:
        end = tokenizer.encode(" " + ending)
        row, mask = ctx + end, [0] * len(ctx) + [1] * len(end)
        rows.append(row[-max_len:])
        masks.append(mask[-max_len:])
    width = max(len(r) for r in rows)
    tokens = torch.zeros((4, width), dtype=torch.long)
    mask = torch.zeros((4, width), dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, masks)):
        tokens[i, : len(r)] = torch.tensor(r)
        mask[i, : len(m)] = torch.tensor(m)
    return Rendered(tokens, mask, int(example["label"]))


@torch.no_grad()
def predict(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
    """(prediction by summed loss, prediction by mean loss) over the masked ending tokens."""
    shift_logits = logits[:, :-1, :].float()
    shift_tokens = tokens[:, 1:]
    losses = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_tokens.reshape(-1),
                             reduction="none").view(tokens.size(0), -1)
    shift_mask = mask[:, 1:].to(losses.dtype)
    summed = (losses * shift_mask).sum(dim=1)
    mean = summed / shift_mask.sum(dim=1)
    return int(summed.argmin()), int(mean.argmin())


@dataclass
class HellaSwagResult:
    total: int
    correct: int
    correct_norm: int

    @property
    def acc(self) -> float:
        return self.correct / max(self.total, 1)

    @property
    def acc_norm(self) -> float:
        return self.correct_norm / max(self.total, 1)


@torch.no_grad()
def score(
    model: Callable[[torch.Tensor], tuple[torch.Tensor, object]],
    tokenizer: Tokenizer,
    path: Path,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    limit: int = 0,
    max_len: int = 1024,
    autocast: AbstractContextManager | None = None,
) -> HellaSwagResult:
    """acc and acc_norm over the first `limit` examples (all if 0), split across ranks."""
    counts = torch.zeros(3, dtype=torch.long, device=device)
    for i, example in enumerate(iter_examples(path, limit)):
        beat()  # one example of this rank or the next: progress for the watchdog
        if i % world_size != rank:
            continue
        r = render(example, tokenizer, max_len)
        tokens, mask = r.tokens.to(device), r.mask.to(device)
        with autocast or nullcontext():
            logits, _ = model(tokens)
        pred, pred_norm = predict(logits, tokens, mask)
        counts += torch.tensor([1, int(pred == r.label), int(pred_norm == r.label)], device=device)
    all_reduce_sum(counts)
    total, correct, correct_norm = (int(c) for c in counts.tolist())
    return HellaSwagResult(total, correct, correct_norm)
