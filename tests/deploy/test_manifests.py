"""Validation of the plain Kubernetes manifests under deploy/kubernetes/.

Three layers, all offline:

(a) every core Kubernetes object is validated, in strict mode (unknown fields fail), against
    the upstream Kubernetes JSON schemas bundled in the `kubernetes-validate` package, for
    each version in K8S_VERSIONS;
(b) every InferencePool is validated against tests/deploy/schemas/inferencepool-v1.json, a
    JSON Schema of the Gateway API Inference Extension's inference.networking.k8s.io/v1 API;
(c) cross-references between objects (selectors, ports, probes, RBAC, the router's TOML).

The cross-reference checks are functions that return a list of problems, so the negative
tests at the end can prove that each one can fail.

Run with tests/deploy/run.
"""

from __future__ import annotations

import copy
import json
import shlex
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFEST_DIR = ROOT / "deploy" / "kubernetes"
SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "inferencepool-v1.json"

# The oldest Kubernetes minor the manifests target, and the newest the pinned
# kubernetes-validate ships. Both are bundled in the package (no download).
K8S_VERSIONS = ["1.33.0", "1.37.0"]

NAMESPACE = "souverain"
INFERENCE_GROUP = "inference.networking.k8s.io"
CLUSTER_SCOPED_KINDS = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}

# The lead's router.toml format: exactly these keys (values may be tuned).
ROUTER_TOML_KEYS = {
    "listen": None,
    "routing": {
        "strategy": None,
        "weights": {"prefix": None, "queue": None, "kv_cache": None, "in_flight": None, "session": None},
    },
    "scrape": {"interval_ms": None},
    "discovery": {
        "kubernetes": {"namespace": None, "inference_pool": None, "engine": None, "region_label": None},
    },
}


# --------------------------------------------------------------------------------------------
# Loading


def load_documents() -> list[tuple[str, int, dict]]:
    """Every non-empty YAML document under deploy/kubernetes/, as (file, index, object)."""
    docs = []
    files = sorted(MANIFEST_DIR.glob("*.yaml")) + sorted(MANIFEST_DIR.glob("*.yml"))
    for path in files:
        with path.open(encoding="utf-8") as f:
            for i, doc in enumerate(yaml.safe_load_all(f)):
                if doc is None:
                    continue
                docs.append((path.name, i, doc))
    return docs


def doc_id(entry) -> str:
    file, i, doc = entry
    return f"{file}#{i}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def api_group(obj: dict) -> str:
    api_version = obj.get("apiVersion", "")
    return api_version.split("/")[0] if "/" in api_version else ""


def is_inference_pool(obj: dict) -> bool:
    return api_group(obj) == INFERENCE_GROUP and obj.get("kind") == "InferencePool"


ALL_DOCS = load_documents()


def is_kustomization(obj: dict) -> bool:
    return obj.get("kind") == "Kustomization" and api_group(obj) == "kustomize.config.k8s.io"


# kustomization.yaml is kubectl's file list, not an object sent to the API server.
DOCS = [e for e in ALL_DOCS if not is_kustomization(e[2])]
KUSTOMIZATIONS = [e for e in ALL_DOCS if is_kustomization(e[2])]
OBJECTS = [doc for _, _, doc in DOCS]


def of_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o.get("kind") == kind]


def find(objs: list[dict], kind: str, name: str, namespace: str | None = None) -> dict | None:
    for o in of_kind(objs, kind):
        meta = o.get("metadata", {})
        if meta.get("name") == name and (namespace is None or meta.get("namespace") == namespace):
            return o
    return None


def ns(obj: dict) -> str | None:
    return obj.get("metadata", {}).get("namespace")


def name(obj: dict) -> str:
    return obj.get("metadata", {}).get("name", "?")


def pod_labels(deploy: dict) -> dict:
    return deploy.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {}) or {}


def pod_spec(deploy: dict) -> dict:
    return deploy.get("spec", {}).get("template", {}).get("spec", {}) or {}


def selects(selector: dict | None, labels: dict) -> bool:
    """True when every selector pair is in labels (an empty selector selects nothing here)."""
    if not selector:
        return False
    return all(labels.get(k) == v for k, v in selector.items())


def selected_deployments(objs: list[dict], selector: dict | None, namespace: str | None) -> list[dict]:
    return [d for d in of_kind(objs, "Deployment") if ns(d) == namespace and selects(selector, pod_labels(d))]


def container_ports(container: dict) -> list[dict]:
    return container.get("ports", []) or []


def port_resolves(port, container: dict) -> bool:
    """A named or numbered port exists on the container."""
    ports = container_ports(container)
    if isinstance(port, str):
        return any(p.get("name") == port for p in ports)
    return any(p.get("containerPort") == port for p in ports)


def pod_port_resolves(port, deploy: dict) -> bool:
    return any(port_resolves(port, c) for c in pod_spec(deploy).get("containers", []))


