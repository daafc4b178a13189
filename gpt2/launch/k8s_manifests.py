"""Kubernetes manifests rendered from the trainer config: an elastic Kubeflow PyTorchJob, its PVC,
TensorBoard, an example S3 secret and a kustomization. Plain data; no API server involved
(`gpt2.launch.k8s` talks to one).

Targets the Kubeflow Training Operator v1.9.x (`kubeflow.org/v1` PyTorchJob, elastic via c10d).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpt2.launch.common import (
    RDZV_PORT,
    TRAINER_ENV,
    LaunchError,
    check_image,
    fit_micro_batch,
    load_trainer_config,
    torchrun_command,
)

WORKDIR = "/workspace"
RUNS_MOUNT = f"{WORKDIR}/runs"
PVC_NAME = "gpt2-runs"
S3_SECRET = "gpt2-s3"
TENSORBOARD = "gpt2-tensorboard"
JOB_LABEL = "training.kubeflow.org/job-name"
# torchrun gives workers 30 s after forwarding SIGTERM; the pod's grace period must exceed it.
GRACE_SECONDS = 120
# The trainers wait this long for the preparation Job's manifest (`kubectl apply -k` starts both).
WAIT_FOR_DATA_S = 24 * 3600
# RFC 1123 labels; a job name is shorter so that the operator's pod names (NAME-worker-N) fit in 63
_DNS_LABEL = {"--name": 50, "--namespace": 63}


def _valid_label(value: str, max_len: int) -> bool:
    return len(value) <= max_len and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", value) is not None


@dataclass
class Options:
    config: str = "configs/gpt2-124m.yaml"
    nodes: int = 2
    min_nodes: int = 1
    max_nodes: int | None = None
    gpus: int = 8
    image: str | None = None  # default: launch.image of the config
    storage: str = "pvc"  # "pvc", or an s3:// URL for data and checkpoints (TensorBoard stays on the PVC)
    pvc_size: str = "500Gi"
    storage_class: str | None = None
    prepare_cpus: int = 16  # the preparation Job's CPU request and tokenizer workers
    name: str | None = None
    namespace: str | None = None
    overrides: list[str] = field(default_factory=list)


def _meta(name: str, opts: Options, **labels: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/part-of": "gpt2", **labels}}
    if opts.namespace:
        meta["namespace"] = opts.namespace
    return meta


def storage_overrides(opts: Options, job: str) -> list[str]:
    """Where data, checkpoints and TensorBoard live inside the pods."""
    tb = f"logging.dir=runs/{job}/tensorboard"
    if opts.storage == "pvc":
        return ["data.dir=runs/data/edu_fineweb10B", f"checkpoint.dir=runs/{job}/checkpoints", tb,
                "data.cache_dir=runs/.cache/shards"]
    if opts.storage.startswith(("s3://", "gs://")):
        base = opts.storage.rstrip("/")
        return [f"data.dir={base}/data/edu_fineweb10B", f"checkpoint.dir={base}/{job}/checkpoints", tb]
    raise LaunchError(f"--storage must be 'pvc' or an s3:// / gs:// URL, got '{opts.storage}'")


def render(opts: Options) -> dict[str, list[dict[str, Any]]]:
    """The manifests, by file name. Raises LaunchError on bad input."""
    cfg = load_trainer_config(opts.config, opts.overrides)
    max_nodes = opts.max_nodes if opts.max_nodes is not None else opts.nodes
    if opts.min_nodes < 1 or opts.nodes < 1:
        raise LaunchError("--nodes and --min-nodes must be at least 1")
    if opts.gpus < 0:
        raise LaunchError(f"--gpus must be 0 (CPU) or more, got {opts.gpus}")
    for flag, value in (("--name", opts.name or cfg.name), ("--namespace", opts.namespace)):
        if value is not None and not _valid_label(value, _DNS_LABEL[flag]):
            raise LaunchError(f"{flag} '{value}' is not a valid Kubernetes name: at most {_DNS_LABEL[flag]} "
                              "lower-case letters, digits and '-', starting with a letter and ending with a "
                              "letter or digit")
    if opts.min_nodes > max_nodes:
        raise LaunchError(f"--min-nodes ({opts.min_nodes}) is greater than --max-nodes ({max_nodes})")
    if not opts.min_nodes <= opts.nodes <= max_nodes:
        raise LaunchError(f"--nodes ({opts.nodes}) must lie between --min-nodes ({opts.min_nodes}) and "
                          f"--max-nodes ({max_nodes})")
    procs = max(opts.gpus, 1)
    world_sizes = [n * procs for n in range(opts.min_nodes, max_nodes + 1)]
    user_overrides, note = fit_micro_batch(cfg, opts.overrides, world_sizes, what=f"with --gpus {opts.gpus}: ")
    if note:
        print(note, file=sys.stderr)
    image = opts.image or cfg.launch.image
    check_image(image)
    job = opts.name or cfg.name
    if opts.prepare_cpus < 1:
        raise LaunchError(f"--prepare-cpus must be at least 1, got {opts.prepare_cpus}")
    placed = storage_overrides(opts, job)
    # a trainer started before the preparation has finished waits for its manifest
    overrides = [*placed, f"data.wait_for_data_s={WAIT_FOR_DATA_S}", *user_overrides]
    command = torchrun_command(opts.config, overrides, nproc_per_node=None)

    env = [{"name": k, "value": v} for k, v in TRAINER_ENV.items()]
    env.append({"name": "GPT2_CACHE_DIR", "value": f"{RUNS_MOUNT}/.cache"})
    resources: dict[str, Any] = {"limits": {"nvidia.com/gpu": str(opts.gpus)}} if opts.gpus else {}
    container = {
        "name": "pytorch",  # the operator requires this name
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "workingDir": WORKDIR,
        # torchrun takes --nnodes, --nproc-per-node, --rdzv-* and --max-restarts from the PET_*
        # variables the operator sets from elasticPolicy and nprocPerNode
        "command": command[:1],
        "args": command[1:],
        "env": env,
        "envFrom": [{"secretRef": {"name": S3_SECRET, "optional": True}}],
        "ports": [{"name": "c10d", "containerPort": RDZV_PORT}],
        "resources": resources,
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "runs", "mountPath": RUNS_MOUNT}],
    }
    pod_spec = {
        "terminationGracePeriodSeconds": GRACE_SECONDS,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}},
            {"name": "runs", "persistentVolumeClaim": {"claimName": PVC_NAME}},
        ],
    }
    pytorchjob = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _meta(job, opts),
        "spec": {
            "elasticPolicy": {"rdzvBackend": "c10d", "minReplicas": opts.min_nodes, "maxReplicas": max_nodes,
                              "maxRestarts": cfg.launch.max_restarts},
            "nprocPerNode": str(procs),
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": cfg.launch.max_requeues},
            "pytorchReplicaSpecs": {
                "Worker": {
                    "replicas": opts.nodes,
                    # 128-255 (signals, our preemption code 200) restart the pod, which resumes from the
                    # newest checkpoint; 1-127 (config or data errors) fail the job instead of looping
                    "restartPolicy": "ExitCode",
                    "template": {"metadata": {"labels": {"app.kubernetes.io/part-of": "gpt2"}}, "spec": pod_spec},
                }
            },
        },
    }
    pvc_spec: dict[str, Any] = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": opts.pvc_size}}}
    if opts.storage_class:
        pvc_spec["storageClassName"] = opts.storage_class
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _meta(PVC_NAME, opts), "spec": pvc_spec}
    tb_labels = {"app.kubernetes.io/name": TENSORBOARD}
    tb_deploy = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(TENSORBOARD, opts, **tb_labels),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": tb_labels},
            "template": {
                "metadata": {"labels": tb_labels},
                "spec": {
                    "securityContext": pod_spec["securityContext"],
                    "containers": [{
                        "name": "tensorboard",
                        "image": image,
                        "command": ["tensorboard", "--logdir", RUNS_MOUNT, "--host", "0.0.0.0", "--port", "6006"],
                        "ports": [{"name": "http", "containerPort": 6006}],
                        "securityContext": container["securityContext"],
                        "volumeMounts": [{"name": "runs", "mountPath": RUNS_MOUNT, "readOnly": True}],
                    }],
                    "volumes": [{"name": "runs", "persistentVolumeClaim": {"claimName": PVC_NAME, "readOnly": True}}],
                },
            },
        },
    }
    tb_service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(TENSORBOARD, opts, **tb_labels),
        "spec": {"selector": tb_labels, "ports": [{"name": "http", "port": 6006, "targetPort": "http"}]},
    }
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(S3_SECRET, opts),
        "type": "Opaque",
        "stringData": {"AWS_ACCESS_KEY_ID": "REPLACE_ME", "AWS_SECRET_ACCESS_KEY": "REPLACE_ME",
                       "AWS_ENDPOINT_URL": "https://s3.REGION.amazonaws.com", "AWS_DEFAULT_REGION": "REGION"},
    }
    prepare_labels = {"app.kubernetes.io/part-of": "gpt2", "app.kubernetes.io/name": f"{job}-prepare"}
    prepare_job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(f"{job}-prepare", opts, **{"app.kubernetes.io/name": f"{job}-prepare"}),
        "spec": {
            # a failed or evicted pod is retried; the preparation resumes after its last finished shard
            "backoffLimit": 10,
            "template": {
                "metadata": {"labels": prepare_labels},
                "spec": {
                    "restartPolicy": "OnFailure",
                    "securityContext": pod_spec["securityContext"],
                    "containers": [{
                        "name": "prepare",
                        "image": image,
                        "imagePullPolicy": "IfNotPresent",
                        "workingDir": WORKDIR,
                        # the image's entrypoint: `prepare ARGS` runs python -m gpt2.prepare ARGS
                        "args": ["prepare", opts.config, *[o for o in placed if o.startswith("data.")],
                                 *opts.overrides, f"data.workers={opts.prepare_cpus}"],
                        "env": [*env, {"name": "HF_HOME", "value": f"{RUNS_MOUNT}/.cache/huggingface"}],
                        "envFrom": container["envFrom"],
                        "resources": {"requests": {"cpu": str(opts.prepare_cpus), "memory": "32Gi"}},
                        "securityContext": container["securityContext"],
                        "volumeMounts": [{"name": "runs", "mountPath": RUNS_MOUNT}],
                    }],
                    "volumes": [{"name": "runs", "persistentVolumeClaim": {"claimName": PVC_NAME}}],
                },
            },
        },
    }
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": ["pvc.yaml", "tensorboard.yaml", "prepare-job.yaml", "pytorchjob.yaml"],
    }
    return {
        "pvc.yaml": [pvc],
        "tensorboard.yaml": [tb_deploy, tb_service],
        "prepare-job.yaml": [prepare_job],
        "pytorchjob.yaml": [pytorchjob],
        "s3-secret.example.yaml": [secret],
        "kustomization.yaml": [kustomization],
    }


HEADER = "# Generated by `python launch/k8s.py render --out k8s/`; edit the renderer, not this file.\n"


def to_yaml(docs: list[dict[str, Any]]) -> str:
    return HEADER + "---\n".join(yaml.safe_dump(d, sort_keys=False, width=120) for d in docs)


def write(manifests: dict[str, list[dict[str, Any]]], out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise LaunchError(f"--out {out} is a file; give a directory for the manifests")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LaunchError(f"--out {out} cannot be created: {err}") from None
    for name, docs in manifests.items():
        (out / name).write_text(to_yaml(docs))
