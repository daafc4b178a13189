"""The Checkpointer and its store: keep-last-k, async, the save interval, failure policy, corrupt checkpoints."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers.parts import Part

from gpt2.checkpoint import (
    MARKER,
    STATE_FILE,
    Checkpointer,
    CheckpointError,
    CheckpointStore,
    find_resume_point,
    load_state,
)
from gpt2.config import CheckpointConfig
from gpt2.storage import StorageError

# ---- the Checkpointer itself -------------------------------------------------------------------------


def small_state(step):
    torch.manual_seed(step)
    return {"model": {"w": torch.randn(8, 8)}, "progress": {"step": step}}


def test_keep_last_k_and_partial_saves_are_cleaned_up(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=2)
    (tmp_path / "step-00000003").mkdir()
    (tmp_path / "step-00000003" / STATE_FILE).write_bytes(b"half a checkpoint")  # a crashed save
    for step in (1, 2, 4, 5):
        store.write(small_state(step), step, {"config": {}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000005"]


def checkpointer(directory, parts, **cfg):
    return Checkpointer(CheckpointConfig(dir=str(directory), **cfg), parts=parts, describe=lambda s: {"config": {}})


def resume(ck: Checkpointer) -> str | None:
    """A start's resume: the one answer to what it loads, then the load into the parts."""
    point = find_resume_point(ck.cfg, is_writer=True)
    if point is not None:
        ck.restore(point)
    return point.url if point else None


def test_async_save_matches_sync_save(tmp_path):
    state = small_state(7)
    a = checkpointer(tmp_path / "a", {"model": Part(state["model"])})
    b = checkpointer(tmp_path / "b", {"model": Part(state["model"])})
    a.save(7, blocking=True)
    b.save(7, blocking=False)
    state["model"]["w"].zero_()  # training goes on: the async save must have taken a copy
    b.wait()
    la, lb = load_state(str(tmp_path / "a" / "step-00000007")), load_state(str(tmp_path / "b" / "step-00000007"))
    assert torch.equal(la["model"]["w"], lb["model"]["w"]) and la["model"]["w"].abs().sum() > 0


def test_interval_and_resume_load_every_part(tmp_path):
    model, progress = Part(), Part()
    ck = checkpointer(tmp_path, {"model": model, "progress": progress}, every=2)
    for step in (1, 2, 3):
        model.state, progress.state = small_state(step)["model"], {"step": step}
        ck.step_end(step)
    assert [c.step for c in ck.store.complete()] == [2]  # only on the interval
    fresh_model, fresh_progress = Part(), Part()
    again = checkpointer(tmp_path, {"model": fresh_model, "progress": fresh_progress})
    assert resume(again).endswith("step-00000002")
    assert fresh_progress.state == {"step": 2}
    assert torch.equal(fresh_model.state["w"], small_state(2)["model"]["w"])
    assert resume(checkpointer(tmp_path, {"model": Part()}, resume="never")) is None


def test_a_failed_periodic_save_is_logged_and_a_failed_final_save_is_fatal(tmp_path, caplog, monkeypatch):
    ck = checkpointer(tmp_path, {"model": Part(small_state(1)["model"])}, every=1)

    def unavailable(*args):
        raise StorageError("writing step-1 failed after 6 attempts: ConnectionError")

    monkeypatch.setattr(ck.store, "write", unavailable)
    with caplog.at_level(logging.ERROR):
        ck.step_end(1)  # goes on
    assert "CHECKPOINT SAVE FAILED" in caplog.text and "ConnectionError" in caplog.text
    with pytest.raises(CheckpointError, match="the final checkpoint could not be saved"):
        ck.save_final(2, "final")


