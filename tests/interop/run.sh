#!/usr/bin/env bash
# Real-client interop suite: starts the worker, runs tests/interop/test_tritonclient.py (gRPC) and
# test_tritonclient_http.py (HTTP, JSON and binary data) with the unmodified Triton Python clients,
# test_openai.py and test_openai_embeddings.py with the official openai client (the latter starts its
# own worker on free ports serving a small generated sentence-embedding model, bert_fixture.py),
# drives it with perf_analyzer (gRPC unary and streaming, HTTP on linear and mlp, sequences), then stops it with SIGTERM
# and checks it exits 0.
#
# Usage: tests/interop/run.sh [WORKER_BINARY]          (default: target/debug/neuron-worker)
# Environment:
#   INTEROP_GRPC_ADDR     gRPC address for the worker     (default 127.0.0.1:18001)
#   INTEROP_METRICS_ADDR  metrics address for the worker  (default 127.0.0.1:18002)
#   INTEROP_HTTP_ADDR     HTTP address for the worker     (default 127.0.0.1:18000)
#   VENV                  client virtualenv               (default ${XDG_CACHE_HOME:-$HOME/.cache}/triton-clients)
#   INTEROP_BACKEND       --backend for the worker        (default cpu: the expected values are the CPU reference's)
#   PYTEST_ARGS           extra pytest arguments (e.g. "-k streaming -v")
# Exits non-zero when any step fails. The last line is "interop: N passed, M failed", counting the
# pytest tests plus six checks: perf_analyzer unary, streaming, HTTP (linear and mlp) and sequences, exit 0 on SIGTERM.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
WORKER=${1:-target/debug/neuron-worker}
GRPC_ADDR=${INTEROP_GRPC_ADDR:-127.0.0.1:18001}
METRICS_ADDR=${INTEROP_METRICS_ADDR:-127.0.0.1:18002}
HTTP_ADDR=${INTEROP_HTTP_ADDR:-127.0.0.1:18000}
VENV=${VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/triton-clients}
BACKEND=${INTEROP_BACKEND:-cpu}
export PYTHONDONTWRITEBYTECODE=1

die() { echo "interop: $*" >&2; exit 1; }
[ -x "$WORKER" ] || die "worker binary '$WORKER' not found or not executable (build it with 'cargo build')"
case "$GRPC_ADDR $METRICS_ADDR $HTTP_ADDR" in
  127.0.0.1:*\ 127.0.0.1:*\ 127.0.0.1:*) ;;
  *) die "INTEROP_GRPC_ADDR / INTEROP_METRICS_ADDR / INTEROP_HTTP_ADDR must be 127.0.0.1:PORT" ;;
esac

# --- clients ---------------------------------------------------------------------------------------
if [ ! -f "$VENV/env.sh" ] || ! "$VENV/bin/python" -c 'import tritonclient.grpc, grpc_health.v1, grpc_reflection.v1alpha, numpy' 2>/dev/null; then
  echo "interop: installing the Triton clients into $VENV"
  bash "$ROOT/../shared/tools/triton-clients.sh" "$VENV"
fi
"$VENV/bin/python" -c 'import tritonclient.http' 2>/dev/null || "$VENV/bin/pip" install -q 'tritonclient[http]==2.51.0'
"$VENV/bin/python" -c 'import pytest' 2>/dev/null || "$VENV/bin/pip" install -q pytest
"$VENV/bin/python" -c 'import openai' 2>/dev/null || "$VENV/bin/pip" install -q 'openai>=1.66'
# shellcheck disable=SC1091
. "$VENV/env.sh"
command -v perf_analyzer >/dev/null || die "perf_analyzer is missing from $VENV"

