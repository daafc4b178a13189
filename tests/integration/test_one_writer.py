"""One run, one writer, one lineage: real trainer processes with the shipped lease defaults
(checkpoint.lease_ttl_s=60: renewed every 15 s; taken over once a start has watched it unchanged for
60 s by its own clock). Skewed clocks come from libfaketime (Debian's faketime), another host's
process from a pid namespace of its own (unshare)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from datetime import datetime
from pathlib import Path

import pytest
from conftest import IN_CI, run_cli
from helpers.runs import popen_train, rank_pid, raw_steps, steps, stop, train, wait_until

from gpt2.chaos import skewed_clock
from gpt2.errors import EXIT_CONFIG, EXIT_ERROR, EXIT_HUNG, EXIT_OK, EXIT_PREEMPTED, ConfigError

BIGGER = {"model.n_layer": 2, "model.n_embd": 64, "model.n_head": 4, "checkpoint.every": 3,
          "train.max_steps": 5000, "eval.val_every": 0}


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        why = f"{tool} is not installed (scripts/test.sh installs it)"
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)


def skewed(offset: str) -> list[str]:
    """A command prefix that runs the trainer with its clocks moved by `offset` (libfaketime, Debian's
    faketime package; preloaded directly: the `faketime` wrapper's semaphore clashes across pid
    namespaces)."""
    try:
        env = skewed_clock(offset)
    except ConfigError as err:
        why = f"{err} (scripts/test.sh installs the faketime package)"
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)
    return ["env", *(f"{k}={v}" for k, v in env.items())]


def lease_records(ckpt: Path) -> dict[int, dict]:
    return {int(p.name): json.loads(p.read_text()) for p in sorted((ckpt / "lease").glob("[0-9]" * 8))}


def attempts(tb: Path) -> list[dict]:
    path = tb / "attempts.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def markers(ckpt: Path) -> dict[int, dict]:
    return {int(m.parent.name[5:]): json.loads(m.read_text()) for m in ckpt.glob("step-????????/COMMITTED")}


def prepared(tmp_path: Path) -> Path:
    """The demo data, prepared once and copied into each run's directory."""
    source = tmp_path / "prepared"
    if not (source / "data").exists():
        source.mkdir(exist_ok=True)
        r = train(source, extra={"train.max_steps": 1})
        assert r.returncode == 0, r.stderr[-3000:]
    return source / "data"


def fresh(tmp_path: Path, name: str) -> Path:
    run = tmp_path / name
    run.mkdir()
    shutil.copytree(prepared(tmp_path), run / "data")
    return run


def clock_in(line_source: str) -> float:
    """Seconds between the holder's clock and this start's, from the line it logs while watching."""
    m = re.search(r"written at ([\d-]+ [\d:]+) by the holder's clock; this host's clock reads ([\d-]+ [\d:]+)",
                  line_source)
    assert m, line_source[-3000:]
    holder, mine = (datetime.strptime(x, "%Y-%m-%d %H:%M:%S") for x in m.groups())
    return (mine - holder).total_seconds()


# ---- two starts, one writer -------------------------------------------------------------------------


def test_two_trainers_started_at_the_same_instant_exactly_one_trains(tmp_path):
    for n in range(2):
        run = fresh(tmp_path, f"round{n}")
        pair = [popen_train(run, extra=BIGGER, log_name=f"{who}.log") for who in ("a", "b")]
        logs = {p.pid: run / f"{who}.log" for p, who in zip(pair, "ab")}
        try:
            loser = None
            deadline = time.monotonic() + 120
            while loser is None and time.monotonic() < deadline:
                loser = next((p for p in pair if p.poll() is not None), None)
                time.sleep(0.1)
            assert loser is not None, [logs[p.pid].read_text()[-2000:] for p in pair]
            winner = next(p for p in pair if p is not loser)
            loser_log = logs[loser.pid].read_text()
            assert loser.returncode == EXIT_ERROR, loser_log[-3000:]
            assert ("renewed its lease in" in loser_log or "at the same moment" in loser_log) and \
                "Traceback" not in loser_log, loser_log[-3000:]
            wait_until(lambda r=run: len(steps(r)) >= 3, "the winner's steps", winner, logs[winner.pid])
            winner.send_signal(signal.SIGTERM)
            assert winner.wait(timeout=120) == EXIT_PREEMPTED, logs[winner.pid].read_text()[-3000:]
        finally:
            for p in pair:
                stop(p)
        ledger = attempts(run / "tb")
        assert [a["pid"] for a in ledger if a["event"] == "start"] == [winner.pid]  # the loser recorded nothing
        assert {r["attempt"] for r in raw_steps(run / "tb")} == {1}
        assert {m["writer"]["pid"] for m in markers(run / "ckpt").values()} == {winner.pid}
        assert list(lease_records(run / "ckpt")) == [1] and lease_records(run / "ckpt")[1]["state"] == "released"


