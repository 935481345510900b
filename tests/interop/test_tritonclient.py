"""Interop suite: the real, unmodified Triton Python client (``tritonclient.grpc``) and the stock
gRPC health / reflection clients against a running neuron-worker.

The worker's gRPC address comes from ``NEURON_WORKER_URL`` (default ``127.0.0.1:18001``) and its
metrics address from ``NEURON_WORKER_METRICS_URL`` (default ``http://127.0.0.1:18002``). The worker
must serve the built-in models (no ``--model-repository``). ``tests/interop/run.sh`` starts one and
runs this file; to run it by hand against a worker that is already up:

    source ~/.cache/triton-clients/env.sh
    NEURON_WORKER_URL=127.0.0.1:18001 python -m pytest -q tests/interop/test_tritonclient.py

Expected values are computed here, independently of the worker (numpy closed forms, exact counts).
"""

import json
import os
import queue
import re
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

URL = os.environ.get("NEURON_WORKER_URL", "127.0.0.1:18001")
METRICS_URL = os.environ.get("NEURON_WORKER_METRICS_URL", "http://127.0.0.1:18002").rstrip("/")

# Every unary call gets a deadline (seconds) so that a hung worker fails the test instead of the run.
DEADLINE = 10.0
LINEAR_IN, LINEAR_OUT, LINEAR_MAX_BATCH = 64, 16, 64


# The models a worker serves with no --model-repository, sorted by name.
BUILTIN_MODELS = ["accumulate", "gru", "linear", "mlp", "tiny_decoder"]

def linear_reference(x: np.ndarray) -> np.ndarray:
    """y = x·W + b for the built-in `linear` model, in float64."""
    i = np.arange(LINEAR_IN).reshape(-1, 1)
    j = np.arange(LINEAR_OUT).reshape(1, -1)
    w = (((7 * i + 3 * j) % 17) - 8) / 16.0
    b = ((np.arange(LINEAR_OUT) % 5) - 2) / 4.0
    return x.astype(np.float64) @ w + b


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-2.0, 2.0, size=(n, LINEAR_IN)).astype(np.float32)


def fp32_input(x: np.ndarray, name: str = "INPUT0") -> grpcclient.InferInput:
    t = grpcclient.InferInput(name, list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    return t


@pytest.fixture(scope="module")
def client():
    c = grpcclient.InferenceServerClient(url=URL)
    yield c
    c.close()


@pytest.fixture(scope="module")
def channel():
    ch = grpc.insecure_channel(URL)
    yield ch
    ch.close()


def linear_stats(client) -> dict:
    s = client.get_inference_statistics("linear", as_json=True, client_timeout=DEADLINE)
    (m,) = [m for m in s["model_stats"] if m["name"] == "linear"]
    return m


def counter(d: dict, *path) -> int:
    """A uint64 field from an as_json protobuf (proto3 JSON writes them as strings, omits zeros)."""
    for p in path:
        d = d.get(p, {}) if isinstance(d, dict) else {}
    return int(d) if d != {} else 0


def expect_error(fn, code: grpc.StatusCode) -> str:
    with pytest.raises(InferenceServerException) as ei:
        fn()
    assert ei.value.status() == str(code), f"status {ei.value.status()} (message: {ei.value.message()})"
    return ei.value.message()


def scrape(path: str) -> bytes:
    with urllib.request.urlopen(METRICS_URL + path, timeout=DEADLINE) as r:
        assert r.status == 200
        return r.read()


# --- server and model discovery -------------------------------------------------------------------


def test_server_live_and_ready(client):
    assert client.is_server_live(client_timeout=DEADLINE) is True
    assert client.is_server_ready(client_timeout=DEADLINE) is True
    assert client.is_model_ready("linear", client_timeout=DEADLINE) is True
    assert client.is_model_ready("mlp", client_timeout=DEADLINE) is True
    assert client.is_model_ready("no_such_model", client_timeout=DEADLINE) is False


def test_server_metadata(client):
    md = client.get_server_metadata(as_json=True, client_timeout=DEADLINE)
    assert md["name"] == "neuron-worker"
    assert md["version"] != ""
    assert "statistics" in md["extensions"]
    assert "model_configuration" in md["extensions"]


def test_model_metadata_linear(client):
    md = client.get_model_metadata("linear", as_json=True, client_timeout=DEADLINE)
    assert md["name"] == "linear"
    assert md["versions"] == ["1"]
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in md["inputs"]] == [("INPUT0", "FP32", [-1, 64])]
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in md["outputs"]] == [("OUTPUT0", "FP32", [-1, 16])]


