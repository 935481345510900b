"""Interop suite, stateful sessions: the unmodified Triton Python client (``tritonclient.grpc``)
driving the built-in sequence models ``accumulate`` and ``gru`` with ``sequence_id`` /
``sequence_start`` / ``sequence_end``, many sequences interleaved from many clients at once.

Every output is checked against an independent computation of that sequence alone: a running sum
for ``accumulate``, and for ``gru`` a numpy GRU cell whose weights are regenerated here from the
documented SplitMix64 streams (see ``src/backend/cpu/stateful/kernels.rs``).

Environment as for ``test_tritonclient.py`` (``NEURON_WORKER_URL``, default ``127.0.0.1:18001``).
"""

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

URL = os.environ.get("NEURON_WORKER_URL", "127.0.0.1:18001")
DEADLINE = 10.0
GRU_IN, GRU_HIDDEN, GRU_SEED = 64, 128, 0x677275
MASK = (1 << 64) - 1


class SplitMix64:
    """The generator of ``backend::cpu::builtin``: uniform() is exact in [-1, 1) as float32."""

    def __init__(self, seed: int):
        self.state = seed & MASK

    def next_u64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def uniform(self) -> np.float32:
        u = np.float32(self.next_u64() >> 40) / np.float32(16777216.0)
        return np.float32(2.0) * u - np.float32(1.0)


def gru_weights():
    g = 3 * GRU_HIDDEN
    r = SplitMix64(GRU_SEED)
    wi = np.array([r.uniform() * np.float32(0.125) for _ in range(GRU_IN * g)], dtype=np.float32).reshape(GRU_IN, g)
    bi = np.array([r.uniform() * np.float32(0.1) for _ in range(g)], dtype=np.float32)
    r = SplitMix64(GRU_SEED + 1)
    wh = np.array([r.uniform() * np.float32(0.0625) for _ in range(GRU_HIDDEN * g)], dtype=np.float32).reshape(GRU_HIDDEN, g)
    bh = np.array([r.uniform() * np.float32(0.1) for _ in range(g)], dtype=np.float32)
    return [w.astype(np.float64) for w in (wi, bi, wh, bh)]


def gru_reference(weights, x: np.ndarray, h: np.ndarray):
    """Runs the cell over x [T, 64] from h [128]; returns ([T, 128], new h), in float64."""
    wi, bi, wh, bh = weights
    hd = GRU_HIDDEN
    out = []
    for xt in x.astype(np.float64):
        gi = xt @ wi + bi
        gh = h @ wh + bh
        r = 1.0 / (1.0 + np.exp(-(gi[:hd] + gh[:hd])))
        z = 1.0 / (1.0 + np.exp(-(gi[hd:2 * hd] + gh[hd:2 * hd])))
        n = np.tanh(gi[2 * hd:] + r * gh[2 * hd:])
        h = (1.0 - z) * n + z * h
        out.append(h)
    return np.stack(out), h


@pytest.fixture(scope="module")
def weights():
    return gru_weights()


def new_client():
    return grpcclient.InferenceServerClient(url=URL)


def accumulate_step(c, seq_id, value: int, start: bool, end: bool) -> int:
    x = grpcclient.InferInput("INPUT", [1, 1], "INT32")
    x.set_data_from_numpy(np.array([[value]], dtype=np.int32))
    r = c.infer("accumulate", [x], sequence_id=seq_id, sequence_start=start, sequence_end=end, client_timeout=DEADLINE)
    out = r.as_numpy("OUTPUT")
    assert out.shape == (1, 1)
    return int(out[0, 0])


def run_accumulate(seq_id, steps: int, seed: int):
    rng = np.random.default_rng(seed)
    values = rng.integers(-1000, 1000, size=steps)
    c = new_client()
    try:
        total = 0
        for i, v in enumerate(values):
            total += int(v)
            got = accumulate_step(c, seq_id, int(v), i == 0, i == steps - 1)
            assert got == total, f"sequence {seq_id!r} step {i}: {got} != {total}"
    finally:
        c.close()
    return seq_id


def run_gru(weights, seq_id, steps: int, seed: int):
    rng = np.random.default_rng(seed)
    c = new_client()
    h = np.zeros(GRU_HIDDEN)
    try:
        for i in range(steps):
            t = int(rng.integers(1, 4))
            x = rng.uniform(-1, 1, size=(t, GRU_IN)).astype(np.float32)
            want, h = gru_reference(weights, x, h)
            inp = grpcclient.InferInput("INPUT0", [1, t, GRU_IN], "FP32")
            inp.set_data_from_numpy(x.reshape(1, t, GRU_IN))
            r = c.infer("gru", [inp], sequence_id=seq_id, sequence_start=i == 0, sequence_end=i == steps - 1,
                        client_timeout=DEADLINE)
            got = r.as_numpy("OUTPUT0")
            assert got.shape == (1, t, GRU_HIDDEN)
            np.testing.assert_allclose(got[0], want, atol=1e-4, err_msg=f"sequence {seq_id!r} step {i}")
    finally:
        c.close()
    return seq_id


def test_sequence_models_are_ready_and_configured():
    c = new_client()
    try:
        for model in ("accumulate", "gru"):
            assert c.is_model_ready(model, client_timeout=DEADLINE) is True
            cfg = c.get_model_config(model, as_json=True, client_timeout=DEADLINE)["config"]
            assert "sequence_batching" in cfg
        md = c.get_model_metadata("gru", as_json=True, client_timeout=DEADLINE)
        assert md["inputs"][0]["shape"] == ["-1", "-1", "64"]
    finally:
        c.close()


def test_accumulate_interleaved_sequences_from_many_clients():
    ids = [1000 + i for i in range(8)] + [f"acc-{i}" for i in range(4)]
    with ThreadPoolExecutor(max_workers=len(ids)) as pool:
        done = list(pool.map(lambda a: run_accumulate(a[1], 25, a[0]), enumerate(ids)))
    assert done == ids


def test_gru_interleaved_sequences_from_many_clients(weights):
    ids = [2000 + i for i in range(6)] + [f"gru-{i}" for i in range(4)]
    with ThreadPoolExecutor(max_workers=len(ids)) as pool:
        done = list(pool.map(lambda a: run_gru(weights, a[1], 8, 100 + a[0]), enumerate(ids)))
    assert done == ids


def test_unknown_and_ended_sequences_are_refused():
    c = new_client()
    try:
        with pytest.raises(InferenceServerException) as e:
            accumulate_step(c, 987654, 1, False, False)
        assert "never started" in str(e.value)
        assert accumulate_step(c, 4242, 5, True, True) == 5
        with pytest.raises(InferenceServerException) as e:
            accumulate_step(c, 4242, 1, False, False)
        assert "has ended" in str(e.value)
    finally:
        c.close()
