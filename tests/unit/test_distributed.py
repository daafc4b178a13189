"""Ending a hung group quickly: a rank that exits for a hang kills its node's stopped peers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO

# An "agent" (like torchrun's) with four children: a worker of the group that runs, one that will be
# stopped, a stopped process of another group, and the rank that calls end_stopped_local_peers once
# it finds the file `go` (it prints what it killed).
AGENT = r"""
import os, subprocess, sys, time
def child(code, run_id):
    env = dict(os.environ, TORCHELASTIC_RUN_ID=run_id)
    return subprocess.Popen([sys.executable, "-c", code], env=env)
sleeper = "import time; time.sleep(120)"
caller = ("import os, time\n"
          "while not os.path.exists('go'): time.sleep(0.05)\n"
          "from gpt2.distributed import end_stopped_local_peers\n"
          "print('killed', sorted(end_stopped_local_peers()), flush=True)")
kids = [child(sleeper, "run-1"), child(sleeper, "run-1"), child(sleeper, "run-2"), child(caller, "run-1")]
print(" ".join(str(k.pid) for k in kids), flush=True)
kids[3].wait()
for k in kids[:3]:
    k.kill()
"""


def test_a_hung_rank_kills_its_stopped_peers_of_the_same_group_only(tmp_path):
    agent = subprocess.Popen([sys.executable, "-c", AGENT], cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(REPO)))
    _running, stopped, other_group, _caller = (int(p) for p in agent.stdout.readline().split())
    try:
        os.kill(stopped, signal.SIGSTOP)
        os.kill(other_group, signal.SIGSTOP)
        time.sleep(0.5)  # the stops have landed
        (tmp_path / "go").touch()
        out = agent.stdout.readline()
        assert out.split(" ", 1) == ["killed", f"[{stopped}]\n"], out
    finally:
        os.kill(other_group, signal.SIGCONT)
        agent.wait(timeout=30)


class _DeadStore:
    """A process group's store whose host is gone: every call is refused (for `failing_s` of a fake
    clock, then answered, if given)."""

    def __init__(self, clock: list[float], failing_s: float = float("inf")):
        self.clock, self.failing_s = clock, failing_s

    def _call(self, *args):
        if self.clock[0] < self.failing_s:
            raise ConnectionError("Connection refused")
        return True

    set = check = _call

    def multi_get(self, keys):
        self._call()
        return [b"1"] * len(keys)


def _waiting_rank_1(monkeypatch, store: _DeadStore, clock: list[float]):
    import torch.distributed as dist

    from gpt2 import distributed

    monkeypatch.setattr(distributed, "_store", lambda: store)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(distributed.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    liveness = distributed.Liveness()
    liveness._thread = object()  # started: wait_for_all watches the store
    return liveness


def test_a_rank_waiting_on_a_store_whose_host_is_gone_gives_up_as_for_a_silent_peer(monkeypatch):
    """Rank 0 hosts the group's store (multi-node torchrun): once it is killed, the others' wait for
    its save would last until the watchdog's limit or torchrun's 30 s SIGKILL; it ends at STALE_S."""
    from gpt2.distributed import STALE_S
    from gpt2.errors import EXIT_HUNG, GroupLost, exit_code

    clock = [0.0]
    liveness = _waiting_rank_1(monkeypatch, _DeadStore(clock), clock)
    with pytest.raises(GroupLost, match="rank 0 is gone, or this rank.s connection to it broke") as caught:
        liveness.wait_for_all()
    assert STALE_S <= clock[0] < STALE_S + 1 and exit_code(caught.value) == EXIT_HUNG


def test_a_store_that_answers_again_within_the_limit_is_waited_for(monkeypatch):
    from gpt2.distributed import STALE_S

    clock = [0.0]
    liveness = _waiting_rank_1(monkeypatch, _DeadStore(clock, failing_s=STALE_S - 1), clock)
    liveness.wait_for_all()  # no error: the blip ends before the limit
    assert clock[0] >= STALE_S - 1


class _SilentRank0Store:
    """The group's store answers, but rank 0's heartbeat stands still (killed on another host, or
    on this one while its agent tears the group down); every rank has arrived at `arrives_at`."""

    def __init__(self, clock: list[float], arrives_at: float = 1e9):
        self.clock, self.arrives_at, self.beats = clock, arrives_at, 0

    def set(self, key, value):
        pass

    def check(self, keys):
        return self.clock[0] >= self.arrives_at

    def multi_get(self, keys):
        self.beats += 1
        return [b"7", str(self.beats).encode()]


def test_a_rank_told_to_stop_while_a_peer_is_silent_leaves_at_once_instead_of_waiting_for_sigkill(monkeypatch):
    """torchrun tears a group down when a worker died (SIGTERM, then SIGKILL 30 s later): a rank
    waiting for the dead one's save leaves once it is stale (STALE_S) instead of waiting for the
    SIGKILL; without the stop, a silent peer is the watchdog's to judge (the wait goes on)."""
    from gpt2 import distributed
    from gpt2.distributed import STALE_S
    from gpt2.errors import GroupLost

    clock = [0.0]
    liveness = _waiting_rank_1(monkeypatch, _SilentRank0Store(clock), clock)
    with pytest.raises(GroupLost, match=r"rank\(s\) \[0\] gave no sign of life .* told to stop"):
        liveness.wait_for_all(stopping=lambda: True)
    assert STALE_S <= clock[0] < STALE_S + 1

    clock[0] = 0.0
    monkeypatch.setattr(distributed, "barrier", lambda: None)
    liveness = _waiting_rank_1(monkeypatch, _SilentRank0Store(clock, arrives_at=3 * STALE_S), clock)
    liveness.wait_for_all(stopping=lambda: False)  # not told to stop: waits, here until rank 0 arrives
    assert clock[0] >= 3 * STALE_S


