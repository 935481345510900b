#!/usr/bin/env python3
"""Writes the OpenAPI schemas .ci/check_gateway.py validates against, taken
from the upstream CRDs at the pinned releases (CI cannot fetch them).

Run from a machine with the two repositories checked out at the tags below:

    python3 .ci/crds/vendor.py GATEWAY_API_DIR INFERENCE_EXTENSION_DIR

(e.g. `git clone --depth 1 -b v1.5.1 https://github.com/kubernetes-sigs/gateway-api`
and `git clone --depth 1 -b v1.5.0 https://github.com/kubernetes-sigs/gateway-api-inference-extension`).
It keeps each kind's `openAPIV3Schema` for the listed version as upstream
wrote it, minus `description` texts and the `status` subtree (manifests never
set status), and writes `.ci/crds/<kind>.yaml`.
"""

from __future__ import annotations

import os
import sys

import yaml

GATEWAY_API = ("kubernetes-sigs/gateway-api", "v1.5.1", "e7677b70ae75d14a4448fba94870e7deea6cf0ad")
INFERENCE_EXT = (
    "kubernetes-sigs/gateway-api-inference-extension",
    "v1.5.0",
    "df9f8909fe06fe2dfd4a6fc0bd0c01a0acabf849",
)
# kind -> (source, path in the repository, version)
SOURCES = {
    "Gateway": (GATEWAY_API, "config/crd/standard/gateway.networking.k8s.io_gateways.yaml", "v1"),
    "HTTPRoute": (GATEWAY_API, "config/crd/standard/gateway.networking.k8s.io_httproutes.yaml", "v1"),
    "GRPCRoute": (GATEWAY_API, "config/crd/standard/gateway.networking.k8s.io_grpcroutes.yaml", "v1"),
    "InferencePool": (INFERENCE_EXT, "config/crd/bases/inference.networking.k8s.io_inferencepools.yaml", "v1"),
}


def strip(node):
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    roots = {GATEWAY_API: argv[0], INFERENCE_EXT: argv[1]}
    out_dir = os.path.dirname(os.path.abspath(__file__))
    for kind, (src, path, version) in SOURCES.items():
        with open(os.path.join(roots[src], path), encoding="utf-8") as fh:
            crd = yaml.safe_load(fh)
        ver = next(v for v in crd["spec"]["versions"] if v["name"] == version)
        schema = strip(ver["schema"]["openAPIV3Schema"])
        schema.get("properties", {}).pop("status", None)
        header = (
            f"# OpenAPI schema of {crd['spec']['group']}/{version} {kind}, from the CRD\n"
            f"# {src[0]} tag {src[1]} (commit {src[2]}),\n"
            f"# {path},\n"
            "# without description texts and status. Written by .ci/crds/vendor.py; do not edit.\n"
        )
        doc = {"group": crd["spec"]["group"], "version": version, "kind": kind, "schema": schema}
        with open(os.path.join(out_dir, f"{kind}.yaml"), "w", encoding="utf-8") as fh:
            fh.write(header)
            yaml.safe_dump(doc, fh, sort_keys=False, width=120)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
