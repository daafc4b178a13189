"""Object storage (SeaweedFS S3 on loopback): preparation into s3:// and reading it back."""

from __future__ import annotations

import numpy as np
from helpers.corpus import cfg_for, train_shards

from gpt2.data import TrainLoader, build_loaders
from gpt2.prepare import prepare

# ---- object storage ------------------------------------------------------------------------------------


def test_prepare_into_s3_and_read_back(s3_url, corpus, bpe_dir, prepared, tmp_path):
    cfg = cfg_for(corpus, s3_url + "/shards", bpe_dir, **{"data.cache_dir": str(tmp_path / "cache")})
    prepare(cfg, workers=2, progress=False)
    cfg.eval.val_batches = 2
    cfg.train.seq_len, cfg.train.micro_batch, cfg.train.total_batch_tokens = 64, 2, 64 * 8
    remote, val = build_loaders(cfg, cfg.train.micro_batch, 0, 1)
    local = TrainLoader(train_shards(prepared, bpe_dir), remote.layout, 0)
    for step in (0, 7, 40):
        assert np.array_equal(remote.rows(step, 1), local.rows(step, 1))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir())  # fetched once into the cache
    assert val is not None and val.batch(1)[0].shape == (2, 64)


def test_a_flipped_byte_on_the_store_is_refused_at_the_fetch_and_never_cached(s3_url, corpus, bpe_dir, tmp_path):
    import pytest

    from gpt2.shards import DataError, open_split
    from gpt2.storage import filesystem
    from gpt2.tokenizer import get_tokenizer

    cfg = cfg_for(corpus, s3_url + "/shards", bpe_dir)
    prepare(cfg, workers=1, progress=False)
    fs, root = filesystem(s3_url + "/shards")
    data = bytearray(fs.cat_file(f"{root}/train_000001.npy"))
    data[-7] ^= 0x10
    fs.pipe_file(f"{root}/train_000001.npy", bytes(data))
    cache = tmp_path / "cache"
    shards = open_split(s3_url + "/shards", "train", get_tokenizer("gpt2", str(bpe_dir)).fingerprint,
                        cache_dir=str(cache))
    assert shards.read(0, 10).size == 10  # shard 0 is fine
    with pytest.raises(DataError, match=r"/shards/train_000001.npy is corrupt: .*--redo train_000001.npy"):
        shards.read(int(shards.offsets[1]), 10)
    cached = sorted(p.name for p in (cache / "sha256").glob("*.npy"))  # (beside them: the copies' lock files)
    assert len(cached) == 1 and not any(p.name.endswith((".tmp", ".partial")) for p in cache.rglob("*"))  # shard 0


def test_two_corpora_through_one_cache_each_read_their_own_tokens(s3_url, corpus, bpe_dir, tmp_path):
    import io
    import json

    from gpt2.shards import open_split
    from gpt2.storage import filesystem
    from gpt2.tokenizer import get_tokenizer

    docs = [json.loads(line) for line in open(corpus)]
    other = tmp_path / "reversed.jsonl"
    other.write_text("".join(json.dumps(d) + "\n" for d in reversed(docs)))
    cache = tmp_path / "cache"  # one explicit data.cache_dir for both, as two jobs on a node might have
    for name, source in (("a", corpus), ("b", other)):
        prepare(cfg_for(source, f"{s3_url}/{name}", bpe_dir), workers=1, progress=False)
    fingerprint = get_tokenizer("gpt2", str(bpe_dir)).fingerprint
    for name in ("a", "b"):
        fs, root = filesystem(f"{s3_url}/{name}")
        truth = np.load(io.BytesIO(fs.cat_file(f"{root}/train_000000.npy")))
        read = open_split(f"{s3_url}/{name}", "train", fingerprint, cache_dir=str(cache)).read(0, truth.size)
        assert np.array_equal(read, truth), name
