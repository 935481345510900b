"""Interop suite for the HTTP front: the real, unmodified ``tritonclient.http`` (JSON and binary
tensor data) against a running neuron-worker, with answers compared to ``tritonclient.grpc``'s.

Addresses: ``NEURON_WORKER_HTTP_URL`` (default ``127.0.0.1:18000``) and ``NEURON_WORKER_URL`` (gRPC,
default ``127.0.0.1:18001``). The worker must serve the built-in models. ``tests/interop/run.sh``
starts one and runs this file; by hand:

    source ~/.cache/triton-clients/env.sh
    NEURON_WORKER_HTTP_URL=127.0.0.1:18000 python -m pytest -q tests/interop/test_tritonclient_http.py

Expected values come from numpy closed forms and from the gRPC client (same worker, other front).
"""

import os

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

HTTP_URL = os.environ.get("NEURON_WORKER_HTTP_URL", "127.0.0.1:18000")
GRPC_URL = os.environ.get("NEURON_WORKER_URL", "127.0.0.1:18001")
LINEAR_IN, LINEAR_OUT = 64, 16


def linear_reference(x: np.ndarray) -> np.ndarray:
    """y = x·W + b for the built-in `linear` model, in float64."""
    i = np.arange(LINEAR_IN).reshape(-1, 1)
    j = np.arange(LINEAR_OUT).reshape(1, -1)
    w = (((7 * i + 3 * j) % 17) - 8) / 16.0
    b = ((np.arange(LINEAR_OUT) % 5) - 2) / 4.0
    return x.astype(np.float64) @ w + b


@pytest.fixture(scope="module")
def http():
    c = httpclient.InferenceServerClient(HTTP_URL, connection_timeout=10.0, network_timeout=10.0)
    yield c
    c.close()


@pytest.fixture(scope="module")
def grpc():
    c = grpcclient.InferenceServerClient(GRPC_URL)
    yield c
    c.close()


def http_infer(http, model, x, binary_in, binary_out, output="OUTPUT0"):
    i = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
    i.set_data_from_numpy(x, binary_data=binary_in)
    o = httpclient.InferRequestedOutput(output, binary_data=binary_out)
    return http.infer(model, [i], outputs=[o]).as_numpy(output)


def grpc_infer(grpc, model, x):
    i = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return grpc.infer(model, [i], client_timeout=10.0).as_numpy("OUTPUT0")


def test_health_and_metadata(http):
    assert http.is_server_live() and http.is_server_ready()
    assert http.is_model_ready("linear")
    meta = http.get_server_metadata()
    assert "binary_tensor_data" in meta["extensions"]
    m = http.get_model_metadata("linear")
    assert m["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 64]}]
    cfg = http.get_model_config("linear")
    assert cfg["max_batch_size"] == 64 and cfg["input"][0]["dims"] == [64]


@pytest.mark.parametrize("binary_in,binary_out", [(True, True), (False, False), (True, False), (False, True)])
@pytest.mark.parametrize("model,width", [("linear", 64), ("mlp", 256)])
def test_values_equal_grpc(http, grpc, model, width, binary_in, binary_out):
    x = np.random.default_rng(width).uniform(-2, 2, size=(3, width)).astype(np.float32)
    got = http_infer(http, model, x, binary_in, binary_out)
    want = grpc_infer(grpc, model, x)
    assert got.dtype == np.float32 and got.shape == want.shape
    # Binary data is the same bytes; JSON prints each float32 with a round-trip representation.
    np.testing.assert_array_equal(got, want)
    if model == "linear":
        np.testing.assert_allclose(got, linear_reference(x), atol=1e-4)


def test_all_outputs_default_binary(http):
    x = np.ones((1, 64), dtype=np.float32)
    i = httpclient.InferInput("INPUT0", [1, 64], "FP32")
    i.set_data_from_numpy(x)
    r = http.infer("linear", [i], request_id="abc")
    assert r.get_response()["id"] == "abc"
    np.testing.assert_allclose(r.as_numpy("OUTPUT0"), linear_reference(x), atol=1e-4)


def test_sequence_parameters(http):
    def step(v, **kw):
        i = httpclient.InferInput("INPUT", [1, 1], "INT32")
        i.set_data_from_numpy(np.array([[v]], dtype=np.int32))
        return int(http.infer("accumulate", [i], **kw).as_numpy("OUTPUT")[0, 0])

    assert step(4, sequence_id=4242, sequence_start=True) == 4
    assert step(5, sequence_id=4242) == 9
    assert step(1, sequence_id=4242, sequence_end=True) == 10
    assert step(2, sequence_id="http-str", sequence_start=True, sequence_end=True) == 2


def test_statistics_and_index(http):
    before = http.get_inference_statistics("linear")["model_stats"][0]["inference_count"]
    http_infer(http, "linear", np.zeros((2, 64), dtype=np.float32), True, True)
    after = http.get_inference_statistics("linear")["model_stats"][0]["inference_count"]
    assert after - before == 2
    names = {m["name"] for m in http.get_model_repository_index()}
    assert {"linear", "mlp", "accumulate", "gru"} <= names


def test_errors(http):
    with pytest.raises(InferenceServerException) as e:
        http_infer(http, "nope", np.zeros((1, 64), dtype=np.float32), True, True)
    assert "404" in str(e.value) and "'nope'" in str(e.value)
    with pytest.raises(InferenceServerException) as e:
        http_infer(http, "linear", np.zeros((1, 63), dtype=np.float32), False, False)
    assert "does not match the model's [-1, 64]" in str(e.value)


def test_compressed_request(http):
    x = np.full((1, 64), 0.5, dtype=np.float32)
    i = httpclient.InferInput("INPUT0", [1, 64], "FP32")
    i.set_data_from_numpy(x)
    for algorithm in ("gzip", "deflate"):
        r = http.infer("linear", [i], request_compression_algorithm=algorithm)
        np.testing.assert_allclose(r.as_numpy("OUTPUT0"), linear_reference(x), atol=1e-4)
