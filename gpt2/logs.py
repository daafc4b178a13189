"""The one message channel: `logging` under the `gpt2` logger, set up once per process.

Info lines print as they are (the console format of a run); warnings and errors are marked by
their level ("warning: ...", "error: ...") and go to stderr. Rank filtering is done here, once:
rank 0 says everything, the other ranks only errors, prefixed with their rank. What a command
produces (a table, a listing, the manifests, samples) is its output and is printed to stdout.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "gpt2"


class _Console(logging.Formatter):
    def __init__(self, rank: int):
        super().__init__()
        self.prefix = f"[rank {rank}] " if rank else ""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        return self.prefix + text


class _StdStream(logging.StreamHandler):
    """A handler on sys.stdout or sys.stderr as they are when a record is written (pytest swaps them)."""

    def __init__(self, name: str, rank: int, keep) -> None:
        super().__init__()
        self._name = name
        self.setFormatter(_Console(rank))
        self.addFilter(keep)

    @property
    def stream(self):  # type: ignore[override]
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup(rank: int | None = None, level: int = logging.INFO) -> None:
    """Send the package's messages to the console for this process (`rank`: RANK of torchrun by default).
    Calling it again replaces the previous set-up."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    floor = level if rank == 0 else logging.ERROR
    logger = logging.getLogger(ROOT)
    for handler in list(logger.handlers):
        if isinstance(handler, _StdStream):
            logger.removeHandler(handler)
    logger.addHandler(_StdStream("stdout", rank, lambda r: floor <= r.levelno < logging.WARNING))
    logger.addHandler(_StdStream("stderr", rank, lambda r: r.levelno >= max(floor, logging.WARNING)))
    logger.setLevel(level)


def duration(seconds: float) -> str:
    """A duration for people: 45s, 3m07s, 2h05m."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
