"""The evaluation schedule: what runs at which step, and HellaSwag disabled once when unavailable."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from gpt2.config import load_config
from gpt2.distributed import Dist
from gpt2.evaluator import Evaluator
from gpt2.model import GPT


class Recorder:
    """Stands in for the metrics logger."""

    def __init__(self):
        self.scalar_tags, self.texts = [], []

    def scalars(self, step, values):
        self.scalar_tags += [(step, tag) for tag in values]

    def text(self, tag, text, step):
        self.texts.append((step, tag))


class FakeVal:
    def batch_ids(self, rank, world_size):
        return range(rank, 2, world_size)

    def batch(self, k, device):
        x = torch.randint(0, 257, (2, 8))
        return x, x


def evaluator(tmp_path, **overrides):
    cfg = load_config("configs/demo.yaml", [f"{k}={v}" for k, v in {
        "model.n_layer": 1, "model.n_embd": 16, "model.n_head": 2,
        "eval.val_every": 4, "eval.hellaswag_every": 6, "eval.sample_every": 3, "eval.sample_tokens": 4,
        "eval.num_samples": 2, "eval.hellaswag_path": str(tmp_path / "absent.jsonl"), **overrides}.items()])
    model = GPT(cfg.model)
    metrics = Recorder()
    dist = Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    return Evaluator(cfg, dist, model, model, FakeVal(), nullcontext(), metrics), metrics


def test_each_evaluation_runs_on_its_own_schedule_and_all_after_the_last_step(tmp_path, caplog):
    ev, metrics = evaluator(tmp_path)
    for step in range(10):
        ev.run_due(step)
    ev.run_due(10, last=True)
    val_steps = [s for s, tag in metrics.scalar_tags if tag == "val/loss"]
    sample_steps = [s for s, tag in metrics.texts if tag == "samples"]
    assert val_steps == [0, 4, 8, 10]
    assert sample_steps == [3, 6, 9, 10]  # never at step 0: an untrained model's samples say nothing
    warnings = [r for r in caplog.records if "HellaSwag disabled" in r.getMessage()]
    assert len(warnings) == 1 and "absent.jsonl" in warnings[0].getMessage()  # once, not at every due step
    assert warnings[0].levelname == "WARNING"


def test_zero_disables_an_evaluation(tmp_path, caplog):
    ev, metrics = evaluator(tmp_path, **{"eval.val_every": 0, "eval.sample_every": 0, "eval.hellaswag_every": 0})
    for step in range(5):
        ev.run_due(step)
    ev.run_due(5, last=True)
    assert metrics.scalar_tags == [] and metrics.texts == [] and caplog.records == []
