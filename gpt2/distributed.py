"""Process-group set-up and tear-down: one process, or torchrun (any nodes x processes)."""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from gpt2.config import ConfigError
from gpt2.errors import Gpt2Error, GroupLost
from gpt2.watchdog import beat, collective_wait_s, in_collective, peers_worked, phase, work_idle_s

log = logging.getLogger(__name__)

T = TypeVar("T")

HEARTBEAT_S = 2.0  # each rank bumps its counter in the process group's store this often
STALE_S = 15.0  # a rank whose counter has not moved for this long is not alive (frozen, cut off, gone)
PEERS_AFTER_S = 10.0  # a rank waiting in a collective without progress for this long looks at its peers' work
POLL_S = 0.5


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    return torch.device("cuda", local_rank)


def init(device_preference: str = "auto", timeout_s: float = 0, start_wait_s: float = 0) -> Dist:
    """Join the process group when started by torchrun (RANK/WORLD_SIZE set); NCCL on GPUs, gloo on CPU.

    `timeout_s` bounds every collective (0: torch's default of 30 minutes); a collective that
    times out raises, and the trainer exits so that the group restarts. `start_wait_s` bounds the
    wait for every rank to start (0: `timeout_s`), see `wait_for_every_rank_to_start`. Joining the
    group then takes seconds and is held to the step-based limit (its floor): a rank frozen or cut
    off after it started is found in about a minute. GroupLost where the group cannot be formed.
    """
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s) if timeout_s > 0 else timedelta(minutes=30)
        # NCCL's heartbeat monitor (default 480 s) would kill a rank stuck in a long phase before our
        # watchdog and the collective timeout could say why: it comes after both
        os.environ.setdefault("TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC", str(int(timeout.total_seconds()) + 60))
        try:
            with phase("start-up: reaching the group's store (a rank that has not started cannot be told from "
                       "a frozen one)", ceiling=True):
                store = _group_store(rank, world, timeout)
            wait_for_every_rank_to_start(store, rank, world, start_wait_s or timeout.total_seconds())
            with phase("start-up: joining the process group (every rank has started)", measured=True):
                dist.init_process_group(backend=backend, timeout=timeout, store=store, rank=rank, world_size=world,
                                        device_id=device if device.type == "cuda" else None)
        except (dist.DistStoreError, dist.DistNetworkError) as err:  # the store's host gone: a restart helps
            log.error("forming the process group failed:\n%s", traceback.format_exc())
            raise GroupLost(f"forming the process group failed: the group's store (at MASTER_ADDR:MASTER_PORT) "
                            f"failed ({type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}); "
                            "rank 0 or the link to it is gone: this rank exits so that the group restarts") from err
        _liveness.start(rank)
    return Dist(rank, local_rank, world, device)


START_ABANDONED = "gpt2/start_abandoned"


def wait_for_every_rank_to_start(store: dist.Store, rank: int, world: int, limit_s: float) -> None:
    """Say in the group's store that this rank has started, and wait for the others: as long as the
    store answers (each answer is progress; a store whose host froze answers no more, and the
    watchdog's limit applies) for up to `limit_s`, since a slow start (importing torch from a shared
    file system) cannot be told from a frozen one before it arrives. Rank 0 decides when the wait is
    over (it hosts the store, which ends with it) and says so: GroupLost on every rank, naming the
    missing ranks; the others give up on their own only POLL_S x 8 later."""
    keys = [f"gpt2/started/{r}" for r in range(world)]
    started = time.monotonic()
    with phase("start-up: waiting for every rank to start", measured=True):
        store.set(keys[rank], "1")
        store.add("gpt2/started", 1)  # polled as a count: one key however many ranks
        while store.add("gpt2/started", 0) < world:
            waited = time.monotonic() - started
            if rank == 0 and waited > limit_s:
                missing = [r for r, key in enumerate(keys) if not store.check([key])]
                if missing:
                    store.set(START_ABANDONED, f"rank(s) {missing} did not start within {limit_s:g} s")
                    time.sleep(2 * POLL_S)  # the others read it before the store ends with this process
                    raise GroupLost(_abandoned(store))
            if rank != 0 and (store.check([START_ABANDONED]) or waited > limit_s + 8 * POLL_S):
                raise GroupLost(_abandoned(store) if store.check([START_ABANDONED]) else
                                f"the other ranks did not all start within {limit_s:g} s")
            beat(waiting=True)
            time.sleep(POLL_S)


def _abandoned(store: dist.Store) -> str:
    return (f"{store.get(START_ABANDONED).decode()} (train.hang_timeout_s) while the others waited for them: "
            "check those nodes' logs; this rank exits so that the group restarts")


