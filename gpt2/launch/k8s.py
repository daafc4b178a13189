"""Kubernetes: render an elastic Kubeflow PyTorchJob (+ PVC, TensorBoard) from the trainer config.

    python launch/k8s.py create [--nodes 2 --gpus 8 --image IMG:TAG ...] [--dry-run] [--follow] [key=value ...]
    python launch/k8s.py delete [--name NAME] [--namespace NS]
    python launch/k8s.py render --out k8s/          # regenerates the checked-in manifests

Targets the Kubeflow Training Operator v1.9.x (`kubeflow.org/v1` PyTorchJob, elastic via c10d).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpt2.launch.common import (
    RDZV_PORT,
    TRAINER_ENV,
    LaunchError,
    check_image,
    check_world,
    fit_micro_batch,
    load_trainer_config,
    split_overrides,
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


@dataclass
class Options:
    config: str = "configs/gpt2-124m.yaml"
    nodes: int = 2
    min_nodes: int = 1
    max_nodes: int | None = None
    gpus: int = 8
    image: str = "ghcr.io/gpt2-cluster/gpt2:0.1.0"
    storage: str = "pvc"  # "pvc", or an s3:// URL for data and checkpoints (TensorBoard stays on the PVC)
    pvc_size: str = "500Gi"
    storage_class: str | None = None
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
    if opts.min_nodes > max_nodes:
        raise LaunchError(f"--min-nodes ({opts.min_nodes}) is greater than --max-nodes ({max_nodes})")
    if not opts.min_nodes <= opts.nodes <= max_nodes:
        raise LaunchError(f"--nodes ({opts.nodes}) must lie between --min-nodes ({opts.min_nodes}) and "
                          f"--max-nodes ({max_nodes})")
    procs = max(opts.gpus, 1)
    world_sizes = [n * procs for n in range(opts.min_nodes, max_nodes + 1)]
    user_overrides = fit_micro_batch(cfg, opts.overrides, world_sizes)
    for n in range(opts.min_nodes, max_nodes + 1):
        check_world(cfg, n, procs, what=f"with --gpus {opts.gpus}: ")
    check_image(opts.image)
    job = opts.name or cfg.name
    overrides = storage_overrides(opts, job) + user_overrides
    command = torchrun_command(opts.config, overrides, nproc_per_node=None)

    env = [{"name": k, "value": v} for k, v in TRAINER_ENV.items()]
    env.append({"name": "GPT2_CACHE_DIR", "value": f"{RUNS_MOUNT}/.cache"})
    resources: dict[str, Any] = {"limits": {"nvidia.com/gpu": str(opts.gpus)}} if opts.gpus else {}
    container = {
        "name": "pytorch",  # the operator requires this name
        "image": opts.image,
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
                        "image": opts.image,
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
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": ["pvc.yaml", "tensorboard.yaml", "pytorchjob.yaml"],
    }
    return {
        "pvc.yaml": [pvc],
        "tensorboard.yaml": [tb_deploy, tb_service],
        "pytorchjob.yaml": [pytorchjob],
        "s3-secret.example.yaml": [secret],
        "kustomization.yaml": [kustomization],
    }


HEADER = "# Generated by `python launch/k8s.py render --out k8s/`; edit the renderer, not this file.\n"


def to_yaml(docs: list[dict[str, Any]]) -> str:
    return HEADER + "---\n".join(yaml.safe_dump(d, sort_keys=False, width=120) for d in docs)


def write(manifests: dict[str, list[dict[str, Any]]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, docs in manifests.items():
        (out / name).write_text(to_yaml(docs))


# ---- talking to the API server --------------------------------------------------------------------


def api_client(kubeconfig: str | None = None):
    """A kubernetes ApiClient from the kubeconfig (or in-cluster config); LaunchError if there is none."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        config.load_kube_config(config_file=kubeconfig)
    except (ConfigException, FileNotFoundError, TypeError) as err:
        try:
            config.load_incluster_config()
        except ConfigException:
            raise LaunchError(
                f"no Kubernetes configuration found ({err}); set KUBECONFIG or pass --kubeconfig, "
                "or use --dry-run to print the manifests"
            ) from None
    return client.ApiClient()