def test_model_config_linear(client):
    cfg = client.get_model_config("linear", client_timeout=DEADLINE).config
    assert cfg.name == "linear"
    assert cfg.max_batch_size == 64
    assert cfg.HasField("dynamic_batching")
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [("INPUT0", 11, [64])]  # 11 = TYPE_FP32
    assert [(o.name, o.data_type, list(o.dims)) for o in cfg.output] == [("OUTPUT0", 11, [16])]


def test_repository_index(client):
    idx = client.get_model_repository_index(as_json=True, client_timeout=DEADLINE)
    got = sorted((m["name"], m.get("version", ""), m.get("state", "")) for m in idx["models"])
    assert got == [(m, "1", "READY") for m in BUILTIN_MODELS]


def test_unknown_model_metadata_is_not_found(client):
    msg = expect_error(lambda: client.get_model_metadata("no_such_model", client_timeout=DEADLINE), grpc.StatusCode.NOT_FOUND)
    assert "no_such_model" in msg


# --- inference ------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 5])
def test_infer_linear_matches_closed_form(client, batch):
    x = rows(batch, seed=batch)
    r = client.infer("linear", [fp32_input(x)], client_timeout=DEADLINE)
    y = r.as_numpy("OUTPUT0")
    assert y.dtype == np.float32
    assert y.shape == (batch, LINEAR_OUT)
    np.testing.assert_allclose(y, linear_reference(x), rtol=0, atol=1e-4)
    resp = r.get_response()
    assert resp.model_name == "linear"
    assert resp.model_version == "1"
    assert [(o.name, o.datatype, list(o.shape)) for o in resp.outputs] == [("OUTPUT0", "FP32", [batch, LINEAR_OUT])]


def test_infer_linear_max_batch(client):
    x = rows(LINEAR_MAX_BATCH, seed=64)
    y = client.infer("linear", [fp32_input(x)], client_timeout=DEADLINE).as_numpy("OUTPUT0")
    np.testing.assert_allclose(y, linear_reference(x), rtol=0, atol=1e-4)


def test_infer_known_vector(client):
    # x = ones: y[j] = sum_i W[i][j] + b[j]; first entries worked out by hand: -0.5, -1.0, -0.4375.
    y = client.infer("linear", [fp32_input(np.ones((1, LINEAR_IN), np.float32))], client_timeout=DEADLINE).as_numpy("OUTPUT0")
    np.testing.assert_allclose(y[0, :3], [-0.5, -1.0, -0.4375], rtol=0, atol=1e-6)


def test_infer_mlp_shape(client):
    x = np.zeros((2, 256), np.float32)
    r = client.infer("mlp", [fp32_input(x)], client_timeout=DEADLINE)
    y = r.as_numpy("OUTPUT0")
    assert y.shape == (2, 256)
    assert y.dtype == np.float32
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(y[0], y[1])  # same input row, same output row