# --- worker ----------------------------------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/neuron-worker-interop.XXXXXX")
LOG="$WORK/worker.log"
WORKER_PID=""
cleanup() {
  if [ -n "$WORKER_PID" ] && kill -0 "$WORKER_PID" 2>/dev/null; then
    kill -KILL "$WORKER_PID" 2>/dev/null || true
    wait "$WORKER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

show_log() { echo "---- worker log ($LOG) ----" >&2; tail -n 80 "$LOG" >&2 || true; echo "---- end of worker log ----" >&2; }

# Refuse to test whatever else may be listening on the ports.
"$VENV/bin/python" - "$GRPC_ADDR" "$METRICS_ADDR" "$HTTP_ADDR" <<'PY' || die "a port is already in use; pick others with INTEROP_GRPC_ADDR / INTEROP_METRICS_ADDR / INTEROP_HTTP_ADDR"
import socket, sys
for addr in sys.argv[1:]:
    host, port = addr.rsplit(":", 1)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, int(port)))
    except OSError as e:
        print(f"{addr}: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        s.close()
PY

echo "interop: starting $WORKER on grpc=$GRPC_ADDR http=$HTTP_ADDR metrics=$METRICS_ADDR"
"$WORKER" serve --grpc-addr "$GRPC_ADDR" --http-addr "$HTTP_ADDR" --metrics-addr "$METRICS_ADDR" --backend "$BACKEND" >"$LOG" 2>&1 &
WORKER_PID=$!

# Readiness: ServerReady over gRPC, bounded to 30 s; give up at once if the worker exits.
if ! "$VENV/bin/python" - "$GRPC_ADDR" "$WORKER_PID" <<'PY'
import os, sys, time
import tritonclient.grpc as grpcclient
addr, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 30
client = grpcclient.InferenceServerClient(addr)
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        print("interop: the worker exited before becoming ready", file=sys.stderr)
        sys.exit(1)
    try:
        if client.is_server_ready(client_timeout=1.0):
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.2)
print("interop: the worker was not ready within 30 s", file=sys.stderr)
sys.exit(1)
PY
then
  show_log
  exit 1
fi
echo "interop: worker ready (pid $WORKER_PID)"

FAILED_STEPS=()   # what failed besides pytest tests, for the log
CHECKS_PASSED=0   # perf_analyzer unary, streaming, HTTP (linear, mlp) and sequences, SIGTERM
CHECKS_FAILED=0

# --- pytest ----------------------------------------------------------------------------------------
JUNIT="$WORK/junit.xml"
set +e
# shellcheck disable=SC2086
NEURON_WORKER_URL="$GRPC_ADDR" NEURON_WORKER_HTTP_URL="$HTTP_ADDR" NEURON_WORKER_METRICS_URL="http://$METRICS_ADDR" \
  NEURON_WORKER_BINARY="$(cd "$(dirname "$WORKER")" && pwd)/$(basename "$WORKER")" \
  timeout 120 "$VENV/bin/python" -m pytest -p no:cacheprovider -q -rfE --junitxml="$JUNIT" \
  "$ROOT/tests/interop/test_tritonclient.py" "$ROOT/tests/interop/test_tritonclient_http.py" \
  "$ROOT/tests/interop/test_sequences.py" "$ROOT/tests/interop/test_generative_sessions.py" \
  "$ROOT/tests/interop/test_openai.py" "$ROOT/tests/interop/test_openai_embeddings.py" ${PYTEST_ARGS:-}
PYTEST_RC=$?
set -e
SUMMARY=$("$VENV/bin/python" - "$JUNIT" <<'PY'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    print("0 0 0"); sys.exit(0)
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
total = sum(int(s.get("tests", 0)) for s in suites)
failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
print(total - failed - skipped, failed, skipped)
PY
)
read -r PASSED FAILED SKIPPED <<<"$SUMMARY"
if [ "$PYTEST_RC" -ne 0 ]; then
  FAILED_STEPS+=("pytest (exit $PYTEST_RC)")
  [ "$FAILED" -gt 0 ] || FAILED=1   # e.g. a collection error or the 120 s bound
fi
[ "$PASSED" -gt 0 ] || { FAILED_STEPS+=("pytest passed no tests"); [ "$FAILED" -gt 0 ] || FAILED=1; }

