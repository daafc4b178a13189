"""Reliability with real processes and the shipped defaults: hangs found in about a minute and
never during slow healthy work, no silent recipe change, every attempt on record (one writer per run:
test_one_writer.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import REPO, run_cli, shared_file, tiny_overrides
from helpers.runs import popen_train, rank_pid, steps, stop, train, wait_until, worker_pids

from gpt2.data import row_hash
from gpt2.errors import EXIT_CONFIG, EXIT_CRASH_LOOP, EXIT_HUNG, EXIT_OK, EXIT_PREEMPTED
from gpt2.shards import open_split
from gpt2.tokenizer import tokenizer_class
from gpt2.watchdog import FLOOR_S, MIN_TIMED, STEP_FACTOR

BIGGER = {"model.n_layer": 2, "model.n_embd": 64, "model.n_head": 4, "checkpoint.every": 3}


# ---- hangs ------------------------------------------------------------------------------------------


def signal_when_said(pid: int, log: Path, words: str, proc: subprocess.Popen, timeout: float,
                     sig: signal.Signals = signal.SIGTERM) -> bool:
    """Send `sig` to `pid` the moment `words` show in `log` (read as it grows, without sleeping); whether
    it still ran (not a zombie) when the signal went. False if `proc` ends or the words never come."""
    deadline, seen = time.monotonic() + timeout, b""
    with open(log, "rb") as f:
        while words.encode() not in seen:
            if proc.poll() is not None or time.monotonic() > deadline:
                return False
            seen = seen[-len(words):] + f.read()
    try:
        running = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        os.kill(pid, sig)
    except (FileNotFoundError, ProcessLookupError):
        return False
    return running


def start_two_workers(tmp_path: Path, attempt: int) -> tuple[Path, subprocess.Popen, Path]:
    """Try `attempt` of a test that reruns: two workers under the launchers' torchrun, training on
    and on (no restarts left); its run dir, its launcher and its log."""
    run_dir = tmp_path / f"run{attempt}"
    run_dir.mkdir()
    run = popen_train(run_dir, nproc=2, extra=dict(BIGGER, **{"train.max_steps": 100000}),
                      launcher="gpt2.launch.torchrun")
    return run_dir, run, run_dir / "train.log"


def test_a_frozen_worker_is_found_in_about_a_minute_with_the_defaults_and_the_job_completes(tmp_path):
    """No watchdog setting is lowered. A worker is killed (torchrun restarts the group); a worker of
    the restarted group frozen at its first step is found at the step-based limit (20 x the slowest
    recent step, at least 60 s; the run's step times from before), not at the 600 s ceiling, and
    torchrun restarts the group again; the job finishes from its checkpoint. (A freeze in the middle
    of a run: the SLURM chaos test in test_slurm.py.)"""
    extra = dict(BIGGER, **{"model.n_embd": 128, "model.n_layer": 4, "train.max_steps": 24, "checkpoint.every": 5})
    proc = popen_train(tmp_path, nproc=2, extra=extra, max_restarts=2)
    log = tmp_path / "train.log"

    def restarted_and_stepping() -> bool:
        starts = [json.loads(x) for x in (tmp_path / "tb" / "attempts.jsonl").read_text().splitlines()
                  if '"start"' in x]
        return len(starts) >= 2 and any(r.get("attempt") == starts[-1]["attempt"] for r in steps(tmp_path).values())

    try:
        # between saves: a save waits for its peers with the ceiling, a step with the step-based limit
        wait_until(lambda: (tmp_path / "ckpt" / "step-00000005" / "COMMITTED").exists() and max(steps(tmp_path)) >= 6,
                   "a checkpoint and a step after it", proc, log)
        os.kill(worker_pids(proc.pid)[1], signal.SIGKILL)
        t0 = time.time()
        wait_until(restarted_and_stepping, "the restarted group's first step", proc, log, timeout=300)
        os.kill(worker_pids(proc.pid)[1], signal.SIGSTOP)  # within its first steps
        code = proc.wait(timeout=300)
        took = time.time() - t0
    finally:
        stop(proc)
    text = log.read_text()
    assert code == 0, text[-4000:]
    detected = [float(s) for s in re.findall(r"no progress for (\d+) s in phase 'training step'", text)]
    assert len(detected) == 1 and FLOOR_S <= detected[0] < FLOOR_S + 10, text[-4000:]  # not 600 s
    assert "resumed from" in text and sorted(steps(tmp_path)) == list(range(24))
    # the rank that found the hang killed its stopped peer: torchrun's teardown did not wait 30 s for it
    assert text.count("killed this node's stopped worker(s)") == 1, text[-4000:]
    assert took < 240, took
    attempts = [json.loads(x) for x in (tmp_path / "tb" / "attempts.jsonl").read_text().splitlines()]
    reasons = [a.get("reason", "") for a in attempts if a["event"] == "end"]
    assert len(reasons) == 3 and "hung in phase 'training step'" in reasons[1], reasons
    assert reasons[-1] == "finished: 24 steps"


def test_a_worker_frozen_in_the_first_steps_of_a_new_run_is_found_at_the_floor_not_the_ceiling(tmp_path):
    """No step times from before, compile off (the demo's), shipped defaults: rank 1 is SIGSTOPped the
    moment rank 0 logs step 0, so rank 0 waits in one of the first steps, before MIN_TIMED are timed
    (they had the 600 s ceiling). Those are held to 20 x the slowest micro-step so far, at least 60 s
    (the steps beat per micro-step): the hang is found in about a minute. A freeze that landed after
    the first timed steps could not tell the two apart, so the run is tried again (up to 3)."""
    for attempt in range(3):
        run_dir, run, log = start_two_workers(tmp_path, attempt)
        try:
            wait_until(lambda d=run_dir: (d / "tb" / "attempts.jsonl").exists(), "the start", run, log)
            assert signal_when_said(rank_pid(run.pid, 1), log, "step      0/", run, timeout=120, sig=signal.SIGSTOP)
            t0 = time.monotonic()
            code = run.wait(timeout=300)  # at the ceiling this would be 600 s
            took = time.monotonic() - t0
        finally:
            stop(run)
        text = log.read_text()
        assert code == EXIT_HUNG, text[-4000:]
        found = re.search(r"no progress for (\d+) s in phase 'training step' \(rank 0, step (\d+); limit (\d+) s: "
                          r"(20 x the slowest micro-step so far|20 x the slowest of the last (\d+) steps)", text)
        assert found, text[-4000:]
        assert FLOOR_S <= float(found.group(1)) < FLOOR_S + 10 and int(found.group(3)) == FLOOR_S, found.group(0)
        assert took < FLOOR_S + 60, took
        first_steps = found.group(5) is None or int(found.group(5)) < MIN_TIMED  # (the micro-steps: before that)
        if first_steps:
            break
    assert first_steps, f"in 3 runs the freeze landed after the first timed steps: the test could not tell ({found})"


def test_a_slow_start_is_waited_for_and_a_rank_that_started_but_never_joins_is_found_at_the_floor(tmp_path):
    """Shipped defaults, rank 0 of two started as torchrun starts it. Rank 1 is this test: it arrives
    in the group's store after more than the floor (a slow start, e.g. imports from a shared file
    system: waited for, under the ceiling), then never joins the process group (a rank frozen or cut
    off right after it started). Rank 0 is found at the floor in the join, not at the 600 s ceiling."""
    import socket
    from datetime import timedelta

    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    run, log = popen_train(tmp_path, env=env), tmp_path / "train.log"
    try:
        time.sleep(FLOOR_S + 5)
        assert run.poll() is None and "no progress" not in log.read_text(), log.read_text()[-4000:]
        store = dist.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=timedelta(seconds=60))
        store.set("gpt2/started/1", "1")  # arrived as a rank does; now silent, as a frozen rank is
        store.add("gpt2/started", 1)
        t0 = time.monotonic()
        code = run.wait(timeout=300)  # at the ceiling this would be 600 s
        took = time.monotonic() - t0
    finally:
        stop(run)
    text = log.read_text()
    assert code == EXIT_HUNG, text[-4000:]
    found = re.search(r"no progress for (\d+) s in phase 'start-up: joining the process group \(every rank has "
                      r"started\)' \(rank 0, step \?; limit (\d+) s", text)
    assert found and int(found.group(2)) == FLOOR_S, text[-4000:]
    assert FLOOR_S <= took < FLOOR_S + 20, took


def test_an_evaluation_many_times_longer_than_a_step_does_not_fire_the_watchdog(tmp_path):
    """HellaSwag on a slow device: the demo model scoring thousands of examples on CPU takes longer
    than the step-based limit (the 60 s floor here), with the shipped defaults; it beats per example,
    so the run goes on."""
    hellaswag = shared_file("hellaswag_val.jsonl")
    base = {"data.dir": tmp_path / "data", "checkpoint.dir": tmp_path / "ckpt", "logging.dir": tmp_path / "tb",
            "train.max_steps": 10, "eval.sample_every": 0, "eval.val_every": 0, "eval.hellaswag_path": hellaswag}
    env = {"OMP_NUM_THREADS": "1"}

    def demo(**extra) -> subprocess.CompletedProcess:
        args = [f"{k}={v}" for k, v in {**base, **extra}.items()]
        return run_cli(["-m", "gpt2.train", "configs/demo.yaml", *args], env=env, timeout=900)

    first = demo(**{"train.stop_at_step": 6, "eval.hellaswag_every": 0})
    assert first.returncode == 0, first.stderr[-3000:]
    # steps 6-9 timed, then HellaSwag: 9000 examples, about 90-120 s on this 2-core machine (4000 once
    # took 53 s and 6000 took 59 s, under the floor, and the test could not show what it claims)
    r = demo(**{"eval.hellaswag_every": 10, "eval.hellaswag_limit": 9000})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "no progress" not in r.stderr
    took = float(re.search(r"step 10: HellaSwag acc_norm \d+/9000 = [\d.]+ \(([\d.]+) s\)", r.stdout).group(1))
    slowest = max(s["step_time_ms"] for s in steps(tmp_path).values() if s["step"] >= 6 and not s["warmup"]) / 1000
    assert STEP_FACTOR * slowest < FLOOR_S < took, (slowest, took)  # the limit was the floor; the eval outlasted it


def test_a_first_step_many_times_longer_than_the_floor_does_not_fire_the_watchdog(tmp_path):
    """A new run (no step times from before, compile off, local data), shipped defaults: its first
    step of tens of thousands of micro-steps takes longer than the 60 s floor that holds the first
    steps once a micro-step is timed. It beats per micro-step, so it is progress and the run finishes.
    The step is sized from a short run on this machine, to last about 80 s."""
    base = {"checkpoint.every": 1000, "eval.val_every": 0}
    micro = 128  # tokens per micro-step of tiny_overrides (4 x 32)
    (tmp_path / "probe").mkdir()
    (tmp_path / "long").mkdir()
    probe = train(tmp_path / "probe", extra=dict(base, **{"train.total_batch_tokens": micro * 2000,
                                                          "train.max_steps": 3}))
    assert probe.returncode == 0, probe.stderr[-3000:]
    micro_s = steps(tmp_path / "probe")[2]["step_time_ms"] / 1000 / 2000
    n = int(80 / micro_s)
    r = train(tmp_path / "long", extra=dict(base, **{"train.total_batch_tokens": micro * n, "train.max_steps": 1}))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "no progress" not in r.stdout + r.stderr
    took = steps(tmp_path / "long")[0]["step_time_ms"] / 1000
    assert STEP_FACTOR * took / n < FLOOR_S < took, (took, n)  # the limit was the floor; the step outlasted it


# ---- the recipe -------------------------------------------------------------------------------------


def rows_of_stream(data_dir: Path, first_row: int, n: int, row_tokens: int = 33) -> np.ndarray:
    """Rows of the train stream read straight from the shards, independent of the loader."""
    shards = open_split(str(data_dir), "train", tokenizer_class("bytes").fingerprint)
    return np.stack([shards.read((first_row + i) * row_tokens, row_tokens) for i in range(n)])


def test_a_new_global_batch_is_refused_unless_allowed_and_then_no_row_is_skipped_or_read_twice(tmp_path):
    r = train(tmp_path, extra={"train.max_steps": 8, "train.stop_at_step": 4})  # 16 rows a step: rows 0-63
    assert r.returncode == 0, r.stderr
    refused = train(tmp_path, extra={"train.max_steps": 8, "train.total_batch_tokens": 1024})
    assert refused.returncode == EXIT_CONFIG and "train.allow_batch_change=true" in refused.stderr
    assert "Traceback" not in refused.stderr
    r = train(tmp_path, extra={"train.max_steps": 8, "train.total_batch_tokens": 1024,
                               "train.allow_batch_change": "true"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "continues by tokens seen, at row 64" in r.stderr
    got = steps(tmp_path)
    for step in range(4):
        assert got[step]["batch_hash"] == row_hash(rows_of_stream(tmp_path / "data", 16 * step, 16), 0)
    for step in range(4, 8):  # 32 rows a step from row 64 on: 64-95, 96-127, ...
        assert got[step]["batch_hash"] == row_hash(rows_of_stream(tmp_path / "data", 64 + 32 * (step - 4), 32), 0)
    # tokens seen count both batch sizes: 64 rows of 32 tokens, then 32 rows a step
    assert [got[s]["tokens_seen"] for s in (3, 7)] == [64 * 32, (64 + 4 * 32) * 32]
    marker = json.loads((tmp_path / "ckpt" / "step-00000008" / "COMMITTED").read_text())
    assert marker["tokens_seen"] == (64 + 4 * 32) * 32


def test_a_longer_schedule_is_said_or_continued_without_a_jump(tmp_path):
    r = train(tmp_path, extra={"train.max_steps": 8})
    assert r.returncode == 0, r.stderr
    last_lr = steps(tmp_path)[7]["lr"]
    r = train(tmp_path, extra={"train.max_steps": 12, "optim.on_schedule_change": "continue"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "train.max_steps 8 -> 12" in r.stderr and "continuing with a new cosine decay" in r.stderr
    lrs = [steps(tmp_path)[s]["lr"] for s in range(8, 12)]
    assert lrs[0] <= last_lr * 1.0001 and lrs == sorted(lrs, reverse=True)  # no jump up, decaying
    r = train(tmp_path, extra={"train.max_steps": 16})
    assert r.returncode == 0 and "goes from" in r.stderr and "optim.on_schedule_change=continue" in r.stderr


# ---- the attempt ledger -----------------------------------------------------------------------------


def test_every_attempt_is_on_record_and_status_shows_the_run(tmp_path):
    extra = dict(BIGGER, **{"train.max_steps": 60})
    a = popen_train(tmp_path, extra=extra, log_name="a.log")
    wait_until(lambda: len(steps(tmp_path)) >= 4, "steps", a, tmp_path / "a.log")
    a.send_signal(signal.SIGTERM)
    assert a.wait(timeout=60) == EXIT_PREEMPTED
    b = popen_train(tmp_path, extra=extra, log_name="b.log")
    wait_until(lambda: len(steps(tmp_path)) >= 20, "steps", b, tmp_path / "b.log")
    os.killpg(b.pid, signal.SIGKILL)  # no end record, and its lease stays behind
    b.wait()
    c = train(tmp_path, extra=extra)
    assert c.returncode == EXIT_OK, c.stdout + c.stderr
    assert "is no longer running" in c.stdout and "left no end record" in c.stderr
    records = [json.loads(x) for x in (tmp_path / "tb" / "attempts.jsonl").read_text().splitlines()]
    ends = {r["attempt"]: r for r in records if r["event"] == "end"}
    assert [r["attempt"] for r in records if r["event"] == "start"] == [1, 2, 3]
    assert ends[1]["exit_code"] == EXIT_PREEMPTED and ends[1]["reason"].startswith("preempted")
    assert ends[2]["inferred"] and ends[3]["exit_code"] == 0 and ends[3]["reason"] == "finished: 60 steps"
    starts = [r for r in records if r["event"] == "start"]
    assert starts[0]["resumed_from_step"] is None and starts[1]["resumed_from_step"] == ends[1]["step"]
    status = run_cli(["-m", "gpt2.status", str(tmp_path / "tb")])
    assert status.returncode == 0, status.stderr
    out = status.stdout
    assert "step 60 of 60 (100.0%)" in out and "newest checkpoint:" in out and "val loss" in out
    assert "exit 200: preempted" in out and "left no end record" in out and "exit 0: finished: 60 steps" in out
    missing = run_cli(["-m", "gpt2.status", str(tmp_path / "nothing")])
    assert missing.returncode == EXIT_CONFIG and "no steps.jsonl" in missing.stderr


def test_the_ledger_is_in_tensorboard_too(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = train(tmp_path, extra={"train.max_steps": 4})
    assert r.returncode == 0, r.stderr
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert "attempts/text_summary" in acc.Tags()["tensors"]


# ---- a lost peer, a crash loop ----------------------------------------------------------------------


def test_a_worker_killed_mid_run_makes_its_peers_exit_for_a_restart_not_for_good(tmp_path):
    """Two workers under the launchers' torchrun, shipped defaults, no restarts left: rank 1 is
    SIGKILLed (the OOM killer, a node gone) while training. Rank 0's next collective fails; it exits
    201 (GroupLost), which torchrun passes on and SLURM and the PyTorchJob restart, not 1 (a failure
    for good: torchrun took rank 0's 1 over rank 1's SIGKILL, and the job ended). The SIGTERM that
    torchrun sends the survivors once a worker failed may land inside rank 0's exit: sent here the
    moment rank 0 says why it exits, it leaves the 201 and the record alone (it made the exit -15).
    The exit takes milliseconds, so a run whose SIGTERM came too late is run again (up to 3)."""
    for attempt in range(3):
        run_dir, run, log = start_two_workers(tmp_path, attempt)
        try:
            wait_until(lambda d=run_dir: len(steps(d)) >= 10, "ten steps", run, log)
            rank_0, rank_1 = rank_pid(run.pid, 0), rank_pid(run.pid, 1)
            os.kill(rank_1, signal.SIGKILL)
            landed = signal_when_said(rank_0, log, "error: a collective failed", run, timeout=60)
            code = run.wait(timeout=120)
        finally:
            stop(run)
        text = log.read_text()
        assert code == EXIT_HUNG, text[-4000:]
        assert f"the trainers failed (rank 0, exit code {EXIT_HUNG}); exiting {EXIT_HUNG}" in text, text[-4000:]
        assert "Traceback" not in text, text[-4000:]
        ends = [json.loads(x) for x in (run_dir / "tb" / "attempts.jsonl").read_text().splitlines() if '"end"' in x]
        assert [(e["exit_code"], e["reason"].split(":")[0]) for e in ends] == [(EXIT_HUNG, "GroupLost")], ends
        if landed:
            break
    assert landed, "in 3 runs the SIGTERM never reached rank 0 on its way out: the test could not tell"


def test_a_job_killed_three_times_from_one_checkpoint_stops_with_its_own_exit_code(tmp_path):
    """Shipped default train.max_failed_restarts=3: three attempts of one job SIGKILLed (as the OOM
    killer does) after their start, before a new checkpoint; the fourth start of that job refuses
    with EXIT_CRASH_LOOP and writes nothing; another submission still starts."""
    extra = dict(BIGGER, **{"train.max_steps": 5000, "checkpoint.every": 1000, "eval.val_every": 0})
    first = train(tmp_path, extra=dict(extra, **{"train.stop_at_step": 3}), env={"GPT2_JOB_ID": "loop-1"})
    assert first.returncode == EXIT_OK, first.stderr[-3000:]
    ledger = tmp_path / "tb" / "attempts.jsonl"
    for n in (2, 3, 4):
        p = popen_train(tmp_path, extra=extra, env={"GPT2_JOB_ID": "loop-1"}, log_name=f"{n}.log")
        wait_until(lambda n=n: any(s.get("attempt") == n for s in steps(tmp_path).values()), f"attempt {n}'s steps",
                   p, tmp_path / f"{n}.log")
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    before = ledger.read_text()
    refused = train(tmp_path, extra=extra, env={"GPT2_JOB_ID": "loop-1"})
    assert refused.returncode == EXIT_CRASH_LOOP, refused.stderr[-3000:]
    assert "error: this job (job:loop-1) failed 3 times in a row from checkpoint" in refused.stderr
    assert "attempt 2: killed" in refused.stderr and "train.max_failed_restarts=0" in refused.stderr
    assert ledger.read_text() == before  # a refused start wrote nothing
    other = train(tmp_path, extra=dict(extra, **{"train.stop_at_step": 5}), env={"GPT2_JOB_ID": "loop-2"})
    assert other.returncode == EXIT_OK, other.stderr[-3000:]
    assert "resumed from" in other.stdout and "at step 3" in other.stdout


# ---- every byte verified ----------------------------------------------------------------------------


def test_a_flipped_byte_in_a_shard_stops_training_naming_the_shard_and_its_redo_command_repairs_it(tmp_path):
    first = train(tmp_path, extra={"train.max_steps": 1})  # prepares the demo's shards
    assert first.returncode == EXIT_OK, first.stderr[-3000:]
    shard = tmp_path / "data" / "train_000000.npy"
    good = shard.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    (tmp_path / "ckpt").rename(tmp_path / "ckpt-first")  # a fresh start, which reads shard 0 again
    bad = train(tmp_path)
    assert bad.returncode == 1, bad.stderr[-3000:]
    said = re.search(r"error: shard .*train_000000.npy is corrupt: .* re-prepare just that shard with "
                     r"python -m gpt2.prepare CONFIG (data.dir=\S+) --redo train_000000.npy", bad.stderr)
    assert said, bad.stderr[-3000:]
    redo = run_cli(["-m", "gpt2.prepare", "configs/demo.yaml", *tiny_overrides(tmp_path), said.group(1),
                    "--redo", "train_000000.npy"])
    assert redo.returncode == 0 and "matches" in redo.stdout + redo.stderr, redo.stderr[-3000:]
    assert shard.read_bytes() == good
    again = train(tmp_path)
    assert again.returncode == EXIT_OK, again.stderr[-3000:]


# ---- goodput ----------------------------------------------------------------------------------------


def test_goodput_counts_each_step_once_and_the_work_a_kill_lost(tmp_path):
    """A run killed (SIGKILL: no end record) some steps after its last checkpoint, restarted after a
    pause: gpt2.status --json counts every step of the current trajectory once as productive, the
    killed attempt's steps after that checkpoint as lost, the pause as between attempts."""
    extra = dict(BIGGER, **{"train.max_steps": 60, "checkpoint.every": 10})
    a = popen_train(tmp_path, extra=extra, log_name="a.log")
    wait_until(lambda: len(steps(tmp_path)) >= 25 and (tmp_path / "ckpt" / "step-00000020" / "COMMITTED").exists(),
               "steps past a checkpoint", a, tmp_path / "a.log")
    os.killpg(a.pid, signal.SIGKILL)
    a.wait()
    time.sleep(3)
    b = train(tmp_path, extra=extra)
    assert b.returncode == EXIT_OK, b.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "tb" / "steps.jsonl").read_text().splitlines()]
    resumed = [json.loads(x) for x in (tmp_path / "tb" / "attempts.jsonl").read_text().splitlines()
               if '"start"' in x][-1]["resumed_from_step"]
    lost = [r for r in lines if r["attempt"] == 1 and r["step"] >= resumed]
    assert lost, "the kill landed before any step past the checkpoint"
    out = run_cli(["-m", "gpt2.status", str(tmp_path / "tb"), "--json"])
    assert out.returncode == 0, out.stderr
    g = json.loads(out.stdout)
    kept = steps(tmp_path)
    assert sorted(kept) == list(range(60))
    assert abs(g["parts"]["productive"] - sum(r["step_time_ms"] for r in kept.values()) / 1000) < 1e-6
    assert abs(g["parts"]["lost"] - sum(r["step_time_ms"] for r in lost) / 1000) < 1e-6
    assert g["parts"]["between"] >= 3 and all(a["startup"] > 0 for a in g["attempts"])
    assert g["parts"]["checkpoint"] > 0 and 0 < g["goodput"] < 1
    assert sum(g["parts"].values()) <= g["wall_s"] + 1e-6
    text = run_cli(["-m", "gpt2.status", str(tmp_path / "tb")]).stdout
    assert re.search(r"goodput \d+\.\d%: .* trained the model; the rest: .*startup .*between", text), text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("goodput/goodput")] == [resumed]  # the run so far, at the restart


STOPPED_PEER = r"""
import os, signal, sys, time
if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    if os.environ["LOCAL_RANK"] == "1":
        os.kill(os.getpid(), signal.SIGSTOP)  # frozen for good
    time.sleep(2)
    sys.exit(1)  # its peer fails: torchrun stops the group and restarts it
print("restarted", flush=True)
"""


def test_torchrun_kills_a_stopped_worker_at_once_instead_of_waiting_30_s(tmp_path):
    """torchrun stops a group whose worker failed with SIGTERM and a hard-coded 30 s wait before
    SIGKILL; a stopped worker never answers. gpt2.launch.torchrun kills it first."""
    script = tmp_path / "worker.py"
    script.write_text(STOPPED_PEER)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "gpt2.launch.torchrun", "--standalone", "--nproc-per-node=2",
                        "--max-restarts=1", "--monitor-interval=0.5", str(script)],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    took = time.monotonic() - t0
    out = r.stdout + r.stderr
    assert r.returncode == 0 and out.count("restarted") == 2, out[-3000:]
    assert "killed stopped worker(s)" in out and took < 25, (took, out[-3000:])
