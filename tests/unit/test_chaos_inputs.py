"""The chaos run's inputs: a clear error for every bad one, before any run starts."""

from __future__ import annotations

import pytest

from gpt2 import chaos


@pytest.mark.parametrize("args, message", [
    (["--kinds", "store-down"], "need --store CMD"),
    (["--kinds", "kill,bogus"], "--kinds must be a comma-separated subset"),
    (["--store", "true", "--store-fault-s", "600"], "--store-fault-s must be above 0 and below checkpoint.outage_s"),
    (["--store", "true", "--store-fault-s", "0"], "--store-fault-s must be above 0"),
    (["--store", "true"], "give checkpoint.dir=URL"),
    (["--launcher", "slurm", "--kinds", "kill,preempt-save"], "preempt-save and preempt-eval need --launcher torchrun"),
])
def test_bad_inputs_are_refused_with_the_fix(args, message, tmp_path, caplog):
    assert chaos.main(["configs/demo.yaml", *args, "--dir", str(tmp_path)]) == 2
    assert message in caplog.text
    assert not list(tmp_path.iterdir())  # nothing ran


def test_faults_land_in_order_in_the_middle_and_submissions_in_the_first_half():
    kinds = ["kill", "second", "skew", "store-down"]
    for seed in range(50):
        faults = chaos.draw(seed, 6, 1000, kinds)
        assert len(faults) == 6 and [f.at_step for f in faults] == sorted(f.at_step for f in faults)
        assert all(100 <= f.at_step < 900 for f in faults)
        assert all(f.at_step < 500 for f in faults if f.kind in chaos.INTRUDERS)


def test_a_fault_never_injected_is_a_breach(tmp_path):
    run = chaos.Run(tmp_path / "chaos", "configs/demo.yaml", [], 2)
    c = chaos.Chaos(run, [chaos.Fault("kill", 10)], restarts=0)
    assert "faults never injected (the run ended first): ['kill at step 10']" in chaos._not_injected(c)


def test_an_earlier_chaos_run_in_the_directory_is_refused(tmp_path, caplog):
    (tmp_path / "chaos").mkdir()
    assert chaos.main(["configs/demo.yaml", "--dir", str(tmp_path)]) == 2
    assert f"{tmp_path} holds an earlier chaos run" in caplog.text


def faulted(tmp_path, kind: str, **state) -> chaos.Chaos:
    run = chaos.Run(tmp_path / "chaos", "configs/demo.yaml", [], 2)
    fault = chaos.Fault(kind, 10, injected_at=1000.0, injected_mono=1.0, **state)
    return chaos.Chaos(run, [fault], restarts=0, store_cmd="true")


def test_a_store_fault_the_job_did_not_notice_or_never_recovered_from_is_a_breach(tmp_path):
    quiet = faulted(tmp_path, "store-down", recovered_at=1050.0, quiet_s=3.0, retried=0)
    assert any("the job did not notice" in b for b in chaos._store_breaches(quiet, []))
    noticed = faulted(tmp_path, "store-down", recovered_at=1050.0, quiet_s=44.0, retried=0)
    assert chaos._store_breaches(noticed, []) == []
    ended = [{"event": "end", "time": 1020.0, "exit_code": 202}]
    assert any("an attempt ended meanwhile" in b for b in chaos._store_breaches(noticed, ended))
    lost = faulted(tmp_path, "store-freeze", quiet_s=44.0, retried=2)
    assert any("never recovered from" in b for b in chaos._store_breaches(lost, []))


def test_a_second_submission_counts_as_refused_only_by_the_leases_words(tmp_path):
    c = faulted(tmp_path, "skew")
    fault = c.faults[0]
    c.run.root.mkdir(parents=True)
    log = c.run.root / "skew-10.log"
    log.write_text("the run's lease in s3://b/x is held by pid 1 on vm; watching it\n"
                   "error: reading s3://b/x was refused (Forbidden): check the permissions or credentials\n")
    assert any("not refused by the lease" in b for b in chaos._intruder_breaches(c, [(fault, 1)], []))
    log.write_text("error: another trainer holds this run: pid 1 on vm renewed its lease\n")
    assert chaos._intruder_breaches(c, [(fault, 1)], []) == [] and fault.note == "refused, run undisturbed"
    admitted = [{"event": "start", "job_id": f"job:{c.intruder_id(fault)}", "time": 0.0}]
    assert any("has an attempt in the ledger" in b for b in chaos._intruder_breaches(c, [(fault, 1)], admitted))


def timed(tmp_path, kind: str, at: int, log: str) -> tuple[chaos.Chaos, chaos.Fault]:
    run = chaos.Run(tmp_path / "chaos", "configs/demo.yaml", [], 2)
    run.root.mkdir(parents=True)
    (run.root / "train.log").write_text(log)
    fault = chaos.Fault(kind, at, injected_at=1000.0)
    return chaos.Chaos(run, [fault], restarts=0, save_every=25, eval_every=100), fault


SAVE = "saved checkpoint /x/ckpt/step-{:08d} (0.5 MB in 0.0s)\n"
SIGNAL = "warning: received SIGTERM: saving a checkpoint after this step\n"


def test_a_timed_preemption_counts_only_when_its_signal_came_inside_the_work(tmp_path):
    inside = timed(tmp_path / "a", "preempt-save", 150, SAVE.format(125) + SIGNAL + SAVE.format(150) + SAVE.format(151))
    assert chaos._landed(*inside) and chaos._not_injected(inside[0]) == []
    late = timed(tmp_path / "b", "preempt-save", 150, SAVE.format(125) + SAVE.format(150) + SIGNAL + SAVE.format(151))
    assert not chaos._landed(*late)
    assert "timed preemptions that did not land where aimed" in chaos._not_injected(late[0])[0]
    # an evaluation at a step that also saves: the signal after that save, before the validation loss
    in_eval = timed(tmp_path / "c", "preempt-eval", 400, SAVE.format(400) + SIGNAL + "step 400: val loss 2.6\n")
    assert chaos._landed(*in_eval)
    in_save = timed(tmp_path / "d", "preempt-eval", 400, SIGNAL + SAVE.format(400) + "step 400: val loss 2.6\n")
    assert not chaos._landed(*in_save)
