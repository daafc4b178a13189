"""The training loop: determinism, DDP equivalence, TensorBoard, HellaSwag, MFU, compile."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import run_cli, shared_file
from helpers.runs import losses, steps, train

from gpt2 import hellaswag
from gpt2.checkpoint import load_state
from gpt2.tokenizer import ByteTokenizer


def test_loss_decreases_and_two_runs_are_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        r = train(d, extra={"train.max_steps": 12})
        assert r.returncode == 0, r.stdout + r.stderr
    la, lb = losses(a), losses(b)
    assert len(la) == 12
    assert la == lb  # bitwise: same seed, same data, CPU
    assert la[-1] < la[0] - 0.5
    assert (a / "ckpt" / "step-00000012" / "COMMITTED").exists()


def test_ddp_two_processes_match_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    r1 = train(one, extra={"train.max_steps": 6})
    r2 = train(two, nproc=2, extra={"train.max_steps": 6})
    assert r1.returncode == 0, r1.stdout + r1.stderr
    assert r2.returncode == 0, r2.stdout + r2.stderr
    s1, s2 = steps(one), steps(two)
    assert [s2[s]["world_size"] for s in s2] == [2] * 6
    for s in range(6):
        assert s1[s]["batch_hash"] == s2[s]["batch_hash"]  # the same tokens
        assert math.isclose(s1[s]["loss"], s2[s]["loss"], rel_tol=1e-5), (s, s1[s]["loss"], s2[s]["loss"])
        assert math.isclose(s1[s]["grad_norm"], s2[s]["grad_norm"], rel_tol=1e-4)


def test_tensorboard_has_every_tag_and_a_restart_does_not_duplicate_steps(tmp_path):
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    hs = shared_file("hellaswag_val.jsonl")
    extra = {"train.max_steps": 8, "eval.hellaswag_every": 4, "eval.hellaswag_limit": 8,
             "eval.hellaswag_path": str(hs), "eval.sample_every": 4, "eval.sample_tokens": 8,
             "checkpoint.storage_options": "{secret_access_key: hush}"}
    r = train(tmp_path, extra=extra)
    assert r.returncode == 0, r.stdout + r.stderr
    # lose the last checkpoint, as if the job died after step 7 was logged: steps 4..7 run again
    shutil.rmtree(tmp_path / "ckpt" / "step-00000008")
    r = train(tmp_path, extra=extra)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout + r.stderr

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalar_tags = set(acc.Tags()["scalars"])
    for tag in ["train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_sec", "perf/step_time_ms",
                "val/loss", "eval/hellaswag_acc_norm", "perf/data_share", "train/micro_batch", "train/grad_accum"]:
        assert tag in scalar_tags, tag
    assert "perf/peak_memory_gib" not in scalar_tags  # CUDA only
    # throughput leaves out the two warm-up steps after each start (0-1, and 4-5 after the restart)
    assert [e.step for e in acc.Scalars("perf/tokens_per_sec")] == [2, 3, 6, 7]
    assert all(0 <= e.value <= 1 for e in acc.Scalars("perf/data_share"))
    assert [e.value for e in acc.Scalars("train/micro_batch")][-1] == 4
    assert "_hparams_/experiment" in acc.PluginTagToContent("hparams")  # the hparams plugin's row
    assert "custom_scalars__config__" in acc.Tags()["tensors"]  # train and val loss on one chart
    assert "perf/mfu" not in scalar_tags  # CPU: MFU unknown, never a made-up peak
    text_tags = set(acc.Tags()["tensors"])
    assert {"samples/text_summary", "config/text_summary"} <= text_tags
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "hush" not in config_text and "***" in config_text
    loss_steps = [e.step for e in acc.Scalars("train/loss")]
    assert loss_steps == list(range(8))


def test_console_line_has_the_step_metrics(tmp_path):
    r = train(tmp_path, extra={"train.max_steps": 2})
    line = next(l for l in r.stdout.splitlines() if l.startswith("step      1/2"))
    for part in ("loss ", "lr ", "norm ", " ms", "tok/s", "MFU n/a"):
        assert part in line
    assert "MFU unknown (no known peak FLOP/s for this device)" in r.stdout


# ---- HellaSwag --------------------------------------------------------------------------------------


def test_hellaswag_same_counts_on_one_and_two_ranks(tmp_path):
    path = shared_file("hellaswag_val.jsonl")
    result = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                      "tests/helpers/hellaswag_ranks.py", str(path), "24"], env={"TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    two = json.loads(result.stdout.strip().splitlines()[-1])
    from helpers.hellaswag_ranks import tiny_model

    one = hellaswag.score(tiny_model(), ByteTokenizer(), path, torch.device("cpu"), limit=24, max_len=128)
    assert two == [one.total, one.correct, one.correct_norm]
    assert one.total == 24


# ---- torch.compile ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_compile_keeps_evaluation_and_sampling_working(tmp_path):
    hs = shared_file("hellaswag_val.jsonl")
    r = train(tmp_path, extra={"train.compile": "true", "train.max_steps": 2, "eval.val_every": 1,
                               "eval.hellaswag_every": 2, "eval.hellaswag_limit": 4, "eval.hellaswag_path": str(hs),
                               "eval.sample_every": 2, "eval.sample_tokens": 4})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "step 2: HellaSwag acc_norm" in r.stdout and "step 2 sample 3:" in r.stdout
    assert "step 2: val loss" in r.stdout



def test_bench_times_the_real_training_step_on_cpu():
    r = run_cli(["-m", "gpt2.bench", "configs/demo.yaml", "--steps", "3", "--warmup", "1", "--json",
                 "--synthetic-data", "model.n_layer=2", "train.total_batch_tokens=2048"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["tokens_per_sec"] > 0 and result["mfu"] is None and result["peak_flops"] is None
    assert result["grad_accum"] == 2 and result["steps"] == 3 and result["data_ms_median"] >= 0
    assert result["step_ms_min"] <= result["step_ms_median"] <= result["step_ms_max"]
    assert result["peak_memory_gib"] > 0


def test_bench_runs_under_torchrun_with_synthetic_data():
    """The DDP benchmark of docs/performance.md: each rank writes the same synthetic tokens into its
    own temporary directory, and the start-up's check that every rank sees the same data passes."""
    r = run_cli(["-m", "gpt2.launch.torchrun", "--standalone", "--nproc-per-node", "2", "-m", "gpt2.bench",
                 "configs/demo.yaml", "--steps", "2", "--warmup", "1", "--json", "--synthetic-data",
                 "model.n_layer=2", "train.total_batch_tokens=2048"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["world_size"] == 2 and result["grad_accum"] == 1 and result["tokens_per_sec"] > 0


def test_evaluate_and_sample_commands_on_a_checkpoint(tmp_path):
    hs = shared_file("hellaswag_val.jsonl")
    r = train(tmp_path, extra={"train.max_steps": 2})
    assert r.returncode == 0, r.stderr
    ev = run_cli(["-m", "gpt2.evaluate", str(tmp_path / "ckpt"), "--hellaswag", str(hs), "--limit", "8"])
    assert ev.returncode == 0, ev.stderr
    assert ev.stdout.startswith("HellaSwag: 8 examples, acc ") and "acc_norm" in ev.stdout
    a = run_cli(["-m", "gpt2.sample", str(tmp_path / "ckpt" / "step-00000002"), "--num-samples", "2", "--tokens", "5"])
    b = run_cli(["-m", "gpt2.sample", str(tmp_path / "ckpt"), "--num-samples", "2", "--tokens", "5"])
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.count("sample ") == 2, a.stderr
    bad = run_cli(["-m", "gpt2.evaluate", str(tmp_path / "nothing-here")])
    assert bad.returncode != 0 and "error:" in bad.stderr


def test_a_diverging_run_stops_with_its_own_exit_code_and_saves_no_nan(tmp_path):
    r = train(tmp_path, extra={"optim.lr": 1e6, "optim.grad_clip": 1e9, "train.max_steps": 30, "checkpoint.every": 1})
    assert r.returncode == 3, r.stdout + r.stderr
    assert "training diverged" in r.stderr and "Lower optim.lr" in r.stderr and "Traceback" not in r.stderr
    assert "update skipped" in r.stderr
    assert "training complete" not in r.stdout and max(steps(tmp_path)) < 29
    for ckpt in (tmp_path / "ckpt").glob("step-*"):
        state = load_state(str(ckpt))
        assert all(torch.isfinite(t).all() for t in state["model"].values()), ckpt


def test_plot_draws_a_demo_run(tmp_path):
    hs = shared_file("hellaswag_val.jsonl")
    r = train(tmp_path, extra={"eval.hellaswag_every": 4, "eval.hellaswag_path": str(hs), "eval.hellaswag_limit": 8})
    assert r.returncode == 0, r.stderr
    out = tmp_path / "plots" / "run.png"
    p = run_cli(["-m", "gpt2.plot", str(tmp_path), "--out", str(out)])
    assert p.returncode == 0 and f"wrote {out} (step 7" in p.stdout, p.stdout + p.stderr
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    from gpt2.plot import LEVELS, find_log_dir, read_run

    run = read_run(find_log_dir(tmp_path))
    assert [s for s, _ in run["train"]] == list(range(8)) and [s for s, _ in run["val"]] == [0, 4, 8]
    assert [s for s, _ in run["hellaswag"]] == [0, 4, 8] and run["size"] is None  # the demo is no GPT-2 size
    assert LEVELS["gpt2"] == (3.2924, 0.294463, 0.337)
    missing = run_cli(["-m", "gpt2.plot", str(tmp_path / "nothing")])
    assert missing.returncode == 2 and "no steps.jsonl" in missing.stderr
