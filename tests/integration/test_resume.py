"""Checkpoints and resume, proven by killing real processes (CPU, gloo)."""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from helpers.parts import Part
from helpers.runs import popen_train, steps, train, worker_pids

from gpt2.checkpoint import MARKER, Checkpointer, CheckpointStore, load_state, state_path
from gpt2.config import CheckpointConfig
from gpt2.errors import EXIT_PREEMPTED

BIGGER = {"model.n_layer": 2, "model.n_embd": 64, "model.n_head": 4, "train.max_steps": 24,
          "checkpoint.every": 3}


def wait_for_step(tmp: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if steps(tmp) and max(steps(tmp)) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}): {(tmp / 'train.log').read_text()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached: {(tmp / 'train.log').read_text()[-3000:]}")


def test_sigkill_of_a_worker_under_torchrun_resumes_bitwise(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir(), run.mkdir()
    r = train(ref, nproc=2, extra=BIGGER)
    assert r.returncode == 0, r.stdout + r.stderr

    kill_at = random.Random().randint(4, 16)
    proc = popen_train(run, nproc=2, extra=BIGGER, max_restarts=2)
    wait_for_step(run, kill_at, proc)
    victim = random.choice(worker_pids(proc.pid))
    os.kill(victim, signal.SIGKILL)
    assert proc.wait(timeout=300) == 0, (run / "train.log").read_text()[-4000:]
    log = (run / "train.log").read_text()
    assert "resumed from" in log, log[-3000:]
    got, want = steps(run), steps(ref)
    assert sorted(got) == sorted(want) == list(range(24))
    assert [got[s]["loss"] for s in range(24)] == [want[s]["loss"] for s in range(24)], f"killed at {kill_at}"


def test_kill_during_a_save_resumes_from_the_previous_checkpoint(tmp_path):
    # a model large enough (60M parameters, 700 MB of state) that writing a checkpoint takes a while
    big = {"model.n_layer": 4, "model.n_embd": 1024, "model.n_head": 8, "train.max_steps": 6,
           "checkpoint.every": 2, "eval.val_every": 0}
    proc = popen_train(tmp_path, extra=big)
    ckpt = tmp_path / "ckpt"
    deadline = time.time() + 300
    while time.time() < deadline:
        partial = [d for d in ckpt.glob("step-*") if d.name != "step-00000002" and not (d / MARKER).exists()]
        if (ckpt / "step-00000002" / MARKER).exists() and partial and any(partial[0].iterdir()):
            proc.send_signal(signal.SIGKILL)
            break
        assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_in = partial[0].name
    assert not (ckpt / killed_in / MARKER).exists()

    found = CheckpointStore(str(ckpt)).complete()
    assert [c.step for c in found] == [2]
    r = train(tmp_path, extra=big)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"resumed from {ckpt}/step-00000002 at step 2" in r.stdout
    assert sorted(d.name for d in ckpt.glob("step-*")) == ["step-00000004", "step-00000006"]


# auto: 24 rows per step, at most 8 per micro-batch: 6 at world size 2 (12 rows a rank), 8 at 1
AUTO = {"train.micro_batch": "auto", "train.max_micro_batch": 8, "train.total_batch_tokens": 24 * 32}


@pytest.mark.parametrize("batch", [{}, AUTO], ids=["fixed", "auto"])
def test_world_size_2_then_1_then_2_reads_the_same_tokens(tmp_path, batch):
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir(), run.mkdir()
    extra = dict(BIGGER, **{"train.max_steps": 12}, **batch)
    r = train(ref, nproc=2, extra=extra)
    assert r.returncode == 0, r.stdout + r.stderr
    chosen = []
    for nproc, stop in ((2, 4), (1, 8), (2, 0)):
        r = train(run, nproc=nproc, extra=dict(extra, **{"train.stop_at_step": stop}))
        assert r.returncode == 0, r.stdout + r.stderr
        chosen += [line for line in r.stdout.splitlines() if "train.micro_batch=auto chose" in line]
    if batch:  # chosen again whenever the world size changes
        assert [c.split("chose ")[1].split(":")[0] for c in chosen] == ["6", "8", "6"], chosen
    got, want = steps(run), steps(ref)
    assert [got[s]["world_size"] for s in range(12)] == [2] * 4 + [1] * 4 + [2] * 4
    assert [got[s]["batch_hash"] for s in range(12)] == [want[s]["batch_hash"] for s in range(12)]
    for s in range(12):
        assert math.isclose(got[s]["loss"], want[s]["loss"], rel_tol=1e-4), (s, got[s]["loss"], want[s]["loss"])


def test_sigterm_saves_and_exits_with_the_preemption_code(tmp_path):
    extra = dict(BIGGER, **{"train.max_steps": 10_000, "checkpoint.every": 10_000})
    proc = popen_train(tmp_path, extra=extra)
    wait_for_step(tmp_path, 3, proc)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == EXIT_PREEMPTED
    assert time.time() - t0 < 10
    found = CheckpointStore(str(tmp_path / "ckpt")).complete()
    assert len(found) == 1 and found[0].step == max(steps(tmp_path)) + 1
    r = train(tmp_path, extra=dict(extra, **{"train.stop_at_step": found[0].step + 2}))
    assert r.returncode == 0 and f"at step {found[0].step}" in r.stdout, r.stdout + r.stderr


@pytest.mark.s3
def test_save_and_resume_on_s3_match_a_local_run_bitwise(tmp_path, s3_url):
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir(), run.mkdir()
    extra = dict(BIGGER, **{"train.max_steps": 8, "checkpoint.every": 2})
    assert train(ref, extra=extra).returncode == 0
    s3 = dict(extra, **{"checkpoint.dir": f"{s3_url}/ckpt"})
    r = train(run, extra=dict(s3, **{"train.stop_at_step": 5}))
    assert r.returncode == 0, r.stdout + r.stderr
    r = train(run, extra=s3)
    assert r.returncode == 0 and f"resumed from {s3_url}/ckpt/step-00000005" in r.stdout, r.stdout + r.stderr
    assert [steps(run)[s]["loss"] for s in range(8)] == [steps(ref)[s]["loss"] for s in range(8)]
    listing = run_cli(["-m", "gpt2.checkpoint", "list", f"{s3_url}/ckpt"])
    assert "step 6" in listing.stdout and "step 8" in listing.stdout, listing.stdout + listing.stderr


@pytest.mark.s3
def test_s3_outage_during_a_save_is_retried(tmp_path, s3_server, s3_url):
    model = Part({"w": torch.randn(256, 256)})
    ckpt = Checkpointer(CheckpointConfig(dir=f"{s3_url}/outage", keep=2, retries=6, every=1, async_save=True,
                                         storage_options=s3_server.storage_options),
                        parts={"model": model}, describe=lambda step: {"config": {}})
    s3_server.stop()
    t0 = time.time()
    ckpt.step_end(1)  # the async write starts while the server is down
    time.sleep(2.0)
    s3_server.start()
    ckpt.wait()
    assert time.time() - t0 > 2.0
    assert [c.step for c in ckpt.store.complete()] == [1]
    assert torch.equal(ckpt.store.load(ckpt.store.complete()[0].url)[1]["model"]["w"], model.state["w"])


def test_checkpoint_cli_list_inspect_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    r = train(tmp_path, extra={"train.max_steps": 4, "checkpoint.every": 2})
    assert r.returncode == 0, r.stderr
    ckpt = tmp_path / "ckpt"
    out = run_cli(["-m", "gpt2.checkpoint", "list", str(ckpt)]).stdout
    assert "step-00000002  step 2  tokens 1,024  world 1" in out and "step-00000004" in out
    out = run_cli(["-m", "gpt2.checkpoint", "inspect", str(ckpt)]).stdout
    assert "step: 4" in out and "tokens_seen: 2048" in out and '"n_embd": 32' in out
    r = run_cli(["-m", "gpt2.checkpoint", "export", str(ckpt), str(tmp_path / "hf")])
    assert r.returncode == 0, r.stderr
    from gpt2.loading import load_model

    ours, _ = load_model(str(ckpt))
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 257, (1, 16))
    with torch.no_grad():
        assert (ours.eval()(x)[0] - hf(x).logits).abs().max() <= 1e-5
    bad = run_cli(["-m", "gpt2.checkpoint", "inspect", str(tmp_path / "nothing")])
    assert bad.returncode == 1 and "no complete checkpoint" in bad.stderr


# ---- corrupt checkpoints in a real run (issue: fault tolerance) ----------------------------------------


def truncate(ckpt: Path, step: int) -> None:
    state = Path(state_path(str(ckpt / f"step-{step:08d}")))
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])