def test_an_hour_long_wait_for_a_living_rank_0_polls_at_a_steady_pace(monkeypatch):
    """Rank 0 prepares the full corpus (an hour) while the others wait: the wait polls every POLL_S
    (after a quick start) for as long as it lasts."""
    from gpt2 import distributed
    from gpt2.distributed import POLL_S

    clock = [0.0]
    monkeypatch.setattr(distributed, "barrier", lambda: None)
    store = _SilentRank0Store(clock, arrives_at=3600.0)
    store.multi_get = lambda keys: [str(clock[0]).encode()] * 2  # every rank beats
    liveness = _waiting_rank_1(monkeypatch, store, clock)
    liveness.wait_for_all()
    assert 3600.0 <= clock[0] < 3600.0 + POLL_S


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_ranks(script: str, *args: str, world: int = 2, port: int | None = None) -> list[subprocess.Popen]:
    """Ranks 0 and 1 of a group of `world` over env:// (the store on rank 0, as with srun, at `port`),
    each running `script` with `args`; their output (stdout and stderr) is read with communicate()."""
    port = port or free_port()
    return [subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
            for r in (0, 1)]


# Ranks 0 and 1 of three (rank 2 never starts) join the group under a watchdog with a 5 s floor, as
# in `gpt2.train.run`, waiting up to 12 s for every rank to start; rank 1 prints each wait's progress.
STARTING = r"""
import os, sys, time
from gpt2 import distributed, logs
from gpt2.errors import Gpt2Error
from gpt2.watchdog import Watchdog
logs.setup()
rank = os.environ["RANK"]
with Watchdog(600, where=lambda: f"rank {rank}", floor_s=5.0) as watchdog:
    t0 = time.monotonic()
    try:
        distributed.init("cpu", 1200, 12)
    except Gpt2Error as err:
        print(f"rank {rank} raised {type(err).__name__} after {time.monotonic() - t0:.0f} s: {err}", flush=True)
"""


def test_the_start_waits_for_a_slow_rank_within_its_limit_and_finds_a_frozen_rank_0_at_the_floor():
    """Waiting for every rank to start goes past the floor while rank 0's store answers, and ends at
    its limit naming the missing rank (GroupLost: a restart helps); once rank 0 (the store's host)
    freezes, a waiting rank is found at the floor (5 s here), not at the ceiling (600 s). Both at once."""
    from datetime import timedelta

    import torch.distributed as dist

    port = free_port()
    slow, frozen = start_two_ranks(STARTING, world=3), start_two_ranks(STARTING, world=3, port=port)
    try:
        store = dist.TCPStore("127.0.0.1", port, 3, is_master=False, timeout=timedelta(seconds=60),
                              wait_for_workers=False)
        while store.add("gpt2/started", 0) < 2:  # both wait for rank 2 now
            time.sleep(0.1)
        os.kill(frozen[0].pid, signal.SIGSTOP)
        t0 = time.monotonic()
        frozen_rank_1 = frozen[1].communicate(timeout=120)[0]
        found_after = time.monotonic() - t0
        outs = [p.communicate(timeout=120)[0] for p in slow]
    finally:
        for p in slow + frozen:
            p.kill()
            p.wait()
    # rank 0 decides at its 12 s and says so; rank 1 (which started a little later) names the rank too
    for rank, out in enumerate(outs):
        said = re.search(rf"rank {rank} raised GroupLost after (\d+) s: rank\(s\) \[2\] did not start within 12 s", out)
        assert said and (12 <= int(said.group(1)) < 20 if rank == 0 else 5 < int(said.group(1)) < 20), out
    assert frozen[1].returncode == 201, frozen_rank_1
    assert re.search(r"no progress for \d+ s in phase 'start-up: waiting for every rank to start' \(rank 1; limit 5 s",
                     frozen_rank_1), frozen_rank_1
    assert found_after < 15, (found_after, frozen_rank_1)