def _group_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """The process group's store, as torch's env:// would make it (rank 0 hosts a TCP store at
    MASTER_ADDR:MASTER_PORT), or, where torchrun's agent hosts it, this restart attempt's key space there.

    torchrun (torch 2.13) shares one TCPStore across restarts; without a per-attempt prefix a
    restarted worker reads its dead peers' addresses and process-group set-up fails. The launchers
    set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store per rendezvous round, also right for
    multi-node membership changes); this prefix covers plain single-node torchrun.
    """
    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT", "")
    if not address or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"RANK is set but MASTER_ADDR={address!r} and MASTER_PORT={port!r} do not name rank 0's "
                          "host and port: start the trainer with torchrun (or set both)")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        # the wait for every rank is `wait_for_every_rank_to_start`'s, not the constructor's (not watched)
        return dist.TCPStore(address, int(port), world_size, is_master=rank == 0, timeout=timeout, multi_tenant=True,
                             wait_for_workers=False, use_libuv=os.environ.get("USE_LIBUV", "1") == "1")
    store = dist.TCPStore(address, int(port), world_size, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"/gpt2/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def teardown() -> None:
    """Leave the process group cleanly, once every rank has finished (rank 0 may still be releasing
    the lease on a slow store: waited for as long as it lives; a frozen or cut-off rank is found in
    about a minute, not at the ceiling). GroupLost where rank 0's store is gone.

    A process that exits while a DDP module is alive aborts now and then under gloo
    ("terminate called without an active exception"); callers `del` their DDP module first, then
    collecting, a barrier and destroying the group avoids that.
    """
    gc.collect()
    try:
        if dist.is_initialized():
            wait_for_all(phase_name="finishing: waiting for every rank to finish")  # ends in a barrier
    finally:
        _liveness.stop()  # after the wait: the others judge this rank by its heartbeat meanwhile
        if dist.is_initialized():
            dist.destroy_process_group()


def abort() -> None:
    """Leave the process group after a failure, without a barrier (peers may be gone)."""
    _liveness.stop()
    if dist.is_initialized():
        dist.destroy_process_group()


def group_failure(err: BaseException) -> GroupLost | None:
    """`err` as GroupLost if it is a collective's failure for want of a peer (killed, frozen past the
    collective timeout, cut off), else None: a restart of the group helps there, as it does not for a
    bug. NCCL and the store raise torch's DistError; gloo raises a RuntimeError from its transport
    ("[.../gloo/transport/tcp/pair.cc:537] Read error ...: Connection reset by peer")."""
    if isinstance(err, GroupLost):
        return err
    text = str(err)
    if not (isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and "/gloo/transport/" in text)):
        return None
    first_line = text.splitlines()[0].split(" This is typically caused")[0][:300] if text else "no message"
    lost = GroupLost(f"a collective failed: a peer is gone or cut off ({type(err).__name__}: {first_line}); "
                     "this rank exits so that the group restarts from the last checkpoint")
    lost.__cause__ = err
    return lost


def end_stopped_local_peers() -> list[int]:
    """SIGKILL this node's other workers of the same torchrun group that are stopped (SIGSTOP; a
    frozen cgroup shows another state and is left alone); returns their pids. Called when this rank
    exits for a hang: torchrun's teardown sends SIGTERM and waits 30 s before SIGKILL, and a stopped
    process never answers SIGTERM."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None:
        return []
    group = [pid for pid in _children(os.getppid()) if pid != os.getpid() and
             f"TORCHELASTIC_RUN_ID={run_id}".encode() in _read_bytes(f"/proc/{pid}/environ").split(b"\0")]
    return kill_stopped(group)


def kill_stopped(pids: Iterable[int]) -> list[int]:
    """SIGKILL those of `pids` that are stopped (state T); returns them. A stopped process never
    answers SIGTERM, so a teardown that waits for it waits in vain."""
    ended = []
    for pid in pids:
        if _state(pid) != "T":
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            ended.append(pid)
        except ProcessLookupError:
            pass
    return ended


def _children(pid: int) -> list[int]:
    return [int(c) for c in _read_bytes(f"/proc/{pid}/task/{pid}/children").split()]


def _state(pid: int) -> str:
    """A process's state letter (R, S, D, T for stopped, ...) from /proc, or "" when it is gone."""
    stat = _read_bytes(f"/proc/{pid}/stat")
    return stat.rsplit(b")", 1)[-1].split()[0].decode() if stat else ""


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


# The collectives below are waits for the other ranks: their work is progress (`in_collective`).


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        with in_collective():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            if t.is_cuda:  # NCCL returns before the others arrive: the wait is here, in the collective
                torch.cuda.current_stream(t.device).synchronize()
    return t


