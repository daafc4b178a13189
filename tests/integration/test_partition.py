"""A network partition between two "nodes": network namespaces joined by a veth pair, made and
removed by the test, one torchrun agent in each, elastic 1:2, the c10d rendezvous on node A.

B's address sorts first, so B's worker is rank 0: the writer, holding the run's lease. The link
goes down mid-run: A (which keeps the rendezvous) goes on alone and takes the lease over, the
cut-off writer B stops within the hang limit and writes nothing after the cut; the link comes back,
a restarted agent on B rejoins, and the job finishes at world size 2. Every step's batch checksum
equals an uninterrupted run's (the checksum does not depend on the world size)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import IN_CI, REPO, tiny_overrides
from helpers.runs import raw_steps, steps, train, worker_pids

from gpt2.launch.common import TRAINER_ENV

EXTRA = {"model.n_layer": 2, "model.n_embd": 64, "model.n_head": 4, "train.max_steps": 1200, "checkpoint.every": 50,
         "eval.val_every": 0, "train.log_every": 50}
PORT = 29471


def _need_root() -> None:
    why = None
    if os.geteuid() != 0:
        why = "network namespaces need root"
    elif shutil.which("ip") is None:
        why = "the ip command (iproute2) is missing"
    if why:
        if IN_CI:
            pytest.fail(why + "; CI runs as root with iproute2")
        pytest.skip(why)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def two_nodes():
    """Two namespaces "a" and "b" with 10.213.N.2 and .1 on a veth pair; removed afterwards. (torchrun
    ranks the nodes by address: B is rank 0.)"""
    _need_root()
    tag = f"g{os.getpid() % 100000}"
    net = f"10.213.{os.getpid() % 250}"
    nodes = {"a": (f"{tag}a", f"{tag}va", f"{net}.2"), "b": (f"{tag}b", f"{tag}vb", f"{net}.1")}
    ip("netns", "add", nodes["a"][0])
    ip("netns", "add", nodes["b"][0])
    try:
        ip("link", "add", nodes["a"][1], "type", "veth", "peer", "name", nodes["b"][1])
        for ns, dev, addr in nodes.values():
            ip("link", "set", dev, "netns", ns)
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield nodes
    finally:
        for ns, _, _ in nodes.values():  # whatever still runs inside, then the namespace and its veth end
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def agent(node: tuple[str, str, str], store_addr: str, tmp: Path, log_name: str) -> subprocess.Popen:
    ns, dev, addr = node
    env = dict(os.environ, **TRAINER_ENV, OMP_NUM_THREADS="1", TMPDIR=str(tmp), GLOO_SOCKET_IFNAME=dev)
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2",
           "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={store_addr}:{PORT}",
           "--rdzv-id=partition-test", f"--rdzv-conf=is_host={str(addr == store_addr).lower()}",
           f"--local-addr={addr}", "--max-restarts=5", "--monitor-interval=0.5",
           "-m", "gpt2.train", "configs/demo.yaml", *tiny_overrides(tmp, **EXTRA)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(tmp / log_name, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_until(predicate, what: str, logs: list[Path], timeout: float = 300) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return time.time() - t0
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n" + "\n".join(p.read_text()[-2500:] for p in logs))


def lease_holder(run: Path) -> dict:
    newest = sorted((run / "ckpt" / "lease").glob("[0-9]" * 8))[-1]
    return json.loads(newest.read_text())


def attempts(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "tb" / "attempts.jsonl").read_text().splitlines() if '"start"' in x]


def world_sizes(tmp: Path) -> list[int]:
    return [r["world_size"] for r in steps(tmp).values()]


def end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_a_partition_leaves_one_side_training_alone_and_a_restarted_agent_rejoins(two_nodes, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir(), run.mkdir()
    r = train(ref, extra=EXTRA)  # the uninterrupted run, one process; also prepares the data
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.copytree(ref / "data", run / "data")
    store = two_nodes["a"][2]
    a = agent(two_nodes["a"], store, run, "a.log")
    b = agent(two_nodes["b"], store, run, "b.log")
    logs = [run / "a.log", run / "b.log"]
    b2 = None
    try:
        wait_until(lambda: 2 in world_sizes(run) and len(steps(run)) >= 30, "both nodes training", logs)
        writer = lease_holder(run)
        assert writer["owner"]["pid"] in worker_pids(b.pid), (writer, worker_pids(b.pid))  # B writes
        ip("-n", two_nodes["b"][0], "link", "set", two_nodes["b"][1], "down")
        cut_at = max(r["step"] for r in raw_steps(run / "tb"))
        # B's worker stops within the hang limit (its agent waits on for the unreachable rendezvous)
        b_done = wait_until(lambda: "no progress for" in (run / "b.log").read_text() and not worker_pids(b.pid),
                            "the cut-off worker to stop", logs, timeout=300)
        alone = wait_until(lambda: any(s["world_size"] == 1 and s["step"] > cut_at for s in steps(run).values()),
                           "A training alone", logs, timeout=300)
        taken = lease_holder(run)
        ip("-n", two_nodes["b"][0], "link", "set", two_nodes["b"][1], "up")
        end(b)  # the node comes back: its agent is restarted, as a node's supervisor would
        b2 = agent(two_nodes["b"], store, run, "b2.log")
        logs.append(run / "b2.log")
        wait_until(lambda: any(s["world_size"] == 2 and s["step"] > cut_at for s in steps(run).values()),
                   "B back in the job", logs, timeout=300)
        assert a.wait(timeout=600) == 0, (run / "a.log").read_text()[-3000:]
        assert b2.wait(timeout=120) == 0, (run / "b2.log").read_text()[-3000:]
    finally:
        for p in (a, b, b2):
            if p is not None:
                end(p)
    b_log = (run / "b.log").read_text()
    assert "no progress for" in b_log, b_log[-3000:]  # the cut-off side's watchdog
    assert b_done < 120 and alone < 120, (b_done, alone)
    got, want = steps(run), steps(ref)
    assert sorted(got) == list(range(EXTRA["train.max_steps"]))
    assert all(got[s]["batch_hash"] == want[s]["batch_hash"] for s in want)  # exact batches throughout
    assert {1, 2} <= set(world_sizes(run))
    # A took the lease from the cut-off writer; B wrote nothing after the cut: no step line, no checkpoint
    assert taken["generation"] > writer["generation"] and taken["owner"]["pid"] != writer["owner"]["pid"]
    b_attempt = next(a["attempt"] for a in attempts(run) if a.get("pid") == writer["owner"]["pid"])
    # (cut_at + 1: a step whose all-reduce finished as the link went down)
    assert max(r["step"] for r in raw_steps(run / "tb") if r["attempt"] == b_attempt) <= cut_at + 1
    gens = [(json.loads(m.read_text())["step"], json.loads(m.read_text())["writer"]["generation"])
            for m in sorted((run / "ckpt").glob("step-????????/COMMITTED"))]
    assert [g for _, g in gens] == sorted(g for _, g in gens), gens  # generations never go back
    assert all(step <= cut_at + 1 for step, g in gens if g == writer["generation"]), gens
