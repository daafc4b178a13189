"""Copying remote shards into the cache (gpt2.fetch): resumable, once per host, progress for the watchdog."""

from __future__ import annotations

import hashlib
import threading
import time

import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from gpt2 import fetch
from gpt2.errors import DataError
from gpt2.fetch import Fetch
from gpt2.watchdog import Watchdog

DATA = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()


class CountingFS(MemoryFileSystem):
    """An in-memory store that counts the bytes it serves and can be slowed or stalled."""

    def __init__(self, delay_s: float = 0.0, **kw):
        super().__init__(**kw)
        self.served, self.delay_s, self.stall, self.thaw = 0, delay_s, threading.Event(), threading.Event()

    def cat_file(self, path, start=None, end=None, **kw):
        if self.stall.is_set():
            self.thaw.wait()  # a hung store: the read does not return until the test ends the stall
        time.sleep(self.delay_s)
        data = super().cat_file(path, start=start, end=end, **kw)
        self.served += len(data)
        return data


@pytest.fixture
def store():
    fs = CountingFS(skip_instance_cache=True)
    fs.store = {}  # fsspec shares the memory store class-wide: this test's own
    fs.pseudo_dirs = [""]
    fs.pipe_file("/bucket/shard.npy", DATA)
    return fs


def check_sha(path):
    if hashlib.sha256(path.read_bytes()).hexdigest() != hashlib.sha256(DATA).hexdigest():
        raise DataError("wrong bytes")


def test_an_interrupted_copy_resumes_where_it_stopped(store, tmp_path):
    target = tmp_path / "cache" / "shard.npy"
    target.parent.mkdir()
    target.with_name("shard.npy.partial").write_bytes(DATA[:1_000_000])  # a killed process's copy
    assert Fetch(store, "/bucket/shard.npy", target, len(DATA), "shard", check_sha).wait() == target
    assert target.read_bytes() == DATA
    assert store.served == len(DATA) - 1_000_000  # only the rest was read
    assert not target.with_name("shard.npy.partial").exists()


def test_a_partial_copy_that_is_not_a_prefix_is_copied_again_and_wrong_bytes_are_refused(store, tmp_path):
    target = tmp_path / "shard.npy"
    target.with_name("shard.npy.partial").write_bytes(b"x" * 1000)  # a crash lost its tail, or the file changed
    assert Fetch(store, "/bucket/shard.npy", target, len(DATA), "shard", check_sha).wait() == target
    assert target.read_bytes() == DATA and store.served == 2 * len(DATA) - 1000  # the rest, then all again

    store.pipe_file("/bucket/shard.npy", DATA[:-1] + b"\0")  # the store's file is bad
    other = tmp_path / "other.npy"
    with pytest.raises(DataError, match="wrong bytes"):
        Fetch(store, "/bucket/shard.npy", other, len(DATA), "shard", check_sha).wait()
    assert not other.exists() and not other.with_name("other.npy.partial").exists()  # never resumed from


def test_the_processes_of_a_host_copy_a_file_once(store, tmp_path):
    store.delay_s = 0.05
    target = tmp_path / "shard.npy"
    # separate Fetch objects open the lock file separately, as separate processes do
    fetches = [Fetch(store, "/bucket/shard.npy", target, len(DATA), "shard", check_sha).start() for _ in range(4)]
    assert all(f.wait() == target for f in fetches)
    assert store.served == len(DATA) and target.read_bytes() == DATA


def test_a_slow_copy_is_progress_and_a_stalled_one_is_a_hang(store, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "MIN_CHUNK", 64 << 10)
    monkeypatch.setattr(fetch, "CHUNK_S", 0.2)
    store.delay_s = 0.2
    fired = []
    with Watchdog(ceiling_s=1.5, exit=fired.append):  # 1.5 s without progress is a hang here
        t0 = time.monotonic()
        Fetch(store, "/bucket/shard.npy", tmp_path / "a.npy", len(DATA), "shard").wait()
        took = time.monotonic() - t0
    assert took > 3 and not fired, (took, fired)  # took twice the limit: the copy was progress

    store.stall.set()
    with Watchdog(ceiling_s=1.5, exit=fired.append):
        stalled = Fetch(store, "/bucket/shard.npy", tmp_path / "b.npy", len(DATA), "shard")
        waiter = threading.Thread(target=stalled.wait, daemon=True)
        waiter.start()
        deadline = time.monotonic() + 10
        while not fired and time.monotonic() < deadline:
            time.sleep(0.1)
    assert fired == [201]  # a copy that stopped moving is a hang
    store.stall.clear()
    store.thaw.set()
    waiter.join(10)
    assert not waiter.is_alive() and (tmp_path / "b.npy").read_bytes() == DATA
