"""Retries of transient storage errors, and atomic writes."""

from __future__ import annotations

import time

import pytest

from gpt2 import storage
from gpt2.storage import StorageError, filesystem, with_retries, write_bytes


def test_transient_errors_are_retried_then_succeed():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection reset")
        return "ok"

    assert with_retries(flaky, "reading x", retries=3, base_delay=0.001) == "ok"
    assert len(calls) == 3


def test_giving_up_names_the_operation_and_the_attempts():
    def down():
        raise TimeoutError("no answer")

    with pytest.raises(StorageError, match=r"writing s3://b/k failed after 3 attempts: TimeoutError: no answer"):
        with_retries(down, "writing s3://b/k", retries=2, base_delay=0.001)


def test_no_retry_starts_after_the_deadline():
    """A holder near its outage limit gives up at once instead of sleeping past it (the default
    retries would take 15 s of back-off alone)."""
    calls = []

    def down():
        calls.append(time.monotonic())
        raise ConnectionError("connection refused")

    t0 = time.monotonic()
    with pytest.raises(StorageError, match=r"listing s3://b failed after 3 attempts, with no time left to try again"):
        with_retries(down, "listing s3://b", retries=5, deadline=lambda: t0 + 1.0)
    # tried at 0 s and 0.5 s, then at the deadline (the 1 s back-off cut to what was left), not at 1.5 s
    assert len(calls) == 3 and 0.9 < calls[-1] - t0 < 1.3 and time.monotonic() - t0 < 1.3


@pytest.fixture
def quick_notices(monkeypatch):
    """Notices after 0.3 s without an answer, from a watcher of this test's own (it polls every 75 ms)."""
    monkeypatch.setattr(storage, "SLOW_CALL_S", 0.3)
    monkeypatch.setattr(storage, "_in_flight", storage._InFlight())


def notices(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "no answer for" in r.getMessage()]


def test_a_call_without_an_answer_says_so_until_it_ends(quick_notices, caplog):
    assert with_retries(lambda: time.sleep(1.0) or "late", "reading s3://b/k") == "late"
    said = notices(caplog)
    assert 2 <= len(said) <= 3 and said[0].startswith("reading s3://b/k: no answer for 0 s; still waiting"), said
    time.sleep(0.5)
    assert notices(caplog) == said  # none after the answer