def test_a_newcomer_whose_clock_is_minutes_ahead_never_takes_over_a_live_holder(tmp_path):
    """The old lease compared the holder's written time with the newcomer's clock: five minutes
    ahead made a healthy holder look stale. Now the newcomer watches the record change."""
    run = fresh(tmp_path, "run")
    holder = popen_train(run, extra=BIGGER, log_name="holder.log")
    try:
        wait_until(lambda: len(steps(run)) >= 3, "the holder's steps", holder, run / "holder.log")
        newcomer = train(run, extra=BIGGER, prefix=skewed("+5m"))
        assert newcomer.returncode == EXIT_ERROR, newcomer.stdout[-3000:] + newcomer.stderr[-3000:]
        assert "renewed its lease in" in newcomer.stderr
        assert clock_in(newcomer.stdout) >= 290  # the clocks really differ by five minutes
        assert holder.poll() is None and list(lease_records(run / "ckpt")) == [1]
        holder.send_signal(signal.SIGTERM)
        assert holder.wait(timeout=120) == EXIT_PREEMPTED, (run / "holder.log").read_text()[-3000:]
    finally:
        stop(holder)
    assert [a["pid"] for a in attempts(run / "tb") if a["event"] == "start"] == [holder.pid]
    assert {r["attempt"] for r in raw_steps(run / "tb")} == {1}


def test_a_dead_holder_on_another_host_whose_clock_is_ahead_is_taken_over_after_one_ttl(tmp_path):
    """The holder runs in a pid namespace of its own (its pid means nothing here: another host) with
    its clock five minutes ahead, and is killed. The old lease would have called it alive until the
    newcomer's clock passed the holder's last renewal time; now the newcomer takes over once it has
    watched the record unchanged for the ttl, by its own clock."""
    need("unshare")
    run = fresh(tmp_path, "run")
    other_host = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", *skewed("+5m")]
    holder = popen_train(run, extra=BIGGER, log_name="holder.log", prefix=other_host)
    try:
        wait_until(lambda: (run / "ckpt" / "step-00000006" / "COMMITTED").exists(), "a checkpoint", holder,
                   run / "holder.log")
    finally:
        stop(holder)  # killed: no release, no end record
    ahead = attempts(run / "tb")[0]["time"] - time.time()
    assert ahead > 240, ahead  # its clock really was ahead
    t0 = time.monotonic()
    r = train(run, extra=dict(BIGGER, **{"train.max_steps": 30}))
    took = time.monotonic() - t0
    assert r.returncode == EXIT_OK, r.stdout[-3000:] + r.stderr[-3000:]
    m = re.search(r"did not renew it while this start watched for (\d+) s", r.stdout)
    assert m and 60 <= int(m.group(1)) < 75 and took < 150, (took, r.stdout[-3000:])
    ends = [a for a in attempts(run / "tb") if a["event"] == "end"]
    assert ends[0]["attempt"] == 1 and ends[0]["inferred"] and "superseded by attempt 2" in ends[0]["reason"]
    assert ends[-1]["reason"] == "finished: 30 steps" and sorted(steps(run)) == list(range(30))


# ---- a superseded writer ------------------------------------------------------------------------------


