"""Tokenizers: GPT-2 BPE offline from local files with hash checks, and the byte tokenizer."""

from __future__ import annotations

import shutil

import pytest

from gpt2.tokenizer import TOKENIZER_DIR_ENV, ByteTokenizer, TokenizerError, get_tokenizer


def test_gpt2_offline_from_shared_files(bpe_dir):
    tok = get_tokenizer("gpt2", str(bpe_dir))
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eot == 50256 and tok.decode([50256]) == "<|endoftext|>"
    assert tok.decode(tok.encode("Résumé, naïve — ok")) == "Résumé, naïve — ok"


def test_gpt2_files_dir_from_environment(bpe_dir, monkeypatch):
    monkeypatch.setenv(TOKENIZER_DIR_ENV, str(bpe_dir))
    assert get_tokenizer("gpt2").encode("Hello world") == [15496, 995]


def test_tampered_file_gives_clear_error(bpe_dir, tmp_path):
    shutil.copy(bpe_dir / "gpt2_encoder.json", tmp_path / "encoder.json")
    data = (bpe_dir / "gpt2_vocab.bpe").read_bytes()
    (tmp_path / "vocab.bpe").write_bytes(data[:-100] + b"x" * 100)
    with pytest.raises(TokenizerError, match=r"vocab\.bpe is not OpenAI's GPT-2 vocab\.bpe: sha256"):
        get_tokenizer("gpt2", str(tmp_path))


def test_missing_file_gives_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="encoder.json and vocab.bpe"):
        get_tokenizer("gpt2", str(tmp_path))


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode("héllo")
    assert max(ids) < 256 and tok.eot == 256 and tok.n_vocab == 257
    assert tok.decode(ids + [tok.eot]) == "héllo"
