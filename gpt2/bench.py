"""`python -m gpt2.bench CONFIG [key=value ...] [--steps N] [--warmup W] [--json] [--synthetic-data]`

Times the real training step (the trainer's own code path: data loader, forward, backward,
all-reduce, clipping, optimizer) after warm-up, and prints tokens/s, MFU (formula and device peak
named), step time median and spread, data-loading time and peak memory. Runs under torchrun too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from gpt2 import distributed, logs
from gpt2.config import load_config
from gpt2.errors import Gpt2Error, exit_code
from gpt2.metrics import mfu
from gpt2.shards import Manifest, npy_bytes, shard_name, write_manifest
from gpt2.tokenizer import tokenizer_class
from gpt2.train import Trainer

log = logging.getLogger("gpt2.bench")


def synthetic_shards(directory: str, tokenizer_name: str, n_tokens: int, vocab: int) -> None:
    """Random uint16 tokens in the shard format, so the benchmark needs no prepared corpus."""
    rng = np.random.default_rng(0)
    # the fingerprint is all the loader checks: no tokenizer files are needed for random tokens
    fingerprint = tokenizer_class(tokenizer_name).fingerprint
    os.makedirs(directory, exist_ok=True)
    shards = []
    for split, n in (("val", n_tokens // 8), ("train", n_tokens)):
        data = rng.integers(0, vocab, n, dtype=np.uint16)
        with open(f"{directory}/{shard_name(split, 0)}", "wb") as f:
            f.write(npy_bytes(data))
        shards.append(dict(file=shard_name(split, 0), split=split, tokens=n, next_doc=0, next_offset=0))
    write_manifest(directory, Manifest(tokenizer=fingerprint, source="synthetic", shard_tokens=n_tokens,
                                       val_tokens=n_tokens // 8, shards=shards, complete=True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt2.bench", description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--synthetic-data", action="store_true", help="random tokens instead of data.dir")
    p.add_argument("--profile", metavar="DIR", help="also profile one step (torch.profiler): a summary table, "
                   "and a Chrome trace in DIR")
    args = p.parse_intermixed_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="gpt2-bench-")
    overrides = list(args.overrides) + ["eval.val_every=0", "eval.val_batches=0", "eval.hellaswag_every=0",
                                        "eval.sample_every=0", "checkpoint.resume=never",
                                        f"checkpoint.dir={tmp.name}/checkpoints", f"logging.dir={tmp.name}/tensorboard"]
    if args.synthetic_data:
        overrides += [f"data.dir={tmp.name}/data", "data.auto_prepare=false"]
    logs.setup()
    try:
        cfg = load_config(args.config, overrides)
        cfg.train.max_steps = max(cfg.train.max_steps, args.warmup + args.steps)
        dist = distributed.init(cfg.train.device, 2 * cfg.train.hang_timeout_s)
        logs.setup(dist.rank)
        if args.synthetic_data:  # on every rank, each in its own temporary directory: the same tokens (seed 0)
            need = (args.warmup + args.steps) * cfg.train.total_batch_tokens * 11 // 10 + 10 * cfg.train.seq_len
            synthetic_shards(cfg.data.dir, cfg.tokenizer.name, need, min(cfg.model.vocab_size, 50257))
        trainer = Trainer.build(cfg, dist)
    except Gpt2Error as err:
        log.error("%s", err)
        return exit_code(err)
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    times, data_times = [], []
    for step in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        out = trainer.train_step(step)
        float(out.loss_sum)  # the step is done when its loss is on the host
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            data_times.append(out.data_seconds)
    tokens_per_sec = cfg.train.total_batch_tokens / statistics.median(times)
    util = mfu(tokens_per_sec, trainer.flops_per_token, trainer.peak_flops, dist.world_size)
    if trainer.device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(trainer.device) / 2**30
        mem_what = "GPU max allocated"
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        mem_what = "host max RSS"
    result = {
        "config": args.config, "overrides": args.overrides, "device": trainer.device_name, "dtype": str(trainer.dtype),
        "world_size": dist.world_size, "compile": cfg.train.compile, "micro_batch": trainer.micro_batch,
        "grad_accum": trainer.accum, "tokens_per_step": cfg.train.total_batch_tokens, "steps": args.steps,
        "tokens_per_sec": tokens_per_sec, "mfu": util, "peak_flops": trainer.peak_flops,
        "flops_per_token": trainer.flops_per_token, "step_ms_median": 1000 * statistics.median(times),
        "step_ms_min": 1000 * min(times), "step_ms_max": 1000 * max(times),
        "step_ms_stdev": 1000 * (statistics.stdev(times) if len(times) > 1 else 0.0),
        "data_ms_median": 1000 * statistics.median(data_times), "peak_memory_gib": peak_mem, "memory_kind": mem_what,
    }
    if args.profile and dist.is_main:
        print(profile_step(trainer, args.warmup + args.steps, args.profile))
    if dist.is_main:
        if args.json:
            print(json.dumps(result))
        else:
            print(table(result))
    trainer.close()
    del trainer
    distributed.teardown()
    tmp.cleanup()
    return 0


def profile_step(trainer, step: int, out_dir: str) -> str:
    """Profile one more training step; return the top operators by device (or CPU) time."""

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=False) as prof:
        float(trainer.train_step(step).loss_sum)
    os.makedirs(out_dir, exist_ok=True)
    prof.export_chrome_trace(os.path.join(out_dir, "train_step_trace.json"))
    key = "self_cuda_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=20)


def table(r: dict) -> str:
    peak = f"{r['peak_flops'] / 1e12:.1f} TFLOP/s ({r['device']}, {r['dtype']})" if r["peak_flops"] else \
        f"unknown for {r['device']}: MFU not reported"
    rows = [
        ("device", f"{r['device']} x {r['world_size']}, {r['dtype']}, compile={r['compile']}"),
        ("batch", f"{r['tokens_per_step']:,} tokens/step = micro-batch {r['micro_batch']} x {r['grad_accum']} "
                  f"accumulation x {r['world_size']} ranks"),
        ("tokens/s", f"{r['tokens_per_sec']:,.0f}"),
        ("MFU", f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"),
        ("FLOPs/token", f"{r['flops_per_token'] / 1e6:.1f} M (6N + 6*L*C*T)"),
        ("device peak", peak),
        ("step time", f"median {r['step_ms_median']:.1f} ms (min {r['step_ms_min']:.1f}, max {r['step_ms_max']:.1f},"
                      f" stdev {r['step_ms_stdev']:.1f}) over {r['steps']} steps"),
        ("data loading", f"median {r['data_ms_median']:.2f} ms/step"),
        ("peak memory", f"{r['peak_memory_gib']:.2f} GiB ({r['memory_kind']})"),
    ]
    return "\n".join(f"{k:>13} | {v}" for k, v in rows)


if __name__ == "__main__":
    sys.exit(main())
