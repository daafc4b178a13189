"""Kubernetes manifests rendered from the trainer config: an elastic Kubeflow PyTorchJob, its PVC,
TensorBoard, an example S3 secret and a kustomization. Plain data; no API server involved
(`gpt2.launch.k8s` talks to one).

Targets the Kubeflow Training Operator v1.9.x (`kubeflow.org/v1` PyTorchJob, elastic via c10d).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpt2.launch.common import (
    RDZV_PORT,
    SAVE_ON_STOP_S,
    TRAINER_ENV,
    LaunchError,
    check_image,
    fit_micro_batch,
    load_trainer_config,
    torchrun_command,
)

log = logging.getLogger(__name__)

WORKDIR = "/workspace"
RUNS_MOUNT = f"{WORKDIR}/runs"
PVC_NAME = "gpt2-runs"
S3_SECRET = "gpt2-s3"
TENSORBOARD = "gpt2-tensorboard"
JOB_LABEL = "training.kubeflow.org/job-name"
RDZV_PORT_NAME = "pytorchjob-port"  # the Training Operator's PytorchJobDefaultPortName
# torchrun gives workers SAVE_ON_STOP_S after forwarding SIGTERM; the pod's grace period must exceed it.
GRACE_SECONDS = SAVE_ON_STOP_S + 20
# The trainers wait this long for the preparation Job's manifest (`kubectl apply -k` starts both).
WAIT_FOR_DATA_S = 24 * 3600
# a Kubernetes resource quantity: 2, 500m, 1.5, 32Gi, 256M
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
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
    prepare_memory: str = "32Gi"
    worker_cpus: str | None = None  # each training pod's requests; none: what the node gives
    worker_memory: str | None = None
    tensorboard_cpus: str = "500m"
    tensorboard_memory: str = "2Gi"
    shm_size: str = "64Gi"  # /dev/shm of a training pod (a memory volume: the data loader's workers)
    name: str | None = None
    namespace: str | None = None
    overrides: list[str] = field(default_factory=list)


def _requests(cpu: str | int | None, memory: str | None) -> dict[str, str]:
    return {k: str(v) for k, v in (("cpu", cpu), ("memory", memory)) if v is not None}


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


POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
S3_ENV_FROM = [{"secretRef": {"name": S3_SECRET, "optional": True}}]


@dataclass
class Shared:
    """What the manifests of one job have in common, resolved once from the options and the config."""

    opts: Options
    job: str
    image: str
    procs: int
    max_nodes: int
    max_restarts: int
    max_requeues: int
    placed: list[str]  # where data, checkpoints and TensorBoard live inside the pods
    train_overrides: list[str]  # the user's, with the micro-batch fitted to every world size

    @property
    def env(self) -> list[dict[str, Any]]:
        return [*({"name": k, "value": v} for k, v in TRAINER_ENV.items()),
                {"name": "GPT2_CACHE_DIR", "value": f"{RUNS_MOUNT}/.cache"},
                # the run's lease: the job's identity (its name in its namespace), so a restarted pod
                # of this job waits for its predecessor instead of being refused as a second job
                {"name": "GPT2_JOB_ID", "value": self.job},
                {"name": "GPT2_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]

    def runs_volume(self) -> dict[str, Any]:
        # never readOnly here, even for TensorBoard (its volumeMount is read-only): a volume plugin
        # that applies fsGroup only at the first mount (the local one) skips it for a read-only
        # first mount, and every later writer then finds the volume not writable by uid 1000
        return {"name": "runs", "persistentVolumeClaim": {"claimName": PVC_NAME}}


def check_options(opts: Options, job: str) -> int:
    """The launcher's flags (LaunchError on bad input); returns the maximum number of nodes."""
    max_nodes = opts.max_nodes if opts.max_nodes is not None else opts.nodes
    if opts.min_nodes < 1 or opts.nodes < 1:
        raise LaunchError("--nodes and --min-nodes must be at least 1")
    if opts.gpus < 0:
        raise LaunchError(f"--gpus must be 0 (CPU) or more, got {opts.gpus}")
    for flag, value in (("--name", job), ("--namespace", opts.namespace)):
        if value is not None and not _valid_label(value, _DNS_LABEL[flag]):
            raise LaunchError(f"{flag} '{value}' is not a valid Kubernetes name: at most {_DNS_LABEL[flag]} "
                              "lower-case letters, digits and '-', starting with a letter and ending with a "
                              "letter or digit")
    if opts.min_nodes > max_nodes:
        raise LaunchError(f"--min-nodes ({opts.min_nodes}) is greater than --max-nodes ({max_nodes})")
    if not opts.min_nodes <= opts.nodes <= max_nodes:
        raise LaunchError(f"--nodes ({opts.nodes}) must lie between --min-nodes ({opts.min_nodes}) and "
                          f"--max-nodes ({max_nodes})")
    if opts.prepare_cpus < 1:
        raise LaunchError(f"--prepare-cpus must be at least 1, got {opts.prepare_cpus}")
    for flag, value in (("--prepare-memory", opts.prepare_memory), ("--worker-cpus", opts.worker_cpus),
                        ("--worker-memory", opts.worker_memory), ("--tensorboard-cpus", opts.tensorboard_cpus),
                        ("--tensorboard-memory", opts.tensorboard_memory), ("--shm-size", opts.shm_size)):
        if value is not None and not _QUANTITY.match(value):
            raise LaunchError(f"{flag} '{value}' is not a Kubernetes quantity: a number with an optional unit, "
                              "e.g. 2, 500m (CPUs) or 512Mi, 32Gi (memory)")
    return max_nodes


