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
