"""The run's lease: generations created exclusively, staleness judged by the watcher's own clock,
the fast paths, fencing. The integration tests (test_lease_races.py) run it in real trainers with the
shipped defaults; here a short ttl keeps the mechanics quick."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time

import pytest

from gpt2.checkpoint.lease import LEASE_DIR, Lease, Owner, node_id
from gpt2.errors import LeaseHeld, LeaseLost
from gpt2.storage import create_exclusive, filesystem, supports_exclusive_create

TTL = 12  # the smallest ttl the config allows; the shipped 60 s is used by the integration tests


def owner(submission: str | None = None, attempt: tuple[int, int] = (0, 0), agent: str | None = None,
          pid: int | None = None) -> Owner:
    me = Owner.of_this_process()
    return Owner(me.host, me.node, pid or os.getpid(), None if pid else me.pid_start, submission, list(attempt),
                 agent, os.urandom(8).hex(), "now")


def lease(directory, **kw) -> Lease:
    return Lease(str(directory), ttl_s=TTL, owner=owner(**kw))


def record(directory, generation: int) -> dict:
    return json.loads((directory / LEASE_DIR / f"{generation:08d}").read_text())


# ---- the primitive: one creator per generation -------------------------------------------------


def _race(url: str, storage_options: dict, rounds: int, barrier, results) -> None:
    fs, root = filesystem(url, storage_options)
    for r in range(rounds):
        barrier.wait()
        results.put((r, create_exclusive(fs, f"{root}/{r:08d}", f"{os.getpid()}".encode())))


def race(url: str, storage_options: dict | None = None, processes: int = 4, rounds: int = 100) -> dict[int, int]:
    """`processes` processes create the same files at the same instant, round after round."""
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(url, storage_options or {}, rounds, barrier, results))
             for _ in range(processes)]
    for p in procs:
        p.start()
    wins: dict[int, int] = {}
    for _ in range(processes * rounds):
        r, won = results.get(timeout=120)
        wins[r] = wins.get(r, 0) + won
    for p in procs:
        p.join()
    return wins


def test_of_processes_creating_a_generation_at_the_same_instant_exactly_one_succeeds(tmp_path):
    wins = race(str(tmp_path), rounds=100)
    assert wins == {r: 1 for r in range(100)}


@pytest.mark.s3
def test_the_same_holds_on_the_s3_server_through_its_conditional_put(s3_server, s3_url):
    fs, root = filesystem(s3_url, s3_server.storage_options)
    assert supports_exclusive_create(fs, root)  # SeaweedFS honours If-None-Match: *
    wins = race(s3_url, s3_server.storage_options, rounds=30)
    assert wins == {r: 1 for r in range(30)}


# ---- taking it ---------------------------------------------------------------------------------


def test_a_free_or_released_lease_is_taken_at_once_and_generations_only_grow(tmp_path):
    first = lease(tmp_path).acquire()
    assert first.generation == 1 and first.took_over is None
    first.release()
    assert record(tmp_path, 1)["state"] == "released"
    t0 = time.monotonic()
    second = lease(tmp_path).acquire()
    assert second.generation == 2 and "released it" in second.took_over.why and time.monotonic() - t0 < 2
    second.release()


def test_another_submission_watching_a_live_holder_is_refused_within_a_renewal(tmp_path):
    holder = lease(tmp_path, submission="slurm:/1").acquire()
    try:
        t0 = time.monotonic()
        with pytest.raises(LeaseHeld) as err:
            lease(tmp_path, submission="slurm:/2").acquire()
        took = time.monotonic() - t0
        assert TTL / 4 - 1 < took < TTL / 4 + 3, took  # refused when it saw the first renewal
        text = str(err.value)
        assert f"pid {os.getpid()}" in text and "renewed its lease" in text and "checkpoint.take_over=true" in text
        assert holder.may_write() and holder.generation == 1  # the holder never noticed
    finally:
        holder.release()


def test_a_lease_watched_unchanged_for_a_ttl_is_taken_over_and_its_holder_fenced(tmp_path):
    frozen = lease(tmp_path).acquire()
    frozen._stop.set()  # renewals stop, as when the process is frozen or cut off
    frozen._thread.join()
    frozen.owner.node = "another-host"  # its pid means nothing here: no fast path
    (tmp_path / LEASE_DIR / "00000001").write_text(json.dumps(dict(record(tmp_path, 1), owner=vars(frozen.owner))))
    t0 = time.monotonic()
    newcomer = lease(tmp_path).acquire()
    waited = time.monotonic() - t0
    assert TTL <= waited < TTL + 3 and newcomer.generation == 2 and newcomer.took_over.stale
    assert "did not renew it while this start watched" in newcomer.took_over.why
    with pytest.raises(LeaseLost, match="superseded"):
        frozen.fence()  # the frozen one, woken up, may not commit anything
    assert record(tmp_path, 2)["owner"]["token"] == newcomer.owner.token
    newcomer.release()


def test_fast_paths_a_dead_process_here_a_later_attempt_of_the_same_agent_and_take_over(tmp_path):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    gone = lease(tmp_path, pid=dead).acquire()
    gone._stop.set()
    t0 = time.monotonic()
    after_crash = lease(tmp_path, submission="torchrun:x", agent="a", attempt=(0, 0)).acquire()
    assert after_crash.took_over.gone and "no longer running" in after_crash.took_over.why
    after_crash._stop.set()
    restart = lease(tmp_path, submission="torchrun:x", agent="a", attempt=(0, 1)).acquire()  # same agent, later
    assert "later attempt of the same job" in restart.took_over.why
    requeue = lease(tmp_path, submission="torchrun:x", agent="b", attempt=(1, 0)).acquire()  # a requeue: any agent
    forced = lease(tmp_path, submission="other").acquire(take_over=True)
    assert time.monotonic() - t0 < 3 and forced.generation == 5
    for superseded in (restart, requeue):
        superseded._thread.join(timeout=TTL)  # each learns it within the poll interval
        assert superseded.superseded
    forced.release()


def test_an_earlier_or_unordered_attempt_of_the_same_job_waits_for_the_holder_to_end(tmp_path):
    """The same job (a restarted pod, a group restart that moved rank 0 to another agent) never takes
    over from a live holder; it waits for it to end, then takes the lease."""
    holder = lease(tmp_path, submission="k8s:ns/job", agent="a", attempt=(0, 3)).acquire()
    got = {}

    def newcomer() -> None:
        got["lease"] = lease(tmp_path, submission="k8s:ns/job", agent="b", attempt=(0, 0)).acquire()

    t = threading.Thread(target=newcomer)
    t.start()
    time.sleep(TTL / 4 + 4)  # a renewal was seen: another submission would have been refused by now
    assert t.is_alive() and holder.may_write()
    holder.release()
    t.join(timeout=10)
    assert got["lease"].generation == 2
    got["lease"].release()


def test_a_stopping_holder_is_waited_for_even_by_another_submission(tmp_path):
    holder = lease(tmp_path, submission="a").acquire()
    holder.mark_stopping()  # e.g. SIGTERM: it saves and exits (a job deleted and created again)
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("lease", lease(tmp_path, submission="b").acquire()))
    t.start()
    time.sleep(TTL / 4 + 2)
    assert t.is_alive()
    holder.release()
    t.join(timeout=10)
    assert got["lease"].generation == 2
    got["lease"].release()


# ---- holding it ----------------------------------------------------------------------------------


def test_a_renewal_racing_a_take_over_never_overwrites_the_newcomer(tmp_path):
    """The holder renews as fast as it can while newcomers take over: every take-over's record stays
    the newcomer's, and the holder learns it lost within its poll interval."""
    for _ in range(5):
        holder = lease(tmp_path).acquire()
        stop = threading.Event()

        def hammer(h=holder, stop=stop) -> None:
            while not stop.is_set() and not h.superseded:
                try:
                    h._write_own()
                except Exception:
                    pass

        t = threading.Thread(target=hammer)
        t.start()
        time.sleep(0.2)
        newcomer = lease(tmp_path).acquire(take_over=True)
        time.sleep(0.3)
        assert record(tmp_path, newcomer.generation)["owner"]["token"] == newcomer.owner.token
        deadline = time.monotonic() + holder.poll_s + 2
        while not holder.superseded and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        t.join()
        assert holder.superseded and not holder.may_write()
        with pytest.raises(LeaseLost):
            holder.check()
        newcomer.release()