def resolve(opts: Options) -> Shared:
    """Check the options and the config (loaded once) and resolve what the manifests share."""
    cfg = load_trainer_config(opts.config, opts.overrides)
    job = opts.name or cfg.name
    max_nodes = check_options(opts, job)
    procs = max(opts.gpus, 1)
    world_sizes = [n * procs for n in range(opts.min_nodes, max_nodes + 1)]
    train_overrides, note = fit_micro_batch(cfg, opts.overrides, world_sizes, what=f"with --gpus {opts.gpus}: ")
    if note:
        log.warning(note)
    image = opts.image or cfg.launch.image
    check_image(image)
    return Shared(opts=opts, job=job, image=image, procs=procs, max_nodes=max_nodes,
                  max_restarts=cfg.launch.max_restarts, max_requeues=cfg.launch.max_requeues,
                  placed=storage_overrides(opts, job), train_overrides=train_overrides)


def render(opts: Options) -> dict[str, list[dict[str, Any]]]:
    """The manifests, by file name. Raises LaunchError on bad input."""
    shared = resolve(opts)
    return {
        "pvc.yaml": [pvc(shared)],
        "tensorboard.yaml": tensorboard(shared),
        "prepare-job.yaml": [prepare_job(shared)],
        "pytorchjob.yaml": [pytorchjob(shared)],
        "s3-secret.example.yaml": [s3_secret(opts)],
        "kustomization.yaml": [kustomization()],
    }


def pytorchjob(s: Shared) -> dict[str, Any]:
    """The elastic PyTorchJob: `--nodes` Worker pods (between min and max), torchrun in each."""
    # a trainer started before the preparation has finished waits for its manifest
    overrides = [*s.placed, f"data.wait_for_data_s={WAIT_FOR_DATA_S}", *s.train_overrides]
    # --nproc-per-node explicitly: in elastic mode the operator sets PET_NPROC_PER_NODE only from the
    # deprecated elasticPolicy.nProcPerNode, not from spec.nprocPerNode
    command = torchrun_command(s.opts.config, overrides, nproc_per_node=s.procs)
    container = {
        "name": "pytorch",  # the operator requires this name
        "image": s.image,
        "imagePullPolicy": "IfNotPresent",
        "workingDir": WORKDIR,
        # the image's entrypoint runs `torchrun ARGS` as gpt2.launch.torchrun, which exits 200 when
        # the kubelet stops the pod (torchrun alone exits 1, which restartPolicy ExitCode takes as a
        # permanent failure). torchrun takes --nnodes, --rdzv-* and --max-restarts from the PET_*
        # variables the operator sets from elasticPolicy.
        "args": command,
        "env": s.env,
        "envFrom": S3_ENV_FROM,
        # the operator takes the rendezvous port (PET_RDZV_ENDPOINT) from the port of this name
        "ports": [{"name": RDZV_PORT_NAME, "containerPort": RDZV_PORT}],
        "resources": worker_resources(s.opts),
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "runs", "mountPath": RUNS_MOUNT}],
    }
    pod_spec = {
        "terminationGracePeriodSeconds": GRACE_SECONDS,
        "securityContext": POD_SECURITY,
        "containers": [container],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": s.opts.shm_size}},
                    s.runs_volume()],
    }
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _meta(s.job, s.opts),
        "spec": {
            "elasticPolicy": {"rdzvBackend": "c10d", "minReplicas": s.opts.min_nodes, "maxReplicas": s.max_nodes,
                              "maxRestarts": s.max_restarts},
            "nprocPerNode": str(s.procs),
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": s.max_requeues},
            "pytorchReplicaSpecs": {
                "Worker": {
                    "replicas": s.opts.nodes,
                    # 128-255 (signals, our codes 200 preempted, 201 hung, 202 storage unreachable) restart
                    # the pod, which resumes from the newest checkpoint; 1-127 (config or data errors) fail
                    # the job instead of looping
                    "restartPolicy": "ExitCode",
                    "template": {"metadata": {"labels": {"app.kubernetes.io/part-of": "gpt2"}}, "spec": pod_spec},
                }
            },
        },
    }


