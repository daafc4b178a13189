"""Throughput, MFU and TensorBoard logging."""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peaks in FLOP/s, from the vendors' datasheets (no sparsity).
# Matched against torch.cuda.get_device_name() in order; the first match wins.
BF16_PEAK_FLOPS: list[tuple[str, float]] = [
    ("H200", 989.4e12),
    ("GH200", 989.4e12),
    ("H100 NVL", 835.0e12),
    ("H100 PCIe", 756.0e12),
    ("H100", 989.4e12),  # SXM (reported as "NVIDIA H100 80GB HBM3")
    ("H800", 989.4e12),
    ("A100", 312.0e12),
    ("A800", 312.0e12),
    ("L40S", 362.0e12),
    ("L4", 121.0e12),
    ("A10G", 70.0e12),
    ("A10", 125.0e12),
    ("RTX 4090", 165.2e12),
    ("RTX 3090", 71.0e12),
]


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """(peak FLOP/s, device name) for MFU; None when the device's peak is not known to us.

    fp32 training on Ampere/Hopper runs on TF32 tensor cores at half the bf16 rate.
    """
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK_FLOPS:
        if key in name:
            return (peak if dtype == torch.bfloat16 else peak / 2), name
    return None, name


def mfu(tokens_per_sec: float, flops_per_tok: int, peak_flops: float | None, world_size: int) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices together."""
    if peak_flops is None:
        return None
    return tokens_per_sec * flops_per_tok / (peak_flops * world_size)


class Metrics:
    """TensorBoard on rank 0 (a no-op elsewhere). `purge_step` drops events from a previous
    attempt at or after the resume step, so curves never double back."""

    def __init__(self, log_dir: str | None, purge_step: int | None = None):
        self.writer = None
        if log_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
