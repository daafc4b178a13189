"""Process concerns shared by the entry points: the preemption flag, precision, RNG state."""

from __future__ import annotations

import logging
import signal
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

log = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


class PreemptionFlag:
    """Set by SIGTERM/SIGINT/SIGUSR2 while installed (`with flag:`); acted on at a step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> PreemptionFlag:
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def is_set(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: object) -> None:
        # Repeats are expected (SLURM signals every process of a step, torchrun forwards the same
        # signal again); a worker that never gets to save is SIGKILLed by torchrun after 30 s.
        if self.signum is None:
            log.warning(f"received {signal.Signals(signum).name}: saving a checkpoint after this step")
        self.signum = signum


def ignore_stop_signals() -> None:
    """For a rank on its way out after a failure, its exit code decided: torchrun, having seen a peer
    fail, sends SIGTERM to the rest, whose default action would turn this rank's exit code into -15
    (which says nothing, and SLURM does not requeue). The exit follows within seconds, before
    torchrun's SIGKILL (30 s)."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`train.dtype`: auto is bfloat16 on CUDA and float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def autocast_for(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """bf16 autocast on CUDA (weights stay fp32); a no-op otherwise."""
    if device.type == "cuda" and dtype == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def set_tf32(device: torch.device, enabled: bool) -> None:
    """TF32 tensor cores for the fp32 matmuls that remain under autocast (CUDA only)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


class RNGState:
    """The host and CUDA random generators, as a part of a checkpoint."""

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
