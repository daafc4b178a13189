"""`train.micro_batch: auto`: the largest exact micro-batch that fits, chosen at start-up.

Candidates are the micro-batches that keep the global batch exact at this world size, up to
`train.max_micro_batch` (`exact_micro_batches`, which the launchers use too). At an unchanged world
size the checkpoint's choice is reused, so a resume stays bitwise; at another one it is chosen
again, so an elastic resume stays exact. On CUDA, rank 0 probes the candidates largest first
(forward and backward of the uncompiled model, out-of-memory caught and memory freed between
tries) and keeps the first whose peak, plus AdamW's state, leaves MEMORY_MARGIN of the device
free; compilation happens once, later, at the chosen size. Elsewhere there is no probe: the
largest candidate is taken, so on CPU `train.max_micro_batch` bounds it.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from gpt2 import distributed
from gpt2.checkpoint import ResumePoint
from gpt2.config import Config, ConfigError, exact_micro_batches
from gpt2.model import build_model
from gpt2.runtime import autocast_for, resolve_dtype

MEMORY_MARGIN = 0.10  # of the device's memory, left free for the allocator's fragmentation and NCCL


def choose_micro_batch(cfg: Config, dist: distributed.Dist, resume: ResumePoint | None) -> tuple[int, str]:
    """(micro-batch, why) for `train.micro_batch: auto`, given the checkpoint this start resumes
    from (`find_resume_point`); the same on every rank."""
    t = cfg.train
    candidates = exact_micro_batches(t.total_batch_tokens, t.seq_len, [dist.world_size], t.max_micro_batch)
    if not candidates:
        raise ConfigError(f"no micro-batch up to train.max_micro_batch={t.max_micro_batch} keeps "
                          f"train.total_batch_tokens={t.total_batch_tokens} exact at world size {dist.world_size}")
    rows = t.total_batch_tokens // t.seq_len // dist.world_size
    stored = stored_choice(resume) if resume is not None else None
    if stored is not None and stored[1] == dist.world_size and stored[0] in candidates:
        return stored[0], f"the checkpoint's, written at the same world size ({dist.world_size})"
    why = (f"the largest of {candidates} that divides the {rows} rows each rank reads per step "
           f"(train.max_micro_batch={t.max_micro_batch})")
    if dist.device.type != "cuda":
        return candidates[0], why + f"; no memory probe on {dist.device.type}"
    _, choice = distributed.decided_on_rank_0(lambda: probe_on_device(cfg, dist, candidates), dist.is_main,
                                              "choosing the micro-batch: waiting for rank 0")
    gc.collect()
    torch.cuda.empty_cache()
    return choice  # type: ignore[return-value]


def stored_choice(resume: ResumePoint) -> tuple[int, int] | None:
    """(micro-batch, world size) that the checkpoint `resume` was written with, if it says."""
    meta = resume.meta
    mb = meta.get("micro_batch", meta.get("config", {}).get("train", {}).get("micro_batch"))
    world = meta.get("world_size")
    return (mb, world) if isinstance(mb, int) and isinstance(world, int) else None


def probe(candidates: list[int], peak_bytes: Callable[[int], int], budget_bytes: int) -> tuple[int, str]:
    """The largest candidate whose forward and backward (`peak_bytes(mb)`, which may run out of
    memory) stays within `budget_bytes`; memory is freed after every try."""
    tried = []
    for mb in candidates:
        try:
            peak = peak_bytes(mb)
        except torch.cuda.OutOfMemoryError:
            peak = None
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if peak is not None and peak <= budget_bytes:
            return mb, (f"the largest exact micro-batch that fits: peak {peak / 2**30:.1f} GiB of a "
                        f"{budget_bytes / 2**30:.1f} GiB budget (tried {tried + [mb]})")
        tried.append(mb)
    raise ConfigError(f"not even micro-batch {candidates[-1]} fits in memory (tried {tried}); use a smaller "
                      "model, a shorter train.seq_len or more GPUs")


def probe_on_device(cfg: Config, dist: distributed.Dist, candidates: list[int]) -> tuple[int, str]:
    """`probe` with the configured model on this GPU, without compilation."""
    device = dist.device
    autocast = autocast_for(device, resolve_dtype(cfg.train.dtype, device))
    model = build_model(cfg.model).to(device)
    optimizer_bytes = 2 * sum(p.numel() * p.element_size() for p in model.parameters())  # AdamW moments
    budget = int(torch.cuda.get_device_properties(device).total_memory * (1 - MEMORY_MARGIN)) - optimizer_bytes

    def peak_bytes(mb: int) -> int:
        torch.cuda.reset_peak_memory_stats(device)
        x = torch.randint(0, cfg.model.vocab_size, (mb, cfg.train.seq_len), device=device)
        try:
            with autocast:
                _, loss = model(x, x)
            loss.backward()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device)
        finally:
            model.zero_grad(set_to_none=True)

    return probe(candidates, peak_bytes, budget)  # the probe's model is freed when this returns