def test_a_corrupt_newest_checkpoint_is_moved_aside_and_the_good_ones_are_kept(tmp_path):
    r = train(tmp_path, extra={"train.max_steps": 4, "checkpoint.every": 2})
    assert r.returncode == 0, r.stderr
    truncate(tmp_path / "ckpt", 4)
    r = train(tmp_path, extra={"train.max_steps": 6, "checkpoint.every": 2})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "step-00000004 is corrupt" in r.stderr and "resumed from" in r.stdout and "step-00000002" in r.stdout
    listing = run_cli(["-m", "gpt2.checkpoint", "list", str(tmp_path / "ckpt")]).stdout
    assert "step 4 " in listing and "step 6 " in listing, listing
    for step in (4, 6):  # both load: the save at step 4 was written again
        assert load_state(str(tmp_path / "ckpt" / f"step-{step:08d}"))["progress"]["step"] == step
    assert len(list((tmp_path / "ckpt").glob("step-00000004.corrupt-*"))) == 1


def test_only_corrupt_checkpoints_fail_the_run_until_told_to_start_over(tmp_path):
    r = train(tmp_path, extra={"train.max_steps": 4, "checkpoint.every": 2})
    assert r.returncode == 0, r.stderr
    truncate(tmp_path / "ckpt", 2), truncate(tmp_path / "ckpt", 4)
    for _ in range(2):
        r = train(tmp_path, extra={"train.max_steps": 6})
        assert r.returncode == 1 and "no loadable checkpoint" in r.stderr and "checkpoint.resume=never" in r.stderr
        assert "Traceback" not in r.stderr and "starting from scratch" not in r.stdout
    r = train(tmp_path, extra={"train.max_steps": 6, "checkpoint.resume": "never"})
    assert r.returncode == 0 and "starting from scratch" in r.stdout, r.stdout + r.stderr


