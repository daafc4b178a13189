"""One writer per run: a lease in `checkpoint.dir`, held by rank 0 of the job that trains.

`LEASE` (JSON) names the holder (host, pid, job id, attempt, start time), a generation number that
every take-over increments, and when it was last renewed; a thread renews it every ttl/4 seconds.
A start takes the lease when there is none, when it is stale (not renewed for `checkpoint.lease_ttl_s`),
when its holder is a dead process on this host, or when the holder is an earlier attempt of the same
job (a torchrun restart, a SLURM requeue, a restarted pod): those take over at once. Anything else is
a second trainer on the run and is refused (LeaseHeld), naming the holder and how to take over.

Fencing: before every save the writer reads the lease back; a writer whose generation is no longer
the lease's was superseded (it was frozen or cut off while another attempt took over) and stops
(LeaseLost) without writing. Each step checks, without any storage access, that the lease was
renewed recently; after a freeze (SIGSTOP, a stalled node) it reads the lease back before going on.

On object stores without conditional writes, two starts in the same instant can both write the
lease; each reads it back after writing and the loser is refused, and a loser that read back too
early finds out at its first renewal or save.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from gpt2.errors import LeaseHeld, LeaseLost, StorageError
from gpt2.storage import filesystem, join, with_retries, write_bytes

log = logging.getLogger(__name__)

LEASE_FILE = "LEASE"


@dataclass
class Owner:
    """Who holds (or wants) the lease."""

    host: str
    pid: int
    # GPT2_JOB_ID (the Kubernetes manifests set it), SLURM_JOB_ID, torchrun's --rdzv-id, or the torchrun agent
    job_id: str | None
    attempt: list[int]  # (SLURM requeues, torchrun restarts): a later attempt of a job is larger
    started: float
    token: str  # unique per start

    @classmethod
    def of_this_process(cls) -> Owner:
        env = os.environ
        run_id = env.get("TORCHELASTIC_RUN_ID")
        job_id = env.get("GPT2_JOB_ID") or env.get("SLURM_JOB_ID") or (run_id if run_id not in (None, "", "none")
                                                                       else None)
        if job_id is None and "TORCHELASTIC_RESTART_COUNT" in env:  # plain torchrun: its agent is the job
            job_id = f"torchrun-{socket.gethostname()}-{os.getppid()}"
        attempt = [int(env.get("SLURM_RESTART_COUNT", 0)), int(env.get("TORCHELASTIC_RESTART_COUNT", 0))]
        return cls(socket.gethostname(), os.getpid(), job_id, attempt, time.time(), uuid.uuid4().hex)

    def describe(self) -> str:
        job = f"job {self.job_id}, " if self.job_id else ""
        return (f"pid {self.pid} on {self.host} ({job}attempt {self.attempt}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))})")


def _alive_here(owner: Owner) -> bool:
    if owner.host != socket.gethostname():
        return True  # cannot tell: assume it runs
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """The run's lease, held by this process once `acquire()` returned."""

    def __init__(self, directory: str, ttl_s: float, storage_options: dict[str, Any] | None = None,
                 retries: int = 5, owner: Owner | None = None):
        self.directory, self.ttl_s, self.retries = directory.rstrip("/"), ttl_s, retries
        self.fs, root = filesystem(self.directory, storage_options)
        self.path = join(root, LEASE_FILE)
        self.owner = owner or Owner.of_this_process()
        self.generation = 0
        self.lost: str | None = None  # why, once superseded
        self._renewed = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- reading and writing the file ---------------------------------------------------------

    def read(self) -> dict[str, Any] | None:
        try:
            raw = with_retries(lambda: self.fs.cat_file(self.path), f"reading {self.directory}/{LEASE_FILE}",
                               self.retries)
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
            Owner(**data["owner"])
            int(data["generation"]), float(data["renewed_at"])
            return data
        except (ValueError, TypeError, KeyError):
            log.warning(f"{self.directory}/{LEASE_FILE} is unreadable; replacing it")
            return None

    def _write(self) -> None:
        data = {"owner": asdict(self.owner), "generation": self.generation, "renewed_at": time.time(),
                "ttl_s": self.ttl_s}
        with_retries(lambda: write_bytes(self.fs, self.path, json.dumps(data, indent=1).encode()),
                     f"writing {self.directory}/{LEASE_FILE}", self.retries)
        self._renewed = time.monotonic()

    # ---- taking it ------------------------------------------------------------------------------

    def acquire(self, take_over: bool = False) -> Lease:
        """Take the lease (see the module's docstring) and start renewing it; LeaseHeld if another
        trainer holds it."""
        held = self.read()
        if held is not None:
            holder = Owner(**held["owner"])
            why = self._may_take_over(holder, held, take_over)
            if why is None:
                age = time.time() - held["renewed_at"]
                raise LeaseHeld(
                    f"another trainer holds this run: {holder.describe()} renewed its lease in "
                    f"{self.directory}/{LEASE_FILE} {age:.0f} s ago. Two trainers on one checkpoint.dir would "
                    "interleave their checkpoints and logs. Stop the other one (it releases the lease when it "
                    f"exits), or wait: a lease not renewed for checkpoint.lease_ttl_s ({self.ttl_s:g} s) is taken "
                    "over; if you are sure it is gone, start with checkpoint.take_over=true")
            log.info(f"taking over the lease of {self.directory}: {why}")
        self.generation = (held["generation"] if held else 0) + 1
        self._write()
        back = self.read()
        if back is None or back["owner"]["token"] != self.owner.token:
            other = Owner(**back["owner"]).describe() if back else "someone"
            raise LeaseHeld(f"{other} took the lease of {self.directory} at the same moment; this start gives way")
        self._thread = threading.Thread(target=self._renew_loop, name="gpt2-lease", daemon=True)
        self._thread.start()
        return self

    def _may_take_over(self, holder: Owner, held: dict[str, Any], take_over: bool) -> str | None:
        """Why this start may take the lease from `holder`, or None."""
        age = time.time() - held["renewed_at"]
        if take_over:
            return f"checkpoint.take_over=true (holder: {holder.describe()})"
        if age > self.ttl_s:
            return f"its holder, {holder.describe()}, has not renewed it for {age:.0f} s (stale)"
        if not _alive_here(holder):
            return f"its holder, {holder.describe()}, is no longer running"
        if holder.job_id is not None and holder.job_id == self.owner.job_id and holder.attempt <= self.owner.attempt:
            return f"a restart of the same job ({holder.describe()} held it)"
        return None

    # ---- holding it -----------------------------------------------------------------------------

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.verify(renew=True)
            except LeaseLost:
                return
            except (StorageError, OSError) as err:
                log.warning(f"could not renew the lease of {self.directory} ({err}); trying again")

    def verify(self, renew: bool = False) -> None:
        """Read the lease back: LeaseLost if another start took it over since (and from then on)."""
        if self.lost is None:
            held = self.read()
            if held is None or held["owner"]["token"] != self.owner.token or held["generation"] != self.generation:
                who = Owner(**held["owner"]).describe() if held else "nobody (the lease is gone)"
                self.lost = (f"this trainer ({self.owner.describe()}, generation {self.generation}) was superseded: "
                             f"{who} holds the lease of {self.directory} now")
                log.error(self.lost)
            elif renew:
                self._write()
            else:
                self._renewed = time.monotonic()
        if self.lost is not None:
            raise LeaseLost(self.lost + "; stopping without writing anything more. The other trainer goes on.")

    def check(self) -> None:
        """Per step, without storage access unless the last renewal is older than half the ttl (the
        process was frozen): then read the lease back first. LeaseLost if superseded."""
        if self.lost is not None or time.monotonic() - self._renewed > self.ttl_s / 2:
            self.verify()

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost is not None:
            return
        try:
            held = self.read()
            if held is not None and held["owner"]["token"] == self.owner.token:
                with_retries(lambda: self.fs.rm(self.path), f"releasing {self.directory}/{LEASE_FILE}", self.retries)
        except (StorageError, OSError) as err:
            log.warning(f"could not release the lease of {self.directory} ({err}); it goes stale in "
                        f"{self.ttl_s:g} s")

    def describe(self) -> dict[str, Any]:
        """For commit markers: who wrote a checkpoint."""
        return {"host": self.owner.host, "pid": self.owner.pid, "job_id": self.owner.job_id,
                "generation": self.generation}
