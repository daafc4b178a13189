"""The Checkpointer and its store: keep-last-k, async, the save interval, failure policy, corrupt checkpoints."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers.parts import Part

from gpt2.checkpoint import (
    MARKER,
    Checkpointer,
    CheckpointError,
    CheckpointStore,
    Lineage,
    apply_plan,
    find_resume_point,
    load_state,
    plan_resume,
    read_lineage,
    state_path,
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
    (tmp_path / "step-00000003" / "state-x.pt").write_bytes(b"half a checkpoint")  # a crashed save
    for step in (1, 2, 4, 5):
        store.write(small_state(step), step, {"config": {}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000005"]


def checkpointer(directory, parts, lineage=None, **cfg):
    return Checkpointer(CheckpointConfig(dir=str(directory), **cfg), parts=parts, describe=lambda s: {"config": {}},
                        lineage=lineage)


def start(directory, submission=None, **cfg):
    """A start's decision (read-only), then what the lease holder does with it: the resume plan applied."""
    cfg = CheckpointConfig(dir=str(directory), **cfg)
    plan = plan_resume(cfg, is_writer=True, submission=submission)
    apply_plan(cfg, plan)
    return plan


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

    def unavailable(*args, **kwargs):
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
    state_file = tmp_path / "step-00000002" / state_path(str(tmp_path / "step-00000002")).rsplit("/", 1)[-1]
    data = bytearray(state_file.read_bytes())
    if damage == "corrupt":
        data[len(data) // 2] ^= 0xFF
        state_file.write_bytes(bytes(data))
    elif damage == "truncate":
        state_file.write_bytes(bytes(data[:100]))
    else:
        (tmp_path / "step-00000002" / MARKER).unlink()
    before = sorted(p.name for p in tmp_path.iterdir())
    plan = plan_resume(CheckpointConfig(dir=str(tmp_path)), is_writer=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # deciding moves nothing
    with caplog.at_level(logging.WARNING):
        apply_plan(CheckpointConfig(dir=str(tmp_path)), plan)
    assert plan.point.url.endswith("step-00000001") and plan.point.state["progress"]["step"] == 1
    if damage == "no-marker":  # an unfinished save: left for the next save's clean-up
        assert (tmp_path / "step-00000002").is_dir() and store.quarantined() == []
    else:  # moved aside, not deleted
        assert "step-00000002 aside" in caplog.text and "it is corrupt" in caplog.text
        assert not (tmp_path / "step-00000002").exists()
        assert [u.rsplit("/", 1)[-1].split(".")[0] for u in store.quarantined()] == ["step-00000002"]
        with pytest.raises(CheckpointError):
            load_state(store.quarantined()[0])


def damage(directory, step):
    state_file = directory / f"step-{step:08d}" / state_path(str(directory / f"step-{step:08d}")).rsplit("/", 1)[-1]
    state_file.write_bytes(state_file.read_bytes()[:100])


def test_a_corrupt_checkpoint_neither_counts_for_keep_nor_blocks_a_new_save_at_its_step(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=2)
    for step in (2, 4):
        store.write(small_state(step), step, {"config": {}})
    damage(tmp_path, 4)
    assert start(tmp_path).point.url.endswith("step-00000002")
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
    for _ in range(2):  # and again on the next start: a refused start moves nothing
        with pytest.raises(CheckpointError, match="checkpoint.resume=never"):
            start(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000004"]
    assert start(tmp_path, resume="never").point is None
    assert [u.rsplit("/", 1)[-1].split(".")[1].split("-")[0] for u in store.moved_aside()] == ["abandoned"] * 2


def test_a_marker_that_is_not_a_json_object_is_corrupt(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=2)
    store.write(small_state(1), 1, {"config": {}})
    (tmp_path / "step-00000001" / MARKER).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        load_state(str(tmp_path / "step-00000001"))
    with pytest.raises(CheckpointError, match="moved aside"):
        start(tmp_path)


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


# ---- lineage: rollbacks and start-overs ----------------------------------------------------------


def saves(directory, plan, steps, keep=2):
    ck = Checkpointer(CheckpointConfig(dir=str(directory), keep=keep), parts={"progress": Part()},
                      describe=lambda s: {"config": {}}, lineage=plan.lineage)
    for step in steps:
        ck.parts["progress"].state = {"step": step}
        ck.save(step, blocking=True)
    return ck


def names(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("step-"))


def test_a_rollback_abandons_the_later_checkpoints_and_a_plain_restart_never_resumes_them(tmp_path, caplog):
    first = start(tmp_path)
    saves(tmp_path, first, (2, 4, 6), keep=3)
    with caplog.at_level(logging.INFO):
        rollback = start(tmp_path, resume=str(tmp_path / "step-00000004"))
    assert rollback.point.step == 4 and rollback.begins.startswith("a rollback to step 4")
    assert "step-00000006 aside" in caplog.text and "not part of the lineage" in caplog.text
    assert names(tmp_path) == ["step-00000002", "step-00000004", f"step-00000006.abandoned-{first.lineage.id}"]
    assert read_lineage(str(tmp_path)).ancestors == [{"id": first.lineage.id, "until_step": 4}]
    saves(tmp_path, rollback, (5,), keep=2)
    # the lineage's newest 2 (4 is an ancestor's, the one resumed from), never the abandoned 6
    assert [n for n in names(tmp_path) if "." not in n] == ["step-00000004", "step-00000005"]
    saves(tmp_path, rollback, (6, 7), keep=2)
    assert [n for n in names(tmp_path) if "." not in n] == ["step-00000006", "step-00000007"]
    again = start(tmp_path)  # a requeue or a pod restart: resume=auto
    assert again.point.step == 7 and again.lineage.id == rollback.lineage.id and again.begins is None
    assert load_state(again.point.url)["progress"]["step"] == 7


def test_a_crash_before_the_rollbacks_first_save_resumes_the_rollback_point_not_the_abandoned_branch(tmp_path):
    first = start(tmp_path)
    saves(tmp_path, first, (2, 4), keep=2)
    other = tmp_path.parent / (tmp_path.name + "-elsewhere")
    elsewhere = start(other)
    saves(other, elsewhere, (3,))
    rollback = start(tmp_path, resume=str(other / "step-00000003"))  # a checkpoint of another directory
    assert sorted(n.split(".")[1].split("-")[0] for n in names(tmp_path)) == ["abandoned", "abandoned"]
    again = start(tmp_path)  # crashed before saving: the lineage says where it began
    assert again.point.url == str(other / "step-00000003") and again.lineage.id == rollback.lineage.id


def test_a_start_over_abandons_everything_once_and_its_requeue_goes_on(tmp_path):
    first = start(tmp_path)
    saves(tmp_path, first, (2, 4))
    over = start(tmp_path, submission="slurm:/7", resume="never")
    assert over.point is None and over.begins.startswith("a start-over")
    assert names(tmp_path) == [f"step-0000000{s}.abandoned-{first.lineage.id}" for s in (2, 4)]
    saves(tmp_path, over, (2,))
    requeued = start(tmp_path, submission="slurm:/7", resume="never")  # the same job, requeued
    assert requeued.point.step == 2 and requeued.lineage.id == over.lineage.id
    by_hand = start(tmp_path, resume="never")  # a new request to start over
    assert by_hand.point is None and by_hand.lineage.id != over.lineage.id
    assert not any(n == "step-00000002" for n in names(tmp_path))


def test_a_save_over_another_writers_marker_replaces_it_atomically_and_says_so(tmp_path, caplog):
    store = CheckpointStore(str(tmp_path))
    store.write(small_state(1), 5, {"config": {}, "writer": "someone else"}, writer="old")
    with caplog.at_level(logging.WARNING):
        store.write(small_state(2), 5, {"config": {}}, writer="new")
    assert "replacing checkpoint" in caplog.text and "someone else" in caplog.text
    assert torch.equal(load_state(str(tmp_path / "step-00000005"))["model"]["w"], small_state(2)["model"]["w"])
    store.write(small_state(3), 5, {"config": {}}, writer="new")  # the same writer again: said, not redone
    assert torch.equal(load_state(str(tmp_path / "step-00000005"))["model"]["w"], small_state(2)["model"]["w"])


# ---- fencing: a superseded writer commits and prunes nothing ---------------------------------------


LINEAGE = Lineage.new()


def leased(directory, parts, **kw):
    from gpt2.checkpoint.lease import Lease

    lease = Lease(str(directory), ttl_s=12).acquire(**kw)
    return Checkpointer(CheckpointConfig(dir=str(directory), keep=1), parts=parts,
                        describe=lambda s: {"config": {}}, lease=lease, lineage=LINEAGE), lease


def test_a_superseded_writers_save_in_flight_is_abandoned_at_the_fence(tmp_path, caplog):
    old_ck, old_lease = leased(tmp_path, {"model": Part(small_state(1)["model"])})
    old_ck.save(1, blocking=True)
    fences, taken = [], {}

    def fence():  # the take-over lands after the save began, while its state file is written
        fences.append(len(fences))
        if len(fences) == 2:
            taken["ck"], taken["lease"] = leased(tmp_path, {"model": Part(small_state(2)["model"])}, take_over=True)
        old_lease.fence()

    old_ck._fence = fence
    with caplog.at_level(logging.ERROR):
        old_ck.save(3, blocking=False)
        old_ck._thread.join()
        with pytest.raises(Exception, match="superseded"):
            old_ck.wait()
    assert len(fences) == 2 and not (tmp_path / "step-00000003" / MARKER).exists()
    assert not list((tmp_path / "step-00000003").glob("state-*.pt"))  # its own file removed
    assert "abandoned the save of step 3" in caplog.text
    new_ck, new_lease = taken["ck"], taken["lease"]
    new_ck.save(4, blocking=True)
    assert [c.step for c in new_ck.store.complete()] == [4]  # keep=1: the new writer pruned step 1
    with pytest.raises(Exception, match="superseded"):
        old_ck.save(5, blocking=True)  # never even starts again
    assert [c.step for c in new_ck.store.complete()] == [4]
    new_lease.release()


def test_a_superseded_writer_never_prunes_the_new_writers_checkpoints(tmp_path):
    old_ck, old_lease = leased(tmp_path, {"model": Part(small_state(1)["model"])})
    new_ck, new_lease = leased(tmp_path, {"model": Part(small_state(2)["model"])}, take_over=True)
    new_ck.save(2, blocking=True)
    (tmp_path / "step-00000004").mkdir()  # the new writer's save in progress
    (tmp_path / "step-00000004" / f"state-{new_lease.tag}.pt").write_bytes(b"being written")
    old_lease.lost = None  # it has not noticed yet: only the fences stop it
    with pytest.raises(Exception, match="superseded"):
        old_ck.store.write(small_state(9), 3, {"config": {}}, writer=old_lease.tag, fence=old_lease.fence)
    assert names(tmp_path) == ["step-00000002", "step-00000003", "step-00000004"]
    assert not list((tmp_path / "step-00000003").iterdir())  # its abandoned save: nothing committed, its file gone
    assert (tmp_path / "step-00000004" / f"state-{new_lease.tag}.pt").exists()
    new_lease.release()


def test_serializing_and_hashing_a_save_are_progress_for_the_work_it_reports_to(tmp_path, monkeypatch):
    """torch.save into memory and the sha256 take seconds per GB, outside any storage call: each
    write of the serializer and each hashed chunk moves the save's work (the phase follows it)."""
    from gpt2.checkpoint import CheckpointStore
    from gpt2.checkpoint import store as store_module

    moves: list[int] = []
    monkeypatch.setattr(store_module, "heard", lambda: moves.append(1))
    monkeypatch.setattr(store_module, "CHUNK", 1 << 16)
    state = {"model": {f"w{i}": torch.ones(64, 64) for i in range(8)}}  # 8 x 16 KB
    CheckpointStore(str(tmp_path)).write(state, 1, {})
    assert len(moves) >= 8 + 2  # a write per tensor at least, and every 64 KB hashed