def _api_message(err: Exception) -> str:
    import json

    body = getattr(err, "body", None)
    try:
        message = json.loads(body)["message"] if body else str(err)
    except (ValueError, KeyError, TypeError):
        message = str(body or err)
    return f"{getattr(err, 'status', '?')} {getattr(err, 'reason', '')}: {message}"


def _creators(api) -> dict[str, tuple[Any, Any]]:
    """(create, delete) per kind. Responses are not deserialized: we only need success or an error."""
    from kubernetes import client

    core, apps, custom = client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)
    raw = {"_preload_content": False}
    job_api = ("kubeflow.org", "v1")
    return {
        "PersistentVolumeClaim": (
            lambda ns, body: core.create_namespaced_persistent_volume_claim(ns, body, **raw),
            lambda ns, name: core.delete_namespaced_persistent_volume_claim(name, ns, **raw)),
        "Deployment": (lambda ns, body: apps.create_namespaced_deployment(ns, body, **raw),
                       lambda ns, name: apps.delete_namespaced_deployment(name, ns, **raw)),
        "Service": (lambda ns, body: core.create_namespaced_service(ns, body, **raw),
                    lambda ns, name: core.delete_namespaced_service(name, ns, **raw)),
        "PyTorchJob": (
            lambda ns, body: custom.create_namespaced_custom_object(*job_api, ns, "pytorchjobs", body, **raw),
            lambda ns, name: custom.delete_namespaced_custom_object(*job_api, ns, "pytorchjobs", name, **raw)),
    }


def create(manifests: dict[str, list[dict[str, Any]]], api, namespace: str) -> list[tuple[str, str]]:
    """Create the companions, then the job. Companions that already exist are reused; if anything
    fails, what this call created is deleted again and LaunchError carries the server's message."""
    from kubernetes.client.exceptions import ApiException

    ops = _creators(api)
    order = manifests["pvc.yaml"] + manifests["tensorboard.yaml"] + manifests["pytorchjob.yaml"]
    created: list[tuple[str, str]] = []
    for obj in order:
        kind, name = obj["kind"], obj["metadata"]["name"]
        try:
            ops[kind][0](namespace, obj)
            created.append((kind, name))
            print(f"created {kind} {namespace}/{name}")
        except ApiException as err:
            if err.status == 409 and kind != "PyTorchJob":
                print(f"{kind} {namespace}/{name} already exists: reusing it")
                continue
            rolled = _rollback(created, ops, namespace)
            hint = (f"; delete it first (python launch/k8s.py delete --name {name}) or pick another --name"
                    if err.status == 409 else "")
            raise LaunchError(f"creating {kind} {namespace}/{name} failed: {_api_message(err)}{hint}"
                              f"{rolled}") from None
    return created


def _rollback(created: list[tuple[str, str]], ops, namespace: str) -> str:
    from kubernetes.client.exceptions import ApiException

    undone = []
    for kind, name in reversed(created):
        try:
            ops[kind][1](namespace, name)
            undone.append(f"{kind}/{name}")
        except ApiException as err:
            print(f"WARNING: could not roll back {kind} {namespace}/{name}: {_api_message(err)}", file=sys.stderr)
    return f" (rolled back: {', '.join(undone)})" if undone else ""


def delete(api, name: str, namespace: str, with_companions: bool) -> None:
    from kubernetes.client.exceptions import ApiException

    ops = _creators(api)
    targets = [("PyTorchJob", name)]
    if with_companions:
        targets += [("Service", TENSORBOARD), ("Deployment", TENSORBOARD)]
    for kind, obj in targets:
        try:
            ops[kind][1](namespace, obj)
            print(f"deleted {kind} {namespace}/{obj}")
        except ApiException as err:
            if err.status != 404:
                raise LaunchError(f"deleting {kind} {namespace}/{obj} failed: {_api_message(err)}") from None
            print(f"{kind} {namespace}/{obj} not found")
    print(f"the PVC {PVC_NAME} (data, checkpoints, logs) is kept; kubectl delete pvc {PVC_NAME} removes it")


