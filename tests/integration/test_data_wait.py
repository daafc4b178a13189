"""The trainer told to wait for data (data.wait_for_data_s) starts once another job has prepared it."""

from __future__ import annotations

import time

from conftest import run_cli, tiny_overrides
from helpers.runs import popen_train, steps, train

WAIT = {"data.auto_prepare": "false", "train.max_steps": 4}


def test_the_trainer_waits_for_the_manifest_then_trains(tmp_path):
    proc = popen_train(tmp_path, extra=dict(WAIT, **{"data.wait_for_data_s": 120}))
    time.sleep(4)
    assert proc.poll() is None, (tmp_path / "train.log").read_text()
    assert "waiting for data" in (tmp_path / "train.log").read_text()
    prep = run_cli(["-m", "gpt2.prepare", "configs/demo.yaml", *tiny_overrides(tmp_path)])
    assert prep.returncode == 0, prep.stderr
    assert proc.wait(timeout=120) == 0, (tmp_path / "train.log").read_text()[-3000:]
    assert sorted(steps(tmp_path)) == [0, 1, 2, 3]


def test_the_wait_runs_out_with_a_message(tmp_path):
    r = train(tmp_path, extra=dict(WAIT, **{"data.wait_for_data_s": 2}))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "is still missing after waiting" in r.stderr and "python launch/slurm.py prepare" in r.stderr
    assert "Traceback" not in r.stderr