def test_requested_output_subset(client):
    x = rows(2, seed=7)
    r = client.infer("linear", [fp32_input(x)], outputs=[grpcclient.InferRequestedOutput("OUTPUT0")], client_timeout=DEADLINE)
    assert [o.name for o in r.get_response().outputs] == ["OUTPUT0"]
    np.testing.assert_allclose(r.as_numpy("OUTPUT0"), linear_reference(x), rtol=0, atol=1e-4)
    msg = expect_error(
        lambda: client.infer("linear", [fp32_input(x)], outputs=[grpcclient.InferRequestedOutput("OUTPUT9")], client_timeout=DEADLINE),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "OUTPUT9" in msg


def test_request_id_echoed(client):
    r = client.infer("linear", [fp32_input(rows(1, seed=3))], request_id="req-42", client_timeout=DEADLINE)
    assert r.get_response().id == "req-42"
    r = client.infer("linear", [fp32_input(rows(1, seed=3))], client_timeout=DEADLINE)
    assert r.get_response().id == ""


def test_explicit_model_version(client):
    x = rows(1, seed=11)
    r = client.infer("linear", [fp32_input(x)], model_version="1", client_timeout=DEADLINE)
    np.testing.assert_allclose(r.as_numpy("OUTPUT0"), linear_reference(x), rtol=0, atol=1e-4)
    msg = expect_error(lambda: client.infer("linear", [fp32_input(x)], model_version="7", client_timeout=DEADLINE), grpc.StatusCode.NOT_FOUND)
    assert "linear" in msg


def test_priority_and_timeout_accepted(client):
    x = rows(3, seed=5)
    r = client.infer("linear", [fp32_input(x)], priority=1, timeout=1_000_000, request_id="prio", client_timeout=DEADLINE)
    assert r.get_response().id == "prio"
    np.testing.assert_allclose(r.as_numpy("OUTPUT0"), linear_reference(x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_request(client, algorithm):
    # tritonclient's `compression_algorithm` compresses the request message (grpc-encoding); Triton
    # accepts both algorithms the client offers.
    x = rows(3, seed=21)
    r = client.infer("linear", [fp32_input(x)], compression_algorithm=algorithm, request_id=algorithm, client_timeout=DEADLINE)
    assert r.get_response().id == algorithm
    np.testing.assert_allclose(r.as_numpy("OUTPUT0"), linear_reference(x), rtol=0, atol=1e-4)


def test_async_infer_callback(client):
    done = queue.Queue()
    x = rows(4, seed=9)
    client.async_infer("linear", [fp32_input(x)], callback=lambda result, error: done.put((result, error)), request_id="async-1", client_timeout=DEADLINE)
    result, error = done.get(timeout=DEADLINE)
    assert error is None, error
    assert result.get_response().id == "async-1"
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), linear_reference(x), rtol=0, atol=1e-4)


def test_concurrent_requests_are_batched_correctly(client):
    # Many in flight at once, so the dynamic batcher can merge them: each caller still gets its rows.
    done = queue.Queue()
    inputs = {f"c{k}": rows(1 + k % 4, seed=100 + k) for k in range(24)}
    for rid, x in inputs.items():
        client.async_infer("linear", [fp32_input(x)], callback=lambda result, error: done.put((result, error)), request_id=rid, client_timeout=DEADLINE)
    seen = set()
    for _ in inputs:
        result, error = done.get(timeout=DEADLINE)
        assert error is None, error
        rid = result.get_response().id
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), linear_reference(inputs[rid]), rtol=0, atol=1e-4)
        seen.add(rid)
    assert seen == set(inputs)


def test_streaming(client):
    answers = queue.Queue()
    inputs = {f"s{k}": rows(1 + k % 3, seed=200 + k) for k in range(8)}
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for rid, x in inputs.items():
            client.async_stream_infer("linear", [fp32_input(x)], request_id=rid)
        got = {}
        for _ in inputs:
            result, error = answers.get(timeout=DEADLINE)
            assert error is None, error
            rid = result.get_response().id
            assert rid not in got, f"two answers for {rid}"
            got[rid] = result.as_numpy("OUTPUT0")
        assert set(got) == set(inputs)
        for rid, x in inputs.items():
            np.testing.assert_allclose(got[rid], linear_reference(x), rtol=0, atol=1e-4)
        # A bad request on the stream is answered with an error, and the stream keeps working.
        client.async_stream_infer("linear", [fp32_input(np.zeros((1, 63), np.float32))], request_id="bad")
        result, error = answers.get(timeout=DEADLINE)
        assert result is None
        assert isinstance(error, InferenceServerException)
        assert "INPUT0" in error.message() and "63" in error.message()
        x = rows(1, seed=299)
        client.async_stream_infer("linear", [fp32_input(x)], request_id="after-bad")
        result, error = answers.get(timeout=DEADLINE)
        assert error is None, error
        assert result.get_response().id == "after-bad"
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), linear_reference(x), rtol=0, atol=1e-4)
    finally:
        client.stop_stream()
    assert answers.empty()


