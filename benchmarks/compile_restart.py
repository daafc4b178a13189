"""What a compiled run's restart pays for compilation: cold, on a node with its own caches, and on
another node with and without the artifacts the run stored (gpt2.compile_cache).

    python benchmarks/compile_restart.py [--config configs/demo.yaml] [--device cpu] [KEY=VALUE ...]

Each row is a fresh process of `python -m gpt2.train CONFIG train.compile=true` that trains two steps
(resuming from the previous row's checkpoint after the first); "another node" is an empty
TORCHINDUCTOR_CACHE_DIR. Reports the warm-up ("compiled the training step in X s", every graph the
run needs before its first step), its cache hits and misses, and the process's wall time.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(config: str, work: Path, node: str, step: int, overrides: list[str]) -> tuple[float, str, float]:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(work / node), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "gpt2.train", config, "train.compile=true", f"train.stop_at_step={step}",
           f"checkpoint.dir={work / 'ckpt'}", f"logging.dir={work / 'tb'}", "checkpoint.every=1000",
           "eval.hellaswag_every=0", "eval.sample_every=0", *overrides]
    t0 = time.monotonic()
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    text = out.stdout + out.stderr
    if out.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} exited {out.returncode}:\n{text[-3000:]}")
    m = re.search(r"compiled the training step in ([\d.]+) s \(every rank ready; compile cache: (\d+) hits, "
                  r"(\d+) misses", text)
    if m is None:
        sys.exit(f"error: no compile line in the output of {' '.join(cmd)}:\n{text[-3000:]}")
    return float(m.group(1)), f"{m.group(2)} / {m.group(3)}", wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.device=cuda")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="compile-restart-"))
    try:
        rows = [("cold: first start, empty caches", "node-a", 2),
                ("restart on the same node (its own caches)", "node-a", 4)]
        results = [(name, *run(args.config, work, node, step, args.overrides)) for name, node, step in rows]
        shutil.rmtree(work / "ckpt" / "compile-cache")  # what a restart elsewhere met before artifacts were stored
        results.append(("restart on another node, no stored artifacts", *run(args.config, work, "node-b", 6,
                                                                               args.overrides)))
        results.append(("restart on another node, stored artifacts", *run(args.config, work, "node-c", 8,
                                                                           args.overrides)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"| {args.config} {' '.join(args.overrides)} | warm-up (compile) | cache hits / misses | process wall |")
    print("|---|---|---|---|")
    for name, compile_s, counts, wall in results:
        print(f"| {name} | {compile_s:.1f} s | {counts} | {wall:.1f} s |")


if __name__ == "__main__":
    main()
