#!/usr/bin/env python3
"""Proves that check_crds.py (with check_gateway.py) fails on broken fleet
manifests: each case below copies the manifests of DIR... into a temporary
folder, breaks one thing (a wrong port, a wrong selector, a missing pool...),
runs the checker on the copy and requires exit status 1 with the expected
message. Exits 1 when the checker accepts a broken copy.

    check_gateway_negative.py DIR...   (the folders given to check_crds.py)
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))


def find(docs, kind, name):
    for d in docs:
        if d.get("kind") == kind and d.get("metadata", {}).get("name") == name:
            return d
    raise KeyError(f"{kind} {name} not in the manifests: update this case")


def picker_config(docs, key):
    cm = find(docs, "ConfigMap", "neuron-worker-epp")
    cfg = yaml.safe_load(cm["data"][key])
    return cm, cfg


def set_picker_config(cm, key, cfg):
    cm["data"][key] = yaml.safe_dump(cfg, sort_keys=False)


def plugin(cfg, ptype):
    return next(p for p in cfg["plugins"] if p["type"] == ptype)


def _metrics_port(d):
    cm, cfg = picker_config(d, "grpc.yaml")
    plugin(cfg, "metrics-data-source")["parameters"]["port"] = 8000
    set_picker_config(cm, "grpc.yaml", cfg)


def _token_affinity(d):
    cm, cfg = picker_config(d, "http.yaml")
    plugin(cfg, "session-affinity-scorer")["parameters"] = {}
    set_picker_config(cm, "http.yaml", cfg)


def _vllm_metric(d):
    cm, cfg = picker_config(d, "grpc.yaml")
    plugin(cfg, "core-metrics-extractor")["parameters"]["engineConfigs"][0]["kvUsageSpec"] = "vllm:kv_cache_usage_perc"
    set_picker_config(cm, "grpc.yaml", cfg)


def _unknown_ref(d):
    cm, cfg = picker_config(d, "grpc.yaml")
    cfg["schedulingProfiles"][0]["plugins"].append({"pluginRef": "lora-affinity-scorer"})
    set_picker_config(cm, "grpc.yaml", cfg)


def _store_host(d):
    k = next(x for x in d if x.get("kind") == "Kustomization" and x.get("patches"))
    k["patches"][0]["patch"] = k["patches"][0]["patch"].replace("redis://neuron-worker-sessions:", "redis://sessions:")


def _store_port(d):
    k = next(x for x in d if x.get("kind") == "Kustomization" and x.get("patches"))
    k["patches"][0]["patch"] = k["patches"][0]["patch"].replace(":6379/0", ":6380/0")


# (what is broken, mutation of the list of all documents, expected message part);
# the first case breaks nothing: the unchanged copy must pass.
CASES = [
    ("nothing (the copy as written must pass)", lambda d: None, None),
    ("gRPC pool targets a port the worker lacks",
     lambda d: find(d, "InferencePool", "neuron-worker-grpc")["spec"]["targetPorts"][0].update(number=8003),
     "target port 8003 is not a container port"),
    ("gRPC (h2c) pool targets the HTTP port",
     lambda d: find(d, "InferencePool", "neuron-worker-grpc")["spec"]["targetPorts"][0].update(number=8000),
     "is not the worker's --grpc-addr port"),
    ("pool selector matches no worker pod",
     lambda d: find(d, "InferencePool", "neuron-worker-http")["spec"]["selector"]["matchLabels"].update(
         {"app.kubernetes.io/component": "workers"}),
     "matches the pods of no worker Deployment"),
    ("worker Deployment no longer exposes the pool's port",
     lambda d: find(d, "Deployment", "neuron-worker")["spec"]["template"]["spec"]["containers"][0]["ports"][1].update(
         containerPort=8080),
     "target port 8000 is not a container port"),
    ("pool names an endpoint picker Service that does not exist",
     lambda d: find(d, "InferencePool", "neuron-worker-http")["spec"]["endpointPickerRef"].update(name="epp"),
     "endpointPickerRef names Service 'epp'"),
    ("pool names the picker Service on a port it does not serve",
     lambda d: find(d, "InferencePool", "neuron-worker-http")["spec"]["endpointPickerRef"]["port"].update(number=9999),
     "has no port 9999"),
    ("picker runs for another pool",
     lambda d: find(d, "Deployment", "neuron-worker-grpc-epp")["spec"]["template"]["spec"]["containers"][0]["args"].__setitem__(
         0, "--pool-name=neuron-worker-http"),
     "--pool-name is 'neuron-worker-http'"),
    ("HTTPRoute sends to a pool that does not exist",
     lambda d: find(d, "HTTPRoute", "neuron-worker-http")["spec"]["rules"][0]["backendRefs"][0].update(name="pool"),
     "InferencePool 'pool', which no manifest defines"),
    ("GRPCRoute sends to the HTTP pool",
     lambda d: find(d, "GRPCRoute", "neuron-worker-grpc")["spec"]["rules"][0]["backendRefs"][0].update(
         name="neuron-worker-http"),
     "a GRPCRoute needs kubernetes.io/h2c"),
    ("route hangs on a listener the Gateway lacks",
     lambda d: find(d, "HTTPRoute", "neuron-worker-http")["spec"]["parentRefs"][0].update(sectionName="https"),
     "has no listener 'https'"),
    ("InferencePool with a field of the old alpha API (schema, strict)",
     lambda d: find(d, "InferencePool", "neuron-worker-grpc")["spec"].update(targetPortNumber=8001),
     "Additional properties are not allowed ('targetPortNumber'"),
    ("Gateway listener port of the wrong type (schema)",
     lambda d: find(d, "Gateway", "neuron-worker")["spec"]["listeners"][0].update(port="eighty"),
     "listeners.0.port: 'eighty' is not of type 'integer'"),
    ("InferencePool appProtocol outside the CRD's enum (schema)",
     lambda d: find(d, "InferencePool", "neuron-worker-grpc")["spec"].update(appProtocol="grpc"),
     "appProtocol: 'grpc' is not one of"),
    ("picker scrapes the target port instead of the metrics port", _metrics_port,
     "metrics-data-source scrapes port 8000"),
    ("session affinity on the picker's own x-session-token instead of x-session-id", _token_affinity,
     "must use strategy session_id with the header x-session-id"),
    ("picker reads a vLLM metric name", _vllm_metric, "is not a neuron_worker_* metric selector"),
    ("scheduling profile refers to a plugin the config lacks", _unknown_ref, "pluginRef 'lora-affinity-scorer'"),
    ("--session-store names a host that is no Service", _store_host, "no Service 'sessions' is defined"),
    ("--session-store on a port the store Service lacks", _store_port, "port 6380 is not a port of Service"),
]


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    files = {}  # relative path -> documents
    texts = {}  # relative path -> text, written as is when a case leaves the file alone (keeps comments)
    for d in argv:
        d = os.path.abspath(d)
        for root, _, names in os.walk(d):
            for n in sorted(names):
                if n.endswith((".yaml", ".yml")):
                    p = os.path.join(root, n)
                    rel = os.path.join(os.path.basename(d), os.path.relpath(p, d))
                    with open(p, encoding="utf-8") as fh:
                        texts[rel] = fh.read()
                    files[rel] = [x for x in yaml.safe_load_all(texts[rel]) if x is not None]
    bad = 0
    for what, mutate, expect in CASES:
        docs = copy.deepcopy(files)
        mutate([x for ds in docs.values() for x in ds])
        with tempfile.TemporaryDirectory() as tmp:
            for rel, ds in docs.items():
                os.makedirs(os.path.join(tmp, os.path.dirname(rel)), exist_ok=True)
                with open(os.path.join(tmp, rel), "w", encoding="utf-8") as fh:
                    if ds == files[rel]:
                        fh.write(texts[rel])
                    else:
                        yaml.safe_dump_all(ds, fh, sort_keys=False)
            dirs = [os.path.join(tmp, os.path.basename(os.path.abspath(d))) for d in argv]
            r = subprocess.run(
                [sys.executable, os.path.join(HERE, "check_crds.py"), *dirs], capture_output=True, text=True
            )
        if expect is None and r.returncode == 0:
            print(f"ok: accepted: {what}")
        elif expect is not None and r.returncode == 1 and expect in r.stderr:
            print(f"ok: rejected: {what}")
        else:
            bad += 1
            print(f"FAIL: not rejected as expected: {what} (exit {r.returncode}, wanted {expect!r})", file=sys.stderr)
            print(r.stderr or r.stdout, file=sys.stderr)
    print(f"{len(CASES) - bad}/{len(CASES)} cases as expected (an intact copy accepted, broken ones rejected)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
