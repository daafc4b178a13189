"""The chaos run: a job under torchrun (2 workers) with faults drawn from a seed, every invariant
checked against an uninterrupted run, with the shipped defaults (watchdog, lease, restarts, outage
limit). checkpoint.dir is on the S3 server of the tests, which the store faults stop and freeze
(through tests/helpers/store_ctl.py: the server belongs to this process)."""

from __future__ import annotations

import json
import re
import sys

import pytest
from conftest import REPO, run_cli, tiny_overrides
from helpers.store_ctl import StoreController

from gpt2.chaos import STORE_FAULT_S, Chaos, Fault, Run, check

# evaluations of 20 batches: long enough (tens of ms) for a preemption timed to land in one
TINY = {"train.max_steps": 1500, "train.log_every": 50, "checkpoint.every": 25, "eval.val_every": 100,
        "eval.val_batches": 20}


@pytest.mark.s3
def test_faults_of_every_kind_one_after_another_and_every_invariant_holds(tmp_path, s3_server, s3_url):
    """Seed 4766 draws a second submission, a preemption that lands while a checkpoint is being
    saved (to S3), a second submission from a clock 10 minutes ahead (both refused), a preemption
    that lands in an evaluation (each saves and is submitted again), a killed worker (torchrun
    restarts the group), then the store frozen and the store down (45 s each, longer than the
    lease's ttl/2). A frozen worker is the SLURM chaos test's (test_slurm.py) and test_reliability.py's."""
    overrides = tiny_overrides(tmp_path, **TINY, **{"checkpoint.dir": s3_url})
    overrides = [o for o in overrides if not o.startswith("logging.dir")]
    store = f"{sys.executable} {REPO}/tests/helpers/store_ctl.py {tmp_path / 'store-ctl'}"
    with StoreController(s3_server, tmp_path / "store-ctl") as controller:
        r = run_cli(["-m", "gpt2.chaos", "configs/demo.yaml", "--seed", "4766", "--faults", "7", "--store", store,
                     "--kinds", "kill,preempt-save,preempt-eval,second,skew,store-down,store-freeze",
                     "--dir", str(tmp_path / "chaos"), *overrides], env={"TMPDIR": str(tmp_path)}, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    record = json.loads((tmp_path / "chaos" / "chaos.json").read_text())
    faults = {f["kind"]: f for f in record["faults"]}
    assert [f["kind"] for f in record["faults"]] == ["second", "preempt-save", "skew", "preempt-eval", "kill",
                                                     "store-freeze", "store-down"]
    assert all(f["injected_at"] for f in record["faults"]) and record["breaches"] == []
    assert r.stdout.count("refused, run undisturbed") == 2 and "every invariant holds" in r.stdout
    assert all(f["recovery_s"] for f in record["faults"] if f["kind"] not in ("second", "skew"))
    # the timed preemptions landed where aimed (else a breach): the log shows the signal inside the work
    assert re.fullmatch(r"in the save of step \d+", faults["preempt-save"]["note"]), faults
    assert re.fullmatch(r"in the evaluation of step \d+", faults["preempt-eval"]["note"]), faults
    assert "goodput" in r.stdout
    # the store faults lasted their time and reached the trainer: a save or a lease renewal waited for
    # the store (no step record for most of the fault); while it was down, calls failed and were retried
    assert [a for a, _ in controller.done] == ["freeze", "thaw", "stop", "start"], controller.done
    (_, frozen), (_, thawed), (_, stopped), (_, started) = controller.done
    assert thawed - frozen >= STORE_FAULT_S and started - stopped >= STORE_FAULT_S
    assert faults["store-freeze"]["quiet_s"] > 30 and faults["store-down"]["quiet_s"] > 30, faults
    assert int(re.search(r"(\d+) storage calls failed", faults["store-down"]["note"]).group(1)) > 0, faults

    # the checks can fail: one loss changed in the run's records is a breach
    root = tmp_path / "chaos"
    ref, run = (Run(root / name, "configs/demo.yaml", overrides, 2, s3_url) for name in ("reference", "chaos"))
    lines = (run.tb / "steps.jsonl").read_text().splitlines()
    doctored = json.loads(lines[-1])
    doctored["loss"] += 1e-6
    (run.tb / "steps.jsonl").write_text("\n".join([*lines[:-1], json.dumps(doctored)]) + "\n")
    c = Chaos(run, [Fault(**f) for f in record["faults"] if f["kind"] in ("preempt-save", "kill")], restarts=0,
              save_every=25, eval_every=100)
    c.job.job_id = json.loads((run.tb / "attempts.jsonl").read_text().splitlines()[0])["job_id"].removeprefix("job:")
    assert any(b.startswith(f"step {doctored['step']}: loss") for b in check(ref, c))
