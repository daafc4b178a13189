"""The test Kubernetes cluster (scripts/k8s-cluster.sh): kubectl, waiting for objects, local volumes,
and a pod shaped as the Kubeflow Training Operator would make it from a PyTorchJob."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import IN_CI, REPO

SCRIPT = REPO / "scripts" / "k8s-cluster.sh"


def cluster_env() -> dict[str, str]:
    """KUBECONFIG, KUBECTL, CONTAINERD_ADDRESS and K8S_NODE as the cluster script reports them."""
    out = subprocess.run(["bash", str(SCRIPT), "env"], capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.split())


def require_cluster() -> dict[str, str]:
    """The cluster's facts; skips (fails in CI) unless its node is Ready."""
    if os.geteuid() != 0:
        reason = "the Kubernetes cluster needs root (scripts/k8s-cluster.sh up)"
    else:
        r = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True)
        reason = None if r.returncode == 0 else f"no Kubernetes cluster is up (scripts/k8s-cluster.sh up): {r.stdout}"
    if reason:
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    return cluster_env()


class Kube:
    """kubectl against the test cluster, in one namespace."""

    def __init__(self, env: dict[str, str], namespace: str):
        self.env, self.namespace = env, namespace

    def run(self, *args: str, check: bool = True, stdin: str | None = None, timeout: float = 300,
            namespaced: bool = True) -> subprocess.CompletedProcess:
        cmd = [self.env["KUBECTL"], "--kubeconfig", self.env["KUBECONFIG"],
               *(["-n", self.namespace] if namespaced else []), *args]
        r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({r.returncode}): {r.stdout}{r.stderr}")
        return r

    def get(self, kind: str, *names_or_flags: str) -> dict[str, Any]:
        cluster_wide = kind in ("crd", "pv", "node", "namespace")
        return json.loads(self.run("get", kind, *names_or_flags, "-o", "json", namespaced=not cluster_wide).stdout)

    def apply(self, obj: dict[str, Any], *flags: str) -> subprocess.CompletedProcess:
        return self.run("apply", "-f", "-", *flags, stdin=yaml.safe_dump(obj))

    def wait_for(self, what: str, predicate, timeout: float, poll: float = 1.0):
        """Poll `predicate()` until it returns something truthy; AssertionError naming `what` after timeout."""
        deadline = time.time() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.time() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; {self.describe()}")
            time.sleep(poll)

    def describe(self) -> str:
        """The namespace's pods, their last log lines and its events, for a failure message."""
        pods = self.run("get", "pods", "-o", "name", check=False).stdout.split()
        logs = "".join(f"--- {p}:\n{self.run('logs', p, '--tail=15', check=False).stdout}" for p in pods)
        return (f"pods:\n{self.run('get', 'pods', '-o', 'wide', check=False).stdout}{logs}"
                f"events:\n{self.run('get', 'events', check=False).stdout[-3000:]}")

    def pod_phase(self, name: str) -> str | None:
        r = self.run("get", "pod", name, "-o", "jsonpath={.status.phase}", check=False)
        return r.stdout if r.returncode == 0 else None

    def logs(self, name: str) -> str:
        return self.run("logs", name, check=False).stdout


def local_volume(name: str, path: Path, node: str, namespace: str, claim: str, size: str = "2Gi") -> dict[str, Any]:
    """A local PersistentVolume on the node, bound ahead to `namespace/claim` (no provisioner here)."""
    return {
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
        "spec": {
            "capacity": {"storage": size}, "accessModes": ["ReadWriteMany"],
            "persistentVolumeReclaimPolicy": "Retain", "local": {"path": str(path)},
            "claimRef": {"namespace": namespace, "name": claim},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}},
        },
    }


# The pod the Kubeflow Training Operator v1.9 creates for Worker 0 of an elastic PyTorchJob without a
# Master. Where each part comes from, in github.com/kubeflow/training-operator:
#   name <job>-worker-0 and the labels: pkg/controller.v1/common/pod.go (createNewPod), labels.go
#   restartPolicy Never for a replica policy ExitCode (the operator restarts pods itself):
#     pkg/controller.v1/common/pod.go (setRestartPolicy)
#   env: PYTHONUNBUFFERED=0 (pkg/controller.v1/pytorch/envvar.go, setPodEnv), then from
#     pkg/controller.v1/pytorch/elastic.go: PET_RDZV_ENDPOINT=<job>-worker-0:<the container port named
#     pytorchjob-port>, PET_RDZV_BACKEND, PET_NNODES=<minReplicas>:<maxReplicas>, PET_MAX_RESTARTS
#   an owner reference to the job, so that deleting the job deletes its pods
# The operator also makes a headless Service per replica for the rendezvous name; this cluster has no
# DNS, and a pod resolves its own name (<job>-worker-0) through the /etc/hosts the kubelet writes.
def operator_worker_pod(job: dict[str, Any], index: int = 0) -> dict[str, Any]:
    name, spec = job["metadata"]["name"], job["spec"]
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    template = copy.deepcopy(worker["template"])
    container = next(c for c in template["spec"]["containers"] if c["name"] == "pytorch")
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "pytorchjob-port")
    elastic = spec["elasticPolicy"]
    container["env"] = [*container.get("env", []), {"name": "PYTHONUNBUFFERED", "value": "0"},
                        {"name": "PET_RDZV_ENDPOINT", "value": f"{name}-worker-0:{port}"},
                        {"name": "PET_RDZV_BACKEND", "value": elastic["rdzvBackend"]},
                        {"name": "PET_NNODES", "value": f"{elastic['minReplicas']}:{elastic['maxReplicas']}"},
                        {"name": "PET_MAX_RESTARTS", "value": str(elastic["maxRestarts"])}]
    template["spec"]["restartPolicy"] = "Never" if worker["restartPolicy"] == "ExitCode" else worker["restartPolicy"]
    labels = {**template.get("metadata", {}).get("labels", {}),
              "training.kubeflow.org/job-name": name, "training.kubeflow.org/operator-name": "pytorchjob-controller",
              "training.kubeflow.org/replica-type": "worker", "training.kubeflow.org/replica-index": str(index)}
    if index == 0:
        labels["training.kubeflow.org/job-role"] = "master"
    meta: dict[str, Any] = {"name": f"{name}-worker-{index}", "labels": labels}
    if job["metadata"].get("uid"):
        meta["ownerReferences"] = [{"apiVersion": job["apiVersion"], "kind": job["kind"], "name": name,
                                    "uid": job["metadata"]["uid"], "controller": True,
                                    "blockOwnerDeletion": True}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template["spec"]}
