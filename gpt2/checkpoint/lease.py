"""One writer per run: the lease in `checkpoint.dir/lease/`, held by rank 0 of the attempt that trains.

Generations. `lease/00000007` is the record of generation 7. Each generation is created once and
exclusively (`gpt2.storage.create_exclusive`: a hard link on local and NFS file systems, a
conditional PUT on object stores); the highest one is the lease. Its holder then rewrites only its
own record: a renewal every ttl/4 s (`beat` + 1), `stopping` once told to stop, `released` at the
end. Acquire, take-over and release therefore never overwrite another start's record, and of two
starts in the same instant exactly one creates the next generation.

Staleness without a shared clock. A start that finds the lease held watches the record with its own
monotonic clock, as Kubernetes' client-go leader election keeps an observed time rather than
trusting a record's timestamps: if the record changes, its holder is alive; if it stays the same
for `checkpoint.lease_ttl_s`, the holder is gone (frozen, cut off, or dead on another host). No
decision compares two hosts' clocks. Fast paths, where the holder is provably gone or replaced:
the lease was released; its holder ran on this machine (same boot, same pid namespace) and that
process is gone; this start is a strictly later attempt of the holder's submission (a SLURM
requeue, a restart by the same torchrun agent); `checkpoint.take_over=true`. Otherwise a start of
another submission that sees the holder renew is refused (LeaseHeld); an attempt of the same
submission, or any start that finds the holder stopping, waits for it to end (up to `wait_s`).

Holding. A thread renews the record every ttl/4 s and looks for a newer generation every `poll_s`.
The holder may write (checkpoints, step lines, ledger records) only while its last successful
renewal began less than ttl/2 ago and no newer generation was seen (`may_write`): a holder that
cannot renew stops writing before anyone could take over (a full ttl of watching), and a superseded
one learns it within `poll_s`. `fence()`, right before a checkpoint's commit marker and before
pruning, looks for the next generation on the storage once more.

Stores without conditional writes (the start-up says so once): a new generation is written, then
read back after SETTLE_S; two starts that create the same generation within that window can both
believe they hold it until the first renewal, which reads the record back (README, "When things go
wrong").
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from gpt2.errors import LeaseHeld, LeaseLost, StorageError, StorageUnavailable
from gpt2.storage import create_exclusive, filesystem, join, supports_exclusive_create, with_retries, write_bytes
from gpt2.watchdog import beat

log = logging.getLogger(__name__)

LEASE_DIR = "lease"
_GENERATION = re.compile(r"^(\d{8})$")
SETTLE_S = 2.0  # stores without conditional writes: how long a new generation settles before it is read back
WATCH_POLL_S = 1.0  # how often a start that watches a held lease reads it
RELEASE_WAIT_S = 10.0  # what an ending holder gives its renewal thread, and then its release, on storage that hangs


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def node_id() -> str:
    """This machine as its processes see each other: the boot and the pid namespace (containers
    on one node, or one machine rebooted, are different nodes)."""
    boot = (_read_text("/proc/sys/kernel/random/boot_id") or "").strip()
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = ""
    return f"{boot}/{pid_ns}" if boot else f"{socket.gethostname()}/?"


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot), or None if no such process runs
    (a zombie counts as gone)."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the command name may hold spaces and parentheses
    return None if fields[0] in ("Z", "X") else int(fields[19])


def submission_of(env: dict[str, str]) -> str | None:
    """The scheduler's job this process belongs to: a restarted or requeued attempt has the same
    one, a second submission another. GPT2_JOB_ID (the Kubernetes manifests set it, with the
    namespace in GPT2_NAMESPACE), the SLURM job, the torchrun run id, or the torchrun agent."""
    if env.get("GPT2_JOB_ID"):
        namespace = env.get("GPT2_NAMESPACE")
        return f"k8s:{namespace}/{env['GPT2_JOB_ID']}" if namespace else f"job:{env['GPT2_JOB_ID']}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env.get('SLURM_CLUSTER_NAME', '')}/{env['SLURM_JOB_ID']}"
    run_id = env.get("TORCHELASTIC_RUN_ID")
    if run_id not in (None, "", "none"):
        return f"torchrun:{run_id}"
    if "TORCHELASTIC_RESTART_COUNT" in env:
        return f"torchrun:{node_id()}:{os.getppid()}"
    return None


@dataclass
class Owner:
    """Who holds (or wants) the lease."""

    host: str
    node: str  # node_id(): where `pid` means something
    pid: int
    pid_start: int | None
    submission: str | None
    attempt: list[int]  # [requeues of the submission (SLURM), restarts by its torchrun agent]
    agent: str | None  # the torchrun agent whose restarts attempt[1] counts
    token: str  # unique per start
    started: str = ""  # wall clock, for people

    @classmethod
    def of_this_process(cls) -> Owner:
        env, pid = os.environ, os.getpid()
        under_torchrun = "TORCHELASTIC_RESTART_COUNT" in env
        return cls(socket.gethostname(), node_id(), pid, process_start(pid), submission_of(dict(env)),
                   [int(env.get("SLURM_RESTART_COUNT", 0)), int(env.get("TORCHELASTIC_RESTART_COUNT", 0))],
                   f"{node_id()}:{os.getppid()}" if under_torchrun else None, uuid.uuid4().hex,
                   time.strftime("%Y-%m-%d %H:%M:%S"))

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> Owner:
        known = {k: data.get(k) for k in cls.__dataclass_fields__}
        known["attempt"] = list(known.get("attempt") or [0, 0])
        return cls(**known)

    def describe(self) -> str:
        job = f"{self.submission}, " if self.submission else ""
        return f"pid {self.pid} on {self.host} ({job}attempt {self.attempt}, started {self.started})"

    def gone(self) -> bool:
        """Provably not running: it ran on this node and its process is gone (or the pid is reused)."""
        if self.node != node_id():
            return False
        now = process_start(self.pid)
        return now is None or (self.pid_start is not None and now != self.pid_start)

    def later_attempt_than(self, other: Owner) -> bool:
        """A strictly later attempt of the same submission: requeued, or restarted by the same agent."""
        if self.submission is None or self.submission != other.submission:
            return False
        if self.attempt[0] != other.attempt[0]:
            return self.attempt[0] > other.attempt[0]
        return self.agent is not None and self.agent == other.agent and self.attempt[1] > other.attempt[1]


@dataclass
class Held:
    """The lease as read: its generation, the record's bytes (what a watcher compares) and content."""

    generation: int
    raw: bytes
    record: dict[str, Any] | None  # None: unreadable

    @property
    def owner(self) -> Owner | None:
        return Owner.from_record(self.record["owner"]) if self.record else None

    @property
    def state(self) -> str:
        return self.record.get("state", "held") if self.record else "held"

    def who(self) -> str:
        owner = self.owner
        return owner.describe() if owner else f"an unreadable record (generation {self.generation})"


