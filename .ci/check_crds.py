#!/usr/bin/env python3
"""Checks for the deployment manifests under deploy/ that the Kubernetes
schemas cannot check.

    check_crds.py --list-builtin DIR...   print the files holding built-in
                                          kinds (for kubernetes-validate)
    check_crds.py DIR...                  check CRD kinds (ServingRuntime,
                                          InferenceService, ServiceMonitor;
                                          InferencePool, Gateway, HTTPRoute,
                                          GRPCRoute with check_gateway.py),
                                          kustomization.yaml and the links
                                          between manifests

Exits 1 with one line per problem when anything is wrong.
"""

from __future__ import annotations

import os
import re
import sys

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check_gateway  # noqa: E402

# Kinds this script checks itself (no schema bundled with kubernetes-validate).
CRD_KINDS = {
    "ServingRuntime": "serving.kserve.io/v1alpha1",
    "ClusterServingRuntime": "serving.kserve.io/v1alpha1",
    "InferenceService": "serving.kserve.io/v1beta1",
    "ServiceMonitor": "monitoring.coreos.com/v1",
    **check_gateway.GATEWAY_KINDS,
}
KUSTOMIZATION = "Kustomization"
# API groups whose kinds kubernetes-validate has schemas for.
BUILTIN_GROUPS = {
    "",
    "apps",
    "batch",
    "policy",
    "autoscaling",
    "networking.k8s.io",
    "rbac.authorization.k8s.io",
    "scheduling.k8s.io",
    "storage.k8s.io",
}

problems: list[str] = []


def fail(where: str, msg: str) -> None:
    problems.append(f"{where}: {msg}")


def yaml_files(dirs: list[str]) -> list[str]:
    out = []
    for d in dirs:
        if os.path.isfile(d):
            out.append(d)
            continue
        if not os.path.isdir(d):
            fail(d, "no such file or directory")
            continue
        for root, _, files in os.walk(d):
            for f in sorted(files):
                if f.endswith((".yaml", ".yml")):
                    out.append(os.path.join(root, f))
    return sorted(out)