def test_enable_empty_final_response_flag(client):
    # perf_analyzer (2.51) sets the bool parameter `triton_enable_empty_final_response` on every
    # ModelInfer and ModelStreamInfer request; the Python client sets it on a stream request with
    # `enable_empty_final_response=True`. For a non-decoupled model the one response is the final
    # one: exactly one answer per request, nothing extra.
    x = rows(2, seed=400)
    r = client.infer("linear", [fp32_input(x)], parameters={"triton_enable_empty_final_response": True}, client_timeout=DEADLINE)
    np.testing.assert_allclose(r.as_numpy("OUTPUT0"), linear_reference(x), rtol=0, atol=1e-4)
    answers = queue.Queue()
    inputs = {f"f{k}": rows(1 + k, seed=410 + k) for k in range(3)}
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for rid, x in inputs.items():
            client.async_stream_infer("linear", [fp32_input(x)], request_id=rid, enable_empty_final_response=True)
        for _ in inputs:
            result, error = answers.get(timeout=DEADLINE)
            assert error is None, error
            rid = result.get_response().id
            np.testing.assert_allclose(result.as_numpy("OUTPUT0"), linear_reference(inputs[rid]), rtol=0, atol=1e-4)
    finally:
        client.stop_stream()
    assert answers.empty()


def test_statistics_count_inferences(client):
    before = linear_stats(client)
    for batch in (1, 2, 5):
        client.infer("linear", [fp32_input(rows(batch, seed=300 + batch))], client_timeout=DEADLINE)
    after = linear_stats(client)
    # Requests were sent one after another, so each ran as its own execution.
    assert counter(after, "inference_count") - counter(before, "inference_count") == 8
    assert counter(after, "execution_count") - counter(before, "execution_count") == 3
    assert counter(after, "inference_stats", "success", "count") - counter(before, "inference_stats", "success", "count") == 3
    assert counter(after, "inference_stats", "queue", "count") - counter(before, "inference_stats", "queue", "count") == 3
    assert counter(after, "inference_stats", "compute_infer", "count") - counter(before, "inference_stats", "compute_infer", "count") == 3
    assert int(after["last_inference"]) >= int(before.get("last_inference", 0))
    assert after["version"] == "1"
    by_size = {int(b["batch_size"]): counter(b, "compute_infer", "count") for b in after.get("batch_stats", [])}
    before_by_size = {int(b["batch_size"]): counter(b, "compute_infer", "count") for b in before.get("batch_stats", [])}
    assert by_size.get(5, 0) - before_by_size.get(5, 0) == 1


def test_statistics_all_models(client):
    s = client.get_inference_statistics(as_json=True, client_timeout=DEADLINE)
    assert sorted((m["name"], m["version"]) for m in s["model_stats"]) == [(m, "1") for m in BUILTIN_MODELS]


# --- errors ---------------------------------------------------------------------------------------


def test_wrong_datatype(client):
    t = grpcclient.InferInput("INPUT0", [1, LINEAR_IN], "FP64")
    t.set_data_from_numpy(np.zeros((1, LINEAR_IN), np.float64))
    msg = expect_error(lambda: client.infer("linear", [t], client_timeout=DEADLINE), grpc.StatusCode.INVALID_ARGUMENT)
    assert "INPUT0" in msg and "FP32" in msg and "FP64" in msg