def test_a_long_transfer_that_moves_is_not_called_unanswered(quick_notices, monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(storage, "CHUNK", 4)
    fs, root = filesystem(str(tmp_path))
    with_retries(lambda: write_bytes(fs, f"{root}/f", b"x" * 80, progress=lambda: time.sleep(0.05)), "writing f")
    assert not notices(caplog)  # 1 s in all, a chunk every 0.05 s


def test_the_deadline_is_read_at_each_failure():
    """A holder whose lease was renewed meanwhile has a later deadline: its retries go on."""
    calls, renewed = [], [time.monotonic() + 0.2]

    def flaky():
        calls.append(1)
        renewed[0] = time.monotonic() + 5  # a renewal during the call
        if len(calls) < 3:
            raise ConnectionError("connection reset")
        return "ok"

    assert with_retries(flaky, "writing x", retries=5, base_delay=0.3, deadline=lambda: renewed[0]) == "ok"


def test_a_call_inside_a_call_keeps_the_outer_ones_notice_quiet_while_it_moves(quick_notices, caplog):
    def outer():
        with_retries(lambda: 1, "inner")
        for _ in range(20):
            time.sleep(0.05)
            storage.heard()

    with_retries(outer, "outer")
    assert not notices(caplog)


def test_missing_files_are_not_retried():
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("nope")

    with pytest.raises(FileNotFoundError):
        with_retries(missing, "reading x", retries=5, base_delay=0.001)
    assert len(calls) == 1


def test_a_refusal_is_not_retried_and_names_what_to_check():
    calls = []

    def forbidden():
        calls.append(1)
        raise PermissionError("Forbidden")  # what s3fs raises for a 403, a skewed clock's too

    with pytest.raises(StorageError, match=r"reading s3://b/k was refused \(Forbidden\): check the permissions or "
                                           r"credentials .* clock is more than about 15 minutes off"):
        with_retries(forbidden, "reading s3://b/k", retries=5, base_delay=0.001)
    assert len(calls) == 1


def test_local_writes_leave_no_temporary_files(tmp_path):
    fs, root = filesystem(str(tmp_path))
    write_bytes(fs, f"{root}/sub/file.bin", b"abc")
    write_bytes(fs, f"{root}/sub/file.bin", b"defg")
    assert (tmp_path / "sub" / "file.bin").read_bytes() == b"defg"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["file.bin"]


def test_large_files_are_written_and_read_in_chunks_each_one_progress(tmp_path):
    import os

    from gpt2.storage import CHUNK, filesystem, read_bytes, write_bytes

    data = os.urandom(3 * CHUNK + 5)
    fs, root = filesystem(str(tmp_path))
    calls = []
    write_bytes(fs, f"{root}/big.pt", data, progress=lambda: calls.append("w"))
    got = read_bytes(fs, f"{root}/big.pt", progress=lambda: calls.append("r"))
    assert got == data and calls == ["w"] * 4 + ["r"] * 4


def test_a_thread_reporting_to_work_allows_each_call_and_moves_it_at_each_chunk_and_end(tmp_path):
    """`reporting_to`: each storage call of this thread is allowed `allowed()` seconds (read as it
    starts), its chunks and its end are moves; calls of other threads do not report."""
    import threading

    from gpt2.watchdog import Work

    work, seen = Work(), []
    fs, _ = filesystem(str(tmp_path))

    def call():
        seen.append((work.calls_in_flight(), work.moved_at))
        storage.heard()  # a chunk
        seen.append((work.calls_in_flight(), work.moved_at))
        return 1

    with storage.reporting_to(work, lambda: 42.0):
        t0 = time.monotonic()
        with_retries(call, "a call")
        write_bytes(fs, str(tmp_path / "f"), b"x" * 10)
    (in_call, until), moved = seen[0]
    assert in_call and t0 + 42.0 <= until < time.monotonic() + 42.0 and seen[1][0] == seen[0][0]
    assert seen[1][1] >= moved >= t0
    assert work.calls_in_flight()[0] is False and work.moved_at >= seen[1][1]  # its end is a move too
    before = work.moved_at
    other = threading.Thread(target=lambda: with_retries(call, "another thread's call"))
    other.start()
    other.join()
    assert seen[-1][0][0] is False and work.moved_at == before  # not reporting: no allowance, no move


def test_a_back_off_is_allowed_to_the_work_and_capped(monkeypatch):
    """A pause between two tries is not a stall: a phase that follows the work waits through
    back-offs longer than its limit (here 0.4 s); and no pause is longer than MAX_BACKOFF_S, so
    `checkpoint.retries` set high does not sleep past the watchdog's floor."""
    import threading

    from gpt2 import watchdog
    from gpt2.watchdog import Watchdog, Work

    codes, calls, work = [], [], Work()

    def flaky():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionError("connection reset")
        return "ok"

    def save():
        with storage.reporting_to(work, lambda: 0.1):
            got.append(with_retries(flaky, "writing x", retries=3, base_delay=1.0))

    got: list[str] = []
    with Watchdog(30.0, exit=codes.append, floor_s=0.4, factor=20) as dog:
        dog.steps([0.01] * 3)
        with watchdog.phase("checkpoint save", follows=work):
            saver = threading.Thread(target=save)
            saver.start()
            saver.join()
    assert got == ["ok"] and codes == []
    assert 2.9 < calls[-1] - calls[0] < 4.0  # back-offs of 1 s and 2 s, each longer than the limit

    def down():
        calls.append(time.monotonic())
        raise ConnectionError("connection refused")

    monkeypatch.setattr(storage, "MAX_BACKOFF_S", 0.2)
    calls.clear()
    with pytest.raises(StorageError, match="failed after 4 attempts"):
        with_retries(down, "reading y", retries=3, base_delay=10.0)
    assert calls[-1] - calls[0] < 1.5  # 3 pauses of 0.2 s, not 10 + 20 + 40 s