def port_number(port, container: dict) -> int | None:
    if isinstance(port, int):
        return port
    for p in container_ports(container):
        if p.get("name") == port:
            return p.get("containerPort")
    return None


def arg_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def container_args(container: dict) -> list[str]:
    return [str(a) for a in (container.get("command", []) or []) + (container.get("args", []) or [])]


def deployment_running(objs: list[dict], subcommand: str) -> list[tuple[dict, dict]]:
    """(Deployment, container) pairs whose container runs `souverain <subcommand>`."""
    out = []
    for d in of_kind(objs, "Deployment"):
        for c in pod_spec(d).get("containers", []):
            args = container_args(c)
            if args and args[0] == subcommand:
                out.append((d, c))
    return out


def router_toml(objs: list[dict]) -> tuple[dict | None, list[str]]:
    cm = find(objs, "ConfigMap", "souverain-router", NAMESPACE)
    if cm is None:
        return None, ["ConfigMap souverain/souverain-router is missing"]
    text = (cm.get("data") or {}).get("router.toml")
    if text is None:
        return None, ["ConfigMap souverain-router has no router.toml key"]
    try:
        return tomllib.loads(text), []
    except tomllib.TOMLDecodeError as e:
        return None, [f"router.toml does not parse: {e}"]


def key_shape(value):
    if isinstance(value, dict):
        return {k: key_shape(v) for k, v in value.items()}
    return None


# --------------------------------------------------------------------------------------------
# (a) core Kubernetes objects against the upstream schemas