def load(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as fh:
            docs = [d for d in yaml.safe_load_all(fh) if d is not None]
    except yaml.YAMLError as e:
        fail(path, f"not valid YAML: {e}")
        return []
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            fail(path, f"document {i} is not a mapping")
    return [d for d in docs if isinstance(d, dict)]


def group_of(api_version: str) -> str:
    return api_version.rsplit("/", 1)[0] if "/" in api_version else ""


def classify(doc: dict) -> str:
    kind = doc.get("kind")
    if kind == KUSTOMIZATION:
        return "kustomization"
    if kind in CRD_KINDS:
        return "crd"
    if isinstance(doc.get("apiVersion"), str) and group_of(doc["apiVersion"]) in BUILTIN_GROUPS:
        return "builtin"
    return "unknown"


def get(d, *path, default=None):
    for p in path:
        if isinstance(d, dict) and p in d:
            d = d[p]
        elif isinstance(d, list) and isinstance(p, int) and 0 <= p < len(d):
            d = d[p]
        else:
            return default
    return d


def port_of(addr: str | None) -> int | None:
    m = re.search(r":(\d+)$", addr or "")
    return int(m.group(1)) if m else None


def selector_matches(selector: dict, labels: dict) -> bool:
    labels = labels or {}
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        k, op, vals = e.get("key"), e.get("operator"), e.get("values") or []
        if op == "In" and labels.get(k) not in vals:
            return False
        if op == "NotIn" and labels.get(k) in vals:
            return False
        if op == "Exists" and k not in labels:
            return False
        if op == "DoesNotExist" and k in labels:
            return False
    return bool(selector.get("matchLabels") or selector.get("matchExpressions"))


def check_common(path: str, doc: dict) -> str:
    kind = doc.get("kind")
    where = f"{path} ({kind or '?'} {get(doc, 'metadata', 'name', default='?')})"
    if not isinstance(doc.get("apiVersion"), str) or not doc["apiVersion"]:
        fail(where, "apiVersion is missing")
    if not isinstance(kind, str) or not kind:
        fail(where, "kind is missing")
    if kind != KUSTOMIZATION:
        name = get(doc, "metadata", "name")
        if not isinstance(name, str) or not name:
            fail(where, "metadata.name is missing")
    if kind in CRD_KINDS and doc.get("apiVersion") != CRD_KINDS[kind]:
        fail(where, f"apiVersion must be {CRD_KINDS[kind]}, got {doc.get('apiVersion')!r}")
    return where


def check_container_args(where: str, container: dict, repo: str) -> dict:
    args = container.get("args")
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        fail(where, "container args must be a non-empty list of strings")
        return {}
    flags = check_gateway.flag_values(args)
    if args[0] != "serve":
        fail(where, f"container args must start with the `serve` subcommand, got {args[0]!r}")
    if flags.get("--model-repository") != repo:
        fail(where, f"--model-repository must be {repo}, got {flags.get('--model-repository')!r}")
    grpc = flags.get("--grpc-addr")
    if not grpc or not grpc.startswith("0.0.0.0:"):
        fail(where, f"--grpc-addr must listen on 0.0.0.0 in a container, got {grpc!r}")
    metrics = flags.get("--metrics-addr")
    if metrics is not None and not metrics.startswith("0.0.0.0:"):
        fail(where, f"--metrics-addr must listen on 0.0.0.0 in a container, got {metrics!r}")
    return flags


def check_probes(where: str, container: dict, grpc_port: int | None) -> None:
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        p = container.get(probe)
        if p is None:
            continue
        port = get(p, "grpc", "port")
        if port is None:
            continue
        if port != grpc_port:
            fail(where, f"{probe}.grpc.port {port} is not the worker's gRPC port {grpc_port}")


def grace_needed(container: dict, flags: dict) -> int:
    try:
        exit_timeout = int(flags.get("--exit-timeout") or 30)
    except ValueError:
        return 30
    sleep = 0
    cmd = get(container, "lifecycle", "preStop", "exec", "command", default=[]) or []
    if len(cmd) >= 2 and str(cmd[0]).endswith("sleep") and str(cmd[1]).isdigit():
        sleep = int(cmd[1])
    sleep = max(sleep, int(get(container, "lifecycle", "preStop", "sleep", "seconds", default=0) or 0))
    return exit_timeout + sleep


def main(argv: list[str]) -> int:
    list_builtin = False
    if argv and argv[0] == "--list-builtin":
        list_builtin = True
        argv = argv[1:]
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2

    files = yaml_files(argv)
    loaded = {f: load(f) for f in files}

    if list_builtin:
        for f, docs in loaded.items():
            classes = {classify(d) for d in docs}
            if "builtin" in classes:
                if classes != {"builtin"}:
                    fail(f, "mixes built-in kinds with CRD/other kinds; keep CRD kinds in their own files")
                else:
                    print(f)
        for p in problems:
            print(f"FAIL {p}", file=sys.stderr)
        return 1 if problems else 0

    if not files:
        fail(" ".join(argv), "no YAML files found")

    by_kind: dict[str, list[tuple[str, dict]]] = {}
    for f, docs in loaded.items():
        if not docs:
            fail(f, "holds no YAML document")
        for d in docs:
            where = check_common(f, d)
            if classify(d) == "unknown":
                fail(where, "unknown kind: neither a built-in Kubernetes kind nor one this checker knows")
            by_kind.setdefault(d.get("kind"), []).append((f, d))

    # --- kustomization.yaml: every listed resource exists, every manifest is listed
    for f, k in by_kind.get(KUSTOMIZATION, []):
        base = os.path.dirname(f)
        with open(f, encoding="utf-8") as fh:
            text = fh.read()
        listed = k.get("resources") or []
        if not listed:
            fail(f, "kustomization lists no resources")
        for r in listed:
            if not os.path.exists(os.path.join(base, r)):
                fail(f, f"resource {r!r} does not exist")
        for other in sorted(os.listdir(base)):
            if not other.endswith((".yaml", ".yml")) or os.path.join(base, other) == f:
                continue
            if other not in listed and not re.search(r"#\s*-\s*" + re.escape(other) + r"\b", text):
                fail(f, f"{other} is neither a resource nor listed as an optional (commented) one")

    # --- built-in kinds: links between Deployment, Service, PDB
    services = by_kind.get("Service", [])
    deployments = by_kind.get("Deployment", [])
    worker_deployments = []
    for f, dep in deployments + by_kind.get("StatefulSet", []):
        pod_labels = get(dep, "spec", "template", "metadata", "labels", default={}) or {}
        if not selector_matches(get(dep, "spec", "selector", default={}) or {}, pod_labels):
            fail(f"{f} ({dep.get('kind')} {get(dep, 'metadata', 'name')})", "spec.selector does not match the pod template labels")
    for f, dep in deployments:
        where = f"{f} (Deployment {get(dep, 'metadata', 'name')})"
        pod_labels = get(dep, "spec", "template", "metadata", "labels", default={}) or {}
        containers = get(dep, "spec", "template", "spec", "containers", default=[]) or []
        if not any(_is_worker_image(c) or "serve" in (c.get("args") or [])[:1] for c in containers):
            continue  # another program (the endpoint picker): checked by check_gateway.py
        workers = [c for c in containers if "serve" in (c.get("args") or [])[:1]]
        if not workers:
            fail(where, "no container runs `serve`")
            continue
        c = workers[0]
        flags = check_container_args(where, c, _models_mount(c))
        worker_deployments.append((f, dep, c, flags))
        grpc_port = port_of(flags.get("--grpc-addr"))
        check_probes(where, c, grpc_port)
        for probe in ("readinessProbe", "livenessProbe"):
            if get(c, probe, "grpc") is None:
                fail(where, f"{probe} must be a native gRPC probe (grpc.health.v1)")
        if get(c, "resources", "limits", "aws.amazon.com/neuroncore") is None:
            fail(where, "the worker container does not request aws.amazon.com/neuroncore")
        grace = get(dep, "spec", "template", "spec", "terminationGracePeriodSeconds", default=30)
        need = grace_needed(c, flags)
        if not isinstance(grace, int) or grace <= need:
            fail(where, f"terminationGracePeriodSeconds ({grace}) must exceed preStop + --exit-timeout ({need})")
        ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
        if grpc_port is not None and grpc_port not in ports.values():
            fail(where, f"container does not expose the gRPC port {grpc_port}")
        mport = port_of(flags.get("--metrics-addr"))
        if mport is not None and mport not in ports.values():
            fail(where, f"container does not expose the metrics port {mport}")
        selected = [s for _, s in services if selector_matches({"matchLabels": get(s, "spec", "selector", default={})}, pod_labels)]
        if not selected:
            fail(where, "no Service selects its pods")
        for s in selected:
            for sp in get(s, "spec", "ports", default=[]) or []:
                tp = sp.get("targetPort")
                if isinstance(tp, str) and tp not in ports:
                    fail(where, f"Service {get(s, 'metadata', 'name')} targets port name {tp!r} the container lacks")
                if isinstance(tp, int) and tp not in ports.values():
                    fail(where, f"Service {get(s, 'metadata', 'name')} targets port {tp} the container lacks")
        for pf, pdb in by_kind.get("PodDisruptionBudget", []):
            if not selector_matches(get(pdb, "spec", "selector", default={}) or {}, pod_labels):
                fail(f"{pf} (PodDisruptionBudget {get(pdb, 'metadata', 'name')})", "selector does not match the worker pods")

    # --- ServingRuntime
    runtimes: dict[str, dict] = {}
    for f, sr in by_kind.get("ServingRuntime", []) + by_kind.get("ClusterServingRuntime", []):
        where = f"{f} ({sr.get('kind')} {get(sr, 'metadata', 'name')})"
        runtimes[get(sr, "metadata", "name")] = sr
        containers = get(sr, "spec", "containers")
        if not isinstance(containers, list) or not containers or not isinstance(containers[0], dict):
            fail(where, "spec.containers[0] is missing")
            continue
        c = containers[0]
        if not isinstance(c.get("image"), str) or not c["image"]:
            fail(where, "spec.containers[0].image is missing")
        if c.get("name") != "kserve-container":
            fail(where, "spec.containers[0].name must be kserve-container (KServe injects storage and ports by that name)")
        flags = check_container_args(where, c, "/mnt/models")
        grpc_port = port_of(flags.get("--grpc-addr"))
        check_probes(where, c, grpc_port)
        formats = get(sr, "spec", "supportedModelFormats")
        if not isinstance(formats, list) or not formats:
            fail(where, "spec.supportedModelFormats is missing or empty")
        else:
            for i, fm in enumerate(formats):
                if not isinstance(fm, dict) or not isinstance(fm.get("name"), str) or not fm["name"]:
                    fail(where, f"spec.supportedModelFormats[{i}].name is missing")
        protos = get(sr, "spec", "protocolVersions", default=[]) or []
        if "grpc-v2" not in protos:
            fail(where, f"spec.protocolVersions must contain grpc-v2, got {protos!r}")
        h2c = [p for p in c.get("ports") or [] if p.get("name") == "h2c"]
        if h2c and grpc_port is not None and h2c[0].get("containerPort") != grpc_port:
            fail(where, f"port h2c ({h2c[0].get('containerPort')}) is not the --grpc-addr port ({grpc_port})")

    # --- InferenceService
    for f, isvc in by_kind.get("InferenceService", []):
        where = f"{f} (InferenceService {get(isvc, 'metadata', 'name')})"
        model = get(isvc, "spec", "predictor", "model")
        if not isinstance(model, dict):
            fail(where, "spec.predictor.model is missing")
            continue
        rt_name = model.get("runtime")
        if rt_name not in runtimes:
            fail(where, f"spec.predictor.model.runtime {rt_name!r} is not a ServingRuntime defined here ({sorted(runtimes)})")
            continue
        rt = runtimes[rt_name]
        supported = [fm.get("name") for fm in get(rt, "spec", "supportedModelFormats", default=[]) or [] if isinstance(fm, dict)]
        fmt = get(model, "modelFormat", "name")
        if fmt not in supported:
            fail(where, f"modelFormat.name {fmt!r} is not supported by runtime {rt_name} ({supported})")
        proto = model.get("protocolVersion")
        if proto is not None and proto not in (get(rt, "spec", "protocolVersions", default=[]) or []):
            fail(where, f"protocolVersion {proto!r} is not offered by runtime {rt_name}")
        if not model.get("storageUri"):
            fail(where, "spec.predictor.model.storageUri is missing")
        rc = (get(rt, "spec", "containers", default=[{}]) or [{}])[0]
        need = grace_needed(rc, check_gateway.flag_values(rc.get("args") or []))
        grace = get(isvc, "spec", "predictor", "terminationGracePeriodSeconds")
        if grace is not None and (not isinstance(grace, int) or grace <= need):
            fail(where, f"terminationGracePeriodSeconds ({grace}) must exceed the runtime's --exit-timeout ({need})")

    # --- ServiceMonitor
    for f, sm in by_kind.get("ServiceMonitor", []):
        where = f"{f} (ServiceMonitor {get(sm, 'metadata', 'name')})"
        sel = get(sm, "spec", "selector")
        if not isinstance(sel, dict):
            fail(where, "spec.selector is missing")
            continue
        matched = [s for _, s in services if selector_matches(sel, get(s, "metadata", "labels", default={}))]
        if not matched:
            fail(where, "spec.selector matches the labels of no Service")
            continue
        endpoints = get(sm, "spec", "endpoints", default=[]) or []
        if not endpoints:
            fail(where, "spec.endpoints is empty")
        for ep in endpoints:
            port = ep.get("port")
            for s in matched:
                names = [p.get("name") for p in get(s, "spec", "ports", default=[]) or []]
                if port not in names:
                    fail(where, f"endpoint port {port!r} is not a port name of Service {get(s, 'metadata', 'name')} ({names})")

    # --- deploy/gateway: InferencePools, endpoint pickers, routes, session store
    check_gateway.check(by_kind, worker_deployments, fail)

    if problems:
        for p in problems:
            print(f"FAIL {p}", file=sys.stderr)
        print(f"{len(problems)} problem(s) in the deployment manifests", file=sys.stderr)
        return 1
    kinds = sorted(k for k in by_kind if k)
    print(f"ok: {len(files)} files, kinds checked: {', '.join(kinds)}")
    return 0


def _is_worker_image(container: dict) -> bool:
    image = str(container.get("image") or "")
    return image.rsplit("/", 1)[-1].startswith("neuron-worker")


def _models_mount(container: dict) -> str:
    """Where the Deployment mounts the model repository (default /models)."""
    for m in container.get("volumeMounts") or []:
        if m.get("name") == "models":
            return m.get("mountPath")
    return "/models"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
