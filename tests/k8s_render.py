"""Render and validate the k8s/ kustomizations offline (used by tests/test_k8s_manifests.py).

``render(dir)`` runs ``kubectl kustomize`` (or ``kustomize build``) when either is on PATH, and
otherwise a small Python renderer for exactly the kustomize features k8s/ uses: ``resources``
(files and directories), ``namespace``, and ``patches`` that are either JSON 6902 operations
(add / replace / remove) on a ``target`` kind+name or a strategic-merge ``$patch: delete`` of a
whole object. Anything else in a kustomization makes the Python renderer raise, so a new feature
fails loudly instead of rendering wrongly; the tests compare both renderers where kubectl exists.

``validate(obj)`` checks built-in kinds against the Kubernetes OpenAPI schemas bundled with
kubernetes-validate (strict: unknown fields are errors) and LeaderWorkerSets against
``LWS_SCHEMA`` plus each of their pod templates against the core PodTemplateSpec schema.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

K8S_VERSION = "1.32"  # the oldest Kubernetes these manifests target (native gRPC probes: 1.27)
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "namespace", "patches"}
CLUSTER_SCOPED = {"Namespace"}

Obj = dict[str, Any]


def load_all(text: str) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render(directory: Path) -> list[Obj]:
    """The objects ``kubectl apply -k directory`` would send."""
    if shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(directory)]
    elif shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(directory)]
    else:
        return render_py(directory)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return load_all(out.stdout)


def render_py(directory: Path) -> list[Obj]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED_KEYS
    if unknown:
        raise NotImplementedError(
            f"{directory}/kustomization.yaml uses {sorted(unknown)}: extend tests/k8s_render.py "
            "(or render with kubectl kustomize)"
        )
    objects: list[Obj] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_dir():
            objects.extend(render_py(path))
        else:
            objects.extend(load_all(path.read_text()))
    for patch in kustomization.get("patches", []):
        objects = _apply_patch(objects, patch, directory)
    namespace = kustomization.get("namespace")
    if namespace:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = namespace
    return objects


def _apply_patch(objects: list[Obj], patch: Obj, directory: Path) -> list[Obj]:
    if set(patch) - {"patch", "target"} or "patch" not in patch:
        raise NotImplementedError(f"{directory}: only inline patches are supported: {patch}")
    body = yaml.safe_load(patch["patch"])
    if isinstance(body, dict):
        if body.get("$patch") != "delete":
            raise NotImplementedError(f"{directory}: strategic-merge patches other than delete")
        kept = [o for o in objects if not _same(o, body["kind"], body["metadata"]["name"])]
        if len(kept) != len(objects) - 1:
            raise ValueError(f"{directory}: delete patch matched {len(objects) - len(kept)}")
        return kept
    target = patch.get("target") or {}
    if set(target) - {"kind", "name"}:
        raise NotImplementedError(f"{directory}: patch targets by kind and name only: {target}")
    matched = [o for o in objects if _same(o, target.get("kind"), target.get("name"))]
    if not matched:
        raise ValueError(f"{directory}: patch target {target} matches nothing")
    for obj in matched:
        for op in body:
            json_patch(obj, op)
    return objects


def _same(obj: Obj, kind: str | None, name: str | None) -> bool:
    return (kind is None or obj["kind"] == kind) and (
        name is None or obj["metadata"]["name"] == name
    )


def json_patch(doc: Obj, op: Obj) -> None:
    """One RFC 6902 add / replace / remove, in place."""
    tokens = [t.replace("~1", "/").replace("~0", "~") for t in op["path"].split("/")[1:]]
    parent: Any = doc
    for token in tokens[:-1]:
        parent = parent[int(token)] if isinstance(parent, list) else parent[token]
    last = tokens[-1]
    kind = op["op"]
    value = copy.deepcopy(op.get("value"))
    if isinstance(parent, list):
        if kind == "add":
            parent.insert(len(parent) if last == "-" else int(last), value)
        elif kind == "replace":
            parent[int(last)] = value
        elif kind == "remove":
            del parent[int(last)]
        else:
            raise NotImplementedError(f"JSON patch op {kind!r}")
        return
    if kind == "add":
        parent[last] = value
    elif kind == "replace":
        if last not in parent:
            raise KeyError(f"replace of missing {op['path']}")
        parent[last] = value
    elif kind == "remove":
        del parent[last]
    else:
        raise NotImplementedError(f"JSON patch op {kind!r}")


# ---- validation ---------------------------------------------------------------------------------

_INT_OR_STRING = {"anyOf": [{"type": "integer"}, {"type": "string"}]}

# LeaderWorkerSet (leaderworkerset.x-k8s.io/v1) as in kubernetes-sigs/lws
# api/leaderworkerset/v1/leaderworkerset_types.go and its generated CRD: every spec field, closed
# (unknown fields are errors, like a structural CRD prunes/rejects them), enums as in the
# kubebuilder markers. The pod templates are validated separately against the core schema.
LWS_SCHEMA: Obj = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "leaderworkerset.x-k8s.io/v1"},
        "kind": {"const": "LeaderWorkerSet"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "additionalProperties": False,
        },
        "spec": {
            "type": "object",
            "required": ["leaderWorkerTemplate"],
            "additionalProperties": False,
            "properties": {
                "replicas": {"type": "integer", "minimum": 0},
                "startupPolicy": {"enum": ["LeaderCreated", "LeaderReady"]},
                "networkConfig": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"subdomainPolicy": {"enum": ["Shared", "UniquePerReplica"]}},
                },
                "rolloutStrategy": {
                    "type": "object",
                    "required": ["type"],
                    "additionalProperties": False,
                    "properties": {
                        "type": {"enum": ["RollingUpdate"]},
                        "rollingUpdateConfiguration": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "partition": {"type": "integer", "minimum": 0},
                                "maxUnavailable": _INT_OR_STRING,
                                "maxSurge": _INT_OR_STRING,
                            },
                        },
                    },
                },
                "leaderWorkerTemplate": {
                    "type": "object",
                    "required": ["workerTemplate"],
                    "additionalProperties": False,
                    "properties": {
                        "leaderTemplate": {"type": "object"},
                        "workerTemplate": {"type": "object"},
                        "size": {"type": "integer", "minimum": 1},
                        "restartPolicy": {
                            "enum": [
                                "Default",
                                "RecreateGroupOnPodRestart",
                                "RecreateGroupAfterStart",
                                "None",
                            ]
                        },
                        "subGroupPolicy": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "subGroupPolicyType": {"enum": ["LeaderWorker", "LeaderExcluded"]},
                                "subGroupSize": {"type": "integer", "minimum": 1},
                            },
                        },
                        "volumeClaimTemplates": {"type": "array", "items": {"type": "object"}},
                        "persistentVolumeClaimRetentionPolicy": {"type": "object"},
                    },
                },
            },
        },
    },
}


def validate(obj: Obj) -> None:
    """Raises jsonschema.ValidationError (or SchemaNotFoundError for an unknown kind)."""
    if obj.get("apiVersion", "").startswith("leaderworkerset.x-k8s.io/"):
        jsonschema.Draft202012Validator(LWS_SCHEMA).validate(obj)
        lwt = obj["spec"]["leaderWorkerTemplate"]
        for key in ("leaderTemplate", "workerTemplate"):
            if key in lwt:
                validate_pod_template(lwt[key], f"{obj['metadata']['name']}-{key.lower()}")
        return
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def validate_pod_template(template: Obj, name: str) -> None:
    """A PodTemplateSpec checked through the core v1 PodTemplate schema (strict)."""
    wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}}
    wrapper["template"] = template
    kubernetes_validate.validate(wrapper, K8S_VERSION, strict=True)
