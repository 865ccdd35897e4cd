"""k8s/, Dockerfile and .dockerignore: rendered offline, validated against the Kubernetes schemas
(strict) and the LeaderWorkerSet API, and checked for what serving Kimi K2.6 needs: 8 GPUs,
native gRPC probes on the server's numeric port with a long startup budget, the OpenAI-compatible
HTTP API on, every Service port reaching a port the server's flags open (and the NetworkPolicy
admitting it), a memory /dev/shm, a grace period longer than the drain, non-root pods, pinned
images, a download Job pinned to a commit, and server flags the real ``kimi-grpc serve`` parser
accepts."""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from k8s_render import load_all, render, render_py, validate

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
BASE = K8S / "base"
SINGLE = K8S / "overlays" / "single-node-8gpu"
MULTI = K8S / "overlays" / "multi-node-lws"
KUSTOMIZATIONS = {"base": BASE, "single-node-8gpu": SINGLE, "multi-node-lws": MULTI}

GRPC_PORT = 50051
HTTP_PORT = 8000  # the OpenAI-compatible API (--http-port)
METRICS_PORT = 9400
# Which `kimi-grpc serve` flag opens each named port, and who may reach it.
PORT_FLAGS = {"grpc": "--port", "http": "--http-port", "metrics": "--metrics-port"}
CLIENT_PORTS = {"grpc": GRPC_PORT, "http": HTTP_PORT}
GPUS_PER_POD = "8"
NON_ROOT_UID = 10001
HEALTH_SERVICES = {"", "kimi.v1.InferenceService"}  # what kimi_grpc/server/app.py sets
LWS_INJECTED = {"LWS_LEADER_ADDRESS": "kimi-grpc-0.kimi-grpc.kimi-grpc", "LWS_WORKER_INDEX": "1"}
LWS_INJECTED_ALL = {*LWS_INJECTED, "LWS_GROUP_SIZE"}
KV_BYTES_PER_TOKEN = 576 * 2 * 61  # latent 512 + rope 64, bf16, 61 layers: 70,272 B
# Kimi K2.6 INT4 (594.5 GB): split across the ranks, except ~2.5 GB every rank holds (q_a/kv_a
# projections, norms, router gates) — the memory plan's count (TP8: 76.5 GB per rank).
SHARDED_WEIGHT_BYTES, REPLICATED_WEIGHT_BYTES = 592.0e9, 2.5e9
GIB = 1024**3


@pytest.fixture(scope="module", params=sorted(KUSTOMIZATIONS))
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(KUSTOMIZATIONS[request.param])


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in by_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def server_pods(objects: list[dict]) -> list[tuple[str, dict]]:
    """(label, PodTemplateSpec) of every pod template that runs the server."""
    pods = [
        (f"Deployment/{d['metadata']['name']}", d["spec"]["template"])
        for d in by_kind(objects, "Deployment")
    ]
    for lws in by_kind(objects, "LeaderWorkerSet"):
        lwt = lws["spec"]["leaderWorkerTemplate"]
        pods.append(("LeaderWorkerSet/leader", lwt["leaderTemplate"]))
        pods.append(("LeaderWorkerSet/worker", lwt["workerTemplate"]))
    assert pods, "no server pod template"
    return pods


def all_pods(objects: list[dict]) -> list[tuple[str, dict]]:
    jobs = [
        (f"Job/{j['metadata']['name']}", j["spec"]["template"]) for j in by_kind(objects, "Job")
    ]
    return server_pods(objects) + jobs


def server_container(pod: dict) -> dict:
    (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "server"]
    return container


def config_data(objects: list[dict]) -> dict[str, str]:
    return one(objects, "ConfigMap", "kimi-grpc-config")["data"]