class _Cut(BaseException):  # a kill: not retried as a storage error
    pass


def test_a_start_that_finishes_a_cut_preparation_records_the_whole_corpus_and_resumes_later(tmp_path, monkeypatch):
    """data.auto_prepare (the demo's) after a preparation cut short after 3 shards: the next start
    finishes it and trains; its checkpoints record the whole corpus, not the part it first found,
    so a later start resumes from them (it used to be refused as a changed corpus)."""
    from conftest import tiny_overrides

    import gpt2.prepare as prep
    from gpt2.config import load_config
    from gpt2.shards import read_manifest

    real_write, written = prep.write_bytes, []

    def cut_after_3_shards(fs, path, data):
        if path.endswith(".npy") and len(written) == 3:
            raise _Cut("cut")
        real_write(fs, path, data)
        written.append(path)

    monkeypatch.setattr(prep, "write_bytes", cut_after_3_shards)
    with pytest.raises(_Cut):
        prep.prepare(load_config("configs/demo.yaml", tiny_overrides(tmp_path)), progress=False)
    assert not read_manifest(str(tmp_path / "data")).complete

    first = train(tmp_path, extra={"train.max_steps": 8})
    assert first.returncode == 0, first.stderr[-3000:]
    assert "preparing builtin:pydoc" in first.stdout + first.stderr
    later = train(tmp_path, extra={"train.max_steps": 12})
    assert later.returncode == 0, later.stderr[-3000:]
    assert "resumed from" in later.stdout + later.stderr and sorted(steps(tmp_path)) == list(range(12))