def test_wrong_shape(client):
    msg = expect_error(
        lambda: client.infer("linear", [fp32_input(np.zeros((1, 63), np.float32))], client_timeout=DEADLINE),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "INPUT0" in msg and "63" in msg and "64" in msg


def test_wrong_input_name(client):
    msg = expect_error(
        lambda: client.infer("linear", [fp32_input(rows(1, seed=1), name="INPUT7")], client_timeout=DEADLINE),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "INPUT7" in msg and "INPUT0" in msg


def test_unknown_model(client):
    msg = expect_error(lambda: client.infer("no_such_model", [fp32_input(rows(1, seed=1))], client_timeout=DEADLINE), grpc.StatusCode.NOT_FOUND)
    assert "no_such_model" in msg and "not found" in msg


def test_batch_over_max_batch_size(client):
    msg = expect_error(
        lambda: client.infer("linear", [fp32_input(rows(LINEAR_MAX_BATCH + 1, seed=65))], client_timeout=DEADLINE),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "65" in msg and "64" in msg and "max_batch_size" in msg


def test_sequence_id_rejected_on_stateless_model(client):
    msg = expect_error(
        lambda: client.infer("linear", [fp32_input(rows(1, seed=1))], sequence_id=17, sequence_start=True, client_timeout=DEADLINE),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "linear" in msg and "sequence" in msg and "stateful" in msg


def test_errors_leave_model_serving(client):
    # After all the rejected requests above, the model still answers correctly.
    x = rows(2, seed=12)
    np.testing.assert_allclose(client.infer("linear", [fp32_input(x)], client_timeout=DEADLINE).as_numpy("OUTPUT0"), linear_reference(x), rtol=0, atol=1e-4)


# --- health, reflection, metrics ------------------------------------------------------------------


def test_health(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "linear", "mlp"):
        r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE)
        assert r.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as ei:
        stub.Check(health_pb2.HealthCheckRequest(service="no_such_model"), timeout=DEADLINE)
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND


def _list_services(channel, method: str) -> list:
    call = channel.stream_stream(
        method,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    responses = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=DEADLINE))
    assert len(responses) == 1
    assert responses[0].WhichOneof("message_response") == "list_services_response"
    return sorted(s.name for s in responses[0].list_services_response.service)


def test_reflection_lists_services(channel):
    # v1alpha with the stock stub; v1 has the same messages under another package name.
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    (resp,) = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=DEADLINE))
    alpha = sorted(s.name for s in resp.list_services_response.service)
    assert "inference.GRPCInferenceService" in alpha
    assert "grpc.health.v1.Health" in alpha
    v1 = _list_services(channel, "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
    assert "inference.GRPCInferenceService" in v1
    assert "grpc.health.v1.Health" in v1
    app = lambda names: [n for n in names if not n.startswith("grpc.reflection.")]
    assert app(v1) == app(alpha)  # both versions describe the same application services


def test_reflection_describes_inference_service(channel):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    svc = pool.FindServiceByName("inference.GRPCInferenceService")
    methods = {m.name: m for m in svc.methods}
    for name in ("ServerLive", "ServerReady", "ServerMetadata", "ModelMetadata", "ModelConfig", "ModelInfer", "ModelStreamInfer", "ModelStatistics"):
        assert name in methods, name
    assert methods["ModelInfer"].input_type.full_name == "inference.ModelInferRequest"
    assert methods["ModelInfer"].output_type.full_name == "inference.ModelInferResponse"


def _metric(text: str, name: str, model: str) -> float:
    pattern = re.compile(r"^" + re.escape(name) + r"\{([^}]*)\}\s+(\S+)$", re.M)
    vals = [float(v) for labels, v in pattern.findall(text) if f'model="{model}"' in labels]
    assert len(vals) == 1, f"{name} for {model}: {vals}"
    return vals[0]


def test_prometheus_metrics(client):
    client.infer("linear", [fp32_input(rows(2, seed=13))], client_timeout=DEADLINE)
    text = scrape("/metrics").decode()
    assert 'neuron_worker_inference_request_success{model="linear"' in text
    stats = linear_stats(client)
    assert _metric(text, "neuron_worker_inference_request_success", "linear") == counter(stats, "inference_stats", "success", "count")
    assert _metric(text, "neuron_worker_inference_count", "linear") == counter(stats, "inference_count")
    assert _metric(text, "neuron_worker_inference_exec_count", "linear") == counter(stats, "execution_count")
    assert _metric(text, "neuron_worker_model_ready", "linear") == 1
    assert "# TYPE neuron_worker_inference_request_success counter" in text


def test_capacity_json():
    doc = json.loads(scrape("/capacity"))
    by_model = {m["model"]: m for m in doc["models"]}
    assert set(by_model) == set(BUILTIN_MODELS)
    lin = by_model["linear"]
    assert lin["version"] == "1"
    assert lin["ready"] is True
    assert lin["max_batch_size"] == 64
    assert lin["instances_in_service"] >= 1
    assert lin["queue_depth"] == 0
