"""Interop suite, ``/v1/embeddings`` with the official ``openai`` Python client against a small
generated sentence-embedding model (``bert_fixture.py``: seeded random BERT, WordPiece tokenizer,
mean pooling + L2 normalisation). The module starts its own worker on free 127.0.0.1 ports with a
repository holding only that model (the main interop worker serves the built-in models) and stops
it with SIGTERM at the end, checking it exits 0.

Checked: a text and a list of texts give the right count and dimension; ``float`` and ``base64``
encodings decode to the same vectors; each vector equals the ``sentence_embedding`` the worker
returns over KServe v2 (``tritonclient.grpc``) for the token ids the fixture's vocabulary gives that
text; token-id input equals text input; an unknown model raises ``openai.NotFoundError``; and the
same BERT model over KServe v2 HTTP with ``tritonclient.http`` (JSON and binary tensor data) gives
the gRPC answer, and ``perf_analyzer -i http`` drives it (real token ids from an input-data file).
Environment: ``NEURON_WORKER_BINARY`` (default ``target/debug/neuron-worker``).
"""

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from openai import OpenAI

sys.path.insert(0, os.path.dirname(__file__))
import bert_fixture  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BINARY = os.environ.get("NEURON_WORKER_BINARY", os.path.join(ROOT, "target/debug/neuron-worker"))
MODEL = "embedder"
TEXTS = ["tok10 tok11 tok12", "tok42 tok7", "tok99 tok5 tok63 tok63 tok21"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def worker():
    with tempfile.TemporaryDirectory() as repo:
        bert_fixture.write(repo, MODEL)
        grpc, http, metrics = (f"127.0.0.1:{free_port()}" for _ in range(3))
        log = open(os.path.join(repo, "worker.log"), "w+")
        proc = subprocess.Popen(
            [BINARY, "serve", "--backend", "cpu", "--model-repository", repo, "--grpc-addr", grpc,
             "--http-addr", http, "--metrics-addr", metrics],
            stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            triton = grpcclient.InferenceServerClient(grpc)
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, f"the embeddings worker exited: {open(log.name).read()}"
                try:
                    if triton.is_model_ready(MODEL, client_timeout=1.0):
                        break
                except Exception:
                    pass
                assert time.monotonic() < deadline, "the embeddings worker was not ready within 30 s"
                time.sleep(0.1)
            yield {"http": http, "triton": triton}
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=35) == 0, open(log.name).read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


def client(w):
    return OpenAI(base_url=f"http://{w['http']}/v1", api_key="not-needed", max_retries=0, timeout=60)


def kserve_embedding(w, ids):
    """``sentence_embedding`` over KServe v2 gRPC for one row of token ids."""
    inputs = []
    for name, values in (("input_ids", ids), ("attention_mask", [1] * len(ids)), ("token_type_ids", [0] * len(ids))):
        t = grpcclient.InferInput(name, [1, len(ids)], "INT64")
        t.set_data_from_numpy(np.array([values], dtype=np.int64))
        inputs.append(t)
    out = [grpcclient.InferRequestedOutput("sentence_embedding")]
    r = w["triton"].infer(MODEL, inputs, outputs=out)
    return r.as_numpy("sentence_embedding")[0]


def test_one_text_equals_kserve(worker):
    r = client(worker).embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    assert r.object == "list" and r.model == MODEL
    assert len(r.data) == 1
    got = np.array(r.data[0].embedding, dtype=np.float32)
    assert got.shape == (bert_fixture.HIDDEN,)
    ids = bert_fixture.ids_of(TEXTS[0])
    assert r.usage.prompt_tokens == len(ids)
    np.testing.assert_allclose(got, kserve_embedding(worker, ids), rtol=0, atol=1e-6)
    assert abs(float(np.linalg.norm(got)) - 1.0) < 1e-5  # the fixture normalises


def test_list_of_texts_float_and_base64_agree_and_equal_kserve(worker):
    c = client(worker)
    floats = c.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    # The client's default asks for base64 and decodes it into floats itself.
    default = c.embeddings.create(model=MODEL, input=TEXTS)
    raw = c.embeddings.with_raw_response.create(model=MODEL, input=TEXTS, encoding_format="base64")
    raw_rows = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw.http_response.json()["data"]]
    assert len(floats.data) == len(default.data) == len(raw_rows) == len(TEXTS)
    assert floats.usage.prompt_tokens == sum(len(bert_fixture.ids_of(t)) for t in TEXTS)
    for i, text in enumerate(TEXTS):
        assert floats.data[i].index == i
        f = np.array(floats.data[i].embedding, dtype=np.float32)
        assert f.shape == (bert_fixture.HIDDEN,)
        np.testing.assert_array_equal(np.array(default.data[i].embedding, dtype=np.float32), raw_rows[i])
        np.testing.assert_array_equal(f, raw_rows[i])
        # Rows of different lengths are padded and masked in one batch: within float rounding of
        # the row served alone.
        np.testing.assert_allclose(f, kserve_embedding(worker, bert_fixture.ids_of(text)), rtol=0, atol=1e-5)