def k8s_errors(obj: dict, version: str) -> list[str]:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        return [f"{obj.get('kind')}/{name(obj)} against {version}: {path}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


CORE_DOCS = [e for e in DOCS if not is_inference_pool(e[2])]
POOL_DOCS = [e for e in DOCS if is_inference_pool(e[2])]


def test_manifests_exist():
    names = {p.name for p in MANIFEST_DIR.glob("*.yaml")}
    assert {"namespace.yaml", "replicas.yaml", "inferencepool.yaml", "router.yaml", "picker.yaml"} <= names
    assert CORE_DOCS and POOL_DOCS


def test_kustomization_lists_every_manifest():
    """`kubectl apply -k deploy/kubernetes` applies exactly the files validated here."""
    (entry,) = KUSTOMIZATIONS
    assert entry[0] == "kustomization.yaml"
    listed = entry[2].get("resources", [])
    manifests = sorted({file for file, _, _ in DOCS})
    assert sorted(listed) == manifests
    assert len(listed) == len(set(listed))
    assert listed[0] == "namespace.yaml"
    assert set(entry[2]) <= {"apiVersion", "kind", "resources"}, "keep the kustomization plain"


def test_kubernetes_validate_bundles_versions():
    """The schemas come from inside the package: nothing is fetched at test time."""
    import importlib.resources

    root = importlib.resources.files("kubernetes_validate").joinpath("kubernetes-json-schema")
    for version in K8S_VERSIONS:
        d = root.joinpath(f"v{version}-local-strict")
        assert d.joinpath("_definitions.json").is_file(), f"no bundled strict schemas for {version}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("entry", CORE_DOCS, ids=doc_id)
def test_core_object_matches_kubernetes_schema(entry, version):
    assert k8s_errors(entry[2], version) == []


# --------------------------------------------------------------------------------------------
# (b) InferencePools against the v1 JSON Schema


def pool_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


POOL_VALIDATOR = pool_validator()


def pool_errors(obj: dict) -> list[str]:
    return [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in POOL_VALIDATOR.iter_errors(obj)
    ]


def test_inferencepool_schema_is_documented():
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    assert "gateway-api-inference-extension" in schema["$comment"]
    assert "inference.networking.k8s.io/v1" in schema["$comment"]


@pytest.mark.parametrize("entry", POOL_DOCS, ids=doc_id)
def test_inferencepool_matches_v1_schema(entry):
    assert pool_errors(entry[2]) == []


# --------------------------------------------------------------------------------------------
# (c) cross-references


def check_kinds_known(objs: list[dict]) -> list[str]:
    errs = []
    for o in objs:
        if not o.get("apiVersion") or not o.get("kind") or not name(o):
            errs.append(f"object without apiVersion/kind/name: {o!r:.80}")
    return errs


def check_namespaces(objs: list[dict]) -> list[str]:
    errs = []
    if find(objs, "Namespace", NAMESPACE) is None:
        errs.append(f"Namespace {NAMESPACE} is not defined")
    seen = set()
    for o in objs:
        key = (o.get("apiVersion"), o.get("kind"), ns(o), name(o))
        if key in seen:
            errs.append(f"duplicate object {key}")
        seen.add(key)
        if o.get("kind") in CLUSTER_SCOPED_KINDS:
            continue
        if ns(o) != NAMESPACE:
            errs.append(f"{o.get('kind')}/{name(o)} is in namespace {ns(o)!r}, not {NAMESPACE!r}")
    return errs


def check_deployment_selectors(objs: list[dict]) -> list[str]:
    errs = []
    for d in of_kind(objs, "Deployment"):
        sel = d.get("spec", {}).get("selector", {}).get("matchLabels")
        if not selects(sel, pod_labels(d)):
            errs.append(f"Deployment {name(d)}: selector {sel} does not match its pod labels")
    return errs


def check_service_selectors(objs: list[dict]) -> list[str]:
    errs = []
    for s in of_kind(objs, "Service"):
        sel = s.get("spec", {}).get("selector")
        targets = selected_deployments(objs, sel, ns(s))
        if not targets:
            errs.append(f"Service {name(s)}: selector {sel} matches no Deployment's pods")
            continue
        for p in s.get("spec", {}).get("ports", []):
            target = p.get("targetPort", p.get("port"))
            for d in targets:
                if not pod_port_resolves(target, d):
                    errs.append(f"Service {name(s)} port {p.get('port')}: targetPort {target!r} not on Deployment {name(d)}")
    return errs


def check_pdb_selectors(objs: list[dict]) -> list[str]:
    errs = []
    for pdb in of_kind(objs, "PodDisruptionBudget"):
        sel = pdb.get("spec", {}).get("selector", {}).get("matchLabels")
        targets = selected_deployments(objs, sel, ns(pdb))
        if not targets:
            errs.append(f"PodDisruptionBudget {name(pdb)}: selector {sel} matches no Deployment's pods")
        for d in targets:
            replicas = d.get("spec", {}).get("replicas", 1)
            min_available = pdb.get("spec", {}).get("minAvailable")
            if isinstance(min_available, int) and min_available >= replicas:
                errs.append(f"PodDisruptionBudget {name(pdb)}: minAvailable {min_available} blocks every eviction of {name(d)} ({replicas} replicas)")
    return errs


PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def check_probes(objs: list[dict]) -> list[str]:
    errs = []
    for d in of_kind(objs, "Deployment"):
        for c in pod_spec(d).get("containers", []):
            where = f"Deployment {name(d)} container {c.get('name')}"
            for required in ("readinessProbe", "livenessProbe"):
                if required not in c:
                    errs.append(f"{where}: no {required}")
            for probe_name in PROBES:
                probe = c.get(probe_name)
                if not probe:
                    continue
                for handler in ("httpGet", "tcpSocket", "grpc"):
                    if handler in probe:
                        port = probe[handler].get("port")
                        if not port_resolves(port, c):
                            errs.append(f"{where}: {probe_name}.{handler}.port {port!r} is not a container port")
                if "httpGet" in probe and probe["httpGet"].get("path") != "/health":
                    errs.append(f"{where}: {probe_name} does not GET /health")
    return errs


def check_security(objs: list[dict]) -> list[str]:
    """The Pod Security "restricted" profile plus a read-only root and resource limits."""
    errs = []
    for d in of_kind(objs, "Deployment"):
        spec = pod_spec(d)
        psc = spec.get("securityContext", {}) or {}
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            where = f"Deployment {name(d)} container {c.get('name')}"
            sc = c.get("securityContext", {}) or {}
            if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
                errs.append(f"{where}: runAsNonRoot is not set")
            if sc.get("readOnlyRootFilesystem") is not True:
                errs.append(f"{where}: readOnlyRootFilesystem is not true")
            if sc.get("allowPrivilegeEscalation") is not False:
                errs.append(f"{where}: allowPrivilegeEscalation is not false")
            if "ALL" not in (sc.get("capabilities", {}) or {}).get("drop", []):
                errs.append(f"{where}: capabilities do not drop ALL")
            seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
            if seccomp != "RuntimeDefault":
                errs.append(f"{where}: seccompProfile is {seccomp!r}, not RuntimeDefault")
            res = c.get("resources", {}) or {}
            for section in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in (res.get(section) or {}):
                        errs.append(f"{where}: no {section}.{r}")
    return errs


def check_volumes(objs: list[dict]) -> list[str]:
    """Every volumeMount names a pod volume; ConfigMap volumes name existing ConfigMaps and keys."""
    errs = []
    for d in of_kind(objs, "Deployment"):
        spec = pod_spec(d)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec.get("containers", []):
            for m in c.get("volumeMounts", []):
                if m.get("name") not in volumes:
                    errs.append(f"Deployment {name(d)}: volumeMount {m.get('name')} names no volume")
        for v in volumes.values():
            if "configMap" in v:
                cm = find(objs, "ConfigMap", v["configMap"].get("name"), ns(d))
                if cm is None:
                    errs.append(f"Deployment {name(d)}: volume {v['name']} names missing ConfigMap {v['configMap'].get('name')}")
                    continue
                for item in v["configMap"].get("items", []):
                    if item.get("key") not in (cm.get("data") or {}):
                        errs.append(f"Deployment {name(d)}: ConfigMap {name(cm)} has no key {item.get('key')}")
    return errs


def mounted_file(deploy: dict, container: dict, path: str) -> tuple[dict, str] | None:
    """The pod volume and the sub-path inside it that provide `path` in the container."""
    volumes = {v["name"]: v for v in pod_spec(deploy).get("volumes", [])}
    for m in container.get("volumeMounts", []):
        mount = m.get("mountPath", "").rstrip("/")
        if path.startswith(mount + "/") and m.get("name") in volumes:
            return volumes[m["name"]], path[len(mount) + 1:]
    return None


def check_config_files(objs: list[dict]) -> list[str]:
    """`--config` of the router and the picker points at router.toml from the ConfigMap."""
    errs = []
    for sub in ("route", "picker"):
        runs = deployment_running(objs, sub)
        if not runs:
            errs.append(f"no Deployment runs `souverain {sub}`")
        for d, c in runs:
            path = arg_value(container_args(c), "--config")
            if path is None:
                errs.append(f"Deployment {name(d)}: `{sub}` has no --config")
                continue
            found = mounted_file(d, c, path)
            if found is None:
                errs.append(f"Deployment {name(d)}: --config {path} is on no mounted volume")
                continue
            vol, rel = found
            cm_ref = vol.get("configMap")
            if cm_ref is None:
                errs.append(f"Deployment {name(d)}: --config {path} is not from a ConfigMap")
                continue
            items = cm_ref.get("items")
            keys = [i["key"] for i in items if i.get("path") == rel] if items else [rel]
            if keys != ["router.toml"] or cm_ref.get("name") != "souverain-router":
                errs.append(f"Deployment {name(d)}: --config {path} is not souverain-router/router.toml")
    return errs


def check_router_toml(objs: list[dict]) -> list[str]:
    cfg, errs = router_toml(objs)
    if cfg is None:
        return errs
    if key_shape(cfg) != ROUTER_TOML_KEYS:
        errs.append(f"router.toml keys {key_shape(cfg)} differ from the router's format {ROUTER_TOML_KEYS}")
        return errs
    k8s = cfg["discovery"]["kubernetes"]
    pool = find([o for o in objs if is_inference_pool(o)], "InferencePool", k8s["inference_pool"], k8s["namespace"])
    if pool is None:
        errs.append(f"router.toml names InferencePool {k8s['namespace']}/{k8s['inference_pool']}, which is not defined")
    else:
        sel = pool.get("spec", {}).get("selector", {}).get("matchLabels")
        for d in selected_deployments(objs, sel, ns(pool)):
            if not pod_labels(d).get(k8s["region_label"]):
                errs.append(f"Deployment {name(d)}: pods lack the region label {k8s['region_label']}")
    if find(objs, "Namespace", k8s["namespace"]) is None:
        errs.append(f"router.toml names namespace {k8s['namespace']}, which is not defined")
    listen_port = int(str(cfg["listen"]).rsplit(":", 1)[1])
    for d, c in deployment_running(objs, "route"):
        if not port_resolves(listen_port, c):
            errs.append(f"Deployment {name(d)}: router.toml listens on {listen_port}, not a container port")
    return errs


def check_picker_listen(objs: list[dict]) -> list[str]:
    errs = []
    for d, c in deployment_running(objs, "picker"):
        listen = arg_value(container_args(c), "--listen")
        if listen is None or not port_resolves(int(listen.rsplit(":", 1)[1]), c):
            errs.append(f"Deployment {name(d)}: --listen {listen} is not a container port")
        metrics = arg_value(container_args(c), "--metrics-listen")
        if metrics is not None and not port_resolves(int(metrics.rsplit(":", 1)[1]), c):
            errs.append(f"Deployment {name(d)}: --metrics-listen {metrics} is not a container port")
    return errs


def check_replicas(objs: list[dict]) -> list[str]:
    errs = []
    runs = deployment_running(objs, "serve")
    if not runs:
        errs.append("no Deployment runs `souverain serve`")
    for d, c in runs:
        args = container_args(c)
        port = arg_value(args, "--port")
        if port is None or not port_resolves(int(port), c):
            errs.append(f"Deployment {name(d)}: --port {port} is not a container port")
        if arg_value(args, "--host") != "0.0.0.0":
            errs.append(f"Deployment {name(d)}: serve does not listen on 0.0.0.0")
        model = arg_value(args, "--model")
        found = mounted_file(d, c, model or "")
        if found is None:
            errs.append(f"Deployment {name(d)}: --model {model} is on no mounted volume")
        else:
            vol, _ = found
            pvc = vol.get("persistentVolumeClaim") or {}
            if pvc.get("claimName") != "souverain-models" or pvc.get("readOnly") is not True:
                errs.append(f"Deployment {name(d)}: the model volume is not the read-only PVC souverain-models")
            mount = [m for m in c.get("volumeMounts", []) if m.get("name") == vol["name"]]
            if not all(m.get("readOnly") for m in mount):
                errs.append(f"Deployment {name(d)}: the model volume is mounted writable")
    return errs


def check_inference_pools(objs: list[dict]) -> list[str]:
    errs = []
    pools = [o for o in objs if is_inference_pool(o)]
    if not pools:
        errs.append("no InferencePool is defined")
    for pool in pools:
        spec = pool.get("spec", {})
        sel = spec.get("selector", {}).get("matchLabels")
        targets = selected_deployments(objs, sel, ns(pool))
        if not targets:
            errs.append(f"InferencePool {name(pool)}: selector {sel} matches no Deployment's pods")
        for d in targets:
            if not any(args and args[0] == "serve" for args in map(container_args, pod_spec(d).get("containers", []))):
                errs.append(f"InferencePool {name(pool)}: selects Deployment {name(d)}, which does not run `souverain serve`")
            for tp in spec.get("targetPorts", []):
                if not pod_port_resolves(tp.get("number"), d):
                    errs.append(f"InferencePool {name(pool)}: targetPort {tp.get('number')} is not a port of {name(d)}")
        ref = spec.get("endpointPickerRef") or {}
        if ref.get("group", "") != "" or ref.get("kind", "Service") != "Service":
            errs.append(f"InferencePool {name(pool)}: endpointPickerRef is not a core Service")
            continue
        svc = find(objs, "Service", ref.get("name"), ns(pool))
        if svc is None:
            errs.append(f"InferencePool {name(pool)}: endpointPickerRef names missing Service {ref.get('name')}")
            continue
        want = (ref.get("port") or {}).get("number")
        ports = [p for p in svc.get("spec", {}).get("ports", []) if p.get("port") == want]
        if not ports:
            errs.append(f"InferencePool {name(pool)}: Service {name(svc)} has no port {want}")
        pickers = [d for d in selected_deployments(objs, svc.get("spec", {}).get("selector"), ns(svc))
                   if any(args and args[0] == "picker" for args in map(container_args, pod_spec(d).get("containers", [])))]
        if not pickers:
            errs.append(f"InferencePool {name(pool)}: Service {name(svc)} does not front a `souverain picker` Deployment")
    return errs


def check_rbac(objs: list[dict]) -> list[str]:
    errs = []
    for rb in of_kind(objs, "RoleBinding"):
        ref = rb.get("roleRef", {})
        if ref.get("kind") == "Role" and find(objs, "Role", ref.get("name"), ns(rb)) is None:
            errs.append(f"RoleBinding {name(rb)}: names missing Role {ref.get('name')}")
        if ref.get("kind") == "ClusterRole" and find(objs, "ClusterRole", ref.get("name")) is None:
            errs.append(f"RoleBinding {name(rb)}: names missing ClusterRole {ref.get('name')}")
        for s in rb.get("subjects", []):
            if s.get("kind") == "ServiceAccount" and find(objs, "ServiceAccount", s.get("name"), s.get("namespace", ns(rb))) is None:
                errs.append(f"RoleBinding {name(rb)}: names missing ServiceAccount {s.get('name')}")
    for d in of_kind(objs, "Deployment"):
        sa = pod_spec(d).get("serviceAccountName")
        if sa and find(objs, "ServiceAccount", sa, ns(d)) is None:
            errs.append(f"Deployment {name(d)}: serviceAccountName {sa} is not defined")
    # The router and the picker watch the pool and its pods: their accounts need these rights.
    needed = {("", "pods"), ("", "services"), ("discovery.k8s.io", "endpointslices"), (INFERENCE_GROUP, "inferencepools")}
    for sub in ("route", "picker"):
        for d, _ in deployment_running(objs, sub):
            sa = pod_spec(d).get("serviceAccountName")
            granted = set()
            for rb in of_kind(objs, "RoleBinding"):
                if ns(rb) != ns(d) or not any(s.get("kind") == "ServiceAccount" and s.get("name") == sa for s in rb.get("subjects", [])):
                    continue
                role = find(objs, "Role", rb.get("roleRef", {}).get("name"), ns(rb))
                for rule in (role or {}).get("rules", []):
                    if {"get", "list", "watch"} <= set(rule.get("verbs", [])):
                        granted |= {(g, r) for g in rule.get("apiGroups", []) for r in rule.get("resources", [])}
            for missing in sorted(needed - granted):
                errs.append(f"Deployment {name(d)}: ServiceAccount {sa} may not get/list/watch {missing[1]} ({missing[0] or 'core'})")
    return errs


def check_router_secrets(objs: list[dict]) -> list[str]:
    errs = []
    want = {"SOUVERAIN_DATABASE_URL": ("souverain-db", "url"), "SOUVERAIN_KEY_HASH_SECRET": ("souverain-db", "key-hash-secret")}
    for d, c in deployment_running(objs, "route"):
        env = {e.get("name"): e for e in c.get("env", [])}
        for var, (secret, key) in want.items():
            ref = (env.get(var, {}).get("valueFrom") or {}).get("secretKeyRef") or {}
            if (ref.get("name"), ref.get("key")) != (secret, key):
                errs.append(f"Deployment {name(d)}: {var} is not from Secret {secret} key {key}")
    return errs


CROSS_CHECKS = [
    check_kinds_known,
    check_namespaces,
    check_deployment_selectors,
    check_service_selectors,
    check_pdb_selectors,
    check_probes,
    check_security,
    check_volumes,
    check_config_files,
    check_router_toml,
    check_picker_listen,
    check_replicas,
    check_inference_pools,
    check_rbac,
    check_router_secrets,
]


@pytest.mark.parametrize("check", CROSS_CHECKS, ids=lambda f: f.__name__)
def test_cross_references(check):
    assert check(OBJECTS) == []


def test_router_toml_is_the_routers_format():
    cfg, errs = router_toml(OBJECTS)
    assert errs == []
    assert cfg["listen"] == "0.0.0.0:8080"
    assert cfg["routing"]["strategy"] == "scored"
    assert cfg["discovery"]["kubernetes"] == {
        "namespace": "souverain",
        "inference_pool": "souverain-pool",
        "engine": "souverain",
        "region_label": "topology.kubernetes.io/region",
    }


def test_replica_region_label():
    (d, _), = deployment_running(OBJECTS, "serve")
    assert pod_labels(d)["topology.kubernetes.io/region"] == "eu-west-paris"
    for key, value in {"app.kubernetes.io/name": "souverain", "app.kubernetes.io/component": "replica",
                       "souverain.eu/pool": "default"}.items():
        assert pod_labels(d)[key] == value


def test_picker_service_speaks_http2():
    svc = find(OBJECTS, "Service", "souverain-picker", NAMESPACE)
    (port,) = svc["spec"]["ports"]
    assert (port["name"], port["port"], port["appProtocol"]) == ("grpc-ext-proc", 9002, "http2")


# --------------------------------------------------------------------------------------------
# Negative tests: each validator can fail.


def mutated(kind: str, obj_name: str, mutate) -> tuple[list[dict], dict]:
    """A deep copy of all objects with one object changed by `mutate(obj)`."""
    objs = copy.deepcopy(OBJECTS)
    target = find(objs, kind, obj_name) if kind != "InferencePool" else next(o for o in objs if is_inference_pool(o) and name(o) == obj_name)
    assert target is not None, f"{kind}/{obj_name} not in the manifests"
    mutate(target)
    return objs, target


def replica_container(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "kind,obj_name,mutate,expect",
    [
        ("Deployment", "souverain-replica", lambda o: replica_container(o).update(gpuCount=1), "gpuCount"),
        ("Deployment", "souverain-replica", lambda o: o["spec"].update(replicas="three"), "replicas"),
        ("Deployment", "souverain-router", lambda o: replica_container(o)["ports"][0].update(containerPort="8080"), "containerPort"),
        ("Deployment", "souverain-picker", lambda o: replica_container(o)["readinessProbe"]["grpc"].update(port="grpc-ext-proc"), "port"),
        ("Deployment", "souverain-replica", lambda o: o["spec"].pop("selector"), "selector"),
        ("Service", "souverain-router", lambda o: o["spec"]["ports"][0].update(port="eighty"), "port"),
        ("PodDisruptionBudget", "souverain-replica", lambda o: o["spec"].update(maxUnavailble=1), "maxUnavailble"),
        ("Role", "souverain-discovery", lambda o: o["rules"][0].update(verbs="get"), "verbs"),
        ("ConfigMap", "souverain-router", lambda o: o.update(data={"router.toml": 7}), "router.toml"),
    ],
    ids=["unknown-container-field", "replicas-string", "containerPort-string", "grpc-probe-named-port",
         "deployment-without-selector", "service-port-string", "pdb-typo", "role-verbs-string", "configmap-int"],
)
def test_kubernetes_schema_rejects(kind, obj_name, mutate, expect, version):
    _, obj = mutated(kind, obj_name, mutate)
    errs = k8s_errors(obj, version)
    assert errs, f"{kind}/{obj_name} mutation was accepted"
    assert expect in errs[0], errs


def test_kubernetes_schema_rejects_unknown_kind():
    obj = {"apiVersion": "apps/v1", "kind": "Deploymint", "metadata": {"name": "x"}}
    assert k8s_errors(obj, K8S_VERSIONS[0])


def pool(obj_name: str = "souverain-pool") -> dict:
    return copy.deepcopy(next(o for o in OBJECTS if is_inference_pool(o) and name(o) == obj_name))


def _drop_port(p):
    del p["spec"]["endpointPickerRef"]["port"]


def _drop_port_and_kind(p):
    del p["spec"]["endpointPickerRef"]["port"]
    del p["spec"]["endpointPickerRef"]["kind"]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda p: p["spec"].pop("selector"),
        lambda p: p["spec"].pop("targetPorts"),
        lambda p: p["spec"].pop("endpointPickerRef"),
        lambda p: p.pop("spec"),
        lambda p: p["spec"]["endpointPickerRef"].update(failureMode="FailSometimes"),
        lambda p: p["spec"]["endpointPickerRef"].update(failureMode="failClose"),
        lambda p: p["spec"]["endpointPickerRef"].pop("name"),
        lambda p: p["spec"]["endpointPickerRef"].update(name=""),
        lambda p: p["spec"]["endpointPickerRef"].update(portNumber=9002),
        lambda p: p["spec"]["endpointPickerRef"]["port"].update(number=0),
        lambda p: p["spec"]["endpointPickerRef"].update(kind="Service/v1"),
        lambda p: p["spec"]["endpointPickerRef"].update(group="Bad_Group"),
        _drop_port,
        _drop_port_and_kind,
        lambda p: p["spec"].update(targetPorts=[]),
        lambda p: p["spec"].update(targetPorts=[{"number": 70000}]),
        lambda p: p["spec"].update(targetPorts=[{"number": "8000"}]),
        lambda p: p["spec"].update(targetPorts=[{"port": 8000}]),
        lambda p: p["spec"].update(targetPortNumber=8000),
        lambda p: p["spec"].update(extensionRef={"name": "souverain-picker"}),
        lambda p: p["spec"]["selector"].update(matchExpressions=[]),
        lambda p: p["spec"].update(selector={}),
        lambda p: p["spec"]["selector"]["matchLabels"].update({"souverain.eu/pool": "not a label value"}),
        lambda p: p["spec"]["selector"]["matchLabels"].update({"bad key!": "x"}),
        lambda p: p["spec"]["selector"].update(matchLabels={f"k{i}": "v" for i in range(65)}),
        lambda p: p.update(apiVersion="inference.networking.x-k8s.io/v1alpha2"),
        lambda p: p["metadata"].pop("name"),
        lambda p: p["metadata"].update(name="Souverain_Pool"),
        lambda p: p.update(status={"parents": [{"conditions": []}]}),
    ],
    ids=[
        "no-selector", "no-targetPorts", "no-endpointPickerRef", "no-spec", "bad-failureMode",
        "lowercase-failureMode", "ref-no-name", "ref-empty-name", "ref-portNumber-field", "ref-port-zero",
        "ref-bad-kind", "ref-bad-group", "service-ref-without-port", "default-kind-ref-without-port",
        "empty-targetPorts", "targetPort-out-of-range", "targetPort-string", "targetPort-wrong-field",
        "v1alpha2-targetPortNumber", "v1alpha2-extensionRef", "matchExpressions", "selector-without-matchLabels",
        "bad-label-value", "bad-label-key", "too-many-labels", "wrong-apiVersion", "no-name", "bad-name",
        "status-parent-without-parentRef",
    ],
)
def test_inferencepool_schema_rejects(mutate):
    p = pool()
    mutate(p)
    assert pool_errors(p), "mutated InferencePool was accepted"


