"""Every optimization of docs/performance.md, one at a time, on the GPU at hand: one table.

    python benchmarks/gpu_matrix.py [--steps 10] [--warmup 3] [--micro-batches 8,16,32] [--no-autotune]

Runs `python -m gpt2.bench configs/gpt2-124m.yaml --synthetic-data --json` per variant (world size 1,
the global batch stays 491,520 tokens), each variant adding one change to the previous, then the
micro-batch sweep on the compiled one, then max-autotune (last: it compiles for minutes), then a
profile of one step of the fastest. Each row prints when measured. For a lent GPU with no network:
nothing here downloads anything.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LADDER = [
    ("fp32 (TF32 off), no fused AdamW, vocab 50257, eager",
     ["train.dtype=float32", "optim.fused=false", "model.pad_vocab_to=1", "train.compile=false", "train.tf32=false"]),
    ("+ TF32 matmuls", ["train.dtype=float32", "optim.fused=false", "model.pad_vocab_to=1", "train.compile=false"]),
    ("+ bf16 autocast (fp32 master weights)", ["train.dtype=bfloat16", "optim.fused=false", "model.pad_vocab_to=1",
                                                "train.compile=false"]),
    ("+ fused AdamW", ["train.dtype=bfloat16", "model.pad_vocab_to=1", "train.compile=false"]),
    ("+ vocab padded to 50304", ["train.dtype=bfloat16", "train.compile=false"]),
    ("+ torch.compile", ["train.dtype=bfloat16", "train.compile=true"]),
]
COMPILED = LADDER[-1][1]
# autotuning compiles for minutes: it runs last, so a short lease still gets every other row
AUTOTUNE = ("+ compile mode max-autotune-no-cudagraphs",
            COMPILED + ["train.compile_mode=max-autotune-no-cudagraphs"])
HEADER = f"{'variant':<52} {'tokens/s':>10} {'MFU':>6} {'step ms':>8} {'data ms':>8} {'mem GiB':>8} {'mb':>4}"


def run(overrides: list[str], steps: int, warmup: int, timeout_s: float, profile: str | None = None) -> dict | str:
    cmd = [sys.executable, "-m", "gpt2.bench", "configs/gpt2-124m.yaml", "--synthetic-data",
           "--steps", str(steps), "--warmup", str(warmup), *overrides]
    cmd += ["--profile", profile] if profile else ["--json"]
    try:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout_s:.0f} s"
    if r.returncode:
        return f"failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}"
    return r.stdout if profile else json.loads(r.stdout.strip().splitlines()[-1])


def row(name: str, r: dict | str) -> str:
    if isinstance(r, str):
        return f"{name:<52} {r}"
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    return (f"{name:<52} {r['tokens_per_sec']:>10,.0f} {mfu:>6} {r['step_ms_median']:>8.1f} "
            f"{r['data_ms_median']:>8.2f} {r['peak_memory_gib']:>8.1f} {r['micro_batch']:>4}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--micro-batches", default="8,16,32", help="the sweep on the compiled variant (empty: none)")
    p.add_argument("--variant-timeout", type=float, default=600, help="seconds one variant may take")
    p.add_argument("--no-autotune", action="store_true", help="skip the max-autotune row")
    p.add_argument("--profile-dir", default="/tmp/gpt2-profile")
    args = p.parse_args()
    variants = list(LADDER)
    variants += [(f"torch.compile, micro-batch {mb}", COMPILED + [f"train.micro_batch={mb}"])
                 for mb in filter(None, args.micro_batches.split(","))]
    variants += [] if args.no_autotune else [AUTOTUNE]
    print(HEADER, flush=True)
    rows = []
    for name, overrides in variants:  # each row as soon as it is measured: a cut-off run keeps what it had
        rows.append((name, run(overrides, args.steps, args.warmup, args.variant_timeout)))
        print(row(*rows[-1]), flush=True)
    ok = [(n, r) for n, r in rows if not isinstance(r, str)]
    if ok:
        fastest = max(ok, key=lambda nr: nr[1]["tokens_per_sec"])
        print(f"\ndevice: {fastest[1]['device']}; peak {fastest[1]['peak_flops']}; profile of '{fastest[0]}':",
              flush=True)
        print(run(fastest[1]["overrides"], 2, args.warmup, args.variant_timeout, profile=args.profile_dir))


if __name__ == "__main__":
    main()
