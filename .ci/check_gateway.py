"""Checks of the fleet manifests (deploy/gateway), called by check_crds.py:

- InferencePool, Gateway, HTTPRoute and GRPCRoute against the OpenAPI schemas
  of their CRDs at the pinned releases (.ci/crds/*.yaml, see vendor.py there),
  strictly: a field the schema does not define is an error, as with
  `kubectl apply --validate=strict`. The CEL rules of the CRDs
  (x-kubernetes-validations) are not evaluated; the ones that matter here are
  checked by hand below.
- the links: a pool's selector matches the worker pods, its target ports are
  the worker's ports for the pool's app protocol, its endpoint picker Service
  exists, serves the port it names and selects the one picker Deployment run
  with --pool-name=<pool>; the picker's config (EndpointPickerConfig in a
  ConfigMap) refers to plugins it defines, of types the pinned router has,
  scrapes the worker's metrics port, reads our metric names and our session
  header; routes hang on a listener of a Gateway defined here that allows
  their kind, and send to a pool defined here of the right protocol; the
  worker's --session-store (after the kustomization's patches) names a
  Service defined here on the store's port.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Callable

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
GATEWAY_KINDS = {
    "InferencePool": "inference.networking.k8s.io/v1",
    "Gateway": "gateway.networking.k8s.io/v1",
    "HTTPRoute": "gateway.networking.k8s.io/v1",
    "GRPCRoute": "gateway.networking.k8s.io/v1",
}
# Plugin types registered by llm-d-router v0.10.0 (cmd/epp/runner/runner.go)
# that these configs may use; Alpha ones need --allow-experimental-plugins.
EPP_PLUGINS = {
    "openai-parser", "passthrough-parser", "vllmgrpc-parser", "vllmhttp-parser", "anthropic-parser",
    "metrics-data-source", "core-metrics-extractor",
    "queue-scorer", "running-requests-size-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer",
    "active-request-scorer", "load-aware-scorer", "session-affinity-scorer", "session-affinity-filter",
    "max-score-picker", "random-picker", "weighted-random-picker", "single-profile-handler",
}
EPP_ALPHA = {"session-affinity-scorer", "session-affinity-filter"}
EPP_CONFIG_API = "llm-d.ai/v1alpha1"
SESSION_HEADER = "x-session-id"  # the worker's session header (src/server/session_turn.rs)
# pool appProtocol -> the worker flag whose port the pool must target
PROTOCOL_FLAG = {"kubernetes.io/h2c": "--grpc-addr", "http": "--http-addr"}
ROUTE_PROTOCOL = {"HTTPRoute": "http", "GRPCRoute": "kubernetes.io/h2c"}


def _get(d, *path, default=None):
    for p in path:
        if isinstance(d, dict) and p in d:
            d = d[p]
        elif isinstance(d, list) and isinstance(p, int) and 0 <= p < len(d):
            d = d[p]
        else:
            return default
    return d


def _strict(schema):
    """The schema with unknown fields forbidden wherever the CRD lists fields."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def load_schemas() -> dict:
    schemas = {}
    for kind in GATEWAY_KINDS:
        with open(os.path.join(HERE, "crds", f"{kind}.yaml"), encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
        schemas[kind] = _strict(doc["schema"])
    return schemas


def validate_schema(where: str, kind: str, doc: dict, schemas: dict, fail: Callable[[str, str], None]) -> None:
    import jsonschema  # installed by check-deploy.sh (and a dependency of kubernetes-validate)

    v = jsonschema.Draft4Validator(schemas[kind])
    for e in sorted(v.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        path = ".".join(str(p) for p in e.absolute_path) or "(top)"
        fail(where, f"{kind} schema: {path}: {e.message}")


def selector_matches(match_labels: dict, labels: dict) -> bool:
    return bool(match_labels) and all((labels or {}).get(k) == v for k, v in match_labels.items())


def flag_values(args) -> dict[str, str | None]:
    """`--flag=value` and `--flag value` forms; a bare flag maps to None (check_crds.py uses it
    too)."""
    out: dict[str, str | None] = {}
    args = [str(a) for a in args or []]
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            if "=" in a:
                k, v = a.split("=", 1)
                out[k] = v
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                out[a] = args[i + 1]
                i += 1
            else:
                out[a] = None
        i += 1
    return out


def port_of(addr) -> int | None:
    m = re.search(r":(\d+)(/.*)?$", addr or "")
    return int(m.group(1)) if m else None


def apply_patches(by_kind: dict, fail) -> dict[str, list[str]]:
    """The worker Deployments' container args after the JSON 6902 `add .../args/-`
    patches of each kustomization that lists ../k8s, keyed by kustomization file."""
    out = {}
    for f, k in by_kind.get("Kustomization", []):
        for p in k.get("patches") or []:
            target = p.get("target") or {}
            if target.get("kind") != "Deployment" or not isinstance(p.get("patch"), str):
                continue
            try:
                ops = yaml.safe_load(p["patch"])
            except yaml.YAMLError as e:
                fail(f, f"patch for Deployment {target.get('name')} is not YAML: {e}")
                continue
            deps = [d for _, d in by_kind.get("Deployment", []) if _get(d, "metadata", "name") == target.get("name")]
            if not deps:
                fail(f, f"patch targets Deployment {target.get('name')!r}, which no manifest defines")
                continue
            dep = copy.deepcopy(deps[0])
            for op in ops if isinstance(ops, list) else []:
                m = re.fullmatch(r"/spec/template/spec/containers/(\d+)/args/-", str(op.get("path")))
                if op.get("op") != "add" or not m:
                    fail(f, f"patch op {op!r}: the checker only understands `add` to .../containers/N/args/-")
                    continue
                c = _get(dep, "spec", "template", "spec", "containers", int(m.group(1)))
                if not isinstance(c, dict):
                    fail(f, f"patch path {op['path']}: no such container")
                    continue
                c.setdefault("args", []).append(op.get("value"))
            out[f] = _get(dep, "spec", "template", "spec", "containers", 0, "args", default=[])
    return out


def check(by_kind: dict, workers: list, fail: Callable[[str, str], None]) -> None:
    """`workers`: (file, Deployment, worker container, flags) of every worker Deployment."""
    schemas = load_schemas()
    for kind, api in GATEWAY_KINDS.items():
        for f, d in by_kind.get(kind, []):
            where = f"{f} ({kind} {_get(d, 'metadata', 'name')})"
            if d.get("apiVersion") != api:
                fail(where, f"apiVersion must be {api}, got {d.get('apiVersion')!r}")
                continue
            validate_schema(where, kind, d, schemas, fail)

    services = {_get(s, "metadata", "name"): s for _, s in by_kind.get("Service", [])}
    deployments = by_kind.get("Deployment", [])
    configmaps = {_get(c, "metadata", "name"): c for _, c in by_kind.get("ConfigMap", [])}

    # --- InferencePools
    pools = {}
    for f, pool in by_kind.get("InferencePool", []):
        name = _get(pool, "metadata", "name")
        where = f"{f} (InferencePool {name})"
        pools[name] = pool
        labels = _get(pool, "spec", "selector", "matchLabels", default={}) or {}
        proto = _get(pool, "spec", "appProtocol", default="http")
        selected = [w for w in workers if selector_matches(labels, _get(w[1], "spec", "template", "metadata", "labels"))]
        if not selected:
            fail(where, f"spec.selector {labels} matches the pods of no worker Deployment")
        ports = [p.get("number") for p in _get(pool, "spec", "targetPorts", default=[]) or [] if isinstance(p, dict)]
        if len(set(ports)) != len(ports):
            fail(where, f"targetPorts repeat a port: {ports}")
        for _, dep, c, flags in selected:
            cports = {p.get("containerPort") for p in c.get("ports") or []}
            want = port_of(flags.get(PROTOCOL_FLAG.get(proto, "")))
            for n in ports:
                if n not in cports:
                    fail(where, f"target port {n} is not a container port of Deployment {_get(dep, 'metadata', 'name')} ({sorted(cports)})")
                elif n != want:
                    fail(where, f"target port {n} is not the worker's {PROTOCOL_FLAG.get(proto)} port ({want}) for appProtocol {proto}")
        ref = _get(pool, "spec", "endpointPickerRef", default={}) or {}
        if ref.get("kind", "Service") == "Service" and _get(ref, "port", "number") is None:
            fail(where, "endpointPickerRef.port is required when kind is Service")
        svc = services.get(ref.get("name"))
        if svc is None:
            fail(where, f"endpointPickerRef names Service {ref.get('name')!r}, which no manifest defines")
            continue
        sport = [p for p in _get(svc, "spec", "ports", default=[]) or [] if p.get("port") == _get(ref, "port", "number")]
        if not sport:
            fail(where, f"Service {ref.get('name')} has no port {_get(ref, 'port', 'number')}")
        pickers = [
            (df, d) for df, d in deployments
            if selector_matches(_get(svc, "spec", "selector", default={}), _get(d, "spec", "template", "metadata", "labels"))
        ]
        if len(pickers) != 1:
            fail(where, f"Service {ref.get('name')} should select exactly one endpoint picker Deployment, selects {len(pickers)}")
            continue
        pf, picker = pickers[0]
        check_picker(f"{pf} (Deployment {_get(picker, 'metadata', 'name')})", picker, name, sport, configmaps, workers, fail)

    # --- Gateways and routes
    gateways = {_get(g, "metadata", "name"): g for _, g in by_kind.get("Gateway", [])}
    for kind in ("HTTPRoute", "GRPCRoute"):
        for f, r in by_kind.get(kind, []):
            where = f"{f} ({kind} {_get(r, 'metadata', 'name')})"
            parents = _get(r, "spec", "parentRefs", default=[]) or []
            if not parents:
                fail(where, "spec.parentRefs is empty: the route hangs on no Gateway")
            for pr in parents:
                g = gateways.get(pr.get("name"))
                if pr.get("kind", "Gateway") != "Gateway" or g is None:
                    fail(where, f"parentRef {pr.get('name')!r} is not a Gateway defined here ({sorted(gateways)})")
                    continue
                listeners = [
                    li for li in _get(g, "spec", "listeners", default=[]) or []
                    if pr.get("sectionName") in (None, li.get("name"))
                ]
                if not listeners:
                    fail(where, f"Gateway {pr.get('name')} has no listener {pr.get('sectionName')!r}")
                for li in listeners:
                    kinds = [k.get("kind") for k in _get(li, "allowedRoutes", "kinds", default=[]) or []]
                    if kinds and kind not in kinds:
                        fail(where, f"listener {li.get('name')} of Gateway {pr.get('name')} allows {kinds}, not {kind}")
            refs = [b for rule in _get(r, "spec", "rules", default=[]) or [] for b in rule.get("backendRefs") or []]
            if not refs:
                fail(where, "no backendRefs")
            for b in refs:
                if b.get("kind") != "InferencePool":
                    continue
                if b.get("group") != "inference.networking.k8s.io":
                    fail(where, f"backendRef {b.get('name')}: group must be inference.networking.k8s.io")
                pool = pools.get(b.get("name"))
                if pool is None:
                    fail(where, f"backendRef names InferencePool {b.get('name')!r}, which no manifest defines ({sorted(pools)})")
                elif _get(pool, "spec", "appProtocol", default="http") != ROUTE_PROTOCOL[kind]:
                    fail(where, f"InferencePool {b.get('name')} speaks {_get(pool, 'spec', 'appProtocol', default='http')}, a {kind} needs {ROUTE_PROTOCOL[kind]}")

    check_session_store(by_kind, services, fail)


def check_picker(where, picker, pool_name, sport, configmaps, workers, fail) -> None:
    containers = _get(picker, "spec", "template", "spec", "containers", default=[]) or []
    if not containers:
        fail(where, "no containers")
        return
    c = containers[0]
    flags = flag_values(c.get("args"))
    if flags.get("--pool-name") != pool_name:
        fail(where, f"--pool-name is {flags.get('--pool-name')!r}, but the Service selecting it is the picker of pool {pool_name}")
    if flags.get("--pool-group", "inference.networking.k8s.io") != "inference.networking.k8s.io":
        fail(where, "--pool-group must be inference.networking.k8s.io (the v1 InferencePool)")
    cports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
    for sp in sport:
        tp = sp.get("targetPort", sp.get("port"))
        n = cports.get(tp) if isinstance(tp, str) else tp
        if n not in cports.values():
            fail(where, f"the picker Service targets {tp!r}, which the picker container does not expose")
        elif n != int(flags.get("--grpc-port") or 9002):
            fail(where, f"the picker Service targets port {n}, but the picker's ext-proc --grpc-port is {flags.get('--grpc-port') or 9002}")
    cfg = flags.get("--config-file")
    mounts = {m.get("mountPath"): m.get("name") for m in c.get("volumeMounts") or []}
    vols = {v.get("name"): v for v in _get(picker, "spec", "template", "spec", "volumes", default=[]) or []}
    if not cfg or os.path.dirname(cfg) not in mounts:
        fail(where, f"--config-file {cfg!r} is not under a mounted volume ({sorted(mounts)})")
        return
    cm_name = _get(vols.get(mounts[os.path.dirname(cfg)]), "configMap", "name")
    cm = configmaps.get(cm_name)
    text = _get(cm, "data", os.path.basename(cfg))
    if not isinstance(text, str):
        fail(where, f"--config-file {cfg}: ConfigMap {cm_name!r} has no key {os.path.basename(cfg)!r}")
        return
    check_picker_config(f"{where} config {cm_name}/{os.path.basename(cfg)}", text, flags, workers, fail)


def check_picker_config(where, text, flags, workers, fail) -> None:
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        fail(where, f"not YAML: {e}")
        return
    if not isinstance(cfg, dict) or cfg.get("apiVersion") != EPP_CONFIG_API or cfg.get("kind") != "EndpointPickerConfig":
        fail(where, f"must be apiVersion {EPP_CONFIG_API}, kind EndpointPickerConfig")
        return
    plugins = {}
    for p in cfg.get("plugins") or []:
        t = p.get("type")
        if t not in EPP_PLUGINS:
            fail(where, f"plugin type {t!r} is not one llm-d-router v0.10.0 registers (known here: {sorted(EPP_PLUGINS)})")
        plugins[p.get("name") or t] = p
        if t in EPP_ALPHA and str(flags.get("--allow-experimental-plugins")).lower() != "true":
            fail(where, f"{t} is an Alpha plugin: the picker needs --allow-experimental-plugins=true")
    refs = [r.get("pluginRef") for prof in cfg.get("schedulingProfiles") or [] for r in prof.get("plugins") or []]
    refs += [r.get("pluginRef") for r in _get(cfg, "requestHandler", "parsers", default=[]) or []]
    for r in refs:
        if r not in plugins:
            fail(where, f"pluginRef {r!r} names no plugin of the config")
    if not cfg.get("schedulingProfiles"):
        fail(where, "no schedulingProfiles")
    metrics_ports = {port_of(w[3].get("--metrics-addr") or "127.0.0.1:8002") for w in workers}
    src = [p for p in plugins.values() if p.get("type") == "metrics-data-source"]
    for p in src:
        port = _get(p, "parameters", "port")
        if port not in metrics_ports:
            fail(where, f"metrics-data-source scrapes port {port}, the workers serve /metrics on {sorted(metrics_ports)}")
    if not src:
        fail(where, "no metrics-data-source: the picker would scrape the pool's target port, not the worker's metrics port")
    ext = [p for p in plugins.values() if p.get("type") == "core-metrics-extractor"]
    for p in ext:
        engines = {e.get("name"): e for e in _get(p, "parameters", "engineConfigs", default=[]) or []}
        default = _get(p, "parameters", "defaultEngine", default="vllm")
        if default not in engines:
            fail(where, f"defaultEngine {default!r} is not one of the engineConfigs ({sorted(engines)}): the picker would read vLLM names")
        for e in engines.values():
            for key in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec"):
                spec = e.get(key)
                if spec is None:
                    continue
                m = re.fullmatch(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?\s*", spec)
                if not m or not m.group(1).startswith("neuron_worker_"):
                    fail(where, f"engine {e.get('name')} {key} {spec!r} is not a neuron_worker_* metric selector")
    for p in plugins.values():
        if p.get("type") in ("session-affinity-scorer", "session-affinity-filter"):
            strategy = _get(p, "parameters", "strategy", default="encoded_endpoint_header")
            sources = _get(p, "parameters", "sessionIdConfig", "sources", default=[{"header": SESSION_HEADER}]) or []
            if strategy != "session_id" or not any(s.get("header") == SESSION_HEADER for s in sources):
                fail(where, f"{p.get('type')} must use strategy session_id with the header {SESSION_HEADER} (the worker's session header)")


def check_session_store(by_kind: dict, services: dict, fail) -> None:
    statefulsets = by_kind.get("StatefulSet", [])
    for f, args in apply_patches(by_kind, fail).items():
        store = flag_values(args).get("--session-store")
        if store is None:
            continue
        m = re.fullmatch(r"redis://(?:[^@/]*@)?([^:/]+):(\d+)(?:/(\d+))?", store)
        if not m:
            fail(f, f"--session-store {store!r} is not redis://host:port/db")
            continue
        host, port = m.group(1), int(m.group(2))
        name = host.split(".")[0]
        svc = services.get(name)
        if svc is None:
            fail(f, f"--session-store names host {host!r}, but no Service {name!r} is defined")
            continue
        sports = [p.get("port") for p in _get(svc, "spec", "ports", default=[]) or []]
        if port not in sports:
            fail(f, f"--session-store port {port} is not a port of Service {name} ({sports})")
        if _get(svc, "spec", "type") == "ExternalName":
            continue
        sel = _get(svc, "spec", "selector", default={}) or {}
        backing = [s for _, s in statefulsets if selector_matches(sel, _get(s, "spec", "template", "metadata", "labels"))]
        if not backing:
            fail(f, f"Service {name} of --session-store selects no StatefulSet's pods")
        for s in backing:
            cports = {}
            for c in _get(s, "spec", "template", "spec", "containers", default=[]) or []:
                cports.update({p.get("name"): p.get("containerPort") for p in c.get("ports") or []})
            for sp in _get(svc, "spec", "ports", default=[]) or []:
                tp = sp.get("targetPort", sp.get("port"))
                n = cports.get(tp) if isinstance(tp, str) else tp
                if n not in cports.values():
                    fail(f, f"Service {name} targets {tp!r}, which StatefulSet {_get(s, 'metadata', 'name')} does not expose")