def test_a_frozen_writer_with_an_async_save_in_flight_is_superseded_and_commits_nothing(tmp_path):
    """The holder is frozen (SIGSTOP) while its async save writes the state file. A second trainer
    takes over once it watched the lease unchanged for 60 s, and trains; the first, woken up, never
    commits that save (it abandons it at the fence, or exits superseded before the save gets there),
    and writes no step, event or ledger record."""
    run = fresh(tmp_path, "run")
    big = dict(BIGGER, **{"model.n_layer": 6, "model.n_embd": 384, "model.n_head": 6, "checkpoint.async_save": True,
                          "checkpoint.every": 4, "checkpoint.keep": 3})
    first = popen_train(run, extra=big, log_name="first.log")
    second = None
    ckpt = run / "ckpt"
    try:
        def saving() -> bool:  # a step directory with a state file being written and no marker yet
            return any(not (d / "COMMITTED").exists() and any(d.iterdir()) for d in ckpt.glob("step-????????")
                       if markers(ckpt))
        wait_until(saving, "an async save in flight", first, run / "first.log", timeout=300)
        first.send_signal(signal.SIGSTOP)
        in_flight = [d.name for d in ckpt.glob("step-????????") if not (d / "COMMITTED").exists()]
        lines_then = len(raw_steps(run / "tb"))
        second = popen_train(run, extra=dict(big, **{"train.max_steps": 40}), log_name="second.log")
        wait_until(lambda: len(lease_records(ckpt)) >= 2, "the take-over", second, run / "second.log", timeout=150)
        wait_until(lambda: any(r["attempt"] == 2 for r in raw_steps(run / "tb")), "the second trainer's steps",
                   second, run / "second.log")
        first.send_signal(signal.SIGCONT)
        code = first.wait(timeout=120)
        at_exit = markers(ckpt)  # before the second writer prunes them
        assert second.wait(timeout=600) == EXIT_OK, (run / "second.log").read_text()[-3000:]
    finally:
        stop(first)
        if second is not None:
            stop(second)
    first_log, second_log = (run / "first.log").read_text(), (run / "second.log").read_text()
    assert "did not renew it while this start watched" in second_log, second_log[-3000:]
    assert code == EXIT_ERROR and "was superseded" in first_log, (code, first_log[-3000:])
    frozen_step = int(in_flight[0][5:])
    # which comes first after the thaw, the save's fence or the main thread's lease check, is the
    # scheduler's choice; either way the save is not the first writer's to commit
    abandoned = f"abandoned the save of step {frozen_step}" in first_log
    assert abandoned or at_exit.get(frozen_step, {}).get("writer", {}).get("generation") != 1, \
        (in_flight, at_exit.get(frozen_step), first_log[-3000:])
    assert len([r for r in raw_steps(run / "tb") if r["attempt"] == 1]) <= lines_then  # nothing after the freeze
    resumed = next(a for a in attempts(run / "tb") if a["event"] == "start" and a["attempt"] == 2)
    for step, m in markers(ckpt).items():  # every checkpoint after the take-over point: the second writer's
        assert m["writer"]["generation"] == (2 if step > resumed["resumed_from_step"] else 1), (step, m["writer"])
    ends = {a["attempt"]: a for a in attempts(run / "tb") if a["event"] == "end"}
    assert "superseded by attempt 2" in ends[1]["reason"] and ends[2]["reason"] == "finished: 40 steps"
    assert sorted(steps(run)) == list(range(40)) and not any("writer" in m and m["writer"]["pid"] == first.pid
                                                             for s, m in markers(ckpt).items() if s > 8)


# ---- the same job submitted twice -----------------------------------------------------------------


