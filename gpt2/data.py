"""The data loader: which tokens a rank reads is a pure function of (step, micro step, rank, world).

The train split is one token stream cut into rows of `seq_len + 1` tokens (inputs and shifted
targets; rows never overlap, so no token is read twice in an epoch). Optimizer step `s` consumes
rows [s*R, (s+1)*R) with R = total_batch_tokens / seq_len; rank r takes its own contiguous
slice of R/world rows, and micro step m the m-th `micro_batch` rows of that slice. Hence:

* N ranks together read at step s exactly what 1 rank reads at step s;
* resuming at step s, at any world size, reads what an uninterrupted run would have read;
* rows wrap into the next epoch deterministically, optionally in a per-epoch permutation drawn
  from the seed (never from the rank), so all of the above still holds with shuffling.

A run whose global batch changed at a resume (train.allow_batch_change) counts from an origin:
step s reads rows from rows0 + (s - step0) * R on, where (step0, rows0) is the resume step and the
rows read before it, so the position continues by tokens seen.
"""

from __future__ import annotations

import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np
import torch

from gpt2.config import Config, grad_accum_steps
from gpt2.shards import DataError, ShardSet, open_split
from gpt2.tokenizer import tokenizer_class
from gpt2.watchdog import beat


@dataclass(frozen=True)
class Layout:
    """How a global batch is cut into ranks and micro-batches."""

    micro_batch: int
    seq_len: int
    total_batch_tokens: int
    world_size: int
    origin: tuple[int, int] = (0, 0)  # (step, rows read before it) where this batch size began

    def __post_init__(self) -> None:
        self.accum_steps  # noqa: B018 -- ConfigError now if the batch cannot be split evenly

    @property
    def rows_per_step(self) -> int:
        return self.total_batch_tokens // self.seq_len

    @property
    def accum_steps(self) -> int:
        return grad_accum_steps(self.total_batch_tokens, self.micro_batch, self.seq_len, self.world_size)

    def rows_before(self, step: int) -> int:
        """Rows of the train stream read by all steps before `step`."""
        step0, rows0 = self.origin
        return rows0 + (step - step0) * self.rows_per_step

    def offset_in_step(self, micro_step: int, rank: int) -> int:
        """Where a rank's micro-batch starts within its step's rows (the same at any world size)."""
        if not 0 <= micro_step < self.accum_steps:
            raise ValueError(f"micro_step {micro_step} out of range 0..{self.accum_steps - 1}")
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} out of range for world size {self.world_size}")
        return rank * self.accum_steps * self.micro_batch + micro_step * self.micro_batch

    def first_row(self, step: int, micro_step: int, rank: int) -> int:
        return self.rows_before(step) + self.offset_in_step(micro_step, rank)