def barrier() -> None:
    if dist.is_initialized():
        with in_collective():
            dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    if not dist.is_initialized():
        return obj
    box = [obj]
    with in_collective():
        dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: object) -> list[object]:
    """`obj` of every rank, in rank order."""
    if not dist.is_initialized():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    with in_collective():
        dist.all_gather_object(out, obj)
    return out


class Liveness:
    """Each rank's heartbeat in the process group's store (a value that changes every HEARTBEAT_S,
    set by a daemon thread), and a barrier that watches it: `wait_for_all()`.

    A heartbeat says that the process runs; whether its main thread moves is for that process's
    own watchdog to judge. So a rank waiting for another rank's long work (rank 0's checkpoint
    save) waits as long as every rank lives, and a rank that stops (frozen, cut off, gone) is
    found at the waiter's step-based limit instead of the ceiling.

    The heartbeat also carries how long ago the rank's own work last beat its watchdog
    (`work_idle_s`). A rank that has waited in a collective for PEERS_AFTER_S without progress (for
    a peer's step that waits for its shard copy) reads its peers' heartbeats, and a peer's work is
    progress for it (`peers_worked`): one slow rank's work is not the others' hang, while ranks that
    all wait (for one another, or for a frozen rank) still are.
    """

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._waits = 0  # barriers so far: the same sequence on every rank

    def start(self, rank: int) -> None:
        store = _store()
        if store is None or self._thread is not None:
            return
        self._stop = threading.Event()  # a stopped thread keeps its own, set
        self._waits = 0
        store.set(_alive_key(rank), _heartbeat(0))  # exists before anyone waits on it
        self._thread = threading.Thread(target=self._bump, args=(store, rank, dist.get_world_size(), self._stop),
                                        name="gpt2-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread = None

    @staticmethod
    def _bump(store: dist.Store, rank: int, world: int, stop: threading.Event) -> None:
        failing, beats = False, 0
        peers = _PeersWork([_alive_key(r) for r in range(world) if r != rank])
        while not stop.wait(HEARTBEAT_S):
            try:
                beats += 1
                store.set(_alive_key(rank), _heartbeat(beats))
                waited = collective_wait_s()
                if waited is None or waited < PEERS_AFTER_S:
                    peers.forget()
                else:
                    peers.look(store)
                failing = False
            except Exception as err:  # this rank now looks gone to the others, as they are to it
                if not failing and not stop.is_set():  # (not when the group was just left: rank 0 may be gone)
                    log.error(f"rank {rank} cannot reach the process group's store ({type(err).__name__}: {err}); "
                                "the other ranks will count it as gone if this lasts")
                failing = True

    def watched(self) -> bool:
        """Whether `wait_for_all` watches heartbeats (else it is a plain barrier, which cannot beat)."""
        return self._thread is not None and _store() is not None

    def wait_for_all(self, stopping: Callable[[], bool] = lambda: False) -> None:
        """A barrier for a wait of unknown length: progress for the watchdog while every rank lives.
        GroupLost once a rank gave no sign of life for STALE_S while this rank was told to stop
        (`stopping()`): the launcher tears the group down (torchrun does when a worker fails, and
        waits 30 s before SIGKILL), so there is nothing left to wait for."""
        store = _store() if self._thread is not None else None
        if store is None:
            barrier()
            return
        self._waits += 1
        rank, world = dist.get_rank(), dist.get_world_size()
        arrivals = [f"gpt2/wait/{self._waits}/{r}" for r in range(world)]
        alive_keys = [_alive_key(r) for r in range(world)]
        arrived, said = False, False
        last: list[bytes] = []
        since: list[float] = []
        failing_since: float | None = None
        while True:
            try:
                if not arrived:
                    store.set(arrivals[rank], "1")  # idempotent: a retried arrival counts once
                    arrived = True
                if store.check(arrivals):
                    break
                counts, now = store.multi_get(alive_keys), time.monotonic()
                failing_since = None
            except Exception as err:  # refused or reset: rank 0, the store's host, is gone (or our link to it)
                if failing_since is None:
                    failing_since = time.monotonic()
                if time.monotonic() - failing_since >= STALE_S:  # as a rank whose heartbeat stopped
                    # the client does not reconnect: either way this rank can no longer take part
                    raise GroupLost(f"every call to the process group's store (on rank 0's host) has failed for "
                                    f"{STALE_S:g} s ({type(err).__name__}: {err}): rank 0 is gone, or this rank's "
                                    "connection to it broke; this rank exits so that the group restarts from the "
                                    "last checkpoint") from err
                time.sleep(POLL_S)
                continue
            if len(last) != len(counts):
                last, since = list(counts), [now] * len(counts)
            for r, count in enumerate(counts):
                if count != last[r]:
                    last[r], since[r] = count, now
            stale = [r for r, t in enumerate(since) if now - t >= STALE_S]
            if stale and stopping():
                raise GroupLost(f"rank(s) {stale} gave no sign of life for {STALE_S:g} s while this rank waited for "
                                "them, and this rank was told to stop (the launcher ends the group, e.g. torchrun "
                                "after a worker failed): leaving now; the group restarts from the last checkpoint")
            if not stale:
                beat(waiting=True)
            elif not said:
                log.error(f"rank(s) {stale} gave no sign of life for {STALE_S:g} s while the others wait for them "
                          "(frozen, cut off or gone); the watchdog ends this wait at its limit")
                said = True
            time.sleep(POLL_S)
        barrier()  # cheap now that every rank is here; keeps every backend's collective order


class _PeersWork:
    """What a rank waiting in a collective learns of its peers' own work, look after look (each
    look reads every peer's heartbeat)."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        self.seen: list[bytes] | None = None

    def forget(self) -> None:
        """Not waiting: the next look begins afresh (a heartbeat seen long ago says nothing of now)."""
        self.seen = None

    def look(self, store: dist.Store) -> None:
        if not store.check(self.keys):  # a peer not started yet: multi_get would block for it
            return
        now = time.monotonic()
        values = store.multi_get(self.keys)
        for before, value in zip(self.seen or [], values):
            beats, _, idle = value.partition(b":")
            if beats != before.partition(b":")[0] and idle not in (b"", b"-"):
                # set since the last look (a live peer), `idle` s after its own work last moved; a
                # move is seen up to two heartbeats late (the peer's, then this rank's look)
                peers_worked(now - float(idle), late_s=2 * HEARTBEAT_S)
        self.seen = values


_liveness = Liveness()


def _alive_key(rank: int) -> str:
    return f"gpt2/alive/{rank}"


def _heartbeat(beats: int) -> str:
    """A rank's heartbeat: `<beats>:<seconds since its own work last beat>` (the first part changes
    with every beat, so that a peer can tell a live rank from a frozen one)."""
    idle = work_idle_s()
    return f"{beats}:{'-' if idle is None else f'{idle:.1f}'}"


def _store() -> dist.Store | None:
    """The process group's store (torchrun's TCP store), or None in a single process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):  # a private API: without it, a plain barrier
        return None


