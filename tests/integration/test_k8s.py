"""Kubernetes manifests: rendered from the config, valid against the real schemas, and runnable."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import IN_CI, REPO, run_cli, shared_file, tiny_overrides
from helpers.k8s_schema import validate_core, validate_pytorchjob, webhook_errors
from helpers.runs import steps

from gpt2.launch import k8s
from gpt2.launch import k8s_manifests as manifests
from gpt2.launch.common import LaunchError


@pytest.fixture
def schemas():
    crd = shared_file("kubeflow.org_pytorchjobs.v1.9.4.yaml")
    return str(crd), str(shared_file("kubernetes_swagger_release-1.36.json"))


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_checked_in_manifests_are_exactly_what_the_renderer_produces(tmp_path):
    manifests.write(manifests.render(manifests.Options()), tmp_path)
    for name in sorted(os.listdir(tmp_path)):
        assert (REPO / "k8s" / name).read_text() == (tmp_path / name).read_text(), f"k8s/{name} drifted"
    assert sorted(os.listdir(REPO / "k8s")) == sorted(os.listdir(tmp_path))


def test_every_manifest_validates(schemas):
    crd, swagger = schemas
    checked = 0
    for path in sorted((REPO / "k8s").glob("*.yaml")):
        for doc in load_docs(path):
            if doc["kind"] == "Kustomization":
                continue
            errors = (validate_pytorchjob(doc, crd, swagger) if doc["kind"] == "PyTorchJob"
                      else validate_core(doc, swagger))
            assert errors == [], f"{path.name} {doc['kind']}: {errors}"
            checked += 1
    assert checked == 6


def test_the_pytorchjob_is_what_the_issue_asks_for():
    job = load_docs(REPO / "k8s" / "pytorchjob.yaml")[0]
    spec = job["spec"]
    assert set(spec["pytorchReplicaSpecs"]) == {"Worker"}
    assert spec["elasticPolicy"]["rdzvBackend"] == "c10d" and spec["nprocPerNode"] == "8"
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    pod = worker["template"]["spec"]
    c = pod["containers"][0]
    # no command: the image's entrypoint runs `torchrun` as gpt2.launch.torchrun (exit 200 on SIGTERM)
    assert c["name"] == "pytorch" and "command" not in c
    assert c["args"][:5] == ["torchrun", "--nproc-per-node=8", "-m", "gpt2.train", "configs/gpt2-124m.yaml"]
    # the port the Training Operator takes the rendezvous endpoint from
    assert c["ports"] == [{"name": "pytorchjob-port", "containerPort": 29400}]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in pod["volumes"]
    assert pod["securityContext"]["runAsNonRoot"] and not c["securityContext"]["allowPrivilegeEscalation"]
    assert pod["terminationGracePeriodSeconds"] > 30 and worker["restartPolicy"] == "ExitCode"
    assert not any("SECRET" in json.dumps(e) for e in c["env"])  # credentials only through the Secret
    assert c["envFrom"] == [{"secretRef": {"name": "gpt2-s3", "optional": True}}]


def test_the_check_can_fail(schemas):
    crd, swagger = schemas
    job = load_docs(REPO / "k8s" / "pytorchjob.yaml")[0]
    misspelt = copy.deepcopy(job)
    misspelt["spec"]["pytorchReplicaSpecs"]["Worker"]["replica"] = 2
    assert any("replica" in e for e in validate_pytorchjob(misspelt, crd, swagger))
    deep = copy.deepcopy(job)
    deep["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["imagePulPolicy"] = "x"
    assert any("imagePulPolicy" in e for e in validate_pytorchjob(deep, crd, swagger))
    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["elasticPolicy"]["minReplicas"] = "one"
    assert any("'one' is not of type 'integer'" in e for e in validate_pytorchjob(wrong_type, crd, swagger))
    pvc = load_docs(REPO / "k8s" / "pvc.yaml")[0]
    pvc["spec"]["accessMode"] = ["ReadWriteMany"]
    assert any("accessMode" in e for e in validate_core(pvc, swagger))
    svc = load_docs(REPO / "k8s" / "tensorboard.yaml")[1]
    svc["spec"]["ports"][0]["port"] = "http"
    assert validate_core(svc, swagger)


def test_webhook_rules():
    job = load_docs(REPO / "k8s" / "pytorchjob.yaml")[0]
    assert webhook_errors(job) == []
    no_worker = copy.deepcopy(job)
    no_worker["spec"]["pytorchReplicaSpecs"] = {"Master": no_worker["spec"]["pytorchReplicaSpecs"]["Worker"]}
    assert "elasticPolicy needs a Worker replica spec" in webhook_errors(no_worker)
    two_masters = copy.deepcopy(job)
    two_masters["spec"]["pytorchReplicaSpecs"]["Master"] = dict(job["spec"]["pytorchReplicaSpecs"]["Worker"],
                                                                replicas=2)
    assert "the Master replica spec must have exactly 1 replica" in webhook_errors(two_masters)
    renamed = copy.deepcopy(job)
    renamed["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    assert "Worker: no container is named 'pytorch'" in webhook_errors(renamed)
    no_nproc = copy.deepcopy(job)
    del no_nproc["spec"]["nprocPerNode"]
    assert "nprocPerNode is not set" in webhook_errors(no_nproc)


def test_kustomize_builds_offline():
    if shutil.which("kubectl") is None:
        if IN_CI:
            pytest.fail("kubectl is missing; scripts/test.sh installs it")
        pytest.skip("kubectl not installed")
    out = subprocess.run(["kubectl", "kustomize", str(REPO / "k8s")], capture_output=True, text=True, check=True)
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(out.stdout))
    assert kinds == ["Deployment", "Job", "PersistentVolumeClaim", "PyTorchJob", "Service"]


def test_overrides_and_options_flow_into_the_job():
    m = manifests.render(manifests.Options(
        nodes=4, min_nodes=2, max_nodes=4, gpus=4, image="reg.example/gpt2@sha256:" + "a" * 64,
        storage="s3://bucket/run", name="exp1", namespace="ml", overrides=["optim.lr=3e-4", "train.max_steps=100"]))
    job = m["pytorchjob.yaml"][0]
    args = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["args"]
    assert args[-2:] == ["optim.lr=3e-4", "train.max_steps=100"]
    assert "checkpoint.dir=s3://bucket/run/exp1/checkpoints" in args
    assert "data.dir=s3://bucket/run/data/edu_fineweb10B" in args
    assert job["metadata"] == {"name": "exp1", "namespace": "ml", "labels": {"app.kubernetes.io/part-of": "gpt2"}}
    assert job["spec"]["elasticPolicy"]["minReplicas"] == 2 and job["spec"]["nprocPerNode"] == "4"


@pytest.mark.parametrize("opts,message", [
    (dict(image="ghcr.io/gpt2-cluster/gpt2"), "has no tag or digest"),
    (dict(min_nodes=3, max_nodes=2), "--min-nodes (3) is greater than --max-nodes (2)"),
    (dict(gpus=7, overrides=["train.micro_batch=4"]), "cannot keep the global batch"),
    (dict(overrides=["train.max_step=3"]), "did you mean 'train.max_steps'"),
])
def test_bad_input_is_refused_with_a_clear_message(opts, message):
    with pytest.raises(LaunchError) as err:
        manifests.render(manifests.Options(**opts))
    assert message in str(err.value)


def test_cli_dry_run_and_missing_kubeconfig(tmp_path):
    r = run_cli(["launch/k8s.py", "create", "--dry-run", "train.max_steps=10"])
    assert r.returncode == 0 and "kind: PyTorchJob" in r.stdout and "train.max_steps=10" in r.stdout
    r = run_cli(["launch/k8s.py", "create", "--kubeconfig", str(tmp_path / "none")],
                env={"KUBECONFIG": str(tmp_path / "none"), "KUBERNETES_SERVICE_HOST": ""})
    assert r.returncode == 2 and "no Kubernetes configuration found" in r.stderr


# ---- the Python client against a fake API server (HTTP layer) -------------------------------------


class FakeApiServer:
    """Records every request; answers 201, or a configured error for a given path."""

    def __init__(self):
        self.requests: list[tuple[str, str, dict | None]] = []
        self.fail: dict[tuple[str, str], tuple[int, str]] = {}
        self.get: dict[str, dict] = {}  # GET answers by path
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self, method):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                server.requests.append((method, self.path, body))
                status, message = server.fail.get((method, self.path.split("?")[0]), (201, ""))
                if status >= 400:
                    payload = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                               "reason": "AlreadyExists" if status == 409 else "Invalid", "code": status}
                else:
                    payload = body or {"kind": "Status", "status": "Success"}
                data = json.dumps(payload).encode()
                self.send_response(status if method != "DELETE" or status >= 400 else 200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                self._handle("POST")

            def do_GET(self):
                path = self.path.split("?")[0]
                server.requests.append(("GET", path, None))
                data = json.dumps(server.get[path]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_DELETE(self):
                self._handle("DELETE")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def client(self):
        from kubernetes import client

        config = client.Configuration()
        config.host = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        return client.ApiClient(config)


@pytest.fixture
def api():
    server = FakeApiServer()
    yield server
    server.httpd.shutdown()


JOBS = "/apis/kubeflow.org/v1/namespaces/ml/pytorchjobs"


def test_create_sends_exactly_the_rendered_manifests(api):
    m = manifests.render(manifests.Options(namespace="ml"))
    k8s.create(m, api.client, "ml")
    posts = [(path, body) for method, path, body in api.requests if method == "POST"]
    assert [p for p, _ in posts] == ["/api/v1/namespaces/ml/persistentvolumeclaims",
                                     "/apis/apps/v1/namespaces/ml/deployments", "/api/v1/namespaces/ml/services", JOBS]
    expected = m["pvc.yaml"] + m["tensorboard.yaml"] + m["pytorchjob.yaml"]
    assert [b for _, b in posts] == expected


@pytest.mark.parametrize("status", [409, 422])
def test_api_error_on_the_job_rolls_back_the_companions(api, status):
    api.fail[("POST", JOBS)] = (status, f'pytorchjobs.kubeflow.org "gpt2-124m" is {status}')
    with pytest.raises(LaunchError) as err:
        k8s.create(manifests.render(manifests.Options(namespace="ml")), api.client, "ml")
    assert f"creating PyTorchJob ml/gpt2-124m failed: {status}" in str(err.value)
    assert f'"gpt2-124m" is {status}' in str(err.value)
    rolled = "rolled back: Service/gpt2-tensorboard, Deployment/gpt2-tensorboard, PersistentVolumeClaim/gpt2-runs"
    assert rolled in str(err.value)
    deletes = [path for method, path, _ in api.requests if method == "DELETE"]
    assert deletes == ["/api/v1/namespaces/ml/services/gpt2-tensorboard",
                       "/apis/apps/v1/namespaces/ml/deployments/gpt2-tensorboard",
                       "/api/v1/namespaces/ml/persistentvolumeclaims/gpt2-runs"]


def test_existing_pvc_is_reused_not_rolled_back(api):
    api.fail[("POST", "/api/v1/namespaces/ml/persistentvolumeclaims")] = (409, "exists")
    api.fail[("POST", JOBS)] = (422, "spec.nprocPerNode: Invalid value")
    with pytest.raises(LaunchError, match="Invalid value"):
        k8s.create(manifests.render(manifests.Options(namespace="ml")), api.client, "ml")
    deletes = [path for method, path, _ in api.requests if method == "DELETE"]
    assert "/api/v1/namespaces/ml/persistentvolumeclaims/gpt2-runs" not in deletes and len(deletes) == 2


# ---- the pod command, run locally as two "pods" with the operator's PET_* environment --------------


def pod_env(tmp: Path, port: int) -> dict[str, str]:
    container = load_docs(REPO / "k8s" / "pytorchjob.yaml")[0]["spec"]["pytorchReplicaSpecs"]["Worker"]
    downward = {"metadata.namespace": "default"}  # what the kubelet fills in
    env = {e["name"]: e["value"] if "value" in e else downward[e["valueFrom"]["fieldRef"]["fieldPath"]]
           for e in container["template"]["spec"]["containers"][0]["env"]}
    env.update({"PET_NNODES": "1:2", "PET_NPROC_PER_NODE": "1", "PET_RDZV_BACKEND": "c10d",
                "PET_RDZV_ENDPOINT": f"127.0.0.1:{port}", "PET_RDZV_ID": "gpt2-test", "PET_MAX_RESTARTS": "3",
                "PET_RDZV_CONF": "join_timeout=120,last_call_timeout=2", "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"})
    return env


def start_pod(tmp: Path, name: str, port: int, extra: dict) -> subprocess.Popen:
    m = manifests.render(manifests.Options(config="configs/demo.yaml", gpus=0, nodes=2, min_nodes=1, max_nodes=2,
                               overrides=tiny_overrides(tmp, **extra)))
    c = m["pytorchjob.yaml"][0]["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    args = [a for a in c["args"] if not a.startswith(("data.dir=runs", "checkpoint.dir=runs", "logging.dir=runs",
                                                      "data.cache_dir=runs"))]  # the test's own dirs win
    assert args[0] == "torchrun"  # what the image's entrypoint runs as gpt2.launch.torchrun
    cmd = [sys.executable, "-m", "gpt2.launch.torchrun", *args[1:]]
    log = open(tmp / f"{name}.log", "a")
    return subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, **pod_env(tmp, port)), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_pod(proc: subprocess.Popen) -> None:
    """SIGKILL the agent and its workers at once, as when a container dies (torchrun starts each
    worker in its own session, so killing the agent's process group would leave them running)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True).stdout
    for pid in [proc.pid, *map(int, out.split())]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    import socket

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the pod exited before opening the rendezvous port"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


@pytest.mark.slow
def test_two_pods_form_one_job_and_a_killed_pod_resumes(tmp_path):
    port = free_port()
    extra = {"train.max_steps": 40, "checkpoint.every": 5, "model.n_embd": 128, "model.n_head": 4,
             "model.block_size": 64, "train.seq_len": 64, "train.total_batch_tokens": 1024}
    # prepare the data first, as a real deployment would, so both pods start training together
    r = run_cli(["-m", "gpt2.prepare", "configs/demo.yaml", *tiny_overrides(tmp_path, **extra)])
    assert r.returncode == 0, r.stderr
    # pod 0 first: like worker-0 behind PET_RDZV_ENDPOINT in the cluster, it hosts the rendezvous
    pods = [start_pod(tmp_path, "pod0", port, extra)]
    wait_for_port(port, pods[0])
    pods.append(start_pod(tmp_path, "pod1", port, extra))
    deadline = time.time() + 240
    while time.time() < deadline and not (steps(tmp_path) and max(steps(tmp_path)) >= 12):
        assert all(p.poll() is None for p in pods), (tmp_path / "pod0.log").read_text()[-3000:]
        time.sleep(0.1)
    assert steps(tmp_path)[5]["world_size"] == 2, "the two pods did not form one job"
    kill_pod(pods[1])  # the pod dies (node lost); the rendezvous host survives
    pods[1].wait()
    time.sleep(2)
    pods[1] = start_pod(tmp_path, "pod1", port, extra)  # the operator restarts it
    for p in pods:
        assert p.wait(timeout=400) == 0, (tmp_path / "pod0.log").read_text()[-4000:]
    log = (tmp_path / "pod0.log").read_text() + (tmp_path / "pod1.log").read_text()
    assert "resumed from" in log
    assert sorted(steps(tmp_path)) == list(range(40))
    assert steps(tmp_path)[39]["world_size"] in (1, 2)


PREP_STATUS = "/apis/batch/v1/namespaces/ml/jobs/gpt2-124m-prepare/status"


def test_create_with_prepare_starts_training_only_after_the_preparation_succeeded(api, capsys):
    api.get[PREP_STATUS] = {"apiVersion": "batch/v1", "kind": "Job", "status": {"succeeded": 1}}
    m = manifests.render(manifests.Options(namespace="ml"))
    k8s.create(m, api.client, "ml", prepare=True, show_progress=True, poll_s=0.01)
    calls = [(method, path) for method, path, _ in api.requests]
    assert calls == [("POST", "/api/v1/namespaces/ml/persistentvolumeclaims"),
                     ("POST", "/apis/apps/v1/namespaces/ml/deployments"), ("POST", "/api/v1/namespaces/ml/services"),
                     ("POST", "/apis/batch/v1/namespaces/ml/jobs"), ("GET", PREP_STATUS), ("POST", JOBS)]
    assert "preparation gpt2-124m-prepare: active 0, succeeded 1" in capsys.readouterr().out


def test_a_failed_preparation_creates_no_training_and_keeps_the_volume(api):
    api.get[PREP_STATUS] = {"status": {"failed": 11, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "limit reached"}]}}
    with pytest.raises(LaunchError, match="BackoffLimitExceeded.*the PyTorchJob was not created"):
        k8s.create(manifests.render(manifests.Options(namespace="ml")), api.client, "ml", prepare=True, poll_s=0.01)
    assert ("POST", JOBS) not in [(m, p) for m, p, _ in api.requests]
    assert [p for m, p, _ in api.requests if m == "DELETE"] == []


def test_the_preparation_job_and_the_waiting_trainers():
    m = manifests.render(manifests.Options(prepare_cpus=32))
    prep = m["prepare-job.yaml"][0]
    c = prep["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][:2] == ["prepare", "configs/gpt2-124m.yaml"] and "data.workers=32" in c["args"]
    assert c["resources"]["requests"]["cpu"] == "32" and "nvidia.com/gpu" not in str(c["resources"])
    assert prep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    train_args = m["pytorchjob.yaml"][0]["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"][
        "containers"][0]["args"]
    data_dir = next(a for a in c["args"] if a.startswith("data.dir="))
    assert data_dir in train_args and f"data.wait_for_data_s={manifests.WAIT_FOR_DATA_S}" in train_args
