"""The run's lease: one writer per checkpoint.dir, take-over rules, fencing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from gpt2.checkpoint.lease import LEASE_FILE, Lease, Owner
from gpt2.errors import LeaseHeld, LeaseLost


def owner(job_id: str | None = None, attempt: tuple[int, int] = (0, 0), pid: int | None = None) -> Owner:
    me = Owner.of_this_process()
    return Owner(me.host, pid or os.getpid(), job_id, list(attempt), time.time(), os.urandom(8).hex())


def lease(tmp_path, **kw) -> Lease:
    return Lease(str(tmp_path), ttl_s=60, owner=owner(**kw))


def test_a_second_trainer_is_refused_naming_the_holder_and_how_to_take_over(tmp_path):
    first = lease(tmp_path).acquire()
    try:
        with pytest.raises(LeaseHeld) as err:
            lease(tmp_path).acquire()
        text = str(err.value)
        assert f"pid {os.getpid()}" in text and "checkpoint.take_over=true" in text and "lease_ttl_s (60 s)" in text
        forced = lease(tmp_path).acquire(take_over=True)
        assert forced.generation == 2
        with pytest.raises(LeaseLost, match="superseded"):
            first.verify()  # fencing: the first holder may not write any more
        forced.release()
    finally:
        first.release()
    assert not (tmp_path / LEASE_FILE).exists()


def test_a_restart_of_the_same_job_takes_over_at_once_an_earlier_attempt_does_not(tmp_path):
    old = lease(tmp_path, job_id="1234", attempt=(0, 0)).acquire()
    new = lease(tmp_path, job_id="1234", attempt=(1, 0)).acquire()  # requeued while the old one still runs
    assert new.generation == 2
    with pytest.raises(LeaseHeld):
        lease(tmp_path, job_id="1234", attempt=(0, 3)).acquire()  # the cut-off old allocation restarting
    with pytest.raises(LeaseHeld):
        lease(tmp_path, job_id="other").acquire()
    old.release()  # superseded: leaves the lease alone
    assert json.loads((tmp_path / LEASE_FILE).read_text())["generation"] == 2
    new.release()


def test_a_dead_holder_on_this_host_and_a_stale_lease_are_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    lease(tmp_path, pid=int(dead)).acquire()._stop.set()  # its holder "crashed": never released
    after_crash = lease(tmp_path).acquire()
    assert after_crash.generation == 2
    after_crash._stop.set()
    data = json.loads((tmp_path / LEASE_FILE).read_text())
    data["renewed_at"] -= 61  # not renewed for longer than the ttl
    (tmp_path / LEASE_FILE).write_text(json.dumps(data))
    stale_taker = lease(tmp_path).acquire()
    assert stale_taker.generation == 3
    stale_taker.release()


def test_a_frozen_holder_checks_the_lease_before_going_on(tmp_path):
    frozen = lease(tmp_path).acquire()
    frozen._stop.set()  # its renewals stop, as when the process is stopped
    frozen.check()  # renewed just now: no storage access, fine
    lease(tmp_path).acquire(take_over=True)
    frozen._renewed -= 31  # more than ttl/2 since the last renewal: the process was frozen
    with pytest.raises(LeaseLost):
        frozen.check()
