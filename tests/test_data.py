"""Preparation into shards and the step-addressed loader."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import shared_file

from gpt2.config import load_config
from gpt2.data import Layout, TrainLoader, ValLoader, build_loaders
from gpt2.prepare import prepare
from gpt2.shards import DataError, Manifest, npy_bytes, open_split, read_manifest
from gpt2.tokenizer import get_tokenizer


def shakespeare_docs() -> list[str]:
    text = shared_file("tinyshakespeare.txt").read_text()
    return [d for d in text.split("\n\n") if d.strip()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """tinyshakespeare as a .jsonl of documents (one per blank-line section)."""
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in shakespeare_docs()))
    return path


def cfg_for(corpus, out, bpe_dir, **extra):
    overrides = [f"data.source={corpus}", f"data.dir={out}", "data.shard_tokens=50000", "data.val_tokens=30000",
                 "tokenizer.name=gpt2", f"tokenizer.files_dir={bpe_dir}"] + [f"{k}={v}" for k, v in extra.items()]
    return load_config("configs/demo.yaml", overrides)


def shard_bytes(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    from conftest import SHARED_DATA

    out = tmp_path_factory.mktemp("prepared") / "shards"
    prepare(cfg_for(corpus, out, SHARED_DATA), workers=1, progress=False)
    return out


def test_token_count_and_shard_sizes_match_tiktoken(prepared, bpe_dir):
    tok = get_tokenizer("gpt2", str(bpe_dir))
    expected = sum(len(tok.encode(d)) + 1 for d in shakespeare_docs())  # +1: <|endoftext|> before each
    manifest = read_manifest(str(prepared))
    assert manifest.complete and manifest.documents == len(shakespeare_docs())
    assert sum(s["tokens"] for s in manifest.shards) == expected
    assert [s["split"] for s in manifest.shards][:2] == ["val", "train"]
    assert manifest.shards[0]["tokens"] == 30000
    assert all(s["tokens"] == 50000 for s in manifest.shards[1:-1]) and 0 < manifest.shards[-1]["tokens"] <= 50000
    val = np.load(prepared / "val_000000.npy")
    assert val.dtype == np.uint16 and val[0] == 50256
    first_doc = tok.encode(shakespeare_docs()[0])
    assert val[1:1 + len(first_doc)].tolist() == first_doc


def test_two_workers_write_the_same_bytes(prepared, corpus, bpe_dir, tmp_path):
    prepare(cfg_for(corpus, tmp_path / "two", bpe_dir), workers=2, progress=False)
    assert shard_bytes(tmp_path / "two") == shard_bytes(prepared)


def test_threads_write_the_same_bytes(prepared, corpus, bpe_dir, tmp_path):
    prepare(cfg_for(corpus, tmp_path / "t", bpe_dir), workers=2, executor_kind="thread", progress=False)
    assert shard_bytes(tmp_path / "t") == shard_bytes(prepared)


class Killed(BaseException):
    """Stands for the process dying: nothing in prepare() may catch it."""


def test_restart_after_a_crash_resumes_without_redoing_shards(prepared, corpus, bpe_dir, tmp_path, monkeypatch):
    import gpt2.prepare as prep

    out = tmp_path / "restart"
    real_write = prep.write_bytes
    written: list[str] = []
    crash = [True]

    def crashing_write(fs, path, data):
        if crash[0] and path.endswith(".npy") and len(written) == 3:
            crash[0] = False
            # die half-way through the 4th shard: a partial temporary file, never the shard itself
            (out / ".train_000002.npy.tmp-dead").write_bytes(data[: len(data) // 2])
            raise Killed("killed")
        real_write(fs, path, data)
        written.append(path.rsplit("/", 1)[-1])

    monkeypatch.setattr(prep, "write_bytes", crashing_write)
    with pytest.raises(Killed):
        prepare(cfg_for(corpus, out, bpe_dir), workers=1, progress=False)
    partial = read_manifest(str(out))
    assert not partial.complete and len(partial.shards) == 3
    with pytest.raises(DataError, match="only partly prepared"):
        open_split(str(out), "train", get_tokenizer("gpt2", str(bpe_dir)).fingerprint)

    written.clear()
    summary = prepare(cfg_for(corpus, out, bpe_dir), workers=2, progress=False)
    assert summary.skipped_shards == 3
    assert "val_000000.npy" not in written and "train_000000.npy" not in written
    (out / ".train_000002.npy.tmp-dead").unlink()
    assert shard_bytes(out) == shard_bytes(prepared)


def test_prepare_refuses_a_directory_prepared_differently(prepared, corpus, bpe_dir):
    with pytest.raises(DataError, match="other settings"):
        prepare(cfg_for(corpus, prepared, bpe_dir, **{"data.shard_tokens": 1234}), workers=1, progress=False)


# ---- the loader -----------------------------------------------------------------------------------


def train_shards(prepared, bpe_dir):
    return open_split(str(prepared), "train", get_tokenizer("gpt2", str(bpe_dir)).fingerprint)


def global_rows(shards, layout: Layout, step: int, shuffle=False) -> np.ndarray:
    """Everything all ranks read at `step`, in rank then micro-step order."""
    parts = []
    for rank in range(layout.world_size):
        loader = TrainLoader(shards, layout, rank, seed=5, shuffle=shuffle)
        parts += [loader.rows(step, m) for m in range(layout.accum_steps)]
    return np.concatenate(parts)


@pytest.mark.parametrize("shuffle", [False, True])
def test_union_of_ranks_equals_one_rank(prepared, bpe_dir, shuffle):
    shards = train_shards(prepared, bpe_dir)
    single = Layout(micro_batch=2, seq_len=64, total_batch_tokens=64 * 16, world_size=1)
    for world in (1, 2, 4):
        layout = Layout(micro_batch=2, seq_len=64, total_batch_tokens=64 * 16, world_size=world)
        for step in (0, 3, 250):  # 250 wraps into a later epoch
            want = global_rows(shards, single, step, shuffle)
            assert np.array_equal(global_rows(shards, layout, step, shuffle), want)


def test_resume_at_any_world_size_reads_what_an_uninterrupted_run_reads(prepared, bpe_dir):
    shards = train_shards(prepared, bpe_dir)
    uninterrupted = [global_rows(shards, Layout(4, 64, 64 * 16, 2), s) for s in range(12)]
    resumed = ([global_rows(shards, Layout(4, 64, 64 * 16, 2), s) for s in range(5)]
               + [global_rows(shards, Layout(4, 64, 64 * 16, 1), s) for s in range(5, 9)]
               + [global_rows(shards, Layout(2, 64, 64 * 16, 4), s) for s in range(9, 12)])
    assert all(np.array_equal(a, b) for a, b in zip(uninterrupted, resumed))


@pytest.mark.parametrize("shuffle", [False, True])
def test_one_epoch_reads_each_token_at_most_once_and_ranks_never_overlap(prepared, bpe_dir, shuffle):
    shards = train_shards(prepared, bpe_dir)
    layout = Layout(micro_batch=2, seq_len=64, total_batch_tokens=64 * 8, world_size=2)
    loaders = [TrainLoader(shards, layout, r, seed=1, shuffle=shuffle) for r in range(2)]
    steps_per_epoch = loaders[0].rows_per_epoch // layout.rows_per_step
    seen = np.zeros(shards.num_tokens, dtype=np.int32)
    owner = np.full(shards.num_tokens, -1)
    for step in range(steps_per_epoch):
        for rank, loader in enumerate(loaders):
            for m in range(layout.accum_steps):
                first = layout.first_row(step, m, rank)
                for i in range(layout.micro_batch):
                    start = loader._row_offset(first + i)
                    seen[start:start + 65] += 1
                    assert np.all((owner[start:start + 65] == -1) | (owner[start:start + 65] == rank))
                    owner[start:start + 65] = rank
    assert seen.max() == 1
    # rows span shard boundaries, so at most one partial row per epoch is left unread
    assert (seen == 0).sum() < 65 + layout.rows_per_step * 65


def test_rows_span_shard_boundaries_without_garbage(prepared, bpe_dir):
    shards = train_shards(prepared, bpe_dir)
    whole = np.concatenate([np.load(prepared / e["file"]) for e in shards.entries])
    boundary = int(shards.offsets[1])
    assert np.array_equal(shards.read(boundary - 10, 20), whole[boundary - 10:boundary + 10])


def test_val_batches_are_fixed_and_split_across_ranks(prepared, bpe_dir):
    val = open_split(str(prepared), "val", get_tokenizer("gpt2", str(bpe_dir)).fingerprint)
    loader = ValLoader(val, micro_batch=2, seq_len=64, num_batches=5)
    assert [list(loader.batch_ids(r, 2)) for r in range(2)] == [[0, 2, 4], [1, 3]]
    x, y = loader.batch(1)
    assert x.shape == (2, 64) and np.array_equal(x[:, 1:], y[:, :-1])
    with pytest.raises(DataError, match="fewer than eval.val_batches=1000"):
        ValLoader(val, micro_batch=2, seq_len=64, num_batches=1000)


# ---- bad input --------------------------------------------------------------------------------------


def loader_cfg(data_dir, bpe_dir, **extra):
    return load_config("configs/demo.yaml", [f"data.dir={data_dir}", "tokenizer.name=gpt2",
                                             f"tokenizer.files_dir={bpe_dir}", "model.vocab_size=50257",
                                             "eval.val_batches=1"] + [f"{k}={v}" for k, v in extra.items()])


def copy_prepared(prepared, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(prepared, target)
    return target


def test_missing_directory(tmp_path, bpe_dir):
    with pytest.raises(DataError, match=r"does not exist; prepare it first"):
        build_loaders(loader_cfg(tmp_path / "nope", bpe_dir), 0, 1)


def test_directory_without_shards(tmp_path, bpe_dir):
    with pytest.raises(DataError, match=r"manifest.json not found \(it holds no shards\)"):
        build_loaders(loader_cfg(tmp_path, bpe_dir), 0, 1)


def test_shard_with_wrong_dtype(prepared, tmp_path, bpe_dir):
    d = copy_prepared(prepared, tmp_path)
    tokens = np.load(d / "train_000001.npy")
    np.save(d / "train_000001.npy", tokens.astype(np.int32))
    with pytest.raises(DataError, match=r"train_000001.npy is \d+ bytes but .* another dtype"):
        build_loaders(loader_cfg(d, bpe_dir), 0, 1)


def test_truncated_shard(prepared, tmp_path, bpe_dir):
    d = copy_prepared(prepared, tmp_path)
    data = (d / "train_000000.npy").read_bytes()
    (d / "train_000000.npy").write_bytes(data[:1000])
    with pytest.raises(DataError, match=r"train_000000.npy is 1000 bytes .*truncated"):
        build_loaders(loader_cfg(d, bpe_dir), 0, 1)


def test_manifest_from_another_tokenizer(prepared, bpe_dir):
    cfg = load_config("configs/demo.yaml", [f"data.dir={prepared}", "eval.val_batches=1"])  # bytes tokenizer
    with pytest.raises(DataError, match=r"tokenized with 'gpt2:.*' but the config's tokenizer is 'bytes"):
        build_loaders(cfg, 0, 1)


def test_shard_smaller_than_one_sequence(tmp_path, bpe_dir):
    tok = get_tokenizer("gpt2", str(bpe_dir))
    d = tmp_path / "small"
    d.mkdir()
    (d / "val_000000.npy").write_bytes(npy_bytes(np.zeros(4000, dtype=np.uint16)))
    (d / "train_000000.npy").write_bytes(npy_bytes(np.zeros(50, dtype=np.uint16)))
    shards = [dict(file="val_000000.npy", split="val", tokens=4000, next_doc=1, next_offset=0),
              dict(file="train_000000.npy", split="train", tokens=50, next_doc=2, next_offset=0)]
    m = Manifest(tokenizer=tok.fingerprint, source="x", shard_tokens=4000, val_tokens=4000, shards=shards,
                 complete=True)
    (d / "manifest.json").write_text(m.to_json())
    with pytest.raises(DataError, match=r"train_000000.npy holds 50 tokens, fewer than one sequence \(129\)"):
        build_loaders(loader_cfg(d, bpe_dir), 0, 1)


def test_missing_shard_file(prepared, tmp_path, bpe_dir):
    d = copy_prepared(prepared, tmp_path)
    (d / "train_000002.npy").unlink()
    with pytest.raises(DataError, match=r"train_000002.npy listed in the manifest is missing"):
        build_loaders(loader_cfg(d, bpe_dir), 0, 1)


# ---- object storage ------------------------------------------------------------------------------------


def test_prepare_into_s3_and_read_back(s3_url, corpus, bpe_dir, prepared, tmp_path):
    cfg = cfg_for(corpus, s3_url + "/shards", bpe_dir, **{"data.cache_dir": str(tmp_path / "cache")})
    prepare(cfg, workers=2, progress=False)
    cfg.eval.val_batches = 2
    cfg.train.seq_len, cfg.train.micro_batch, cfg.train.total_batch_tokens = 64, 2, 64 * 8
    remote, val = build_loaders(cfg, 0, 1)
    local = TrainLoader(train_shards(prepared, bpe_dir), remote.layout, 0)
    for step in (0, 7, 40):
        assert np.array_equal(remote.rows(step, 1), local.rows(step, 1))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir())  # fetched once into the cache
    assert val is not None and val.batch(1)[0].shape == (2, 64)


def test_bad_source_writes_nothing(tmp_path, bpe_dir):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="matches no files"):
        prepare(cfg_for(tmp_path / "nope" / "*.jsonl", out, bpe_dir), workers=1, progress=False)
    assert not out.exists()