def test_a_holder_that_could_not_renew_for_half_a_ttl_writes_nothing_until_it_has(tmp_path):
    holder = lease(tmp_path).acquire()
    assert holder.may_write()
    holder._confirmed -= TTL / 2  # as after a freeze, or renewals that failed
    assert not holder.may_write()
    holder.check()  # not superseded: training goes on, writes are held back
    holder.fence()  # a commit first renews
    assert holder.may_write()
    holder.release()


def test_a_store_without_conditional_writes_is_said_and_still_taken_and_renewed(tmp_path, monkeypatch, caplog):
    import gpt2.checkpoint.lease as lease_module

    monkeypatch.setattr(lease_module, "supports_exclusive_create", lambda fs, root: False)
    first = lease(tmp_path).acquire()
    assert "does not support conditional writes" in caplog.text and first.generation == 1
    first._write_own()
    # a second writer of the same generation (the window the fallback leaves): the first finds out
    (tmp_path / LEASE_DIR / "00000001").write_text(json.dumps(dict(record(tmp_path, 1), owner=vars(owner()))))
    first._write_own()
    assert first.superseded
    first.release()


def test_node_identity_tells_processes_of_this_machine_apart_from_other_pid_namespaces():
    assert node_id() == Owner.of_this_process().node
    me = Owner.of_this_process()
    assert not me.gone()
    me.pid_start = (me.pid_start or 0) + 1  # the pid, reused by another process
    assert me.gone()
    me.node = "other-boot/pid:[1]"
    assert not me.gone()  # cannot tell from here: never a fast path