# Two ranks: rank 0 refuses the start in one of the start-up's decisions (its resume plan, its
# lease), or the ranks see different data.
REFUSED = r"""
import sys
from types import SimpleNamespace
from gpt2 import distributed
from gpt2.checkpoint import plan_resume
from gpt2.config import CheckpointConfig
from gpt2.errors import Gpt2Error, exit_code
from gpt2.train import same_data_everywhere, take_lease
dist = distributed.init("cpu", 60)
decide = {"plan": lambda: plan_resume(CheckpointConfig(dir=sys.argv[1]), dist.is_main),
          "lease": lambda: take_lease(CheckpointConfig(dir=sys.argv[1]), dist.is_main),
          "data": lambda: same_data_everywhere(SimpleNamespace(data=SimpleNamespace(dir=sys.argv[1])),
                                               f"prepared on rank {dist.rank}")}[sys.argv[2]]
try:
    decide()
except Gpt2Error as err:
    print(f"rank {dist.rank} refused: {type(err).__name__} {exit_code(err)}: {err}", flush=True)
"""


@pytest.mark.parametrize("where", ["plan", "lease", "data"])
def test_a_start_rank_0_refuses_is_refused_alike_on_every_rank(tmp_path, where):
    """Rank 0 cannot plan the resume (an unreadable LINEAGE), or cannot take the lease (a file stands
    where checkpoint.dir should be), or the ranks found different data in data.dir: every rank raises
    the same typed error (its message and exit code), instead of the others losing the group and
    exiting as for a fault."""
    if where == "plan":
        ckpt = tmp_path / "ckpt"
        ckpt.mkdir()
        (ckpt / "LINEAGE").write_text("not json")
        expected = f"CheckpointError 1: {ckpt}/LINEAGE is unreadable"
    elif where == "data":  # each rank's data.dir holds its own corpus (a node-local disk, prepared apart)
        ckpt = tmp_path / "data"
        expected = f"DataError 1: data.dir {ckpt} holds other data on"
    else:
        (tmp_path / "blocker").write_text("a file")
        ckpt = tmp_path / "blocker" / "ckpt"
        expected = f"StorageError 1: checkpoint.dir '{ckpt}' cannot be created: {tmp_path}/blocker is a file"
    procs = start_two_ranks(REFUSED, str(ckpt), where)
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for rank, out in enumerate(outs):
        assert f"rank {rank} refused: {expected}" in out, out


# Two ranks each do a part of the work (reading their first batches); rank 1's part fails
# (a corrupt shard), rank 0's takes a few seconds.
PART_FAILS = r"""
import sys, time
from gpt2 import distributed
from gpt2.errors import DataError, Gpt2Error, exit_code
dist = distributed.init("cpu", 60)
def work():
    if dist.rank == 1 and sys.argv[1] == "fails":
        raise DataError("shard train_000001.npy is corrupt")
    time.sleep(3 * (dist.rank == 0))
t0 = time.monotonic()
try:
    distributed.done_on_every_rank(work, "reading the first batches")
    print(f"rank {dist.rank} done", flush=True)
except Gpt2Error as err:
    print(f"rank {dist.rank} raised {type(err).__name__} {exit_code(err)}: {err} in {time.monotonic() - t0:.0f} s",
          flush=True)
"""


@pytest.mark.parametrize("outcome", ["fails", "done"])
def test_work_that_fails_on_one_rank_is_raised_on_every_rank_at_once(outcome):
    """The failing rank's typed error (message and exit code) on both ranks, as soon as the slower
    rank is done: rank 0 does not wait in the barrier for a rank that is gone (15 s for its
    heartbeat, then the watchdog), and does not go on to the first step without it."""
    outs = [p.communicate(timeout=120)[0] for p in start_two_ranks(PART_FAILS, outcome)]
    for rank, out in enumerate(outs):
        if outcome == "done":
            assert f"rank {rank} done" in out, out
        else:
            said = re.search(rf"rank {rank} raised DataError 1: shard train_000001.npy is corrupt in (\d+) s", out)
            assert said and int(said.group(1)) < 10, out


