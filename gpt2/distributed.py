"""Process-group set-up and tear-down: one process, or torchrun (any nodes x processes)."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from gpt2.config import ConfigError


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


def init(device_preference: str = "auto", timeout_s: float = 0) -> Dist:
    """Join the process group when started by torchrun (RANK/WORLD_SIZE set); NCCL on GPUs, gloo on CPU.

    `timeout_s` bounds every collective (0: torch's default of 30 minutes); a collective that
    times out raises, and the trainer exits so that the group restarts.
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
        dist.init_process_group(backend=backend, timeout=timeout, store=_attempt_store(world, timeout),
                                rank=rank, world_size=world, device_id=device if device.type == "cuda" else None)
    return Dist(rank, local_rank, world, device)


def _attempt_store(world_size: int, timeout: timedelta) -> dist.Store | None:
    """A key space of this restart attempt in torchrun's shared TCP store, or None for env://.

    torchrun (torch 2.13) shares one TCPStore across restarts; without a per-attempt prefix a
    restarted worker reads its dead peers' addresses and process-group set-up fails. The launchers
    set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store per rendezvous round, also right for
    multi-node membership changes); this prefix covers plain single-node torchrun.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"/gpt2/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def teardown() -> None:
    """Leave the process group cleanly.

    A process that exits while a DDP module is alive aborts now and then under gloo
    ("terminate called without an active exception"); callers `del` their DDP module first, then
    collecting, a barrier and destroying the group avoids that.
    """
    gc.collect()
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def abort() -> None:
    """Leave the process group after a failure, without a barrier (peers may be gone)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: object) -> list[object]:
    """`obj` of every rank, in rank order."""
    if not dist.is_initialized():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
