"""MFU (the FLOP count and the device peaks) and the metrics logger's channels."""

from __future__ import annotations

import json

import pytest
import torch

from gpt2.metrics import MetricsLogger, StepRecord, device_peak_flops, mfu
from gpt2.model import flops_per_token
from gpt2.storage import StorageError

# ---- MFU ----------------------------------------------------------------------------------------------


def test_mfu_formula_for_the_124m_config():
    f = flops_per_token(124_439_808, n_layer=12, n_embd=768, seq_len=1024)
    assert f == 6 * 124_439_808 + 6 * 12 * 768 * 1024 == 803_261_952
    # 616k tokens/s on one H100 SXM (989.4 TFLOP/s bf16) is ~50% MFU
    assert abs(mfu(616_000, f, 989.4e12, 1) - 0.5001) < 1e-3
    assert abs(mfu(8 * 616_000, f, 989.4e12, 8) - 0.5001) < 1e-3
    assert device_peak_flops(torch.device("cpu"), torch.float32) == (None, "cpu")
    assert mfu(1000.0, f, None, 1) is None


# ---- the metrics logger --------------------------------------------------------------------------------


def record(step: int, loss: float = 3.0) -> StepRecord:
    return StepRecord(step=step, loss=loss, lr=1e-3, grad_norm=0.5, step_time_ms=100.0, tokens_per_sec=1000.0,
                      mfu=None, batch_hash=42, world_size=1)


def test_logger_writes_jsonl_tensorboard_and_the_console_line(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    m = MetricsLogger(str(tmp_path), enabled=True, max_steps=4, log_every=2)
    for s in range(4):
        m.step(record(s, loss=3.0 - s / 10))
    m.scalars(3, {"val/loss": 2.5, "missing": None})
    m.text("samples", "hello", 3)
    m.close()
    lines = [json.loads(x) for x in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2, 3] and lines[1]["loss"] == 2.9  # full precision
    console = capsys.readouterr().out
    assert "step      0/4 | loss 3.000000" in console and "step      2/4" in console
    assert "step      3/4" in console and "step      1/4" not in console  # every 2 steps, and the last
    ea = EventAccumulator(str(tmp_path))
    ea.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_sec", "val/loss"} <= set(ea.Tags()["scalars"])
    assert "missing" not in ea.Tags()["scalars"] and "perf/mfu" not in ea.Tags()["scalars"]


def test_logger_off_rank_0_writes_nothing(tmp_path, capsys):
    m = MetricsLogger(str(tmp_path / "tb"), enabled=False, max_steps=4)
    m.step(record(0))
    m.scalars(0, {"x": 1.0})
    m.close()
    assert not (tmp_path / "tb").exists() and capsys.readouterr().out == ""


def test_a_logging_dir_under_a_file_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match="logging.dir .* cannot be created"):
        MetricsLogger(str(tmp_path / "file" / "tb"), enabled=True, max_steps=1)


def test_the_attempt_ledger_records_starts_and_ends_and_says_when_an_attempt_was_killed(tmp_path, caplog):
    from gpt2.metrics import KILLED, read_attempts

    first = MetricsLogger(str(tmp_path), enabled=True, max_steps=4)
    first.attempt_started(0, {"world_size": 2, "hosts": ["a", "b"]})
    first.close()  # ... and then it was SIGKILLed: no end record
    second = MetricsLogger(str(tmp_path), enabled=True, max_steps=4)
    second.attempt_started(3, {"world_size": 1, "resumed_from_step": 3})
    second.attempt_ended(4, 0, "finished: 4 steps")
    second.close()
    records = read_attempts((tmp_path / "attempts.jsonl").read_text())
    assert [(r["event"], r["attempt"]) for r in records] == [("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    assert records[1]["reason"] == KILLED and records[1]["inferred"] and records[1]["exit_code"] is None
    assert records[2]["resumed_from_step"] == 3 and records[3]["exit_code"] == 0
    assert "attempt 1 of this run" in caplog.text and "left no end record" in caplog.text
    assert not MetricsLogger(str(tmp_path / "off"), enabled=False, max_steps=4).attempt_started(0, {})


# ---- the crash-loop streak ----------------------------------------------------------------------------


def _attempt(n: int, job: str, resumed: int | None, exit_code: int | None, reason: str = "x") -> list[dict]:
    start = {"event": "start", "attempt": n, "job_id": job, "resumed_from_step": resumed, "generation": n}
    return [start] if exit_code == -1 else [start, {"event": "end", "attempt": n, "exit_code": exit_code,
                                                    "reason": reason}]


def test_failed_in_a_row_counts_only_failures_of_this_job_from_this_checkpoint():
    from gpt2.metrics import KILLED, failed_in_a_row

    ledger = (_attempt(1, "slurm:/7", None, 0, "finished")  # a finished attempt ends any streak
              + _attempt(2, "slurm:/7", 40, 201, "hung in phase train step")
              + _attempt(3, "slurm:/7", 40, None, KILLED)
              + _attempt(4, "slurm:/7", 40, -1))  # no end record yet: killed
    assert [a["attempt"] for a in failed_in_a_row(ledger, "slurm:/7", 40)] == [4, 3, 2]
    assert failed_in_a_row(ledger, "slurm:/8", 40) == []  # another submission counts afresh
    assert failed_in_a_row(ledger, "slurm:/7", 80) == []  # a new checkpoint since: progress
    preempted = ledger + _attempt(5, "slurm:/7", 40, 200, "preempted")
    assert failed_in_a_row(preempted, "slurm:/7", 40) == []
    superseded = ledger + _attempt(5, "slurm:/7", 40, None, "superseded by attempt 6: ...")
    assert failed_in_a_row(superseded, "slurm:/7", 40) == []
    scratch = _attempt(1, "k8s:ns/j", None, 1, "error") + _attempt(2, "k8s:ns/j", None, -1)
    assert len(failed_in_a_row(scratch, "k8s:ns/j", 0)) == 2  # from scratch is step 0
