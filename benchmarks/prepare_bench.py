"""Preparation throughput: gpt2.prepare (processes and threads) against build-nanogpt's baseline.

    python benchmarks/prepare_bench.py [--copies 20] [--bpe-dir ../shared/data] [--workers N]

The corpus is tinyshakespeare cut into documents at blank lines, repeated `--copies` times, as
.jsonl. The baseline is build-nanogpt's fineweb.py loop: a multiprocessing.Pool mapping
`[eot] + encode_ordinary(doc)` over documents (imap, chunksize 16), filling 100M-token shards.
Every variant gets the same number of worker processes and writes its shards to a temp dir.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_enc = None


def _baseline_init(files_dir: str) -> None:
    global _enc
    from gpt2.tokenizer import GPT2Tokenizer

    _enc = GPT2Tokenizer(files_dir)._enc


def _baseline_tokenize(doc: dict) -> np.ndarray:
    tokens = [50256]
    tokens.extend(_enc.encode_ordinary(doc["text"]))
    arr = np.array(tokens)
    assert (0 <= arr).all() and (arr < 2**16).all()
    return arr.astype(np.uint16)


def baseline(corpus: Path, out: Path, workers: int, files_dir: str, shard_size: int = 100_000_000) -> int:
    """build-nanogpt's fineweb.py, reading the same .jsonl."""
    docs = (json.loads(line) for line in open(corpus))
    total = 0
    with mp.Pool(workers, initializer=_baseline_init, initargs=(files_dir,)) as pool:
        shard_index, count = 0, 0
        buf = np.empty((shard_size,), dtype=np.uint16)
        for tokens in pool.imap(_baseline_tokenize, docs, chunksize=16):
            if count + len(tokens) < shard_size:
                buf[count:count + len(tokens)] = tokens
                count += len(tokens)
            else:
                rest = shard_size - count
                buf[count:count + rest] = tokens[:rest]
                np.save(out / f"baseline_{shard_index:06d}", buf)
                shard_index += 1
                buf[0:len(tokens) - rest] = tokens[rest:]
                count = len(tokens) - rest
            total += len(tokens)
        if count:
            np.save(out / f"baseline_{shard_index:06d}", buf[:count])
    return total


def ours(corpus: Path, out: Path, workers: int, files_dir: str, kind: str) -> int:
    from gpt2.config import load_config
    from gpt2.prepare import prepare

    overrides = [f"data.source={corpus}", f"data.dir={out}", f"tokenizer.files_dir={files_dir}",
                 "data.val_tokens=1000000"]
    cfg = load_config(REPO / "configs" / "gpt2-124m.yaml", overrides)
    return prepare(cfg, workers=workers, executor_kind=kind, progress=False).tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--copies", type=int, default=20)
    p.add_argument("--bpe-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--corpus", default=str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt"))
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--repeats", type=int, default=2, help="best of N runs per variant")
    args = p.parse_args()
    text = Path(args.corpus).read_text()
    docs = [d for d in text.split("\n\n") if d.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        with open(corpus, "w") as f:
            for _ in range(args.copies):
                for d in docs:
                    f.write(json.dumps({"text": d}) + "\n")
        variants = {
            f"baseline: build-nanogpt Pool({args.workers}).imap(encode_ordinary, chunksize=16)":
                lambda out: baseline(corpus, out, args.workers, args.bpe_dir),
            f"gpt2.prepare, {args.workers} processes (batched encode, ordered, bounded)":
                lambda out: ours(corpus, out, args.workers, args.bpe_dir, "process"),
            f"gpt2.prepare, {args.workers} threads (tiktoken encodes without the GIL)":
                lambda out: ours(corpus, out, args.workers, args.bpe_dir, "thread"),
        }
        results = {}
        for name, fn in variants.items():
            best = None
            for r in range(args.repeats):
                out = Path(tmp) / f"out-{len(results)}-{r}"
                out.mkdir()
                t0 = time.perf_counter()
                tokens = fn(out)
                dt = time.perf_counter() - t0
                best = min(best or dt, dt)
            results[name] = (tokens, best)
    base_rate = next(iter(results.values()))[0] / next(iter(results.values()))[1]
    print(f"corpus: {len(docs) * args.copies:,} documents, {os.path.getsize(args.corpus) * args.copies / 1e6:.1f} MB "
          f"of text; {args.workers} workers on {os.cpu_count()} cores; best of {args.repeats}")
    print(f"{'variant':<80} {'tokens':>12} {'seconds':>8} {'tokens/s':>12} {'vs baseline':>11}")
    for name, (tokens, dt) in results.items():
        print(f"{name:<80} {tokens:>12,} {dt:>8.2f} {tokens / dt:>12,.0f} {tokens / dt / base_rate:>10.2f}x")


if __name__ == "__main__":
    main()
