"""Offline validation of manifests the way an API server with strict field validation would.

PyTorchJobs are checked against the openAPIV3Schema of the real Kubeflow CRD, core objects
against the Kubernetes OpenAPI (swagger) definitions; in both, unknown fields are errors.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path

import jsonschema
import yaml

INT_OR_STRING = {"anyOf": [{"type": "integer"}, {"type": "string"}]}


def _strict(schema):
    """Reject unknown fields: objects with listed properties get additionalProperties: false."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if schema.get("x-kubernetes-int-or-string"):
            schema.pop("type", None)
            schema.update(INT_OR_STRING)
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    return schema


@cache
def crd_schema(crd_path: str) -> dict:
    crd = yaml.safe_load(Path(crd_path).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    schema["properties"]["metadata"] = {"type": "object"}  # checked against ObjectMeta separately
    return schema


@cache
def swagger_definitions(swagger_path: str) -> dict:
    defs = json.loads(Path(swagger_path).read_text())["definitions"]
    defs = _strict(defs)
    # quantities and int-or-string are strings or integers on the wire
    defs["io.k8s.apimachinery.pkg.api.resource.Quantity"] = INT_OR_STRING
    defs["io.k8s.apimachinery.pkg.util.intstr.IntOrString"] = INT_OR_STRING
    return defs


KIND_DEFINITIONS = {
    ("v1", "PersistentVolumeClaim"): "io.k8s.api.core.v1.PersistentVolumeClaim",
    ("v1", "Service"): "io.k8s.api.core.v1.Service",
    ("v1", "Secret"): "io.k8s.api.core.v1.Secret",
    ("apps/v1", "Deployment"): "io.k8s.api.apps.v1.Deployment",
    ("batch/v1", "Job"): "io.k8s.api.batch.v1.Job",
}


def validate_core(obj: dict, swagger_path: str, definition: str | None = None) -> list[str]:
    defs = swagger_definitions(swagger_path)
    definition = definition or KIND_DEFINITIONS[(obj["apiVersion"], obj["kind"])]
    schema = {"$ref": f"#/definitions/{definition}", "definitions": defs}
    validator = jsonschema.Draft4Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def validate_pytorchjob(obj: dict, crd_path: str, swagger_path: str) -> list[str]:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(crd_schema(crd_path)).iter_errors(obj)]
    errors += validate_core(obj["metadata"], swagger_path, "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")
    for name, spec in obj.get("spec", {}).get("pytorchReplicaSpecs", {}).items():
        errors += [f"{name}: {e}" for e in validate_core(spec.get("template", {}), swagger_path,
                                                         "io.k8s.api.core.v1.PodTemplateSpec")]
    return errors + webhook_errors(obj)


def webhook_errors(obj: dict) -> list[str]:
    """The rules the Kubeflow training-operator webhook enforces beyond the schema."""
    spec = obj.get("spec", {})
    replicas = spec.get("pytorchReplicaSpecs", {})
    errors = []
    for rtype in replicas:
        if rtype not in ("Master", "Worker"):
            errors.append(f"replica type {rtype} is not Master or Worker")
    if spec.get("elasticPolicy") is not None and "Worker" not in replicas:
        errors.append("elasticPolicy needs a Worker replica spec")
    if "Master" in replicas and replicas["Master"].get("replicas", 1) != 1:
        errors.append("the Master replica spec must have exactly 1 replica")
    for rtype, rspec in replicas.items():
        containers = rspec.get("template", {}).get("spec", {}).get("containers", [])
        if not any(c.get("name") == "pytorch" for c in containers):
            errors.append(f"{rtype}: no container is named 'pytorch'")
        if any(not c.get("image") for c in containers):
            errors.append(f"{rtype}: a container has no image")
    if not spec.get("nprocPerNode"):
        errors.append("nprocPerNode is not set")
    return errors
