"""Ending a hung group quickly: a rank that exits for a hang kills its node's stopped peers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from conftest import REPO

# An "agent" (like torchrun's) with four children: a worker of the group that runs, one that will be
# stopped, a stopped process of another group, and the rank that calls end_stopped_local_peers once
# it finds the file `go` (it prints what it killed).
AGENT = r"""
import os, subprocess, sys, time
def child(code, run_id):
    env = dict(os.environ, TORCHELASTIC_RUN_ID=run_id)
    return subprocess.Popen([sys.executable, "-c", code], env=env)
sleeper = "import time; time.sleep(120)"
caller = ("import os, time\n"
          "while not os.path.exists('go'): time.sleep(0.05)\n"
          "from gpt2.distributed import end_stopped_local_peers\n"
          "print('killed', sorted(end_stopped_local_peers()), flush=True)")
kids = [child(sleeper, "run-1"), child(sleeper, "run-1"), child(sleeper, "run-2"), child(caller, "run-1")]
print(" ".join(str(k.pid) for k in kids), flush=True)
kids[3].wait()
for k in kids[:3]:
    k.kill()
"""


def test_a_hung_rank_kills_its_stopped_peers_of_the_same_group_only(tmp_path):
    agent = subprocess.Popen([sys.executable, "-c", AGENT], cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(REPO)))
    _running, stopped, other_group, _caller = (int(p) for p in agent.stdout.readline().split())
    try:
        os.kill(stopped, signal.SIGSTOP)
        os.kill(other_group, signal.SIGSTOP)
        time.sleep(0.5)  # the stops have landed
        (tmp_path / "go").touch()
        out = agent.stdout.readline()
        assert out.split(" ", 1) == ["killed", f"[{stopped}]\n"], out
    finally:
        os.kill(other_group, signal.SIGCONT)
        agent.wait(timeout=30)
