"""Interop suite, conversation sessions on a generative model: the unmodified Triton Python client
(``tritonclient.grpc`` streaming, as the vLLM backend's users call it) holding conversations with the
built-in ``tiny_decoder`` by ``sequence_id`` / ``sequence_start``: each turn sends only the new message,
and its tokens (and, seeded, its log-probabilities) equal a stateless request that re-sends the whole
token history — two turns greedy, four turns greedy and four turns with seeded sampling.

Environment as for ``test_tritonclient.py`` (``NEURON_WORKER_URL``, default ``127.0.0.1:18001``).
"""

import json
import os
import queue

import numpy as np
import tritonclient.grpc as grpcclient

URL = os.environ.get("NEURON_WORKER_URL", "127.0.0.1:18001")
MODEL = "tiny_decoder"
PARAMS = json.dumps({"max_tokens": 8, "temperature": 0, "ignore_eos": True})


SEEDED = json.dumps({"max_tokens": 6, "temperature": 0.9, "top_p": 0.95, "seed": 5, "ignore_eos": True})


def inputs(ids, params=PARAMS):
    tensors = []
    for name, dtype, value in [
        ("input_ids", "INT32", np.array(ids, dtype=np.int32)),
        ("sampling_parameters", "BYTES", np.array([params.encode()], dtype=object)),
        ("stream", "BOOL", np.array([True])),
        ("exclude_input_in_output", "BOOL", np.array([True])),
        ("return_output_ids", "BOOL", np.array([True])),
        ("return_output_logprobs", "BOOL", np.array([True])),
    ]:
        t = grpcclient.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        tensors.append(t)
    return tensors


def turn_with_logprobs(client, ids, params=PARAMS, **session):
    """One streamed request; returns the generated token ids and their log-probabilities."""
    results = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(MODEL, inputs(ids, params), enable_empty_final_response=True, **session)
        out, lps = [], []
        while True:
            result, error = results.get(timeout=30)
            assert error is None, error
            response_params = result.get_response().parameters
            ids_out = result.as_numpy("output_ids")
            if ids_out is not None:
                out.extend(int(i) for i in ids_out)
            lp_out = result.as_numpy("output_logprobs")
            if lp_out is not None:
                lps.extend(float(x) for x in lp_out)
            if response_params["triton_final_response"].bool_param:
                return out, lps
    finally:
        client.stop_stream()


def turn(client, ids, **session):
    """One streamed greedy request; returns the generated token ids."""
    return turn_with_logprobs(client, ids, **session)[0]


def test_two_turn_conversation_sends_only_the_new_message():
    client = grpcclient.InferenceServerClient(URL)
    first, second = [72, 101, 108, 108, 111], [32, 97, 103, 97, 105, 110]
    t1 = turn(client, first, sequence_id=4242, sequence_start=True)
    t2 = turn(client, second, sequence_id=4242)
    assert len(t1) == 8 and len(t2) == 8
    stateless = turn(client, first + t1 + second)
    assert t2 == stateless, (t2, stateless)
    turn(client, [46], sequence_id=4242, sequence_end=True)


def four_turns(client, sequence_id, params):
    history = []
    for n in range(4):
        message = [(sequence_id * 7 + n * 13 + k * 5) % 250 + 1 for k in range(4 + 3 * n)]
        kept = turn_with_logprobs(client, message, params, sequence_id=sequence_id, sequence_start=(n == 0))
        history += message
        stateless = turn_with_logprobs(client, history, params)
        assert kept == stateless, (sequence_id, n, kept, stateless)
        history += kept[0]
    turn(client, [46], sequence_id=sequence_id, sequence_end=True)


def test_four_turns_greedy_and_seeded_equal_stateless_requests():
    client = grpcclient.InferenceServerClient(URL)
    four_turns(client, 4301, PARAMS)
    four_turns(client, 4302, SEEDED)
