"""torch.compile health on CPU: one graph with no break, no recompilation after the first steps across
evaluation, sampling, a checkpoint save and a resume, and losses that match eager."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_overrides

from gpt2 import distributed
from gpt2.config import load_config
from gpt2.train import Trainer

# losses of compiled and eager runs agree to this relative tolerance (fp32 on CPU; inductor fuses and
# reorders some reductions, so not bitwise)
REL_TOL = 1e-4


def fit(tmp, compile: bool, **extra) -> tuple[dict[int, float], list[tuple[int, int]]]:
    """Train in this process; returns the loss per step and, per step, dynamo's unique-graph count."""
    from torch._dynamo.utils import counters

    cfg = load_config("configs/demo.yaml", tiny_overrides(tmp, **{
        "train.compile": str(compile).lower(), "eval.val_every": 3, "eval.sample_every": 3, "eval.sample_tokens": 4,
        "checkpoint.every": 3, **extra}))
    dist = distributed.init("cpu")
    trainer = Trainer.build(cfg, dist)
    graphs: list[tuple[int, int]] = []
    original = trainer.train_step

    def counted(step):
        out = original(step)
        graphs.append((step, counters["stats"]["unique_graphs"]))
        return out

    trainer.train_step = counted
    try:
        assert trainer.fit() == 0
    finally:
        trainer.close()
    import json

    losses = {}
    for line in (tmp / "tb" / "steps.jsonl").read_text().splitlines():
        r = json.loads(line)
        losses[r["step"]] = r["loss"]
    return losses, graphs


@pytest.mark.slow
def test_compiled_training_compiles_once_and_matches_eager(tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, _ = fit(tmp_path / "eager", compile=False, **{"train.max_steps": 8})
    compiled, graphs = fit(tmp_path / "compiled", compile=True, **{"train.max_steps": 8, "train.stop_at_step": 5})
    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
    after_warm_up = {n for step, n in graphs if step >= 1}
    # steps 1..4 cross val loss (step 3, no_grad: its own graph, compiled at step 0), samples and a save
    assert len(after_warm_up) == 1, graphs
    # the resume: a fresh process would compile again; the resumed steps add no graph beyond that
    torch._dynamo.reset()
    counters.clear()
    resumed, graphs = fit(tmp_path / "compiled", compile=True, **{"train.max_steps": 8})
    assert dict(counters["graph_break"]) == {} and len({n for step, n in graphs if step >= 6}) == 1, graphs
    compiled.update(resumed)
    for step in range(8):
        assert math.isclose(compiled[step], eager[step], rel_tol=REL_TOL), (step, compiled[step], eager[step])


@pytest.mark.slow
def test_a_restart_on_another_node_compiles_from_the_stored_artifacts(tmp_path):
    """A compiled run stores its compile artifacts with its checkpoints; a restart on a node whose own
    caches are empty (another TORCHINDUCTOR_CACHE_DIR) loads them and compiles nothing from scratch,
    with the losses an uninterrupted compiled run has."""
    import re

    from helpers.runs import losses, train

    extra = {"train.compile": "true", "train.max_steps": 6, "checkpoint.every": 3, "eval.val_every": 3}
    first = train(tmp_path, extra=dict(extra, **{"train.stop_at_step": 3}),
                  env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "node-a")})
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-3000:]
    assert "stored compile artifacts at" in out and "compile-cache/" in out, out[-3000:]
    hits, misses = map(int, re.search(r"compile cache: (\d+) hits, (\d+) misses", out).groups())
    assert misses > 0, out[-2000:]  # a cold node: this is what the restart must not repeat

    second = train(tmp_path, extra=extra, env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "node-b")})
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert "loaded compile artifacts from" in out, out[-3000:]
    hits, misses = map(int, re.search(r"compile cache: (\d+) hits, (\d+) misses, from stored artifacts",
                                      out).groups())
    assert hits > 0 and misses == 0, out[-2000:]
    assert len(losses(tmp_path)) == 6