def test_token_ids_equal_text(worker):
    c = client(worker)
    ids = bert_fixture.ids_of(TEXTS[2])
    by_ids = c.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    by_text = c.embeddings.create(model=MODEL, input=TEXTS[2], encoding_format="float")
    assert by_ids.data[0].embedding == by_text.data[0].embedding
    two = c.embeddings.create(model=MODEL, input=[ids, bert_fixture.ids_of(TEXTS[0])], encoding_format="float")
    assert len(two.data) == 2


def test_unknown_model_and_bad_input_raise(worker):
    c = client(worker)
    with pytest.raises(openai.NotFoundError) as e:
        c.embeddings.create(model="no-such-model", input="tok10")
    assert "no-such-model" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        c.embeddings.create(model=MODEL, input="tok10", dimensions=8)
    assert "dimensions" in str(e.value)


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_http_equals_grpc_on_the_bert_model(worker, binary):
    """KServe v2 HTTP with ``tritonclient.http`` on the BERT model: JSON or binary tensor data in
    and out, two rows of different lengths padded with a zero mask; each row equals the gRPC answer
    for that row alone."""
    rows = [bert_fixture.ids_of(TEXTS[0]), bert_fixture.ids_of(TEXTS[2])]
    width = max(len(r) for r in rows)
    ids = np.array([r + [0] * (width - len(r)) for r in rows], dtype=np.int64)
    mask = np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=np.int64)
    http = httpclient.InferenceServerClient(worker["http"])
    assert http.is_model_ready(MODEL)
    inputs = []
    for name, values in (("input_ids", ids), ("attention_mask", mask), ("token_type_ids", np.zeros_like(ids))):
        t = httpclient.InferInput(name, list(values.shape), "INT64")
        t.set_data_from_numpy(values, binary_data=binary)
        inputs.append(t)
    out = [httpclient.InferRequestedOutput("sentence_embedding", binary_data=binary)]
    got = http.infer(MODEL, inputs, outputs=out).as_numpy("sentence_embedding")
    assert got.shape == (2, bert_fixture.HIDDEN)
    for i, r in enumerate(rows):
        np.testing.assert_allclose(got[i], kserve_embedding(worker, r), rtol=0, atol=1e-5)


def test_perf_analyzer_http_on_the_bert_model(worker, tmp_path):
    """``perf_analyzer -i http`` against the BERT model, with valid token ids from an input-data
    file (its random data would be ids outside the vocabulary, which the worker refuses): every
    request succeeds and both concurrency levels report a throughput."""
    # run.sh puts the client venv's perf_analyzer (and the libraries it loads) on the paths.
    perf = shutil.which("perf_analyzer")
    assert perf, "perf_analyzer is not on PATH (run the suite with tests/interop/run.sh)"
    ids = bert_fixture.ids_of(TEXTS[2])
    row = {
        "input_ids": {"content": ids, "shape": [len(ids)]},
        "attention_mask": {"content": [1] * len(ids), "shape": [len(ids)]},
        "token_type_ids": {"content": [0] * len(ids), "shape": [len(ids)]},
    }
    data = tmp_path / "bert-input.json"
    data.write_text(json.dumps({"data": [row]}))
    out = subprocess.run(
        [perf, "-i", "http", "-u", worker["http"], "-m", MODEL, "--input-data", str(data), "-b", "1",
         "--concurrency-range", "1:2", "--measurement-interval", "1000", "--stability-percentage", "50",
         "--max-trials", "8"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    levels = re.findall(r"^Concurrency: (\d+), throughput: ([0-9.]+) infer/sec", out.stdout, re.M)
    assert {c for c, t in levels if float(t) > 0} == {"1", "2"}, out.stdout