def test_a_second_start_with_the_same_job_identity_waits_and_a_refused_one_disturbs_nothing(tmp_path):
    run = fresh(tmp_path, "run")
    job = {"GPT2_JOB_ID": "same-job"}
    holder = popen_train(run, extra=BIGGER, env=job, log_name="holder.log")
    second = None
    try:
        wait_until(lambda: (run / "ckpt" / "step-00000003" / "COMMITTED").exists(), "a checkpoint", holder,
                   run / "holder.log")
        before = lease_records(run / "ckpt")
        refused = train(run, extra=dict(BIGGER, **{"train.total_batch_tokens": 1024}), env=job)
        assert refused.returncode == EXIT_CONFIG and "train.allow_batch_change=true" in refused.stderr
        assert "Traceback" not in refused.stderr and "watching" not in refused.stdout  # refused before the lease
        assert list(lease_records(run / "ckpt")) == list(before) == [1] and holder.poll() is None
        assert lease_records(run / "ckpt")[1]["owner"]["pid"] == holder.pid
        second = popen_train(run, extra=dict(BIGGER, **{"train.max_steps": 5000}), env=job, log_name="second.log")
        wait_until(lambda: "is an earlier attempt of this job and still renews it" in
                   (run / "second.log").read_text(), "the second start waiting", second, run / "second.log",
                   timeout=120)
        assert holder.poll() is None and list(lease_records(run / "ckpt")) == [1]  # never taken from a live holder
        holder.send_signal(signal.SIGTERM)  # the old job ends: it marks the lease stopping, saves, releases
        assert holder.wait(timeout=120) == EXIT_PREEMPTED
        wait_until(lambda: any(r["attempt"] == 2 for r in raw_steps(run / "tb")), "the second start training",
                   second, run / "second.log")
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=120) == EXIT_PREEMPTED, (run / "second.log").read_text()[-3000:]
    finally:
        stop(holder)
        if second is not None:
            stop(second)
    assert "released it" in (run / "second.log").read_text()
    ledger = attempts(run / "tb")
    # it decided again once it held the lease: it resumed from the preemption checkpoint the holder left
    held_until = next(a["step"] for a in ledger if a["event"] == "end")
    second_start = next(a for a in ledger if a["event"] == "start" and a["pid"] == second.pid)
    assert second_start["resumed_from_step"] == held_until
    assert [a["pid"] for a in ledger if a["event"] == "start"] == [holder.pid, second.pid]
    assert [a["exit_code"] for a in ledger if a["event"] == "end"] == [EXIT_PREEMPTED, EXIT_PREEMPTED]
    got = steps(run)
    assert sorted(got) == list(range(len(got)))


def test_the_other_ranks_wait_out_rank_0s_long_wait_for_the_lease_and_find_it_frozen_in_about_a_minute(tmp_path):
    """Shipped defaults. A live trainer of the same job holds the run; a second start with two workers
    under the launchers' torchrun waits for it to end (rank 0, up to checkpoint.lease_wait_s: 600 s).
    Rank 1 waits with it past the 60 s floor of the step-based limit and declares no hang: rank 0
    lives. Then rank 0 is frozen: rank 1 finds it at that floor, not at the start-up's ceiling
    (600 s), and the second start ends without touching the holder's lease."""
    run = fresh(tmp_path, "run")
    job = {"GPT2_JOB_ID": "same-job"}
    holder = popen_train(run, extra=dict(BIGGER, **{"train.max_steps": 100000}), env=job, log_name="holder.log")
    second = None
    log = run / "second.log"
    found = "in phase 'taking the run's lease: waiting for rank 0' (rank 1"
    try:
        wait_until(lambda: (run / "ckpt" / "step-00000003" / "COMMITTED").exists(), "a checkpoint", holder,
                   run / "holder.log")
        second = popen_train(run, nproc=2, extra=BIGGER, env=job, log_name="second.log",
                             launcher="gpt2.launch.torchrun")
        wait_until(lambda: "is an earlier attempt of this job and still renews it" in log.read_text(),
                   "the second start waiting", second, log, timeout=180)
        time.sleep(80)  # past the floor (60 s) and a peer's staleness (15 s): the wait is progress
        assert second.poll() is None and "no progress" not in log.read_text(), log.read_text()[-3000:]
        os.kill(rank_pid(second.pid, 0), signal.SIGSTOP)
        took = wait_until(lambda: found in log.read_text(), "rank 1 to find rank 0 frozen", second, log, timeout=300)
        assert second.wait(timeout=120) == EXIT_HUNG  # rank 1's, though rank 0 (killed by it) failed first
        assert holder.poll() is None and list(lease_records(run / "ckpt")) == [1]  # the holder's, untouched
    finally:
        stop(holder)
        if second is not None:
            stop(second)
    hang = next(line for line in log.read_text().splitlines() if found in line)
    print(f"rank 1 found rank 0 frozen {took:.0f} s after it froze: {hang}")
    assert "no step timed yet" in hang and 60 <= took < 120, (took, hang)  # not the 600 s ceiling


