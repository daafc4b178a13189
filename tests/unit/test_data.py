"""The step-addressed loader and its checks on the data it opens."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.corpus import train_shards

from gpt2.config import load_config
from gpt2.data import Layout, TrainLoader, ValLoader, build_loaders
from gpt2.shards import DataError, Manifest, npy_bytes, open_split
from gpt2.tokenizer import get_tokenizer

# ---- the loader -----------------------------------------------------------------------------------


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
        build_loaders(loader_cfg(tmp_path / "nope", bpe_dir), 4, 0, 1)


def test_directory_without_shards(tmp_path, bpe_dir):
    with pytest.raises(DataError, match=r"manifest.json not found \(it holds no shards\)"):
        build_loaders(loader_cfg(tmp_path, bpe_dir), 4, 0, 1)


def test_shard_with_wrong_dtype(prepared, tmp_path, bpe_dir):
    d = copy_prepared(prepared, tmp_path)
    tokens = np.load(d / "train_000001.npy")
    np.save(d / "train_000001.npy", tokens.astype(np.int32))
    with pytest.raises(DataError, match=r"train_000001.npy is \d+ bytes but .* another dtype"):
        build_loaders(loader_cfg(d, bpe_dir), 4, 0, 1)


def test_truncated_shard(prepared, tmp_path, bpe_dir):
    d = copy_prepared(prepared, tmp_path)
    data = (d / "train_000000.npy").read_bytes()
    (d / "train_000000.npy").write_bytes(data[:1000])
    with pytest.raises(DataError, match=r"train_000000.npy is 1000 bytes .*truncated"):
        build_loaders(loader_cfg(d, bpe_dir), 4, 0, 1)


def test_manifest_from_another_tokenizer(prepared, bpe_dir):
    cfg = load_config("configs/demo.yaml", [f"data.dir={prepared}", "eval.val_batches=1"])  # bytes tokenizer
    with pytest.raises(DataError, match=r"tokenized with 'gpt2:.*' but the config's tokenizer is 'bytes"):
        build_loaders(cfg, cfg.train.micro_batch, 0, 1)


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
        build_loaders(loader_cfg(d, bpe_dir), 4, 0, 1)


def test_missing_shard_file(prepared, tmp_path, bpe_dir):
    d = copy_prepared(prepared, tmp_path)
    (d / "train_000002.npy").unlink()
    with pytest.raises(DataError, match=r"train_000002.npy listed in the manifest is missing"):
        build_loaders(loader_cfg(d, bpe_dir), 4, 0, 1)


@pytest.mark.parametrize("manifest,message", [
    ("[1, 2]", "a JSON list, not an object"),
    ('{"format": "gpt2-shards/1", "tokenizer": "x", "source": "s", "shard_tokens": 1, "val_tokens": 1, '
     '"shards": [{"file": "train_000000.npy", "split": "train"}], "complete": true}', "lacks a file, split or token"),
])
def test_a_malformed_manifest_is_a_data_error(tmp_path, bpe_dir, manifest, message):
    (tmp_path / "manifest.json").write_text(manifest)
    with pytest.raises(DataError, match=message):
        build_loaders(loader_cfg(tmp_path, bpe_dir), 4, 0, 1)


# ---- every byte verified --------------------------------------------------------------------------


def flip_a_byte(path, at: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_shard_with_a_flipped_byte_is_refused_before_its_first_read_and_redo_restores_it(
        prepared, corpus, tmp_path, bpe_dir):
    from helpers.corpus import cfg_for

    from gpt2.prepare import redo_shard

    d = copy_prepared(prepared, tmp_path)
    good = (d / "train_000001.npy").read_bytes()
    flip_a_byte(d / "train_000001.npy")
    shards = train_shards(d, bpe_dir)  # opening checks names and sizes: still fine
    shards.read(0, 100)  # shard 0 is intact
    with pytest.raises(DataError, match=r"shard .*/train_000001.npy is corrupt: its sha256 is .* the manifest says"
                                        r".* python -m gpt2.prepare CONFIG data.dir=.* --redo train_000001.npy"):
        shards.read(int(shards.offsets[1]) + 5, 10)
    said = redo_shard(cfg_for(corpus, d, bpe_dir), "train_000001.npy", workers=1)
    assert "matches" in said and (d / "train_000001.npy").read_bytes() == good
    assert train_shards(d, bpe_dir).read(int(shards.offsets[1]) + 5, 10).size == 10


def test_a_manifest_from_before_hashes_loads_with_a_warning_and_add_hashes_completes_it(
        prepared, corpus, tmp_path, bpe_dir, caplog):
    import json

    from helpers.corpus import cfg_for

    from gpt2.prepare import add_hashes
    from gpt2.recipe import data_identity
    from gpt2.shards import read_manifest

    d = copy_prepared(prepared, tmp_path)
    hashed = read_manifest(str(d))
    legacy = json.loads((d / "manifest.json").read_text())
    for s in legacy["shards"]:
        del s["sha256"]
    (d / "manifest.json").write_text(json.dumps(legacy))
    flip_a_byte(d / "train_000001.npy")  # what a manifest without hashes cannot see
    caplog.set_level("WARNING")
    shards = train_shards(d, bpe_dir)
    shards.read(int(shards.offsets[1]) + 5, 10)
    assert "records no sha256 per shard" in caplog.text and f"data.dir={d} --add-hashes" in caplog.text
    old_identity = data_identity(read_manifest(str(d)))
    assert f"sha256 recorded for {len(legacy['shards'])} shards" in add_hashes(cfg_for(corpus, d, bpe_dir))
    assert read_manifest(str(d)).hashed
    new_identity = data_identity(read_manifest(str(d)))
    assert new_identity.split(":")[0] == old_identity  # a checkpoint from before still resumes
    assert new_identity != data_identity(hashed)  # the flipped byte is now part of what it is
