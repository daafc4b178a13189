"""The chaos run's inputs: a clear error for every bad one, before any run starts."""

from __future__ import annotations

import pytest

from gpt2 import chaos


@pytest.mark.parametrize("args, message", [
    (["--kinds", "store-down"], "need --store CMD"),
    (["--kinds", "kill,bogus"], "--kinds must be a comma-separated subset"),
    (["--store", "true", "--store-fault-s", "600"], "--store-fault-s must be above 0 and below checkpoint.outage_s"),
    (["--store", "true", "--store-fault-s", "0"], "--store-fault-s must be above 0"),
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