# Two ranks over env:// at the end of a run, each under a watchdog with the shipped limits, as in
# `gpt2.train.run`: rank 0 takes 75 s to finish (a final lease release on a slow store), or freezes
# (SIGSTOP) before it reaches the teardown.
FINISHING = r"""
import os, signal, sys, time
from gpt2 import distributed, logs
from gpt2.config import TrainConfig
from gpt2.watchdog import Watchdog
logs.setup()
ceiling = TrainConfig().hang_timeout_s
dist = distributed.init("cpu", 2 * ceiling)
logs.setup(dist.rank)
with Watchdog(ceiling, where=lambda: f"rank {dist.rank}") as watchdog:
    with watchdog.phase("finishing (the last records, the lease, the group's teardown)", ceiling=True):
        if dist.rank == 0:
            if sys.argv[1] == "frozen":
                os.kill(os.getpid(), signal.SIGSTOP)
            time.sleep(75)
        t0 = time.monotonic()
        distributed.teardown()
print(f"rank {dist.rank} left the group after {time.monotonic() - t0:.0f} s", flush=True)
"""


def test_the_ranks_wait_for_a_slow_finish_and_find_a_frozen_rank_0_in_about_a_minute():
    """At the end of a run the other ranks wait for rank 0 (its last records, the lease's release)
    as long as it lives, past the 60 s floor, and all leave cleanly; a rank 0 that froze is found in
    about a minute (exit 201, the phase named), not at train.hang_timeout_s (600 s). Both groups run
    at once."""
    groups = {case: start_two_ranks(FINISHING, case) for case in ("slow", "frozen")}
    t0 = time.monotonic()
    try:
        frozen_rank_1 = groups["frozen"][1].communicate(timeout=300)[0]
        found_after = time.monotonic() - t0
        slow = [p.communicate(timeout=300)[0] for p in groups["slow"]]
    finally:
        for p in groups["frozen"] + groups["slow"]:
            p.kill()
            p.wait()
    assert groups["frozen"][1].returncode == 201, frozen_rank_1
    assert "in phase 'finishing: waiting for every rank to finish'" in frozen_rank_1, frozen_rank_1
    assert 60 <= found_after < 150, (found_after, frozen_rank_1)
    for rank, out in enumerate(slow):
        assert groups["slow"][rank].returncode == 0, out
        assert f"rank {rank} left the group" in out, out
    waited = int(slow[1].split("rank 1 left the group after ")[1].split()[0])
    assert waited >= 70, slow[1]  # rank 1 did wait past the floor for rank 0


# Two ranks over env:// in a training step, under watchdogs whose ceiling is 30 s and whose
# step-based limit is 8 s (20 s for the working rank). The working rank beats first, as work of its
# own (a step that waits for its shard copy: for 20 s, `working` only every 7.5 s, close to the
# other's limit; or `looping` for good) or as a wait for other ranks (`waiting`, as `wait_for_all`
# does), then joins the step's all-reduce. The other goes straight into the all-reduce, or
# (`stuck`, the working rank being rank 0 then) sleeps outside any collective: a read that hangs.
GROUP_PROGRESS = r"""
import sys, time
import torch
from gpt2 import distributed, logs
from gpt2.watchdog import Watchdog, beat
logs.setup()
distributed.PEERS_AFTER_S = 2.0  # look at the peers' work after 2 s without progress (10 s shipped): a short test
dist = distributed.init("cpu", 600)
logs.setup(dist.rank)
case = sys.argv[1]
working = dist.rank == (0 if case == "stuck" else 1)
with Watchdog(30, where=lambda: f"rank {dist.rank}", floor_s=20 if working else 8) as watchdog:
    watchdog.steps(before=[0.01] * 3)
    t0 = time.monotonic()
    if working:
        while time.monotonic() - t0 < (120 if case == "looping" else 20):
            beat(waiting=case == "waiting")
            time.sleep(7.5 if case == "working" else 0.2)
    elif case == "stuck":
        time.sleep(120)
    distributed.all_reduce_sum(torch.zeros(1))
    print(f"rank {dist.rank} left the step after {time.monotonic() - t0:.0f} s", flush=True)
distributed.teardown()
"""