# ---- lineage: rollback, start-over, restart ----------------------------------------------------------


def test_a_rollback_and_a_start_over_in_one_directory_then_plain_restarts_follow_the_current_lineage(tmp_path):
    run = fresh(tmp_path, "run")
    base = {"train.max_steps": 20, "checkpoint.every": 5, "checkpoint.keep": 2, "eval.val_every": 0}
    ckpt, tb = run / "ckpt", run / "tb"
    first = train(run, extra=base)
    assert first.returncode == 0, first.stderr[-3000:]
    original = {s: r["loss"] for s, r in steps(run).items()}
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000015", "step-00000020"]

    # a rollback that cannot fit (another model size) is refused before it touches anything
    before = {p.relative_to(run): p.read_bytes() for p in (ckpt, tb) for p in p.rglob("*") if p.is_file()}
    misfit = train(run, extra=dict(base, **{"checkpoint.resume": ckpt / "step-00000015", "model.n_embd": 64}))
    assert misfit.returncode == EXIT_ERROR and "does not fit this run's model" in misfit.stderr
    assert {p.relative_to(run): p.read_bytes() for p in (ckpt, tb) for p in p.rglob("*") if p.is_file()} == before

    # a loss spike after step 15: roll back to it with a lower lr
    lower = {"checkpoint.resume": ckpt / "step-00000015", "optim.lr": 1e-3, "optim.min_lr": 1e-4}
    back = train(run, extra=dict(base, **lower))
    assert back.returncode == 0, back.stdout[-3000:] + back.stderr[-3000:]
    assert "a rollback to step 15" in back.stdout and "step-00000020 aside" in back.stderr
    assert (len(list(ckpt.glob("step-00000020.abandoned-*"))), back.stdout.count("resumed from")) == (1, 1)
    rolled = steps(run)
    assert [rolled[s]["loss"] for s in range(15)] == [original[s] for s in range(15)]
    assert all(rolled[s]["loss"] != original[s] for s in range(16, 20))  # the new branch, not the old one
    final = json.loads((ckpt / "step-00000020" / "COMMITTED").read_text())
    assert final["lineage"]["id"] != json.loads((next(ckpt.glob("step-00000020.abandoned-*")) / "COMMITTED")
                                                .read_text())["lineage"]["id"]

    again = train(run, extra=base)  # a requeue, a pod restart: resume=auto
    assert again.returncode == 0 and "training already complete (20/20 steps)" in again.stdout
    assert f"resumed from {ckpt}/step-00000020" in again.stdout
    status = run_cli(["-m", "gpt2.status", str(tb)]).stdout
    assert "step 20 (rollback)" not in status and "step 15 (rollback)" in status and "a rollback" in status, status
    assert f"loss {rolled[19]['loss']:.4f}" in status

    # start over in the same directory: everything moves aside, the run begins again from scratch
    over = train(run, extra=dict(base, **{"checkpoint.resume": "never"}))
    assert over.returncode == 0, over.stdout[-3000:] + over.stderr[-3000:]
    assert "a start-over" in over.stdout and "training complete: 20 steps" in over.stdout
    assert {s: r["loss"] for s, r in steps(run).items()} == original  # same seed: the first run, bitwise
    final_over = json.loads((ckpt / "step-00000020" / "COMMITTED").read_text())
    assert final_over["lineage"]["id"] not in (final["lineage"]["id"],)
    done = train(run, extra=base)
    assert done.returncode == 0 and "training already complete (20/20 steps)" in done.stdout
    listing = run_cli(["-m", "gpt2.checkpoint", "list", str(ckpt)]).stdout
    assert f"current lineage {final_over['lineage']['id']}" in listing and listing.count("moved aside") >= 3

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    events = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert len(acc.Scalars("train/loss")) == 20 and all(abs(events[s] - original[s]) < 1e-6 for s in range(20))
