"""`train.micro_batch: auto`: the memory probe (with an injected limit) and the choice at start-up."""

from __future__ import annotations

import pytest
import torch

from gpt2.checkpoint import CheckpointStore, find_resume_point, state_path
from gpt2.config import ConfigError, load_config
from gpt2.distributed import Dist
from gpt2.microbatch import choose_micro_batch, probe

GIB = 2**30


def limited(limit_rows: int, tried: list[int]):
    """A stand-in for forward+backward on a GPU that holds `limit_rows` rows: 1 GiB per row, OOM above."""
    def peak_bytes(mb: int) -> int:
        tried.append(mb)
        if mb > limit_rows:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return mb * GIB
    return peak_bytes


def test_the_largest_candidate_that_fits_is_chosen_largest_first():
    tried: list[int] = []
    mb, why = probe([30, 15, 10, 6, 5, 3, 2, 1], limited(12, tried), budget_bytes=64 * GIB)
    assert mb == 10 and tried == [30, 15, 10] and "tried [30, 15, 10]" in why


def test_the_budget_leaves_a_margin_even_without_an_out_of_memory_error():
    tried: list[int] = []
    mb, _ = probe([30, 15, 10, 6], limited(100, tried), budget_bytes=8 * GIB)
    assert mb == 6 and tried == [30, 15, 10, 6]


def test_nothing_fits_is_a_config_error_naming_what_to_change():
    with pytest.raises(ConfigError, match="not even micro-batch 1 fits.*smaller model"):
        probe([2, 1], limited(0, []), budget_bytes=64 * GIB)


def cpu(world_size: int = 1) -> Dist:
    return Dist(rank=0, local_rank=0, world_size=world_size, device=torch.device("cpu"))


def test_on_cpu_the_largest_exact_candidate_up_to_the_cap(tmp_path):
    cfg = load_config("configs/gpt2-124m.yaml", [f"checkpoint.dir={tmp_path}", "train.max_micro_batch=16"])
    mb, why = choose_micro_batch(cfg, cpu(8), None)
    assert mb == 15 and "60 rows each rank reads" in why and "no memory probe on cpu" in why


def test_an_unchanged_world_size_reuses_the_checkpoints_choice(tmp_path):
    from gpt2.config import to_dict

    written = load_config("configs/gpt2-124m.yaml", [f"checkpoint.dir={tmp_path}", "train.micro_batch=6"])
    CheckpointStore(str(tmp_path)).write({"progress": {"step": 5}}, 5, {"world_size": 8, "config": to_dict(written)})
    cfg = load_config("configs/gpt2-124m.yaml", [f"checkpoint.dir={tmp_path}"])
    resume = find_resume_point(cfg.checkpoint, is_writer=True)
    assert choose_micro_batch(cfg, cpu(8), resume) == (6, "the checkpoint's, written at the same world size (8)")
    assert choose_micro_batch(cfg, cpu(16), resume)[0] == 30  # another world size: chosen again


def test_the_choice_follows_the_checkpoint_that_is_resumed_not_the_newest_marker(tmp_path):
    """The newest checkpoint (micro-batch 10) is damaged: the resume falls back to the previous one
    (micro-batch 6), and so does the micro-batch choice: one answer to "what would a resume load"."""
    store = CheckpointStore(str(tmp_path), keep=3)
    store.write({"progress": {"step": 4}}, 4, {"world_size": 8, "micro_batch": 6})
    store.write({"progress": {"step": 6}}, 6, {"world_size": 8, "micro_batch": 10})
    with open(state_path(str(tmp_path / "step-00000006")), "r+b") as f:
        f.truncate(10)
    cfg = load_config("configs/gpt2-124m.yaml", [f"checkpoint.dir={tmp_path}"])
    resume = find_resume_point(cfg.checkpoint, is_writer=True)
    assert resume is not None and resume.url.endswith("step-00000004") and resume.state["progress"]["step"] == 4
    assert choose_micro_batch(cfg, cpu(8), resume) == (6, "the checkpoint's, written at the same world size (8)")
