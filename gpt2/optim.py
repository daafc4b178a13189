"""AdamW with decay only on >= 2-D weights, the warmup + cosine learning-rate schedule, and the
guard that skips non-finite updates and stops a diverging run."""

from __future__ import annotations

import inspect
import logging
import math

import torch

from gpt2.config import OptimConfig
from gpt2.errors import TrainingDiverged

log = logging.getLogger(__name__)



def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW; embeddings and matrices decay, biases and LayerNorm gains do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = cfg.fused and device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None
    )


def lr_at(step: int, cfg: OptimConfig, max_steps: int, phase: tuple[int, float] | None = None) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `max_steps`.

    `phase` (start step, start lr): from that step on, a cosine decay from the start lr to `min_lr`
    at `max_steps` instead (optim.on_schedule_change=continue: a resume with a longer run, no jump).
    """
    if phase is not None and step >= phase[0]:
        start, start_lr = phase
        if step >= max_steps:
            return cfg.min_lr
        progress = (step - start) / max(1, max_steps - start)
        return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (start_lr - cfg.min_lr)
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= max_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


class NonFiniteGuard:
    """Decides, from the global gradient norm, whether an optimizer step may update the weights.

    A NaN or infinite norm skips the update (the weights stay as they were, as with a loss scaler),
    so no NaN ever reaches the weights or a checkpoint; `limit` such steps in a row raise
    TrainingDiverged. The norm is the same on every rank after DDP's all-reduce, so every rank
    decides the same.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.skipped: list[int] = []

    def allows(self, step: int, grad_norm: float) -> bool:
        if math.isfinite(grad_norm):
            self.skipped = []
            return True
        self.skipped.append(step)
        if len(self.skipped) >= self.limit:
            raise TrainingDiverged(
                f"training diverged: the gradient norm was {grad_norm} at {len(self.skipped)} steps in a row "
                f"(steps {self.skipped[0]}-{step}; their updates were skipped, so the weights and checkpoints hold "
                "no NaN). Lower optim.lr, check optim.eps and optim.grad_clip, then resume from the last "
                "checkpoint (or start over with checkpoint.resume=never)")
        log.warning("step %d: gradient norm %s; update skipped (%d of %d in a row before the run stops)",
                    step, grad_norm, len(self.skipped), self.limit)
        return False