def wait_for_all(stopping: Callable[[], bool] = lambda: False, phase_name: str | None = None) -> None:
    """A barrier whose wait is progress while every rank lives (see `Liveness.wait_for_all`). With
    `phase_name`, the wait is that phase: measured (the step-based limit, even before a step is
    timed) where heartbeats are watched, under the ceiling where only a plain barrier can be had."""
    if phase_name is None:
        _liveness.wait_for_all(stopping)
        return
    watched = _liveness.watched()
    with phase(phase_name, measured=watched, ceiling=not watched):
        _liveness.wait_for_all(stopping)


def decided_on_rank_0(decide: Callable[[], T], is_main: bool, phase_name: str,
                      share: Callable[[T], object] = lambda answer: answer) -> tuple[T | None, object]:
    """Rank 0 runs `decide()` and every rank gets `share(answer)`, or raises rank 0's typed error
    alike (its message and exit code, not a lost group). The others wait for rank 0 as long as it
    lives (`wait_for_all` in phase `phase_name`): a frozen or cut-off rank 0 is found in about a
    minute, a slow decision is waited for. Returns (the answer on rank 0, else None; the shared part)."""
    answer, refused = None, None
    if is_main:
        try:
            answer = decide()
        except Gpt2Error as err:
            refused = err
    wait_for_all(phase_name=phase_name)
    failed, shared = broadcast_object((refused, share(answer) if is_main and refused is None else None))  # type: ignore[misc]
    if failed is not None:
        raise refused or failed
    return answer, shared


def done_on_every_rank(work: Callable[[], None], phase_name: str, stopping: Callable[[], bool] = lambda: False
                       ) -> None:
    """Every rank runs `work()`, which reports its progress, in phase `phase_name` (measured: the
    step-based limit), then waits for the others while every rank lives. A typed error on any rank
    is raised on every rank alike (the failing rank's message and exit code), so its peers leave at
    once instead of waiting for a rank that is gone."""
    failed = None
    with phase(phase_name, measured=True):
        try:
            work()
        except Gpt2Error as err:
            failed = err
    wait_for_all(stopping, phase_name=f"{phase_name}: waiting for the other ranks")
    failures = [f for f in all_gather_object(failed) if f is not None]
    if failures:
        raise failed or failures[0]  # type: ignore[misc]
