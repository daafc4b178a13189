"""torchrun with the trainers' outcome as its exit code: `python -m gpt2.launch.torchrun ARGS` (ARGS as torchrun's).

torchrun itself exits 1 both when a trainer failed for good (a config error, exit 2) and when it was
told to stop: on SIGTERM it forwards the signal, the trainers save a checkpoint and exit 200, and
torchrun still exits 1. What runs torchrun decides on that code: a PyTorchJob with
`restartPolicy: ExitCode` restarts a pod for 128-255 and fails the whole job for 1-127, so an
evicted or preempted pod must not exit 1. Here a stop signal gives EXIT_PREEMPTED (the trainers were
asked to save, and a resume continues from the newest checkpoint either way), and a failed worker
group gives the exit code of its cause (a signal N as 128 + N; see `decisive_failure`). The
trainers get SAVE_ON_STOP_S (100 s), not torch's 30 s, for that save before torchrun kills them.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from gpt2 import logs
from gpt2.errors import EXIT_ERROR, EXIT_PREEMPTED, RETRYABLE
from gpt2.launch.common import TRAINER_ENV

log = logging.getLogger("gpt2.launch.torchrun")


def exit_code_of(failure_code: int) -> int:
    """A worker's return code as a process exit code: -N (killed by signal N) becomes 128 + N."""
    if failure_code < 0:
        return 128 + -failure_code
    return failure_code or EXIT_ERROR


def decisive_failure(failures: dict[int, object]) -> tuple[int, int]:
    """(rank, return code) of the failure that gives the exit code: the first error for good (exit
    1-127), else the first retryable exit, else the first failure. An error is the cause and its
    peers' 201s (a collective failed for want of it) the consequence; torchrun's timestamps are whole
    seconds, so time alone often cannot tell them apart. A retryable exit says more than a signal: a
    rank that finds a peer frozen kills it (SIGKILL) and then exits 201, so the kill is first in time
    but the 201 says what happened and that a restart helps (SLURM requeues on it)."""
    def when(rank: int) -> float:
        return failures[rank].timestamp  # type: ignore[attr-defined]

    def code(rank: int) -> int:
        return failures[rank].exitcode  # type: ignore[attr-defined]

    errors = [rank for rank in failures if 0 < code(rank) < 128]  # RETRYABLE codes are 200 and up
    retryable = [rank for rank in failures if code(rank) in RETRYABLE]
    first = min(errors or retryable or list(failures), key=lambda rank: (when(rank), rank))
    return first, code(first)


def kill_stopped_workers_first() -> None:
    """Make torchrun SIGKILL its stopped workers before it stops the others.

    Whenever torchrun stops its workers (a worker failed on this node, the group restarts for a
    peer on another node, or a stop signal came), it sends SIGTERM and waits for them: 30 s,
    hard-coded, on a failure or a restart (TORCH_ELASTIC_SHUTDOWN_TIMEOUT on a stop signal), then
    SIGKILL. A stopped worker (SIGSTOP) never answers SIGTERM and could not save anyway, so it is
    killed at once. (A worker in a frozen cgroup is not stopped in this sense: it is left to the wait.)
    """
    from torch.distributed.elastic.multiprocessing.api import PContext

    from gpt2.distributed import kill_stopped  # imports torch: only where torchrun runs

    close = PContext.close
    if getattr(close, "kills_stopped", False):
        return

    def close_killing_stopped_first(self: PContext, *args: object, **kwargs: object) -> None:
        try:
            pids = list(self.pids().values())
        except Exception:  # no processes started yet
            pids = []
        killed = kill_stopped(pids)
        if killed:
            log.warning(f"killed stopped worker(s) {killed} at once: a stopped process never answers SIGTERM")
        close(self, *args, **kwargs)

    close_killing_stopped_first.kills_stopped = True  # type: ignore[attr-defined]
    PContext.close = close_killing_stopped_first  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logs.setup()
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", TRAINER_ENV["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
    args = parse_args(sys.argv[1:] if argv is None else argv)
    kill_stopped_workers_first()
    try:
        run(args)
    except SignalException as err:
        name = signal.Signals(err.sigval).name
        log.warning(f"torchrun got {name}: the trainers were asked to save a checkpoint; exiting "
                    f"{EXIT_PREEMPTED} (preempted), so that the job is restarted and resumes")
        return EXIT_PREEMPTED
    except ChildFailedError as err:
        rank, returned = decisive_failure(err.failures)
        code = exit_code_of(returned)
        log.error("%s", err)
        log.error(f"the trainers failed (rank {rank}, exit code {returned}); exiting {code}")
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
