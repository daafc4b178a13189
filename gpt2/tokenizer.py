"""Tokenizers: tiktoken's GPT-2 BPE (online, or offline from local files) and a byte tokenizer.

The byte tokenizer exists for the offline demo (a fresh Python install has no BPE files). It is
chosen explicitly by `tokenizer.name: bytes`; nothing ever falls back to it silently.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Protocol

from gpt2.errors import TokenizerError

# sha256 of OpenAI's GPT-2 BPE files, as pinned by tiktoken (tiktoken_ext/openai_public.py).
GPT2_FILE_HASHES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
TOKENIZER_DIR_ENV = "GPT2_TOKENIZER_DIR"
EOT_GPT2 = 50256



class Tokenizer(Protocol):
    name: str
    n_vocab: int
    eot: int
    # Identifies the exact vocabulary; stored in shard manifests and checked by the loader.
    fingerprint: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class GPT2Tokenizer:
    """tiktoken's `gpt2` encoding: 50,257 ids, `<|endoftext|>` = 50256."""

    name = "gpt2"
    n_vocab = 50257
    eot = EOT_GPT2
    fingerprint = "gpt2:" + GPT2_FILE_HASHES["vocab.bpe"][:16] + GPT2_FILE_HASHES["encoder.json"][:16]

    def __init__(self, files_dir: str | os.PathLike | None = None):
        import tiktoken

        files_dir = files_dir or os.environ.get(TOKENIZER_DIR_ENV) or None
        if files_dir is None:
            try:
                self._enc = tiktoken.get_encoding("gpt2")
            except Exception as err:
                raise TokenizerError(
                    f"could not load tiktoken's gpt2 encoding ({type(err).__name__}: {err}). Offline, put "
                    f"encoder.json and vocab.bpe in a directory and set tokenizer.files_dir or "
                    f"${TOKENIZER_DIR_ENV} to it (or use tokenizer.name=bytes for the demo)."
                ) from None
        else:
            self._enc = _encoding_from_files(Path(files_dir))
        self.files_dir = str(files_dir) if files_dir else None

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids)

    def __getstate__(self) -> dict:
        return {"files_dir": self.files_dir}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["files_dir"])


def find_bpe_file(files_dir: str | os.PathLike, name: str) -> Path:
    """`encoder.json` / `vocab.bpe` in `files_dir`, also under the `gpt2_` prefixed names."""
    plain = Path(files_dir) / name
    prefixed = Path(files_dir) / f"gpt2_{name}"
    return prefixed if not plain.is_file() and prefixed.is_file() else plain


def _encoding_from_files(files_dir: Path):
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    paths = {}
    for name, expected in GPT2_FILE_HASHES.items():
        path = find_bpe_file(files_dir, name)
        paths[name] = path
        if not path.is_file():
            raise TokenizerError(
                f"tokenizer file {path} not found: {files_dir} must hold encoder.json and vocab.bpe, "
                "OpenAI's GPT-2 BPE files"
            )
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != expected:
            raise TokenizerError(
                f"tokenizer file {path} is not OpenAI's GPT-2 {name}: sha256 {actual[:16]}... "
                f"but expected {expected[:16]}... (corrupt, truncated or another tokenizer's file); "
                "download it again"
            )
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(paths["vocab.bpe"]), encoder_json_file=str(paths["encoder.json"])
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_GPT2},
    )


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, and 256 as end-of-text. Needs no files at all."""

    name = "bytes"
    n_vocab = 257
    eot = 256
    fingerprint = "bytes:utf-8+eot256"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def tokenizer_class(name: str) -> type[GPT2Tokenizer] | type[ByteTokenizer]:
    """The class a config's `tokenizer.name` means; its `fingerprint` and `n_vocab` need no files."""
    classes = {"gpt2": GPT2Tokenizer, "bytes": ByteTokenizer}
    if name not in classes:
        raise TokenizerError(f"unknown tokenizer '{name}'; choose gpt2 or bytes")
    return classes[name]


def get_tokenizer(name: str = "gpt2", files_dir: str | None = None) -> Tokenizer:
    """The tokenizer a config names: `gpt2` or `bytes`."""
    cls = tokenizer_class(name)
    return cls(files_dir) if cls is GPT2Tokenizer else cls()


# ---- baking the BPE files into an image --------------------------------------------------------------

GPT2_FILE_URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}


def bake(cache_dir: str | os.PathLike, files_dir: str | os.PathLike | None = None) -> None:
    """Put the GPT-2 BPE files where tiktoken looks first ($TIKTOKEN_CACHE_DIR, named by the sha1
    of their URLs), so `tiktoken.get_encoding("gpt2")` works with no network.

    From `files_dir` (checked against the known hashes), or downloaded when it is None.
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    for name, url in GPT2_FILE_URLS.items():
        target = cache / hashlib.sha1(url.encode()).hexdigest()
        if files_dir is not None:
            _encoding_from_files(Path(files_dir))  # raises TokenizerError on a wrong file
            target.write_bytes(find_bpe_file(files_dir, name).read_bytes())
        else:
            import urllib.request

            data = urllib.request.urlopen(url, timeout=60).read()
            if hashlib.sha256(data).hexdigest() != GPT2_FILE_HASHES[name]:
                raise TokenizerError(f"downloaded {url} does not have the expected sha256")
            target.write_bytes(data)


if __name__ == "__main__":  # python -m gpt2.tokenizer bake CACHE_DIR [FILES_DIR]
    import sys

    if len(sys.argv) < 3 or sys.argv[1] != "bake":
        raise SystemExit("usage: python -m gpt2.tokenizer bake TIKTOKEN_CACHE_DIR [DIR_WITH_encoder.json_vocab.bpe]")
    bake(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
    print(f"GPT-2 BPE files baked into {sys.argv[2]}")