# --- perf_analyzer -------------------------------------------------------------------------------
perf() {
  local label=$1 url=$2 model=${PERF_MODEL:-linear} shape=${PERF_SHAPE:-INPUT0:64}; shift 2
  local out="$WORK/perf-$label.txt" rc=0
  echo "interop: perf_analyzer ($label)"
  # This checks that perf_analyzer works against the worker, not how fast it is: a loose stability
  # bound (the default 10% fails now and then on a busy 2-core machine) and at most 8 windows per level.
  timeout 90 perf_analyzer -u "$url" -m "$model" --shape "$shape" --concurrency-range 1:4:3 \
    --measurement-interval 1000 -b 1 --stability-percentage 50 --max-trials 8 "$@" >"$out" 2>&1 || rc=$?
  grep -E '^Concurrency: [0-9]+, throughput: [0-9.]+ infer/sec' "$out" || true
  if [ "$rc" -ne 0 ]; then
    tail -n 20 "$out" >&2
    FAILED_STEPS+=("perf_analyzer $label (exit $rc)")
    CHECKS_FAILED=$((CHECKS_FAILED + 1))
    return 0
  fi
  # One summary line per concurrency level (1 and 4), each with a non-zero throughput.
  local lines
  lines=$(grep -cE '^Concurrency: (1|4), throughput: [0-9.]*[1-9][0-9.]* infer/sec' "$out" || true)
  if [ "$lines" -ne 2 ] || ! grep -qE '^ +Throughput: [0-9.]+ infer/sec' "$out"; then
    tail -n 20 "$out" >&2
    FAILED_STEPS+=("perf_analyzer $label (no throughput for concurrency 1 and 4)")
    CHECKS_FAILED=$((CHECKS_FAILED + 1))
    return 0
  fi
  CHECKS_PASSED=$((CHECKS_PASSED + 1))
}
perf unary "$GRPC_ADDR" -i grpc
perf streaming "$GRPC_ADDR" -i grpc --streaming
perf http "$HTTP_ADDR" -i http
PERF_MODEL=mlp PERF_SHAPE=INPUT0:256 perf http-mlp "$HTTP_ADDR" -i http

# Sequences: perf_analyzer drives the stateful `accumulate` model with START/END flags.
echo "interop: perf_analyzer (sequences)"
SEQ_OUT="$WORK/perf-sequences.txt"
SEQ_RC=0
timeout 90 perf_analyzer -i grpc -u "$GRPC_ADDR" -m accumulate --sequence-length 20 --concurrency-range 8 \
  --shape INPUT:1 --measurement-interval 1000 --stability-percentage 50 --max-trials 8 >"$SEQ_OUT" 2>&1 || SEQ_RC=$?
grep -E '^Concurrency: [0-9]+, throughput: [0-9.]+ infer/sec' "$SEQ_OUT" || true
if [ "$SEQ_RC" -ne 0 ] || ! grep -qE '^Concurrency: 8, throughput: [0-9.]*[1-9][0-9.]* infer/sec' "$SEQ_OUT"; then
  tail -n 20 "$SEQ_OUT" >&2
  FAILED_STEPS+=("perf_analyzer sequences (exit $SEQ_RC)")
  CHECKS_FAILED=$((CHECKS_FAILED + 1))
else
  CHECKS_PASSED=$((CHECKS_PASSED + 1))
fi

# --- graceful stop ---------------------------------------------------------------------------------
echo "interop: SIGTERM to the worker"
kill -TERM "$WORKER_PID"
STOP_RC=""
for _ in $(seq 1 350); do
  if ! kill -0 "$WORKER_PID" 2>/dev/null; then
    set +e; wait "$WORKER_PID"; STOP_RC=$?; set -e
    break
  fi
  sleep 0.1
done
if [ -z "$STOP_RC" ]; then
  FAILED_STEPS+=("worker still running 35 s after SIGTERM")
elif [ "$STOP_RC" -ne 0 ]; then
  FAILED_STEPS+=("worker exited $STOP_RC after SIGTERM (want 0)")
fi
[ -z "$STOP_RC" ] || WORKER_PID=""
if [ "$STOP_RC" = 0 ]; then CHECKS_PASSED=$((CHECKS_PASSED + 1)); else CHECKS_FAILED=$((CHECKS_FAILED + 1)); fi

# --- result ----------------------------------------------------------------------------------------
if [ "${#FAILED_STEPS[@]}" -ne 0 ]; then
  show_log
  for s in "${FAILED_STEPS[@]}"; do echo "interop: FAILED: $s" >&2; done
fi
[ "$SKIPPED" -eq 0 ] || echo "interop: $SKIPPED pytest tests skipped"
echo "interop: $((PASSED + CHECKS_PASSED)) passed, $((FAILED + CHECKS_FAILED)) failed"
[ "${#FAILED_STEPS[@]}" -eq 0 ]
