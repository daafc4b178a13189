"""The one family of typed errors, and the one table that turns them into exit codes.

Library code raises a `Gpt2Error` subclass whose message names the problem and the fix; only the
entry points catch it (`except Gpt2Error`), log the message and exit with `exit_code(err)`.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
# The loss went NaN/inf and stayed there (optim.max_skipped_steps): a restart would not help.
EXIT_DIVERGED = 3
# The run's last train.max_failed_restarts attempts each failed from the same checkpoint (a crash
# loop): another restart would repeat it, so every launcher must stop (below 128 for Kubeflow).
EXIT_CRASH_LOOP = 4
# Preempted (signal received, checkpoint saved). In the 128-255 range that Kubeflow's
# restartPolicy=ExitCode treats as retryable, and not 128+N for a common signal N.
EXIT_PREEMPTED = 200
# No progress for train.hang_timeout_s (gpt2.watchdog), or none possible (the group lost rank 0):
# retryable too, the restart resumes.
EXIT_HUNG = 201
# The storage could not be reached (after retries at start-up, or for checkpoint.outage_s while
# training): retryable, a later attempt finds it back.
EXIT_STORAGE = 202
# The exit codes after which a restart of the job can help (the launchers requeue/restart on them).
RETRYABLE = (EXIT_PREEMPTED, EXIT_HUNG, EXIT_STORAGE)


class Gpt2Error(Exception):
    """A problem the user can act on; the message says what is wrong and what to do."""


class ConfigError(Gpt2Error, ValueError):
    """A problem with the user's configuration; the message says what to change."""


class StorageError(Gpt2Error, RuntimeError):
    """A storage operation failed (after retries), or a path cannot be used."""


class StorageUnavailable(StorageError):
    """The storage did not answer (after retries, or for checkpoint.outage_s): a later attempt may find it back."""


class StorageFull(StorageError):
    """No space left (or a quota, or a read-only file system): retrying cannot help."""


class TokenizerError(Gpt2Error, RuntimeError):
    """Tokenizer files are missing, wrong, or cannot be fetched."""


class DataError(Gpt2Error, RuntimeError):
    """Prepared data is missing, inconsistent or corrupt, or a source cannot be read."""


class CheckpointError(Gpt2Error, RuntimeError):
    """A checkpoint is missing, incomplete or corrupt, or a save that must succeed failed."""


class CheckpointUnloadable(CheckpointError):
    """A checkpoint whose bytes match its marker could not be loaded (memory, a torch version, an
    unsafe payload): not corrupt, so never moved aside."""


class ModelError(Gpt2Error, ValueError):
    """Weights or a model directory do not fit GPT-2 (or cannot be loaded)."""


class TrainingDiverged(Gpt2Error, RuntimeError):
    """The gradient norm stayed NaN or infinite: training cannot go on from here."""


class CrashLoop(Gpt2Error, RuntimeError):
    """The run's last attempts all failed from the same checkpoint: a restart would repeat it."""


class HellaSwagUnavailable(Gpt2Error, RuntimeError):
    """The HellaSwag file is neither given nor downloadable."""


class PlotError(Gpt2Error, RuntimeError):
    """A run directory holds nothing to plot, or matplotlib is missing."""


class StatusError(Gpt2Error, RuntimeError):
    """A run directory holds no record of a run."""


class LeaseHeld(Gpt2Error, RuntimeError):
    """Another trainer holds the run's lease: this start would be a second writer."""


class LeaseLost(Gpt2Error, RuntimeError):
    """This trainer was superseded by another attempt that took the run's lease: it must not write."""


class GroupLost(Gpt2Error, RuntimeError):
    """A peer is gone or cut off: the process group's store (on rank 0's host) refuses every call, or
    a collective failed for want of a peer. The group must restart from the last checkpoint."""


class LaunchError(Gpt2Error, ValueError):
    """Bad launcher input or an unusable cluster; nothing was submitted."""


# The one table: an error's class (or the nearest base listed) gives the process's exit code.
EXIT_CODES: dict[type[Gpt2Error], int] = {
    ConfigError: EXIT_CONFIG,
    LaunchError: EXIT_CONFIG,
    PlotError: EXIT_CONFIG,
    StatusError: EXIT_CONFIG,
    TrainingDiverged: EXIT_DIVERGED,
    CrashLoop: EXIT_CRASH_LOOP,
    GroupLost: EXIT_HUNG,
    StorageUnavailable: EXIT_STORAGE,
    Gpt2Error: EXIT_ERROR,
}


def exit_code(err: Gpt2Error) -> int:
    """The exit code for `err`, by the first of its classes in EXIT_CODES."""
    for cls in type(err).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return EXIT_ERROR