def follow(api, name: str, namespace: str, poll_s: float = 10.0) -> int:
    """Print job conditions and pod phases as they change until the job succeeds (0) or fails (1)."""
    from kubernetes import client

    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    print(f"logs: kubectl logs -n {namespace} -l {JOB_LABEL}={name} -f --prefix")
    last = None
    while True:
        job = custom.get_namespaced_custom_object("kubeflow.org", "v1", namespace, "pytorchjobs", name)
        conditions = [(c["type"], c.get("status")) for c in job.get("status", {}).get("conditions", [])]
        pods = core.list_namespaced_pod(namespace, label_selector=f"{JOB_LABEL}={name}").items
        phases = sorted((p.metadata.name, p.status.phase) for p in pods)
        state = (conditions[-1:] if conditions else [], phases)
        if state != last:
            print(f"job {name}: {conditions[-1][0] if conditions else 'Pending'}; pods: "
                  + ", ".join(f"{n}={ph}" for n, ph in phases))
            last = state
        done = {t for t, s in conditions if s == "True"}
        if "Succeeded" in done:
            return 0
        if "Failed" in done:
            return 1
        time.sleep(poll_s)


# ---- command line --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python launch/k8s.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("create", "render"):
        s = sub.add_parser(name)
        s.add_argument("--config", default=Options.config)
        s.add_argument("--nodes", type=int, default=Options.nodes)
        s.add_argument("--min-nodes", type=int, default=Options.min_nodes)
        s.add_argument("--max-nodes", type=int, default=None)
        s.add_argument("--gpus", type=int, default=Options.gpus, help="GPUs (processes) per node; 0 runs on CPU")
        s.add_argument("--image", default=Options.image)
        s.add_argument("--storage", default=Options.storage, help="pvc (default) or an s3:// URL")
        s.add_argument("--pvc-size", default=Options.pvc_size)
        s.add_argument("--storage-class", default=None)
        s.add_argument("--name", default=None, help="job name (default: the config's name)")
        s.add_argument("--namespace", default=None)
        s.add_argument("overrides", nargs="*", help="trainer config overrides key=value")
        if name == "create":
            s.add_argument("--dry-run", action="store_true", help="print the manifests, create nothing")
            s.add_argument("--follow", action="store_true", help="watch the job until it succeeds or fails")
            s.add_argument("--kubeconfig", default=None)
        else:
            s.add_argument("--out", default="k8s", help="directory to write the manifests to")
    d = sub.add_parser("delete")
    d.add_argument("--name", default="gpt2-124m")
    d.add_argument("--namespace", default="default")
    d.add_argument("--keep-tensorboard", action="store_true")
    d.add_argument("--kubeconfig", default=None)
    args = p.parse_args(argv)
    try:
        if args.command == "delete":
            delete(api_client(args.kubeconfig), args.name, args.namespace, not args.keep_tensorboard)
            return 0
        opts = Options(config=args.config, nodes=args.nodes, min_nodes=args.min_nodes, max_nodes=args.max_nodes,
                       gpus=args.gpus, image=args.image, storage=args.storage, pvc_size=args.pvc_size,
                       storage_class=args.storage_class, name=args.name, namespace=args.namespace,
                       overrides=split_overrides(args.overrides))
        manifests = render(opts)
        if args.command == "render":
            write(manifests, Path(args.out))
            print(f"wrote {', '.join(manifests)} to {args.out}/")
            return 0
        if args.dry_run:
            print(to_yaml(manifests["pvc.yaml"] + manifests["tensorboard.yaml"] + manifests["pytorchjob.yaml"]))
            return 0
        namespace = args.namespace or "default"
        api = api_client(args.kubeconfig)
        create(manifests, api, namespace)
        job = manifests["pytorchjob.yaml"][0]["metadata"]["name"]
        print(f"watch: kubectl get pytorchjob -n {namespace} {job} -w | logs: kubectl logs -n {namespace} "
              f"-l {JOB_LABEL}={job} -f | TensorBoard: kubectl port-forward -n {namespace} svc/{TENSORBOARD} 6006")
        return follow(api, job, namespace) if args.follow else 0
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