def test_a_rank_in_a_collective_waits_for_a_working_peer_and_only_for_one():
    """A rank whose main thread waits in a collective sees no progress of its own. It waits past
    its limit while a peer's own work moves (published with the peer's heartbeat, and seen up to
    two heartbeats late: a peer's moves 7.5 s apart are enough for an 8 s limit), but exits as
    hung at its limit when the peer only waits too (its beats are not work: ranks that wait for one
    another must not keep each other alive), and at the ceiling (30 s here) when the peer works for
    good; a rank stuck outside a collective is found at its own limit although its peer works. The
    four groups run at once."""
    cases = ("working", "waiting", "looping", "stuck")
    groups = {case: start_two_ranks(GROUP_PROGRESS, case) for case in cases}
    found = {"waiting": 0, "looping": 0, "stuck": 1}  # the rank that must exit as hung
    try:
        outs = {case: groups[case][rank].communicate(timeout=180)[0] for case, rank in found.items()}
        working = [p.communicate(timeout=180)[0] for p in groups["working"]]
    finally:
        for p in (p for case in cases for p in groups[case]):
            p.kill()
            p.wait()
    for case, rank in found.items():
        assert groups[case][rank].returncode == 201, (case, outs[case])
    waited = {case: re.search(rf"no progress for (\d+) s in phase 'training step' \(rank {rank}", outs[case])
              for case, rank in found.items()}
    assert all(waited.values()), outs
    # the limit (polled once a second), plus two heartbeats where the peer's start-up counted as its work
    assert 8 <= int(waited["waiting"].group(1)) <= 14, outs["waiting"]
    assert 8 <= int(waited["stuck"].group(1)) <= 10, outs["stuck"]  # not after its peer's 20 s of work
    assert 30 <= int(waited["looping"].group(1)) <= 32, outs["looping"]  # the ceiling, not the collective's timeout
    for rank, out in enumerate(working):
        assert groups["working"][rank].returncode == 0, out
    left = int(working[0].split("rank 0 left the step after ")[1].split()[0])
    assert left >= 19, working[0]  # rank 0 did wait in the all-reduce past its 8 s limit


# Two ranks over env://, each with its own eval.hellaswag_path: rank 1's file is missing (a node
# whose download failed, a path that exists on one node only).
HELLASWAG = r"""
import sys
from contextlib import nullcontext
from gpt2 import distributed, logs
from gpt2.config import load_config
from gpt2.evaluator import Evaluator
from gpt2.model import GPT
logs.setup()
dist = distributed.init("cpu", 60)
path = sys.argv[1] if dist.rank == 0 else sys.argv[1] + ".absent"
cfg = load_config("configs/demo.yaml", ["model.n_layer=1", "model.n_embd=16", "model.n_head=2",
                                       f"eval.hellaswag_path={path}"])
model = GPT(cfg.model)
evaluator = Evaluator(cfg, dist, model, model, None, nullcontext(), None)
print(f"rank {dist.rank} scores HellaSwag: {evaluator.hellaswag_path() is not None}", flush=True)
distributed.teardown()
"""


def test_hellaswag_is_skipped_on_every_rank_when_one_rank_lacks_the_file(tmp_path):
    """Each rank scores its share of HellaSwag and the shares are all-reduced: a rank without the file
    skipping it alone would leave the others in the collective until the watchdog ends the run (and
    every restart). Every rank skips it, and rank 0 says which rank lacks it and why."""
    hs = tmp_path / "hellaswag_val.jsonl"
    hs.write_text("{}\n")
    procs = start_two_ranks(HELLASWAG, str(hs))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for rank, out in enumerate(outs):
        assert procs[rank].returncode == 0, out
        assert f"rank {rank} scores HellaSwag: False" in out, out
    assert f"HellaSwag disabled for this run (rank 1: eval.hellaswag_path={hs}.absent does not exist)" in outs[0]


def test_a_collective_that_fails_for_want_of_a_peer_is_a_lost_group_and_a_bug_is_not():
    """What a rank exits with when a collective fails: GroupLost (201, the launchers restart and
    requeue) where a peer is gone or cut off, the error itself (exit 1) for anything else."""
    import torch.distributed as dist

    from gpt2.distributed import group_failure
    from gpt2.errors import EXIT_HUNG, exit_code

    gloo = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                        "[127.0.0.1]:30109: Connection reset by peer. This is typically caused by a remote worker")
    for err in (gloo, dist.DistBackendError("NCCL communicator was aborted on rank 0"),
                dist.DistNetworkError("Connection reset by peer")):
        lost = group_failure(err)
        assert lost is not None and exit_code(lost) == EXIT_HUNG and lost.__cause__ is err, err
        assert str(err).splitlines()[0][:40] in str(lost) and "restarts from the last checkpoint" in str(lost)
    for bug in (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x64 and 32x64)"), ValueError("gloo"),
                KeyError("x")):
        assert group_failure(bug) is None, bug