def container_env(container: dict, objects: list[dict], lws: bool) -> dict[str, str]:
    """The environment the kubelet gives the container (ConfigMap refs resolved)."""
    config = config_data(objects)
    env: dict[str, str] = dict(LWS_INJECTED) if lws else {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = var["valueFrom"].get("configMapKeyRef")
        if ref is None:
            continue  # secretKeyRef: never needed for flags
        assert ref["name"] == "kimi-grpc-config", var
        assert ref["key"] in config, f"{var['name']}: ConfigMap has no key {ref['key']}"
        env[var["name"]] = config[ref["key"]]
    return env


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion; an undefined variable is an error here (kubelet would leave
    the literal text and the server would get a nonsense flag)."""

    def sub(match: re.Match) -> str:
        name = match.group(1)
        assert name in env, f"$({name}) is not defined in the container's env"
        return env[name]

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, value)


def serve_args(pod: dict, objects: list[dict], lws: bool) -> list[str]:
    container = server_container(pod)
    assert "command" not in container, "the image ENTRYPOINT (kimi-grpc serve) must run"
    env = container_env(container, objects, lws)
    return [expand(a, env) for a in container["args"]]


def flag(args: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    assert len(values) == 1, f"{name} given {len(values)} times in {args}"
    return values[0]


# ---- rendering and schema validation ------------------------------------------------------------


def test_every_kustomization_renders_and_validates_strictly(rendered):
    _, objects = rendered
    kinds = sorted(o["kind"] for o in objects)
    assert {"ConfigMap", "PersistentVolumeClaim", "Job", "Service"} <= set(kinds), kinds
    assert {"PodDisruptionBudget", "NetworkPolicy"} <= set(kinds), kinds
    assert ("Deployment" in kinds) != ("LeaderWorkerSet" in kinds), kinds
    for obj in objects:
        validate(obj)  # raises on any schema violation or unknown kind


def test_every_yaml_file_in_k8s_parses_and_its_objects_validate():
    files = sorted(K8S.rglob("*.yaml")) + sorted(K8S.rglob("*.yml"))
    assert len(files) >= 12, files
    for path in files:
        docs = load_all(path.read_text())  # merge-conflict leftovers fail to parse here
        assert docs, f"{path} is empty"
        for doc in docs:
            if doc.get("kind") == "Kustomization":
                assert doc["apiVersion"] == "kustomize.config.k8s.io/v1beta1", path
                continue
            # LWS files get their kustomize namespace only at render time; validate as written.
            validate(doc)


def test_validation_rejects_unknown_fields_and_named_grpc_probe_ports():
    deployment = one(render(BASE), "Deployment")
    broken = copy.deepcopy(deployment)
    server_container(broken["spec"]["template"])["imagee"] = "x"
    with pytest.raises(jsonschema.ValidationError, match="imagee"):
        validate(broken)
    named = copy.deepcopy(deployment)
    server_container(named["spec"]["template"])["startupProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(jsonschema.ValidationError, match="integer"):
        validate(named)
    lws = one(render(MULTI), "LeaderWorkerSet")
    for path, value in (
        (("spec", "leaderWorkerTemplate", "sizee"), 2),
        (("spec", "startupPolicy"), "LeaderStarted"),
        (("spec", "leaderWorkerTemplate", "workerTemplate", "spec", "containerz"), []),
    ):
        bad = copy.deepcopy(lws)
        target = bad
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError):
            validate(bad)
    no_worker = copy.deepcopy(lws)
    del no_worker["spec"]["leaderWorkerTemplate"]["workerTemplate"]
    with pytest.raises(jsonschema.ValidationError, match="workerTemplate"):
        validate(no_worker)


def test_python_renderer_matches_kubectl_kustomize():
    tool = shutil.which("kubectl") or shutil.which("kustomize")
    if tool is None:
        pytest.skip("neither kubectl nor kustomize on PATH: the tests used the Python renderer")
    for name, directory in KUSTOMIZATIONS.items():
        ours = render_py(directory)
        theirs = render(directory)

        def key(o):
            return (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])

        assert sorted(map(key, ours)) == sorted(map(key, theirs)), name
        theirs_by_key = {key(o): o for o in theirs}
        for obj in ours:
            assert obj == theirs_by_key[key(obj)], f"{name}: {key(obj)} differs"


# ---- what the server pods must have --------------------------------------------------------------


def test_eight_gpus_requested_and_limited(rendered):
    _, objects = rendered
    for label, pod in server_pods(objects):
        resources = server_container(pod)["resources"]
        assert resources["requests"]["nvidia.com/gpu"] == GPUS_PER_POD, label
        assert resources["limits"]["nvidia.com/gpu"] == GPUS_PER_POD, label
        assert resources["requests"]["cpu"] and resources["requests"]["memory"], label
    for label, pod in all_pods(objects):
        for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
            assert "requests" in c.get("resources", {}), f"{label}/{c['name']} has no requests"


def test_grpc_probes_on_the_numeric_serving_port_with_a_long_startup_budget(rendered):
    _, objects = rendered
    for label, pod in server_pods(objects):
        container = server_container(pod)
        args = serve_args(pod, objects, lws=label.startswith("LeaderWorkerSet"))
        assert int(flag(args, "--port")) == GRPC_PORT and flag(args, "--host") == "0.0.0.0"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["grpc"] == GRPC_PORT, label
        if label == "LeaderWorkerSet/worker":
            assert not {"startupProbe", "readinessProbe"} & set(container), "worker serves no gRPC"
            continue
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container[kind]
            assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, label
            assert type(probe["grpc"]["port"]) is int and probe["grpc"]["port"] == GRPC_PORT
            assert probe["grpc"].get("service", "") in HEALTH_SERVICES, label
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 60 * 60, label
        liveness = container["livenessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 30, label


def test_health_service_names_match_the_server():
    app = (ROOT / "kimi_grpc/server/app.py").read_text()
    servicer = (ROOT / "kimi_grpc/server/servicer.py").read_text()
    assert 'for service in ("", SERVICE_NAME)' in app
    assert 'SERVICE_NAME = "kimi.v1.InferenceService"' in servicer


def test_dev_shm_is_a_sized_memory_emptydir(rendered):
    _, objects = rendered
    for label, pod in server_pods(objects):
        mounts = {m["mountPath"]: m["name"] for m in server_container(pod)["volumeMounts"]}
        assert "/dev/shm" in mounts, label
        (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mounts["/dev/shm"]]
        assert volume["emptyDir"]["medium"] == "Memory", label
        assert _gib(volume["emptyDir"]["sizeLimit"]) >= 8, label
        limit = _gib(server_container(pod)["resources"]["limits"]["memory"])
        assert limit >= 4 * _gib(volume["emptyDir"]["sizeLimit"]), "tmpfs counts against memory"


def _gib(quantity: str) -> float:
    match = re.fullmatch(r"(\d+)(Mi|Gi|Ti)", quantity)
    assert match, quantity
    return int(match.group(1)) * {"Mi": 1 / 1024, "Gi": 1, "Ti": 1024}[match.group(2)]


def test_grace_period_exceeds_drain_timeout_plus_prestop(rendered):
    _, objects = rendered
    for label, pod in server_pods(objects):
        args = serve_args(pod, objects, lws=label.startswith("LeaderWorkerSet"))
        drain = float(flag(args, "--drain-timeout"))
        assert drain == float(config_data(objects)["DRAIN_TIMEOUT"]) and drain >= 30
        prestop = server_container(pod)["lifecycle"]["preStop"]["exec"]["command"]
        assert prestop[0] == "sleep", prestop
        grace = pod["spec"]["terminationGracePeriodSeconds"]
        assert grace > drain + int(prestop[1]) + 15, f"{label}: {grace} s grace, {drain} s drain"


def test_pods_are_non_root_without_privilege_escalation(rendered):
    _, objects = rendered
    for label, pod in all_pods(objects):
        spec = pod["spec"]
        security = spec["securityContext"]
        assert security["runAsNonRoot"] is True, label
        assert security["runAsUser"] == NON_ROOT_UID and security["runAsGroup"] != 0, label
        assert security["seccompProfile"]["type"] == "RuntimeDefault", label
        assert security.get("fsGroupChangePolicy") == "OnRootMismatch", "chowning 594 GB"
        assert not spec.get("hostNetwork") and not spec.get("hostIPC") and not spec.get("hostPID")
        assert spec.get("automountServiceAccountToken") is False, label
        assert all("hostPath" not in v for v in spec.get("volumes", [])), label
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, f"{label}/{c['name']}"
            assert sc.get("runAsNonRoot", True) is True and sc.get("runAsUser", 1) != 0
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
            assert not sc.get("privileged"), f"{label}/{c['name']}"
    for ns in by_kind(objects, "Namespace"):
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_images_are_pinned_and_identical(rendered):
    _, objects = rendered
    images = set()
    for _, pod in all_pods(objects):
        for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
            images.add(c["image"])
    assert len(images) == 1, images
    (image,) = images
    assert _pinned(image), image


def _pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


def test_no_conflict_markers_or_latest_tags_anywhere():
    files = [p for p in K8S.rglob("*") if p.is_file()]
    files += [ROOT / "Dockerfile", ROOT / ".dockerignore", ROOT / "docs" / "DEPLOY.md"]
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{number}"
            assert not line.startswith(("<<<<<<<", ">>>>>>>", "|||||||")), where
            assert line.rstrip() != "=======", where
            assert not re.search(r":latest\b", line), where
            untagged = re.match(r"\s*(-\s*)?image:\s*[^\s:@]+\s*$", line)
            assert not untagged, f"untagged image at {where}"


# ---- Service, NetworkPolicy, PDB ----------------------------------------------------------------


def test_service_exposes_grpc_and_metrics_of_the_serving_pods(rendered):
    name, objects = rendered
    service = one(objects, "Service", "kimi-grpc")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == ports["grpc"]["targetPort"] == GRPC_PORT
    assert ports["http"]["port"] == ports["http"]["targetPort"] == HTTP_PORT
    assert ports["metrics"]["port"] == ports["metrics"]["targetPort"] == METRICS_PORT
    assert set(ports) == set(PORT_FLAGS), f"{name}: unexpected Service ports {sorted(ports)}"
    selector = service["spec"]["selector"]
    for label, pod in server_pods(objects):
        args = serve_args(pod, objects, lws=label.startswith("LeaderWorkerSet"))
        assert int(flag(args, "--metrics-port")) == METRICS_PORT
        assert int(flag(args, "--http-port")) == HTTP_PORT
        labels = pod["metadata"]["labels"]
        if label == "LeaderWorkerSet/worker":
            # The LWS controller labels worker pods worker-index >= 1: the Service skips them.
            assert selector["leaderworkerset.sigs.k8s.io/worker-index"] == "0"
            labels = {k: v for k, v in selector.items() if "leaderworkerset" not in k} | labels
            continue
        if label == "LeaderWorkerSet/leader":
            labels = labels | {"leaderworkerset.sigs.k8s.io/worker-index": "0"}
        assert selector.items() <= labels.items(), f"{name}: Service does not select {label}"


def test_service_ports_target_container_ports_the_server_flags_open(rendered):
    """Each Service port's targetPort (number or name) is a containerPort of every pod that serves,
    with the same name, and the `kimi-grpc serve` flag for that name opens exactly it."""
    name, objects = rendered
    service = one(objects, "Service", "kimi-grpc")
    for label, pod in server_pods(objects):
        if label == "LeaderWorkerSet/worker":
            continue  # not selected by the Service; serves nothing
        args = serve_args(pod, objects, lws=label.startswith("LeaderWorkerSet"))
        container_ports = server_container(pod)["ports"]
        by_name = {p["name"]: p for p in container_ports}
        assert len(by_name) == len(container_ports), f"{label}: duplicate port names"
        assert len({p["containerPort"] for p in container_ports}) == len(container_ports), label
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            matches = [
                p
                for p in container_ports
                if (p["name"] if isinstance(target, str) else p["containerPort"]) == target
            ]
            assert len(matches) == 1, f"{name}: Service port {port['name']} -> {target}: {label}"
            (opened,) = matches
            assert opened["name"] == port["name"], f"{name}: {port['name']} targets {opened}"
            assert opened.get("protocol", "TCP") == port.get("protocol", "TCP") == "TCP"
            assert int(flag(args, PORT_FLAGS[port["name"]])) == opened["containerPort"], (
                f"{label}: {PORT_FLAGS[port['name']]} does not open {opened}"
            )


def test_network_policy_admits_only_client_ports_from_clients_and_ranks_from_the_group(rendered):
    name, objects = rendered
    policy = one(objects, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    assert policy["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "kimi-grpc",
        "app.kubernetes.io/component": "server",
    }
    rules = policy["ingress"]
    for rule in rules:
        assert rule.get("from") and rule.get("ports"), f"{name}: a rule open to all: {rule}"
    # The client rule admits gRPC and the HTTP API, both exactly as the Service exposes them.
    grpc = [r for r in rules if GRPC_PORT in [p["port"] for p in r["ports"]]]
    assert len(grpc) == 1 and grpc[0]["from"] == [
        {"podSelector": {"matchLabels": {"kimi-grpc.io/client": "true"}}}
    ]
    client_ports = sorted((p["port"], p.get("protocol", "TCP")) for p in grpc[0]["ports"])
    assert client_ports == sorted((p, "TCP") for p in CLIENT_PORTS.values()), client_ports
    service = {p["name"]: p["targetPort"] for p in one(objects, "Service")["spec"]["ports"]}
    assert {n: service[n] for n in CLIENT_PORTS} == CLIENT_PORTS, service
    metrics = [r for r in rules if [p["port"] for p in r["ports"]] == [METRICS_PORT]]
    assert len(metrics) == 1 and list(metrics[0]["from"][0]) == ["namespaceSelector"]
    assert service["metrics"] == METRICS_PORT
    rest = [r for r in rules if r not in grpc + metrics]
    if not by_kind(objects, "LeaderWorkerSet"):
        assert rest == [], f"{name}: single-node pods need no rank-to-rank rule"
        return
    (ranks,) = rest
    lws = one(objects, "LeaderWorkerSet")
    assert ranks["from"] == [
        {"podSelector": {"matchLabels": {"leaderworkerset.sigs.k8s.io/name": "kimi-grpc"}}}
    ]
    assert lws["metadata"]["name"] == "kimi-grpc"
    ports = {(p["port"], p.get("endPort")) for p in ranks["ports"]}
    assert (int(config_data(objects)["MASTER_PORT"]), None) in ports
    assert (32768, 60999) in ports and len(ports) == 2


def test_pod_disruption_budget_covers_the_serving_pods(rendered):
    _, objects = rendered
    pdb = one(objects, "PodDisruptionBudget")["spec"]
    assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    selector = pdb["selector"]["matchLabels"]
    if by_kind(objects, "LeaderWorkerSet"):
        lws = one(objects, "LeaderWorkerSet")
        assert selector == {"leaderworkerset.sigs.k8s.io/name": lws["metadata"]["name"]}
        assert pdb["minAvailable"] == lws["spec"]["leaderWorkerTemplate"]["size"]
        return
    (deployment,) = by_kind(objects, "Deployment")
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert pdb["minAvailable"] == deployment["spec"]["replicas"] == 1


# ---- server flags -------------------------------------------------------------------------------


def test_server_flags_parse_with_the_real_cli(rendered):
    from kimi_grpc.cli import build_parser

    _, objects = rendered
    parser = build_parser()
    config = config_data(objects)
    for label, pod in server_pods(objects):
        lws = label.startswith("LeaderWorkerSet")
        args = serve_args(pod, objects, lws)
        try:
            parsed = parser.parse_args(["serve", *args])
        except SystemExit:
            pytest.fail(f"{label}: `kimi-grpc serve` rejects the manifest's flags {args}")
        assert parsed.device == "cuda" and parsed.port == GRPC_PORT
        assert parsed.metrics_port == METRICS_PORT
        assert parsed.http_port == HTTP_PORT, f"{label}: the HTTP API must be on"
        assert parsed.model == config["MODEL_DIR"] and parsed.model.startswith("/models/")
        assert parsed.kv_cache_memory == int(config["KV_CACHE_MEMORY"])
        assert parsed.tensor_parallel_size == int(config["TENSOR_PARALLEL_SIZE"])
        dcp = parsed.decode_context_parallel_size
        assert dcp == int(config["DECODE_CONTEXT_PARALLEL_SIZE"]) and 8 % dcp == 0
        mounts = {m["mountPath"]: m["name"] for m in server_container(pod)["volumeMounts"]}
        key_dir = os.path.dirname(parsed.api_key_file)
        (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mounts[key_dir]]
        assert volume["secret"]["secretName"] == "kimi-grpc-api-keys"
        assert "optional" not in volume["secret"], "serving without keys must not start"
        if lws:
            lwt = one(objects, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
            assert parsed.nnodes == lwt["size"] == int(config["NNODES"])
            assert parsed.node_rank == int(LWS_INJECTED["LWS_WORKER_INDEX"])
            assert parsed.master_addr == LWS_INJECTED["LWS_LEADER_ADDRESS"]
            assert parsed.master_port == int(config["MASTER_PORT"])
            assert parsed.tensor_parallel_size == lwt["size"] * int(GPUS_PER_POD)
        else:
            assert parsed.tensor_parallel_size == int(GPUS_PER_POD)
        env = {e["name"]: e.get("value") for e in server_container(pod)["env"]}
        assert env["HF_HUB_OFFLINE"] == "1"
        assert not LWS_INJECTED_ALL & set(env), "LWS injects these itself"


def test_every_config_reference_resolves(rendered):
    _, objects = rendered
    config = config_data(objects)
    for label, pod in all_pods(objects):
        for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    assert ref["key"] in config, f"{label}/{c['name']}: {ref}"
        for volume in pod["spec"].get("volumes", []):
            if "configMap" in volume:
                one(objects, "ConfigMap", volume["configMap"]["name"])
            if "persistentVolumeClaim" in volume:
                one(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])


def test_sizing_fits_the_gpus(rendered):
    """KV_CACHE_MEMORY (per GPU) + this GPU's share of the weights + 10 GiB of runtime fit the
    smallest GPU the variant targets, and one max-length sequence fits the cache."""
    name, objects = rendered
    config = config_data(objects)
    tp = int(config["TENSOR_PARALLEL_SIZE"])
    kv = int(config["KV_CACHE_MEMORY"])
    gpu_bytes = {8: 143_771 * 2**20, 16: 81_559 * 2**20}[tp]  # H200 141 GB; H100 80 GB
    weights = SHARDED_WEIGHT_BYTES / tp + REPLICATED_WEIGHT_BYTES
    assert weights + kv + 10 * GIB <= gpu_bytes, name
    assert kv // KV_BYTES_PER_TOKEN >= int(config["MAX_MODEL_LEN"]), name


# ---- LeaderWorkerSet ----------------------------------------------------------------------------


def test_leader_worker_set_groups_two_eight_gpu_nodes():
    objects = render(MULTI)
    assert not by_kind(objects, "Deployment"), "the overlay replaces the Deployment"
    lws = one(objects, "LeaderWorkerSet")
    spec = lws["spec"]
    lwt = spec["leaderWorkerTemplate"]
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    assert lwt["size"] == 2 and spec.get("replicas", 1) == 1
    assert lwt["restartPolicy"] == "RecreateGroupOnPodRestart"
    # LeaderReady would deadlock: the leader is Ready only after all 16 ranks loaded.
    assert spec["startupPolicy"] == "LeaderCreated"
    assert set(lwt) >= {"leaderTemplate", "workerTemplate"}
    for key in ("leaderTemplate", "workerTemplate"):
        spec_ = lwt[key]["spec"]
        assert [c["name"] for c in spec_["initContainers"]] == ["wait-for-weights"], key
    pvc = one(objects, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "two nodes mount the weights"
    single = one(render(SINGLE), "PersistentVolumeClaim")
    assert single["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_single_node_overlay_places_on_h200_nodes():
    deployment = one(render(SINGLE), "Deployment")
    assert deployment["metadata"]["namespace"] == "kimi-grpc"
    selector = deployment["spec"]["template"]["spec"]["nodeSelector"]
    assert selector == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert deployment["spec"]["strategy"]["type"] == "Recreate"


# ---- the download Job and the wait-for-weights gate ---------------------------------------------

STUB_HUB = """
import json, os
from pathlib import Path

def snapshot_download(**kwargs):
    Path(os.environ["STUB_CALLS"]).write_text(json.dumps(kwargs))
    dest = Path(kwargs["local_dir"])
    (dest / "config.json").write_text("{}")
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = {"weight_map": {"a": shards[0], "b": shards[1]}}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    for shard in shards[: int(os.environ.get("STUB_SHARDS", "2"))]:
        (dest / shard).write_bytes(b"")
    return str(dest)
"""

SHA = "0123456789abcdef0123456789abcdef01234567"


def _job_script(objects: list[dict]) -> str:
    job = one(objects, "Job", "kimi-grpc-download")
    container = job["spec"]["template"]["spec"]["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    script_path = Path(container["command"][-1])
    (volume,) = [v for v in job["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    assert str(script_path.parent) == mounts[volume["name"]]
    data = one(objects, "ConfigMap", volume["configMap"]["name"])["data"]
    return data[script_path.name]


def _run_download(tmp_path: Path, script: str, revision: str, shards: int = 2, dest: str = "a"):
    (tmp_path / "stub" / "huggingface_hub").mkdir(parents=True, exist_ok=True)
    (tmp_path / "stub" / "huggingface_hub" / "__init__.py").write_text(STUB_HUB)
    (tmp_path / "download.py").write_text(script)
    calls = tmp_path / "calls.json"
    calls.unlink(missing_ok=True)
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(tmp_path / "stub"),
        "MODEL_REPO": "moonshotai/Kimi-K2.6",
        "MODEL_REVISION": revision,
        "MODEL_DIR": str(tmp_path / "models" / dest),
        "HF_TOKEN": "hf_test",
        "STUB_CALLS": str(calls),
        "STUB_SHARDS": str(shards),
    }
    result = subprocess.run(
        [sys.executable, str(tmp_path / "download.py")], env=env, capture_output=True, text=True
    )
    called = json.loads(calls.read_text()) if calls.exists() else None
    return result, called, Path(env["MODEL_DIR"])


def test_download_job_uses_huggingface_hub_with_a_pinned_revision(tmp_path):
    objects = render(SINGLE)
    job = one(objects, "Job", "kimi-grpc-download")
    container = job["spec"]["template"]["spec"]["containers"][0]
    token = [e for e in container["env"] if e["name"] == "HF_TOKEN"]
    assert token and token[0]["valueFrom"]["secretKeyRef"]["key"] == "HF_TOKEN"
    assert "value" not in token[0]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert not mounts["/models"].get("readOnly")
    script = _job_script(objects)

    # Not a commit sha (the shipped placeholder, a branch): refused before any download.
    for revision in (config_data(objects)["MODEL_REVISION"], "main", SHA[:7]):
        result, called, _ = _run_download(tmp_path, script, revision)
        assert result.returncode != 0 and "40-hex" in result.stderr, result
        assert called is None

    result, called, dest = _run_download(tmp_path, script, SHA)
    assert result.returncode == 0, result.stderr
    assert called["repo_id"] == "moonshotai/Kimi-K2.6" and called["revision"] == SHA
    assert called["local_dir"] == str(dest) and called["token"] == "hf_test"
    assert sorted(called["allow_patterns"]) == sorted(_serving_file_patterns())
    assert (dest / ".kimi-grpc-revision").read_text().strip() == SHA

    # Complete already: no second download.
    result, called, _ = _run_download(tmp_path, script, SHA)
    assert result.returncode == 0 and called is None

    # A missing shard leaves no completion marker.
    result, called, dest = _run_download(tmp_path, script, SHA, shards=1, dest="b")
    assert result.returncode != 0 and "missing" in result.stderr
    assert not (dest / ".kimi-grpc-revision").exists()


def _serving_file_patterns() -> tuple[str, ...]:
    tree = ast.parse((ROOT / "kimi_grpc/checkpoint.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.targets[0].id == "SERVING_FILE_PATTERNS":
            return ast.literal_eval(node.value)
    raise AssertionError("kimi_grpc/checkpoint.py has no SERVING_FILE_PATTERNS")


def test_wait_for_weights_gate(tmp_path):
    objects = render(SINGLE)
    pod = one(objects, "Deployment")["spec"]["template"]
    (init,) = pod["spec"]["initContainers"]
    assert init["command"][:2] == ["sh", "-c"]
    model_dir = tmp_path / "Kimi-K2.6"
    model_dir.mkdir()
    env = {"PATH": os.environ["PATH"], "MODEL_DIR": str(model_dir), "MODEL_REVISION": SHA}

    def gate() -> int:
        return subprocess.run(init["command"], env=env, capture_output=True).returncode

    assert gate() != 0  # nothing downloaded
    (model_dir / ".kimi-grpc-revision").write_text(SHA[::-1] + "\n")
    assert gate() != 0  # another revision
    (model_dir / ".kimi-grpc-revision").write_text(SHA + "\n")
    assert gate() == 0


# ---- Dockerfile ---------------------------------------------------------------------------------


def _dockerfile() -> list[str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def test_dockerfile_is_pinned_non_root_and_builds_the_hopper_extension():
    lines = _dockerfile()
    args = dict(
        ln.split(None, 1)[1].split("=", 1) for ln in lines if ln.startswith("ARG ") and "=" in ln
    )
    froms = [ln.split()[1] for ln in lines if ln.startswith("FROM ")]
    assert len(froms) >= 1
    for image in froms:
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert _pinned(resolved), resolved
    text = "\n".join(lines)
    assert "TORCH_CUDA_ARCH_LIST=9.0a" in text
    assert "--no-build-isolation" in text
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] == str(NON_ROOT_UID)
    entrypoint = [ln for ln in lines if ln.startswith("ENTRYPOINT ")]
    assert entrypoint and json.loads(entrypoint[-1].split(None, 1)[1]) == ["kimi-grpc", "serve"]
    copies = [ln for ln in lines if ln.startswith(("COPY ", "ADD "))]
    assert not any(re.search(r"safetensors|weights|models|\.venv", c) for c in copies), copies
    assert not any(ln.startswith("COPY . ") for ln in lines), "copy only what the wheel needs"


def test_dockerignore_keeps_weights_and_environments_out():
    patterns = {
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    }
    assert {".git", ".venv", "build", "weights", "**/*.safetensors"} <= patterns


def test_dockerfile_user_matches_the_pods():
    lines = _dockerfile()
    useradd = [ln for ln in lines if "useradd" in ln]
    assert useradd and f"--uid {NON_ROOT_UID}" in useradd[0]
    for path in (BASE / "deployment.yaml", MULTI / "leaderworkerset.yaml"):
        assert f"runAsUser: {NON_ROOT_UID}" in path.read_text()
