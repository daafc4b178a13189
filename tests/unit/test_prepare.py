"""Preparation into uint16 shards: token counts, workers, restart after a crash, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_file
from helpers.corpus import cfg_for, shakespeare_docs, shard_bytes

from gpt2.prepare import prepare
from gpt2.shards import DataError, open_split, read_manifest
from gpt2.storage import StorageError
from gpt2.tokenizer import get_tokenizer


def docs() -> list[str]:
    return shakespeare_docs(shared_file("tinyshakespeare.txt").read_text())


def test_token_count_and_shard_sizes_match_tiktoken(prepared, bpe_dir):
    tok = get_tokenizer("gpt2", str(bpe_dir))
    expected = sum(len(tok.encode(d)) + 1 for d in docs())  # +1: <|endoftext|> before each
    manifest = read_manifest(str(prepared))
    assert manifest.complete and manifest.documents == len(docs())
    assert sum(s["tokens"] for s in manifest.shards) == expected
    assert [s["split"] for s in manifest.shards][:2] == ["val", "train"]
    assert manifest.shards[0]["tokens"] == 30000
    assert all(s["tokens"] == 50000 for s in manifest.shards[1:-1]) and 0 < manifest.shards[-1]["tokens"] <= 50000
    val = np.load(prepared / "val_000000.npy")
    assert val.dtype == np.uint16 and val[0] == 50256
    first_doc = tok.encode(docs()[0])
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
    assert not (out / ".train_000002.npy.tmp-dead").exists()  # the dead run's temporary file is cleaned up
    assert shard_bytes(out) == shard_bytes(prepared)


def test_prepare_refuses_a_directory_prepared_differently(prepared, corpus, bpe_dir):
    with pytest.raises(DataError, match="other settings"):
        prepare(cfg_for(corpus, prepared, bpe_dir, **{"data.shard_tokens": 1234}), workers=1, progress=False)


def test_bad_source_writes_nothing(tmp_path, bpe_dir):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="matches no files"):
        prepare(cfg_for(tmp_path / "nope" / "*.jsonl", out, bpe_dir), workers=1, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("content,message", [
    (b"caf\xe9 latin-1\n", "is not UTF-8 text"),
    (b'{"text": null}\n', "the 'text' field is null, not a string"),
    (b'{"text": 42}\n', "the 'text' field is 42, not a string"),
])
def test_bad_input_files_are_named(tmp_path, bpe_dir, content, message):
    source = tmp_path / ("in.jsonl" if content.startswith(b"{") else "in.txt")
    source.write_bytes(content)
    with pytest.raises(DataError) as err:
        prepare(cfg_for(source, tmp_path / "out", bpe_dir), workers=1, progress=False)
    assert message in str(err.value) and str(source) in str(err.value)


def test_a_data_dir_under_a_file_is_named(tmp_path, corpus, bpe_dir):
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match=r"data.dir .* cannot be created: .*file is a file, not a directory"):
        prepare(cfg_for(corpus, tmp_path / "file" / "data", bpe_dir), workers=1, progress=False)


def test_a_rank_that_does_not_see_rank_0s_prepared_data_names_the_unshared_data_dir(tmp_path, corpus, bpe_dir,
                                                                                    monkeypatch):
    """data.auto_prepare on several nodes whose data.dir is each node's local disk: rank 0 prepares
    into its own, and another node, which waits for rank 0 and then sees no manifest, says that
    data.dir must be shared (instead of waiting forever). The wait is 2 minutes; here 1 s."""
    from gpt2 import prepare as prepare_module

    monkeypatch.setattr(prepare_module, "SHARED_VIEW_S", 1.0)
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match=r"does not see its manifest.json after 1 s: data.dir must be storage that "
                                        r"every node shares"):
        prepare_module.see_prepared_data(cfg_for(corpus, tmp_path / "data", bpe_dir, **{"data.auto_prepare": True}))