class TrainLoader:
    """Micro-batches of the train split for one rank; holds no position of its own."""

    def __init__(self, shards: ShardSet, layout: Layout, rank: int, seed: int = 0, shuffle: bool = False):
        self.shards, self.layout, self.rank = shards, layout, rank
        self.seed, self.shuffle = seed, shuffle
        self.row_tokens = layout.seq_len + 1
        self.rows_per_epoch = shards.num_tokens // self.row_tokens
        if self.rows_per_epoch < layout.micro_batch:
            raise DataError(
                f"{shards.url}: the train split holds {shards.num_tokens:,} tokens, fewer than one micro-batch "
                f"({layout.micro_batch} x {self.row_tokens}); use more data or a smaller batch"
            )
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _row_offset(self, row: int) -> int:
        epoch, j = divmod(row, self.rows_per_epoch)
        if self.shuffle:
            if epoch != self._perm_epoch:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.rows_per_epoch)
                self._perm_epoch = epoch
            j = int(self._perm[j])
        return j * self.row_tokens

    def rows(self, step: int, micro_step: int) -> np.ndarray:
        """The (micro_batch, seq_len + 1) token rows this rank reads at (step, micro_step)."""
        first = self.layout.first_row(step, micro_step, self.rank)
        return np.stack(
            [self.shards.read(self._row_offset(first + i), self.row_tokens) for i in range(self.layout.micro_batch)]
        )

    def batch(self, step: int, micro_step: int, device: torch.device | str = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (micro_batch, seq_len) as int64 on `device`."""
        return to_device(self.rows(step, micro_step), device)

    def epoch_of(self, step: int) -> int:
        return self.layout.rows_before(step) // self.rows_per_epoch


class ReadAhead:
    """Reads the next micro-batch's rows in a thread while the current one computes."""

    def __init__(self, loader: TrainLoader):
        self.loader = loader
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="gpt2-data")
        self._next: tuple[tuple[int, int], Future] | None = None
        self._waited = 0.0

    def rows(self, step: int, micro_step: int) -> np.ndarray:
        """The same rows as `loader.rows(step, micro_step)`; starts reading the micro-batch after it."""
        key = (step, micro_step)
        rows = self._result(self._next[1]) if self._next and self._next[0] == key else self.loader.rows(*key)
        upcoming = (step, micro_step + 1) if micro_step + 1 < self.loader.layout.accum_steps else (step + 1, 0)
        self._next = (upcoming, self._pool.submit(self.loader.rows, *upcoming))
        return rows

    def _result(self, future: Future) -> np.ndarray:
        """Wait for the read-ahead; while it copies or verifies a shard, what that moves is progress
        (and not the step's own time)."""
        seen, polled = self.loader.shards.reader_progress(), time.monotonic()
        while True:
            try:
                return future.result(timeout=0.5)
            except FutureTimeout:
                now, progress = time.monotonic(), self.loader.shards.reader_progress()
                if progress is not None and progress != seen:
                    beat()
                    self._waited += now - polled
                seen, polled = progress, now

    def read_early(self, step: int) -> None:
        """Read the first micro-batch of `step` now, waiting (with progress) for its shard's copy."""
        key = (step, 0)
        self._next = (key, self._pool.submit(self.loader.rows, *key))
        self._result(self._next[1])

    def waited(self) -> float:
        """Seconds spent waiting for shard copies or checks since the last call (not the step's own time)."""
        waited, self._waited = self._waited, 0.0
        return waited

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def row_hash(rows: np.ndarray, first_position: int) -> int:
    """Position-aware checksum of batch rows; sums over ranks to the same value at any world size."""
    return sum(zlib.crc32(np.int64(first_position + i).tobytes() + row.tobytes()) for i, row in enumerate(rows))


class ValLoader:
    """A fixed list of validation micro-batches; batch k goes to rank k % world_size."""

    def __init__(self, shards: ShardSet, micro_batch: int, seq_len: int, num_batches: int):
        self.shards, self.micro_batch, self.row_tokens = shards, micro_batch, seq_len + 1
        available = shards.num_tokens // (self.row_tokens * micro_batch)
        if available < num_batches:
            raise DataError(
                f"{shards.url}: the val split holds {available} micro-batches of {micro_batch} x {self.row_tokens} "
                f"tokens, fewer than eval.val_batches={num_batches}; lower eval.val_batches"
            )
        self.num_batches = num_batches

    def batch_ids(self, rank: int, world_size: int) -> range:
        return range(rank, self.num_batches, world_size)

    def read_early(self, rank: int, world_size: int) -> None:
        """Read this rank's first batch now, which brings its shard here (with progress)."""
        for k in self.batch_ids(rank, world_size)[:1]:
            self.batch(k)

    def batch(self, k: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        start = k * self.micro_batch * self.row_tokens
        rows = self.shards.read(start, self.micro_batch * self.row_tokens).reshape(self.micro_batch, self.row_tokens)
        return to_device(rows, device)


def to_device(rows: np.ndarray, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(rows.astype(np.int64))
    x, y = t[:, :-1], t[:, 1:]
    if torch.device(device).type == "cuda":
        # pinned host memory makes the copy asynchronous with respect to the host
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.contiguous(), y.contiguous()


def build_loaders(cfg: Config, micro_batch: int, rank: int, world_size: int, origin: tuple[int, int] = (0, 0)
                  ) -> tuple[TrainLoader, ValLoader | None]:
    """Open and check the data for `cfg` (every problem a DataError before training starts)."""
    t = cfg.train
    layout = Layout(micro_batch, t.seq_len, t.total_batch_tokens, world_size, origin)
    common = dict(tokenizer_fingerprint=tokenizer_class(cfg.tokenizer.name).fingerprint,
                  storage_options=cfg.data.storage_options, cache_dir=cfg.data.cache_dir, min_tokens=t.seq_len + 1)
    train = open_split(cfg.data.dir, "train", **common)  # type: ignore[arg-type]
    loader = TrainLoader(train, layout, rank, seed=t.seed, shuffle=cfg.data.shuffle)
    val = None
    if cfg.eval.val_batches > 0:
        val_shards = open_split(cfg.data.dir, "val", **common)  # type: ignore[arg-type]
        val = ValLoader(val_shards, micro_batch, t.seq_len, cfg.eval.val_batches)
    return loader, val