def worker_resources(opts: Options) -> dict[str, Any]:
    """A training pod's resources: the GPUs as a limit (none on CPU), CPU and memory as requests if given."""
    resources: dict[str, Any] = {}
    if opts.gpus:
        resources["limits"] = {"nvidia.com/gpu": str(opts.gpus)}
    if requests := _requests(opts.worker_cpus, opts.worker_memory):
        resources["requests"] = requests
    return resources


def pvc(s: Shared) -> dict[str, Any]:
    """The shared volume for data, checkpoints and TensorBoard (ReadWriteMany: every pod mounts it)."""
    spec: dict[str, Any] = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": s.opts.pvc_size}}}
    if s.opts.storage_class:
        spec["storageClassName"] = s.opts.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _meta(PVC_NAME, s.opts), "spec": spec}


def tensorboard(s: Shared) -> list[dict[str, Any]]:
    """A TensorBoard Deployment over the volume, read-only, and its Service."""
    labels = {"app.kubernetes.io/name": TENSORBOARD}
    container = {
        "name": "tensorboard",
        "image": s.image,
        "command": ["tensorboard", "--logdir", RUNS_MOUNT, "--host", "0.0.0.0", "--port", "6006"],
        "ports": [{"name": "http", "containerPort": 6006}],
        "resources": {"requests": _requests(s.opts.tensorboard_cpus, s.opts.tensorboard_memory)},
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [{"name": "runs", "mountPath": RUNS_MOUNT, "readOnly": True}],
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(TENSORBOARD, s.opts, **labels),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {
                "securityContext": POD_SECURITY, "containers": [container],
                "volumes": [s.runs_volume()]}},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(TENSORBOARD, s.opts, **labels),
        "spec": {"selector": labels, "ports": [{"name": "http", "port": 6006, "targetPort": "http"}]},
    }
    return [deployment, service]


def prepare_job(s: Shared) -> dict[str, Any]:
    """The data preparation as a batch Job on CPUs, writing the shards onto the volume."""
    name = f"{s.job}-prepare"
    container = {
        "name": "prepare",
        "image": s.image,
        "imagePullPolicy": "IfNotPresent",
        "workingDir": WORKDIR,
        # the image's entrypoint: `prepare ARGS` runs python -m gpt2.prepare ARGS
        "args": ["prepare", s.opts.config, *[o for o in s.placed if o.startswith("data.")],
                 *s.opts.overrides, f"data.workers={s.opts.prepare_cpus}"],
        "env": [*s.env, {"name": "HF_HOME", "value": f"{RUNS_MOUNT}/.cache/huggingface"}],
        "envFrom": S3_ENV_FROM,
        "resources": {"requests": _requests(s.opts.prepare_cpus, s.opts.prepare_memory)},
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [{"name": "runs", "mountPath": RUNS_MOUNT}],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(name, s.opts, **{"app.kubernetes.io/name": name}),
        "spec": {
            # a failed or evicted pod is retried; the preparation resumes after its last finished shard
            "backoffLimit": 10,
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/part-of": "gpt2", "app.kubernetes.io/name": name}},
                "spec": {"restartPolicy": "OnFailure", "securityContext": POD_SECURITY, "containers": [container],
                         "volumes": [s.runs_volume()]},
            },
        },
    }


def s3_secret(opts: Options) -> dict[str, Any]:
    """An example Secret for object storage; the pods read it as environment variables."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(S3_SECRET, opts),
        "type": "Opaque",
        "stringData": {"AWS_ACCESS_KEY_ID": "REPLACE_ME", "AWS_SECRET_ACCESS_KEY": "REPLACE_ME",
                       "AWS_ENDPOINT_URL": "https://s3.REGION.amazonaws.com", "AWS_DEFAULT_REGION": "REGION"},
    }


def kustomization() -> dict[str, Any]:
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": ["pvc.yaml", "tensorboard.yaml", "prepare-job.yaml", "pytorchjob.yaml"],
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
