"""The optimizer's parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from gpt2.config import ModelConfig, OptimConfig
from gpt2.model import GPT
from gpt2.optim import NonFiniteGuard, TrainingDiverged, build_optimizer, lr_at

SEED = OptimConfig()  # lr 6e-4 -> 6e-5, 715 warm-up steps


def test_warmup_is_linear_from_lr_over_warmup_to_lr():
    assert lr_at(0, SEED, 19_073) == pytest.approx(6e-4 / 715)
    assert lr_at(356, SEED, 19_073) == pytest.approx(6e-4 * 357 / 715)
    assert lr_at(714, SEED, 19_073) == pytest.approx(6e-4)


def test_cosine_decays_to_min_lr_at_max_steps_and_stays_there():
    assert lr_at(715, SEED, 19_073) == pytest.approx(6e-4)
    middle = 715 + (19_073 - 715) // 2
    assert lr_at(middle, SEED, 19_073) == pytest.approx(6e-5 + 0.5 * (6e-4 - 6e-5), rel=1e-3)
    assert lr_at(19_073, SEED, 19_073) == pytest.approx(6e-5)
    assert lr_at(30_000, SEED, 19_073) == pytest.approx(6e-5)
    values = [lr_at(s, SEED, 19_073) for s in range(715, 19_073, 97)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone after warm-up
    assert all(math.isfinite(v) for v in values)


def test_weight_decay_only_on_matrices_and_embeddings():
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()
    assert opt.defaults["betas"] == (0.9, 0.96) and opt.defaults["eps"] == 1e-8
    assert isinstance(opt, torch.optim.AdamW)


def test_non_finite_updates_are_skipped_and_a_run_that_stays_there_stops():
    guard = NonFiniteGuard(limit=3)
    assert guard.allows(0, 1.5)
    assert not guard.allows(1, float("nan")) and not guard.allows(2, float("inf"))
    assert guard.allows(3, 0.7)  # a transient spike: the count starts over
    assert not guard.allows(4, float("nan")) and not guard.allows(5, float("nan"))
    with pytest.raises(TrainingDiverged, match=r"3 steps in a row \(steps 4-6.*Lower optim.lr"):
        guard.allows(6, float("nan"))