@dataclass
class TakeOver:
    """From whom this start took the lease, and why (the ledger's end record of that attempt)."""

    previous: dict[str, Any] | None  # the previous holder's owner record
    why: str
    gone: bool = False  # provably dead, not superseded: the ledger says "killed"
    stale: bool = False
    generation: int = 0  # the previous holder's generation

    @property
    def superseded(self) -> str | None:
        """The end reason of the previous holder's attempt if this start superseded it (None: it
        released the lease, or its process is gone, i.e. killed)."""
        return None if self.gone or self.previous is None or "released it" in self.why else self.why


@dataclass
class Lease:
    """The run's lease, held by this process once `acquire()` returned."""

    directory: str
    ttl_s: float
    storage_options: dict[str, Any] | None = None
    retries: int = 5
    owner: Owner = field(default_factory=Owner.of_this_process)
    wait_s: float = 600.0  # how long to wait for a live holder of the same submission, or a stopping one
    outage_s: float = float("inf")  # how long training goes on without a renewal before the attempt ends

    def __post_init__(self) -> None:
        self.directory = self.directory.rstrip("/")
        self.fs, root = filesystem(self.directory, self.storage_options)
        self.root = join(root, LEASE_DIR)
        self.poll_s = min(5.0, self.ttl_s / 12)
        self.exclusive = True
        self.generation = 0
        self.beat = 0
        self.state = "held"
        self.lost: str | None = None
        self.took_over: TakeOver | None = None
        self._confirmed = -float("inf")  # monotonic start of the last renewal that succeeded
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned_at = -float("inf")

    # ---- reading -------------------------------------------------------------------------------

    def _path(self, generation: int) -> str:
        return join(self.root, f"{generation:08d}")

    def _generations(self, retries: int | None = None, deadline: Callable[[], float] | None = None) -> list[int]:
        try:
            entries = with_retries(lambda: self.fs.ls(self.root, detail=False), f"listing {self.root}",
                                   self.retries if retries is None else retries, deadline=deadline)
        except FileNotFoundError:
            return []
        found = (_GENERATION.match(p.rstrip("/").rsplit("/", 1)[-1]) for p in entries)
        return sorted(int(m.group(1)) for m in found if m)

    def current(self) -> Held | None:
        """The highest generation, or None when nobody ever held the lease."""
        generations = self._generations()
        if not generations:
            return None
        top = generations[-1]
        try:
            raw = with_retries(lambda: self.fs.cat_file(self._path(top)), f"reading {self._path(top)}", self.retries)
        except FileNotFoundError:  # pruned between the listing and the read: look again
            return self.current()
        try:
            record = json.loads(raw)
            Owner.from_record(record["owner"])
        except (ValueError, TypeError, KeyError):
            record = None
        return Held(top, raw, record)

    def _newer_exists(self, retries: int | None = None) -> bool:
        """Whether this holder was superseded: a higher generation exists, or our own record is gone
        (pruned by a holder several generations later). Retries end at the outage deadline."""
        generations = self._generations(retries, self.deadline)
        return self.generation not in generations or generations[-1] > self.generation

    # ---- taking it -----------------------------------------------------------------------------

    def acquire(self, take_over: bool = False) -> Lease:
        """Take the lease (see the module's docstring) and start holding it; LeaseHeld if another
        trainer holds it."""
        self.exclusive = supports_exclusive_create(self.fs, self.root)
        if not self.exclusive:
            log.warning(f"{self.directory} does not support conditional writes (If-None-Match): the run's lease falls "
                        f"back to writing and reading back after {SETTLE_S:g} s; two trainers started within that "
                        "window may both train until the first renewal (README, 'When things go wrong')")
        held, why = self.current(), None
        if held is not None:
            why = self._fast_path(held, take_over)
            if why is None:
                why, held = self._watch(held)  # the record as last seen: the next generation is ours to create
        generation = held.generation + 1 if held else 1
        if not self._create(generation):
            other = self.current()
            raise LeaseHeld(f"{other.who() if other else 'another trainer'} took the lease of {self.directory} at the "
                            f"same moment as this start (generation {generation}); this start gives way and writes "
                            "nothing")
        if why is not None and held is not None:
            why.previous, why.generation = (held.record["owner"] if held.record else None), held.generation
            log.info(f"took over the lease of {self.directory} (generation {generation}): {why.why}")
        self.took_over = why
        self._prune(generation)
        self._thread = threading.Thread(target=self._hold, name="gpt2-lease", daemon=True)
        self._thread.start()
        return self

    def _fast_path(self, held: Held, take_over: bool) -> TakeOver | None:
        """Why this start may take the lease from `held` at once, or None."""
        owner = held.owner
        if held.state == "released":
            return TakeOver(None, f"{held.who()} released it")
        if take_over:
            return TakeOver(None, f"checkpoint.take_over=true (holder: {held.who()})")
        if owner is not None and owner.gone():
            return TakeOver(None, f"its holder, {held.who()}, is no longer running", gone=True)
        if owner is not None and self.owner.later_attempt_than(owner):
            return TakeOver(None, f"this start is a later attempt of the same job ({held.who()} held it)")
        return None

    def _watch(self, held: Held) -> tuple[TakeOver, Held]:
        """Watch a held lease with this process's monotonic clock: (why, the record as last seen)
        once it stayed the same for a full ttl (or was released); LeaseHeld when another
        submission's holder renews it, or a holder of the same job outlasts `wait_s`."""
        owner = held.owner
        same_job = owner is not None and self.owner.submission is not None and owner.submission == self.owner.submission
        written = held.record.get("written", "?") if held.record else "?"
        log.info(f"the run's lease in {self.directory} is held by {held.who()}; watching it for up to "
                 f"{self.ttl_s:g} s to see whether its holder is alive (its record was written at {written} by the "
                 f"holder's clock; this host's clock reads {time.strftime('%Y-%m-%d %H:%M:%S')}; the two are never "
                 "compared)")
        started = unchanged_since = last_note = time.monotonic()
        while True:
            time.sleep(WATCH_POLL_S)
            beat()
            now_held = self.current()
            now = time.monotonic()
            if now_held is None:
                return TakeOver(None, "the lease was removed"), held
            if (now_held.generation, now_held.raw) == (held.generation, held.raw):
                if now - unchanged_since >= self.ttl_s:
                    return TakeOver(None, f"its holder, {held.who()}, did not renew it while this start watched for "
                                          f"{now - unchanged_since:.0f} s (checkpoint.lease_ttl_s={self.ttl_s:g}): "
                                          "it is frozen, cut off, or gone on another host", stale=True), held
                continue
            held, owner, unchanged_since = now_held, now_held.owner, now
            fast = self._fast_path(held, take_over=False)
            if fast is not None:
                return fast, held
            if not (same_job or held.state == "stopping"):
                raise LeaseHeld(
                    f"another trainer holds this run: {held.who()} renewed its lease in {self.root} while this start "
                    "watched it. Two trainers on one checkpoint.dir would interleave their checkpoints and logs. Stop "
                    "the other one (it releases the lease when it exits), or, if it is frozen or cut off, start again: "
                    f"a lease that stays unchanged for checkpoint.lease_ttl_s ({self.ttl_s:g} s) is taken over; if you "
                    "are sure it is gone, start with checkpoint.take_over=true")
            if now - started > self.wait_s:
                raise LeaseHeld(f"{held.who()} still holds the lease of {self.directory} after this start waited "
                                f"{now - started:.0f} s for it to end (checkpoint.lease_wait_s); stop it, or start "
                                "with checkpoint.take_over=true")
            if now - last_note > 15:
                last_note = now
                kind = "stopping" if held.state == "stopping" else "an earlier attempt of this job"
                log.info(f"waiting for the lease of {self.directory}: its holder, {held.who()}, is {kind} and still "
                         f"renews it (waited {now - started:.0f} s of at most {self.wait_s:g})")

    def _record(self, generation: int) -> bytes:
        return json.dumps({"generation": generation, "owner": asdict(self.owner), "beat": self.beat,
                           "state": self.state, "ttl_s": self.ttl_s,
                           "written": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1).encode()

    def _create(self, generation: int) -> bool:
        """Create `generation` as ours; False if another start created it first."""
        self.generation, self.beat, self.state = generation, 0, "held"
        data, path = self._record(generation), self._path(generation)
        started = time.monotonic()
        if self.exclusive:
            created = with_retries(lambda: create_exclusive(self.fs, path, data), f"creating {path}", self.retries)
        elif with_retries(lambda: self.fs.exists(path), f"checking {path}", self.retries):
            created = False
        else:
            with_retries(lambda: write_bytes(self.fs, path, data), f"writing {path}", self.retries)
            time.sleep(SETTLE_S)
            created = self._ours()
        if created and self._generations()[-1] != generation:
            created = False  # an old, pruned number: a newer generation exists
        if created:
            self._confirmed = started
        return created

    def _ours(self) -> bool:
        try:
            record = json.loads(self.fs.cat_file(self._path(self.generation)))
            return record["owner"]["token"] == self.owner.token
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return False

    def _prune(self, generation: int) -> None:
        """Drop records of old generations (the last few stay, for people and for late readers)."""
        for old in self._generations():
            if old < generation - 2:
                try:
                    self.fs.rm(self._path(old))
                except (OSError, StorageError):
                    pass

    # ---- holding it ----------------------------------------------------------------------------

    def _hold(self) -> None:
        next_renewal = time.monotonic() + self.ttl_s / 4
        while not self._stop.wait(self.poll_s):
            try:
                if self._newer_exists():
                    self._lose()
                    return
                if time.monotonic() >= next_renewal:
                    self._write_own()
                    next_renewal = time.monotonic() + self.ttl_s / 4
                    if self.lost is not None:
                        return
            except (StorageError, OSError) as err:
                now = time.monotonic()
                if now - self._warned_at > self.ttl_s / 4:
                    self._warned_at = now
                    log.warning(f"could not renew the lease of {self.directory} ({err}); trying again. "
                                f"Without a renewal for {self.ttl_s / 2:g} s this trainer writes nothing "
                                "(checkpoints, step records) until one succeeds")

    def _write_own(self, state: str | None = None) -> None:
        """Rewrite our own record (a renewal, or a new state); never another generation's."""
        if not self._lock.acquire(timeout=30):
            raise StorageError(f"the lease of {self.directory} is busy: a renewal hangs")
        try:
            if self.lost is not None:
                return
            started = time.monotonic()
            # never recreate or overwrite a record that is no longer the lease: check before writing,
            # and again after (a take-over may land while this process was frozen in between)
            if self._newer_exists(retries=1) or (not self.exclusive and not self._ours()):
                self._lose()
                return
            self.beat += 1
            self.state = state or self.state
            path = self._path(self.generation)
            with_retries(lambda: write_bytes(self.fs, path, self._record(self.generation)), f"renewing {path}", 1)
            if self._newer_exists(retries=1):
                self._lose()
                return
            self._confirmed = started
        finally:
            self._lock.release()

    def _lose(self) -> None:
        if self.lost is None:
            newer = self.current()
            self.lost = (f"this trainer ({self.owner.describe()}, generation {self.generation}) was superseded: "
                         f"{newer.who() if newer else 'another trainer'} holds the lease of {self.directory} now")
            log.error(self.lost)

    @property
    def superseded(self) -> bool:
        return self.lost is not None

    def deadline(self) -> float:
        """When an outage ends this attempt (`time.monotonic()`): `outage_s` after the last renewal that
        succeeded. The holder's storage calls stop retrying there, so that no save keeps the training
        loop past it (and `check` ends the attempt on time)."""
        return self._confirmed + self.outage_s if self._confirmed > -math.inf else math.inf

    def may_write(self) -> bool:
        """Whether this holder may write now: not superseded, and renewed less than ttl/2 ago. No storage access."""
        return self.lost is None and time.monotonic() - self._confirmed < self.ttl_s / 2

    def check(self) -> None:
        """Per step, without storage access: LeaseLost once superseded; StorageUnavailable once no
        renewal succeeded for `outage_s`. (A holder that was frozen or cannot renew for a while is
        not superseded, but `may_write` is False until its next renewal.)"""
        if self.lost is not None:
            raise LeaseLost(self.lost + "; stopping without writing anything more. The other trainer goes on.")
        unconfirmed = time.monotonic() - self._confirmed
        if unconfirmed > self.outage_s:
            raise StorageUnavailable(
                f"checkpoint.dir {self.directory} has not answered for {unconfirmed:.0f} s "
                f"(checkpoint.outage_s={self.outage_s:g}): the run's lease could not be renewed, so nothing was "
                "saved or recorded meanwhile. Check that the storage is up and reachable from this node (its "
                "endpoint, credentials, network); a restart of the job resumes from the last checkpoint")

    def fence(self) -> None:
        """Right before a write that must come from the holder (a commit marker, pruning): LeaseLost
        if a newer generation exists; a renewal first when the last one is older than ttl/2."""
        if self.lost is None and self._newer_exists():
            self._lose()
        if self.lost is None and not self.may_write():
            self._write_own()
        if self.lost is not None:
            raise LeaseLost(self.lost + "; this write is abandoned")

    def mark_stopping(self) -> None:
        """Tell watchers that this holder is ending (a preemption): they wait for its release instead of giving up."""
        try:
            self._write_own("stopping")
        except (StorageError, OSError) as err:
            log.warning(f"could not mark the lease of {self.directory} as stopping: {err}")

    def release(self) -> None:
        """Stop holding; mark our record released if it is still the lease (never another's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=RELEASE_WAIT_S)  # a renewal hung on the storage must not keep the process
        if self.lost is not None or self.generation == 0:
            return
        # one try each, in a thread given RELEASE_WAIT_S: a process on its way out does not wait for storage
        # that does not answer (a hung mount's call never returns)
        releasing = threading.Thread(target=self._mark_released, name="gpt2-lease-release", daemon=True)
        releasing.start()
        releasing.join(timeout=RELEASE_WAIT_S)
        if releasing.is_alive():
            self._not_released(f"no answer within {RELEASE_WAIT_S:g} s")

    def _mark_released(self) -> None:
        try:
            if not self._newer_exists(retries=0):
                self._write_own("released")
        except (StorageError, OSError) as err:
            self._not_released(str(err))

    def _not_released(self, why: str) -> None:
        log.warning(f"could not release the lease of {self.directory} ({why}); another start takes it over once "
                    f"it has watched it unchanged for {self.ttl_s:g} s")

    def describe(self) -> dict[str, Any]:
        """For commit markers and the ledger: who wrote."""
        o = self.owner
        return {"host": o.host, "pid": o.pid, "submission": o.submission, "attempt": o.attempt,
                "generation": self.generation, "token": o.token}

    @property
    def tag(self) -> str:
        """A name part unique to this holder (its files never collide with another writer's)."""
        return f"g{self.generation}-{self.owner.token[:8]}"
