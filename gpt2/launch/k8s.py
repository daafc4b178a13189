"""Kubernetes: create, follow and delete the rendered manifests on a cluster.

    python launch/k8s.py create [--nodes 2 --gpus 8 --image IMG:TAG ...] [--prepare] [--dry-run] [--follow]
        [key=value ...]
    python launch/k8s.py delete [--name NAME] [--namespace NS]
    python launch/k8s.py render --out k8s/          # regenerates the checked-in manifests

Needs the `kubernetes` client (`pip install 'gpt2[k8s]'`) only to talk to a cluster; rendering
(`gpt2.launch.k8s_manifests`) works without it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from gpt2 import logs
from gpt2.errors import Gpt2Error, exit_code
from gpt2.launch.common import LaunchError, check_overrides, require
from gpt2.launch.k8s_manifests import JOB_LABEL, PVC_NAME, TENSORBOARD, Options, render, to_yaml, write

log = logging.getLogger("gpt2.launch.k8s")

# ---- talking to the API server --------------------------------------------------------------------


def api_client(kubeconfig: str | None = None):
    """A kubernetes ApiClient from the kubeconfig (or in-cluster config); LaunchError if there is none."""
    require("kubernetes", "k8s")
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
    batch = client.BatchV1Api(api)
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
        "Job": (lambda ns, body: batch.create_namespaced_job(ns, body, **raw),
                lambda ns, name: batch.delete_namespaced_job(name, ns, propagation_policy="Background", **raw)),
        "PyTorchJob": (
            lambda ns, body: custom.create_namespaced_custom_object(*job_api, ns, "pytorchjobs", body, **raw),
            lambda ns, name: custom.delete_namespaced_custom_object(*job_api, ns, "pytorchjobs", name, **raw)),
    }


def create(manifests: dict[str, list[dict[str, Any]]], api, namespace: str, prepare: bool = False,
           show_progress: bool = False, poll_s: float = 10.0) -> list[tuple[str, str]]:
    """Create the companions, then the job. Companions that already exist are reused; if anything
    fails, what this call created is deleted again and LaunchError carries the server's message.

    With `prepare`, the preparation Job is created with the companions, and the PyTorchJob only
    once it has succeeded (a failed preparation creates no PyTorchJob; prepared data is never rolled back).
    """
    ops = _creators(api)
    first = manifests["pvc.yaml"] + manifests["tensorboard.yaml"] + (manifests["prepare-job.yaml"] if prepare else [])
    if not prepare:
        return _create_each(first + manifests["pytorchjob.yaml"], ops, namespace)
    created = _create_each(first, ops, namespace)
    wait_for_preparation(api, manifests["prepare-job.yaml"][0]["metadata"]["name"], namespace, show_progress, poll_s)
    return created + _create_each(manifests["pytorchjob.yaml"], ops, namespace)


def _create_each(objs: list[dict[str, Any]], ops, namespace: str) -> list[tuple[str, str]]:
    from kubernetes.client.exceptions import ApiException

    created: list[tuple[str, str]] = []
    for obj in objs:
        kind, name = obj["kind"], obj["metadata"]["name"]
        try:
            ops[kind][0](namespace, obj)
            created.append((kind, name))
            log.info(f"created {kind} {namespace}/{name}")
        except ApiException as err:
            if err.status == 409 and kind not in ("PyTorchJob", "Job"):
                log.info(f"{kind} {namespace}/{name} already exists: reusing it")
                continue
            rolled = _rollback(created, ops, namespace)
            hint = (f"; delete it first (python launch/k8s.py delete --name {name}) or pick another --name"
                    if err.status == 409 else "")
            raise LaunchError(f"creating {kind} {namespace}/{name} failed: {_api_message(err)}{hint}"
                              f"{rolled}") from None
    return created


def wait_for_preparation(api, name: str, namespace: str, show_progress: bool, poll_s: float = 10.0) -> None:
    """Until the preparation Job has succeeded; LaunchError when it has failed for good."""
    import json

    from kubernetes import client

    batch = client.BatchV1Api(api)
    log.info(f"waiting for the preparation Job {namespace}/{name}; logs: kubectl logs -n {namespace} job/{name} -f")
    last = None
    while True:
        job = json.loads(batch.read_namespaced_job_status(name, namespace, _preload_content=False).data)
        status = job.get("status", {})
        failed = [c for c in status.get("conditions", []) if c.get("type") == "Failed" and c.get("status") == "True"]
        counts = (status.get("active", 0), status.get("succeeded", 0), status.get("failed", 0))
        if show_progress and counts != last:
            log.info(f"preparation {name}: active {counts[0]}, succeeded {counts[1]}, failed {counts[2]}")
            last = counts
        if counts[1]:
            log.info(f"preparation {name} succeeded")
            return
        if failed:
            raise LaunchError(f"the preparation Job {namespace}/{name} failed ({failed[0].get('reason', '')}: "
                              f"{failed[0].get('message', '')}); the PyTorchJob was not created. See "
                              f"kubectl logs -n {namespace} job/{name}; the data prepared so far is kept on the "
                              "volume and a new preparation resumes after its last shard")
        time.sleep(poll_s)


def _rollback(created: list[tuple[str, str]], ops, namespace: str) -> str:
    from kubernetes.client.exceptions import ApiException

    undone = []
    for kind, name in reversed(created):
        try:
            ops[kind][1](namespace, name)
            undone.append(f"{kind}/{name}")
        except ApiException as err:
            log.warning(f"could not roll back {kind} {namespace}/{name}: {_api_message(err)}")
    return f" (rolled back: {', '.join(undone)})" if undone else ""


def delete(api, name: str, namespace: str, with_companions: bool, with_volume: bool = False) -> None:
    """Delete the job, its preparation Job and (with_companions) TensorBoard; the PVC only with_volume."""
    from kubernetes.client.exceptions import ApiException

    ops = _creators(api)
    targets = [("PyTorchJob", name), ("Job", f"{name}-prepare")]
    if with_companions:
        targets += [("Service", TENSORBOARD), ("Deployment", TENSORBOARD)]
    if with_volume:
        targets.append(("PersistentVolumeClaim", PVC_NAME))
    for kind, obj in targets:
        try:
            ops[kind][1](namespace, obj)
            log.info(f"deleted {kind} {namespace}/{obj}")
        except ApiException as err:
            if err.status != 404:
                raise LaunchError(f"deleting {kind} {namespace}/{obj} failed: {_api_message(err)}") from None
            log.info(f"{kind} {namespace}/{obj} not found")
    if not with_volume:
        log.info(f"the PVC {PVC_NAME} (data, checkpoints, logs) is kept; --delete-volume (or kubectl delete pvc "
                 f"{PVC_NAME}) removes it")


def follow(api, name: str, namespace: str, poll_s: float = 10.0) -> int:
    """Print job conditions and pod phases as they change until the job succeeds (0) or fails (1)."""
    from kubernetes import client

    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    log.info(f"logs: kubectl logs -n {namespace} -l {JOB_LABEL}={name} -f --prefix")
    last = None
    while True:
        job = custom.get_namespaced_custom_object("kubeflow.org", "v1", namespace, "pytorchjobs", name)
        conditions = [(c["type"], c.get("status")) for c in job.get("status", {}).get("conditions", [])]
        pods = core.list_namespaced_pod(namespace, label_selector=f"{JOB_LABEL}={name}").items
        phases = sorted((p.metadata.name, p.status.phase) for p in pods)
        state = (conditions[-1:] if conditions else [], phases)
        if state != last:
            log.info(f"job {name}: {conditions[-1][0] if conditions else 'Pending'}; pods: "
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
        s.add_argument("--image", default=None, help="default: launch.image of the config")
        s.add_argument("--storage", default=Options.storage, help="pvc (default) or an s3:// URL")
        s.add_argument("--pvc-size", default=Options.pvc_size)
        s.add_argument("--storage-class", default=None)
        s.add_argument("--name", default=None, help="job name (default: the config's name)")
        s.add_argument("--namespace", default=None)
        s.add_argument("--prepare-cpus", type=int, default=Options.prepare_cpus,
                       help="CPUs of the data preparation Job (and its tokenizer workers)")
        s.add_argument("--prepare-memory", default=Options.prepare_memory, help="memory of the preparation Job")
        s.add_argument("--worker-cpus", default=None, help="CPU request of each training pod (default: none)")
        s.add_argument("--worker-memory", default=None, help="memory request of each training pod (default: none)")
        s.add_argument("--tensorboard-cpus", default=Options.tensorboard_cpus)
        s.add_argument("--tensorboard-memory", default=Options.tensorboard_memory)
        s.add_argument("--shm-size", default=Options.shm_size, help="/dev/shm (memory) of each training pod")
        s.add_argument("overrides", nargs="*", help="trainer config overrides key=value")
        if name == "create":
            s.add_argument("--prepare", action="store_true",
                           help="run the data preparation Job first; the PyTorchJob starts once it has succeeded")
            s.add_argument("--dry-run", action="store_true", help="print the manifests, create nothing")
            s.add_argument("--follow", action="store_true", help="watch the job until it succeeds or fails")
            s.add_argument("--kubeconfig", default=None)
        else:
            s.add_argument("--out", default="k8s", help="directory to write the manifests to")
    d = sub.add_parser("delete")
    d.add_argument("--name", default="gpt2-124m")
    d.add_argument("--namespace", default="default")
    d.add_argument("--keep-tensorboard", action="store_true")
    d.add_argument("--delete-volume", action="store_true",
                   help="also delete the PVC: the prepared data, every checkpoint and the logs")
    d.add_argument("--kubeconfig", default=None)
    args = p.parse_args(argv)
    logs.setup()
    try:
        if args.command == "delete":
            delete(api_client(args.kubeconfig), args.name, args.namespace, not args.keep_tensorboard,
                   with_volume=args.delete_volume)
            return 0
        opts = Options(config=args.config, nodes=args.nodes, min_nodes=args.min_nodes, max_nodes=args.max_nodes,
                       gpus=args.gpus, image=args.image, storage=args.storage, pvc_size=args.pvc_size,
                       storage_class=args.storage_class, name=args.name, namespace=args.namespace,
                       prepare_cpus=args.prepare_cpus, prepare_memory=args.prepare_memory,
                       worker_cpus=args.worker_cpus, worker_memory=args.worker_memory,
                       tensorboard_cpus=args.tensorboard_cpus, tensorboard_memory=args.tensorboard_memory,
                       shm_size=args.shm_size, overrides=check_overrides(args.overrides))
        manifests = render(opts)
        if args.command == "render":
            write(manifests, Path(args.out))
            log.info(f"wrote {', '.join(manifests)} to {args.out}/")
            return 0
        order = (manifests["pvc.yaml"] + manifests["tensorboard.yaml"]
                 + (manifests["prepare-job.yaml"] if args.prepare else []) + manifests["pytorchjob.yaml"])
        if args.dry_run:
            sys.stdout.write(to_yaml(order) + "\n")  # the manifests themselves, not a message
            return 0
        namespace = args.namespace or "default"
        api = api_client(args.kubeconfig)
        create(manifests, api, namespace, prepare=args.prepare, show_progress=args.follow)
        job = manifests["pytorchjob.yaml"][0]["metadata"]["name"]
        log.info(f"watch: kubectl get pytorchjob -n {namespace} {job} -w | logs: kubectl logs -n {namespace} "
              f"-l {JOB_LABEL}={job} -f | TensorBoard: kubectl port-forward -n {namespace} svc/{TENSORBOARD} 6006")
        return follow(api, job, namespace) if args.follow else 0
    except Gpt2Error as err:
        log.error("%s", err)
        return exit_code(err)


if __name__ == "__main__":
    sys.exit(main())