def test_a_checkpoint_dir_under_a_file_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match="checkpoint.dir .* cannot be created: .*file is a file"):
        checkpointer(tmp_path / "file" / "ckpt", {"model": Part()})


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "no-marker"])
def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog, damage):
    store = CheckpointStore(str(tmp_path), keep=3)
    for step in (1, 2):
        store.write(small_state(step), step, {"config": {}})
    state_file = tmp_path / "step-00000002" / STATE_FILE
    data = bytearray(state_file.read_bytes())
    if damage == "corrupt":
        data[len(data) // 2] ^= 0xFF
        state_file.write_bytes(bytes(data))
    elif damage == "truncate":
        state_file.write_bytes(bytes(data[:100]))
    else:
        (tmp_path / "step-00000002" / MARKER).unlink()
    with caplog.at_level(logging.WARNING):
        url, _, state = store.newest_loadable()
    assert url.endswith("step-00000001") and state["progress"]["step"] == 1
    if damage == "no-marker":  # an unfinished save: left for the next save's clean-up
        assert (tmp_path / "step-00000002").is_dir() and store.quarantined() == []
    else:  # moved aside, not deleted
        assert "step-00000002 is corrupt" in caplog.text and "moved it to" in caplog.text
        assert not (tmp_path / "step-00000002").exists()
        assert [u.rsplit("/", 1)[-1].split(".")[0] for u in store.quarantined()] == ["step-00000002"]
        with pytest.raises(CheckpointError):
            load_state(store.quarantined()[0])


def damage(directory, step):
    state_file = directory / f"step-{step:08d}" / STATE_FILE
    state_file.write_bytes(state_file.read_bytes()[:100])


def test_a_corrupt_checkpoint_neither_counts_for_keep_nor_blocks_a_new_save_at_its_step(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=2)
    for step in (2, 4):
        store.write(small_state(step), step, {"config": {}})
    damage(tmp_path, 4)
    url, _, _ = store.newest_loadable()
    assert url.endswith("step-00000002")
    for step in (4, 6):  # training goes on from step 2 and saves again
        store.write(small_state(step), step, {"config": {}})
    assert [c.step for c in store.complete()] == [4, 6]
    assert all(store.load(c.url)[1]["progress"]["step"] == c.step for c in store.complete())
    assert len(store.quarantined()) == 1  # the corrupt one is kept for inspection


def test_only_corrupt_checkpoints_stop_the_run_instead_of_starting_over(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=2)
    for step in (2, 4):
        store.write(small_state(step), step, {"config": {}})
    damage(tmp_path, 2), damage(tmp_path, 4)
    for _ in range(2):  # and again on the next start, when they have already been moved aside
        with pytest.raises(CheckpointError, match="checkpoint.resume=never"):
            store.newest_loadable()
    assert resume(checkpointer(tmp_path, {"model": Part()}, resume="never")) is None


def test_a_marker_that_is_not_a_json_object_is_corrupt(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=2)
    store.write(small_state(1), 1, {"config": {}})
    (tmp_path / "step-00000001" / MARKER).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        load_state(str(tmp_path / "step-00000001"))
    with pytest.raises(CheckpointError, match="moved aside"):
        store.newest_loadable()


class Payload:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_a_checkpoint_with_code_in_it_is_refused_without_advising_to_run_it(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=2)
    store.write({"model": {"w": torch.zeros(2)}, "extra": Payload()}, 1, {"config": {}})
    with pytest.raises(CheckpointError) as err:
        load_state(str(tmp_path / "step-00000001"))
    assert "cannot be loaded safely" in str(err.value) and "weights_only=False" not in str(err.value)


def test_a_checkpoint_of_another_model_shape_says_so(tmp_path):
    checkpointer(tmp_path, {"model": torch.nn.Linear(4, 4)}).save(1, blocking=True)
    with pytest.raises(CheckpointError, match="does not fit this run's model.*another model size"):
        resume(checkpointer(tmp_path, {"model": torch.nn.Linear(8, 8)}))


def test_a_model_with_nan_is_never_saved(tmp_path, caplog):
    model = Part({"w": torch.tensor([1.0, float("nan")])})
    ck = checkpointer(tmp_path, {"model": model}, every=1)
    with caplog.at_level(logging.ERROR):
        ck.step_end(1)
    assert "model.w hold NaN or infinite values" in caplog.text and ck.store.complete() == []
    with pytest.raises(CheckpointError, match="final checkpoint could not be saved"):
        ck.save_final(2, "final")
