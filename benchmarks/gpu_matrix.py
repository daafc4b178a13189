"""Every optimization of docs/performance.md, one at a time, on the GPU at hand: one table.

    python benchmarks/gpu_matrix.py [--steps 10] [--warmup 3] [--tokenizer-dir DIR]

Runs `python -m gpt2.bench configs/gpt2-124m.yaml --synthetic-data --json` per variant (world size 1,
the global batch stays 491,520 tokens), each variant adding one change to the previous, then the
micro-batch sweep on the best, then a profile of one step of the fastest. For a lent GPU with no
network: nothing here downloads anything.
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
    ("+ compile mode max-autotune-no-cudagraphs", ["train.dtype=bfloat16", "train.compile=true",
                                                   "train.compile_mode=max-autotune-no-cudagraphs"]),
]


def run(overrides: list[str], steps: int, warmup: int, profile: str | None = None) -> dict | str:
    cmd = [sys.executable, "-m", "gpt2.bench", "configs/gpt2-124m.yaml", "--synthetic-data",
           "--steps", str(steps), "--warmup", str(warmup), *overrides]
    if profile:
        cmd += ["--profile", profile]
    else:
        cmd.append("--json")
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode:
        return f"failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}"
    return r.stdout if profile else json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--micro-batches", default="4,8,16,32")
    p.add_argument("--profile-dir", default="/tmp/gpt2-profile")
    args = p.parse_args()
    rows = []
    for name, overrides in LADDER:
        rows.append((name, run(overrides, args.steps, args.warmup)))
        print(name, rows[-1] if isinstance(rows[-1][1], str) else f"{rows[-1][1]['tokens_per_sec']:,.0f} tok/s",
              flush=True)
    best = LADDER[-2][1]
    for mb in args.micro_batches.split(","):
        name = f"torch.compile, micro-batch {mb}"
        rows.append((name, run(best + [f"train.micro_batch={mb}"], args.steps, args.warmup)))
        print(name, rows[-1][1] if isinstance(rows[-1][1], str) else f"{rows[-1][1]['tokens_per_sec']:,.0f} tok/s",
              flush=True)
    print(f"\n{'variant':<52} {'tokens/s':>10} {'MFU':>6} {'step ms':>8} {'data ms':>8} {'mem GiB':>8}")
    for name, r in rows:
        if isinstance(r, str):
            print(f"{name:<52} {r}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{name:<52} {r['tokens_per_sec']:>10,.0f} {mfu:>6} {r['step_ms_median']:>8.1f} "
              f"{r['data_ms_median']:>8.2f} {r['peak_memory_gib']:>8.1f}")
    ok = [(n, r) for n, r in rows if not isinstance(r, str)]
    if ok:
        fastest = max(ok, key=lambda nr: nr[1]["tokens_per_sec"])
        print(f"\ndevice: {fastest[1]['device']}; peak {fastest[1]['peak_flops']}; profile of '{fastest[0]}':")
        mb = [o for o in fastest[1]["overrides"] if o.startswith("train.micro_batch")]
        print(run(best + mb, 2, args.warmup, profile=args.profile_dir))


if __name__ == "__main__":
    main()