def test_inferencepool_schema_accepts_variants():
    """Documented optional forms stay valid: defaults left out for a non-Service kind, FailOpen, a status."""
    p = pool()
    ref = p["spec"]["endpointPickerRef"]
    ref.update(failureMode="FailOpen")
    assert pool_errors(p) == []
    del ref["group"], ref["failureMode"]
    assert pool_errors(p) == []
    p2 = pool()
    p2["spec"]["endpointPickerRef"] = {"group": "example.com", "kind": "EndpointPicker", "name": "epp"}
    assert pool_errors(p2) == []
    p["status"] = {"parents": [{"parentRef": {"name": "gw", "namespace": "souverain"}, "conditions": [{
        "type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
        "lastTransitionTime": "2025-09-01T00:00:00Z", "observedGeneration": 1}]}]}
    assert pool_errors(p) == []


def _router_toml(mutate_cfg):
    def mutate(cm):
        text = cm["data"]["router.toml"]
        cm["data"]["router.toml"] = mutate_cfg(text)
    return mutate


def _container_of(sub):
    def get(objs):
        return next(c for d, c in deployment_running(objs, sub))
    return get


@pytest.mark.parametrize(
    "check,kind,obj_name,mutate",
    [
        (check_service_selectors, "Service", "souverain-replicas",
         lambda o: o["spec"]["selector"].update({"souverain.eu/pool": "other"})),
        (check_service_selectors, "Service", "souverain-picker",
         lambda o: o["spec"]["ports"][0].update(targetPort="grpc")),
        (check_deployment_selectors, "Deployment", "souverain-router",
         lambda o: o["spec"]["selector"]["matchLabels"].update({"app.kubernetes.io/component": "routeur"})),
        (check_pdb_selectors, "PodDisruptionBudget", "souverain-router",
         lambda o: o["spec"]["selector"]["matchLabels"].update({"app.kubernetes.io/component": "nothing"})),
        (check_pdb_selectors, "PodDisruptionBudget", "souverain-router",
         lambda o: o["spec"].update(minAvailable=2)),
        (check_probes, "Deployment", "souverain-replica",
         lambda o: replica_container(o)["readinessProbe"]["httpGet"].update(port="metrics")),
        (check_probes, "Deployment", "souverain-picker",
         lambda o: replica_container(o)["livenessProbe"]["grpc"].update(port=9003)),
        (check_probes, "Deployment", "souverain-router",
         lambda o: replica_container(o).pop("livenessProbe")),
        (check_security, "Deployment", "souverain-router",
         lambda o: replica_container(o)["securityContext"].update(readOnlyRootFilesystem=False)),
        (check_security, "Deployment", "souverain-replica",
         lambda o: replica_container(o)["resources"].pop("limits")),
        (check_volumes, "Deployment", "souverain-picker",
         lambda o: o["spec"]["template"]["spec"]["volumes"][0]["configMap"].update(name="missing")),
        (check_config_files, "Deployment", "souverain-router",
         lambda o: replica_container(o)["args"].__setitem__(2, "/etc/other/router.toml")),
        (check_router_toml, "ConfigMap", "souverain-router",
         _router_toml(lambda t: t.replace('inference_pool = "souverain-pool"', 'inference_pool = "other-pool"'))),
        (check_router_toml, "ConfigMap", "souverain-router",
         _router_toml(lambda t: t.replace('listen = "0.0.0.0:8080"', 'listen = "0.0.0.0:9090"'))),
        (check_router_toml, "ConfigMap", "souverain-router",
         _router_toml(lambda t: t.replace("[scrape]", "[scrap]"))),
        (check_router_toml, "ConfigMap", "souverain-router",
         _router_toml(lambda t: t + "\nthis is = not toml = at all\n")),
        (check_router_toml, "Deployment", "souverain-replica",
         lambda o: o["spec"]["template"]["metadata"]["labels"].pop("topology.kubernetes.io/region")),
        (check_picker_listen, "Deployment", "souverain-picker",
         lambda o: replica_container(o)["args"].__setitem__(4, "0.0.0.0:9100")),
        (check_picker_listen, "Deployment", "souverain-picker",
         lambda o: replica_container(o)["args"].__setitem__(6, "0.0.0.0:9191")),
        (check_replicas, "Deployment", "souverain-replica",
         lambda o: replica_container(o)["volumeMounts"][0].update(readOnly=False)),
        (check_replicas, "Deployment", "souverain-replica",
         lambda o: replica_container(o)["args"].__setitem__(4, "8001")),
        (check_inference_pools, "InferencePool", "souverain-pool",
         lambda o: o["spec"]["selector"]["matchLabels"].update({"souverain.eu/pool": "gpu"})),
        (check_inference_pools, "InferencePool", "souverain-pool",
         lambda o: o["spec"]["endpointPickerRef"].update(name="souverain-epp")),
        (check_inference_pools, "InferencePool", "souverain-pool",
         lambda o: o["spec"]["endpointPickerRef"]["port"].update(number=9003)),
        (check_inference_pools, "InferencePool", "souverain-pool",
         lambda o: o["spec"].update(targetPorts=[{"number": 8001}])),
        (check_inference_pools, "InferencePool", "souverain-pool",
         lambda o: o["spec"]["endpointPickerRef"].update(name="souverain-router", port={"number": 8080})),
        (check_rbac, "RoleBinding", "souverain-picker",
         lambda o: o["roleRef"].update(name="souverain-missing")),
        (check_rbac, "RoleBinding", "souverain-router",
         lambda o: o["subjects"][0].update(name="default")),
        (check_rbac, "Role", "souverain-discovery",
         lambda o: o["rules"].pop()),
        (check_rbac, "Deployment", "souverain-picker",
         lambda o: o["spec"]["template"]["spec"].update(serviceAccountName="souverain-ghost")),
        (check_router_secrets, "Deployment", "souverain-router",
         lambda o: replica_container(o)["env"][1]["valueFrom"]["secretKeyRef"].update(key="password")),
        (check_namespaces, "Service", "souverain-router",
         lambda o: o["metadata"].update(namespace="default")),
    ],
)
def test_cross_reference_checks_can_fail(check, kind, obj_name, mutate):
    objs, _ = mutated(kind, obj_name, mutate)
    assert check(objs), f"{check.__name__} accepted a broken {kind}/{obj_name}"


def test_documents_are_yaml_maps_with_shlex_safe_args():
    """Container args are plain strings (no accidental YAML ints/bools reaching the CLI parser)."""
    for d in of_kind(OBJECTS, "Deployment"):
        for c in pod_spec(d).get("containers", []):
            for a in c.get("args", []):
                assert isinstance(a, str), f"{name(d)}: arg {a!r} is not a string"
                assert shlex.quote(a) == a, f"{name(d)}: arg {a!r} needs quoting"
