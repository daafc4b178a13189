"""Checkpoint save/load of GPT-2 124M with its AdamW state: local disk and S3 on loopback, sync vs async.

    python benchmarks/checkpoint_bench.py [--s3] [--repeats 3]

"stall" is how long the training loop is blocked by save(): the whole save when synchronous, only
the copy to host memory when asynchronous. "total" is until the checkpoint is committed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from gpt2.checkpoint import Checkpointer  # noqa: E402
from gpt2.config import CheckpointConfig, ModelConfig, OptimConfig  # noqa: E402
from gpt2.model import GPT  # noqa: E402
from gpt2.optim import build_optimizer  # noqa: E402
from gpt2.runtime import RNGState  # noqa: E402


def parts_124m() -> dict:
    torch.manual_seed(0)
    model = GPT(ModelConfig(pad_vocab_to=128))
    opt = build_optimizer(model, OptimConfig(), "cpu")
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()  # creates the AdamW moments
    return {"model": model, "optimizer": opt, "rng": RNGState()}


def measure(url: str, parts: dict, blocking: bool, repeats: int, storage_options: dict) -> dict:
    stalls, totals, loads = [], [], []
    ck = Checkpointer(CheckpointConfig(dir=url, keep=2, storage_options=storage_options), parts=parts,
                      describe=lambda step: {"config": {}})
    for r in range(repeats):
        t0 = time.perf_counter()
        ck.save(100 + r, blocking=blocking)
        t1 = time.perf_counter()
        ck.wait()
        t2 = time.perf_counter()
        stalls.append(t1 - t0)
        totals.append(t2 - t0)
        t3 = time.perf_counter()
        ck.store.load(ck.store.complete()[-1].url)
        loads.append(time.perf_counter() - t3)
    return {"stall": statistics.median(stalls), "total": statistics.median(totals), "load": statistics.median(loads),
            "bytes": ck.store.complete()[-1].meta["bytes"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--s3", action="store_true", help="also against SeaweedFS on 127.0.0.1:8333")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    parts = parts_124m()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        targets = [("local disk", tmp + "/ckpt", {})]
        server = None
        if args.s3:
            from helpers.s3 import S3_BUCKET, S3Server

            server = S3Server(Path(tmp) / "weed")
            server.start()
            targets.append(("S3 (SeaweedFS, loopback)", f"s3://{S3_BUCKET}/bench", server.storage_options))
        try:
            for where, url, opts in targets:
                for blocking in (True, False):
                    r = measure(f"{url}/{'sync' if blocking else 'async'}", parts, blocking, args.repeats, opts)
                    rows.append((where, "sync" if blocking else "async", r))
        finally:
            if server:
                server.stop()
    print(f"GPT-2 124M + AdamW state; {os.cpu_count()} CPUs; median of {args.repeats}")
    print(f"{'storage':<26} {'mode':<6} {'size MB':>8} {'stall s':>8} {'total s':>8} {'load s':>7} {'stall/sync':>10}")
    sync_total = {}
    for where, mode, r in rows:
        if mode == "sync":
            sync_total[where] = r["total"]
        ratio = r["stall"] / sync_total[where]
        print(f"{where:<26} {mode:<6} {r['bytes'] / 1e6:>8.0f} {r['stall']:>8.2f} {r['total']:>8.2f} {r['load']:>7.2f} "
              f"{100 * ratio:>9.1f}%")


if __name__ == "__main__":
    main()