def test_a_holder_frozen_through_several_take_overs_never_comes_back(tmp_path):
    """Generations pruned behind the newest holders: the frozen first holder's own record is gone,
    and it must count that as superseded, never recreate it and write again."""
    frozen = lease(tmp_path).acquire()
    frozen._stop.set()
    frozen._thread.join()
    for _ in range(4):  # four later holders, one after the other
        lease(tmp_path).acquire(take_over=True).release()
    assert not (tmp_path / LEASE_DIR / "00000001").exists() and not (tmp_path / LEASE_DIR / "00000002").exists()
    frozen._confirmed -= TTL  # it wakes up: its last renewal is long ago
    with pytest.raises(LeaseLost):
        frozen.fence()
    assert not (tmp_path / LEASE_DIR / "00000001").exists() and frozen.superseded and not frozen.may_write()


def test_a_superseded_start_records_nothing_in_the_ledger(tmp_path):
    from gpt2.metrics import MetricsLogger

    first = lease(tmp_path).acquire()
    lease(tmp_path).acquire(take_over=True)  # before the first wrote its start record
    metrics = MetricsLogger(str(tmp_path / "tb"), True, 10, gate=first)
    with pytest.raises(LeaseLost):
        metrics.attempt_started(0, {"pid": os.getpid()}, generation=first.generation)
    metrics.close()
    assert not (tmp_path / "tb" / "attempts.jsonl").exists()


def test_a_final_save_marks_the_lease_stopping_until_it_is_released(tmp_path):
    from helpers.parts import Part

    from gpt2.checkpoint import Checkpointer
    from gpt2.config import CheckpointConfig

    holder = lease(tmp_path).acquire()
    ck = Checkpointer(CheckpointConfig(dir=str(tmp_path)), parts={"progress": Part({"step": 1})},
                      describe=lambda s: {"config": {}}, lease=holder)
    ck.save_final(1, "preemption")
    assert record(tmp_path, 1)["state"] == "stopping"  # a start that watches it now waits instead of giving up
    holder.release()
    assert record(tmp_path, 1)["state"] == "released"
