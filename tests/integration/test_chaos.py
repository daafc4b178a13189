"""The chaos run: a job under torchrun (2 workers) with faults drawn from a seed, every invariant
checked against an uninterrupted run, with the shipped defaults (watchdog, lease, restarts)."""

from __future__ import annotations

import json

from conftest import run_cli, tiny_overrides

from gpt2.chaos import Chaos, Fault, Run, check

TINY = {"train.max_steps": 1500, "train.log_every": 50, "checkpoint.every": 25, "eval.val_every": 100}


def chaos(tmp_path, *args: str) -> tuple[object, dict]:
    overrides = [o for o in tiny_overrides(tmp_path, **TINY) if not o.startswith(("checkpoint.dir", "logging.dir"))]
    r = run_cli(["-m", "gpt2.chaos", "configs/demo.yaml", *args, "--dir", str(tmp_path / "chaos"), *overrides],
                env={"TMPDIR": str(tmp_path)}, timeout=900)
    return r, json.loads((tmp_path / "chaos" / "chaos.json").read_text())


def test_faults_of_every_kind_one_after_another_and_every_invariant_holds(tmp_path):
    """Seed 22 draws a second submission (refused), a preemption (saved, submitted again) and a
    killed worker (torchrun restarts the group). A frozen worker costs about 100 s (the watchdog's
    minute, then torchrun's teardown): it is in docs/reliability.md's longer schedule, and alone in
    test_reliability.py."""
    r, record = chaos(tmp_path, "--seed", "22", "--faults", "3", "--kinds", "kill,preempt,second")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert [f["kind"] for f in record["faults"]] == ["second", "preempt", "kill"]
    assert all(f["injected_at"] for f in record["faults"]) and record["breaches"] == []
    assert "refused, run undisturbed" in r.stdout and "every invariant holds" in r.stdout
    assert all(f["recovery_s"] for f in record["faults"] if f["kind"] != "second")
    assert "goodput" in r.stdout

    # the checks can fail: one loss changed in the run's records is a breach
    root = tmp_path / "chaos"
    overrides = tiny_overrides(tmp_path, **TINY)
    ref, run = Run(root / "reference", "configs/demo.yaml", overrides, 2), Run(root / "chaos", "configs/demo.yaml",
                                                                                overrides, 2)
    lines = (run.tb / "steps.jsonl").read_text().splitlines()
    doctored = json.loads(lines[-1])
    doctored["loss"] += 1e-6
    (run.tb / "steps.jsonl").write_text("\n".join([*lines[:-1], json.dumps(doctored)]) + "\n")
    c = Chaos(run, [Fault(**f) for f in record["faults"] if f["kind"] != "second"], restarts=0)
    c.job_id = json.loads((run.tb / "attempts.jsonl").read_text().splitlines()[0])["job_id"].removeprefix("job:")
    assert any(b.startswith(f"step {doctored['step']}: loss") for b in check(ref, c))
