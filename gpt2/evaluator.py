"""What a run measures besides the training loss, and when: val loss, HellaSwag, samples."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from gpt2 import hellaswag
from gpt2.config import Config
from gpt2.data import ValLoader
from gpt2.distributed import Dist, all_gather_object, all_reduce_sum, wait_for_all
from gpt2.metrics import MetricsLogger
from gpt2.model import GPT
from gpt2.sample import sample_texts
from gpt2.tokenizer import Tokenizer, get_tokenizer
from gpt2.watchdog import beat, phase

log = logging.getLogger(__name__)


@torch.no_grad()
def mean_val_loss(model: torch.nn.Module, loader: ValLoader, device: torch.device, rank: int, world_size: int,
             autocast: AbstractContextManager | None = None) -> float:
    """Mean loss over the fixed validation batches, split across ranks and all-reduced."""
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for k in loader.batch_ids(rank, world_size):
        beat()
        x, y = loader.batch(k, device)
        with autocast or nullcontext():
            _, loss = model(x, y)
        sums += torch.stack([loss.detach().double(), torch.ones((), dtype=torch.float64, device=device)])
    model.train()
    all_reduce_sum(sums)
    return float(sums[0] / sums[1])


class Evaluator:
    """Runs each evaluation on its schedule (`eval.*_every`, and after the last step).

    `model` is what trains (maybe compiled or DDP-wrapped) and gives the val loss; HellaSwag and
    sampling use the plain module, whose varying input lengths compiled graphs dislike.
    """

    def __init__(self, cfg: Config, dist: Dist, model: torch.nn.Module, raw_model: GPT,
                 val_loader: ValLoader | None, autocast: AbstractContextManager, metrics: MetricsLogger,
                 stopping: Callable[[], bool] = lambda: False):
        """`stopping()`: whether this process was told to stop (a signal), for its waits for the other ranks."""
        self.cfg, self.e, self.dist, self.stopping = cfg, cfg.eval, dist, stopping
        self.model, self.raw_model, self.val_loader = model, raw_model, val_loader
        self.autocast, self.metrics = autocast, metrics
        self.tokenizer: Tokenizer | None = None
        if self.e.sample_every or self.e.hellaswag_every:
            # missing tokenizer files fail now, not at the first sample
            self.tokenizer = get_tokenizer(cfg.tokenizer.name, cfg.tokenizer.files_dir)
        self._hellaswag_path: Path | None = None
        self._hellaswag_checked = False
        self.seconds = 0.0  # spent evaluating in this attempt (for goodput)

    @torch.no_grad()
    def warm_up(self) -> None:
        """Compile the evaluation's forward now, with the training step, rather than in the first
        evaluation after a start (whose limit is the step-based one)."""
        if self.val_loader is None or not self.e.val_every:
            return
        x = torch.zeros((self.val_loader.micro_batch, self.val_loader.row_tokens - 1), dtype=torch.long,
                        device=self.dist.device)
        self.model.eval()
        with self.autocast:
            self.model(x, x)
        self.model.train()

    def run_due(self, step: int, last: bool = False) -> None:
        """Every evaluation due at `step` (all of them when `last`)."""
        t0 = time.monotonic()
        try:
            self._run_due(step, last)
        finally:
            self.seconds += time.monotonic() - t0

    def _run_due(self, step: int, last: bool) -> None:
        e = self.e

        def due(every: int) -> bool:
            return bool(every) and (step % every == 0 or last)

        if self.val_loader is not None and due(e.val_every):
            with phase("evaluation: val loss"):
                self.val_loss(step)
        if due(e.hellaswag_every):
            with phase("evaluation: HellaSwag"):  # its first download too
                if self.hellaswag_path() is not None:
                    self.hellaswag(step)
        if step > 0 and due(e.sample_every):
            with phase("evaluation: samples"):  # rank 0 beats per token (the plain module: nothing to compile)
                self.samples(step)
                wait_for_all(self.stopping)  # the other ranks wait for rank 0's samples here, while every rank lives

    def val_loss(self, step: int) -> None:
        loss = mean_val_loss(self.model, self.val_loader, self.dist.device, self.dist.rank,  # type: ignore[arg-type]
                        self.dist.world_size, self.autocast)
        log.info(f"step {step}: val loss {loss:.4f}")
        self.metrics.scalars(step, {"val/loss": loss})

    def hellaswag(self, step: int) -> None:
        t0 = time.monotonic()
        r = hellaswag.score(self.raw_model, self.tokenizer, self.hellaswag_path(),  # type: ignore[arg-type]
                            self.dist.device, self.dist.rank, self.dist.world_size, self.e.hellaswag_limit,
                            self.cfg.model.block_size, self.autocast)
        log.info(f"step {step}: HellaSwag acc_norm {r.correct_norm}/{r.total} = {r.acc_norm:.4f} "
                 f"({time.monotonic() - t0:.1f} s)")
        self.metrics.scalars(step, {"eval/hellaswag_acc_norm": r.acc_norm, "eval/hellaswag_acc": r.acc})

    def samples(self, step: int) -> None:
        if not self.dist.is_main:
            return
        e = self.e
        texts = sample_texts(self.raw_model, self.tokenizer, e.sample_prompt, e.num_samples,  # type: ignore[arg-type]
                             e.sample_tokens, e.top_k, seed=self.cfg.train.seed + step, device=self.dist.device,
                             on_token=beat)
        for i, t in enumerate(texts):
            log.info(f"step {step} sample {i}: {t!r}")
        self.metrics.text("samples", "\n\n".join(f"{i}: {t}" for i, t in enumerate(texts)), step)

    def hellaswag_path(self) -> Path | None:
        """The HellaSwag file, found (or downloaded) once; None on every rank, with a warning, when a
        rank cannot have it: each rank scores its share, so a rank without the file would leave the
        others waiting in the evaluation's all-reduce."""
        if not self._hellaswag_checked:
            self._hellaswag_checked = True
            why = None
            try:  # a connection attempt cannot report progress (each has its timeout): the ceiling
                with phase("evaluation: HellaSwag: finding or downloading the file", ceiling=True):
                    self._hellaswag_path = hellaswag.data_path(self.e.hellaswag_path)
            except hellaswag.HellaSwagUnavailable as err:
                why = str(err)
            wait_for_all(self.stopping)  # for a rank still downloading it, while every rank lives
            lacking = [f"rank {r}: {w}" for r, w in enumerate(all_gather_object(why)) if w]
            if lacking:
                log.warning(f"HellaSwag disabled for this run ({'; '.join(lacking)})")
                self._hellaswag_path = None
        return self._hellaswag_path
