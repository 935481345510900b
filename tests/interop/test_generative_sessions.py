"""Interop suite, conversation sessions on a generative model: the unmodified Triton Python client
(``tritonclient.grpc`` streaming, as the vLLM backend's users call it) holding a two-turn
conversation with the built-in ``tiny_decoder`` by ``sequence_id`` / ``sequence_start``; turn 2 sends
only the new message, and its tokens equal a stateless request that re-sends the whole token history.

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


def inputs(ids):
    tensors = []
    for name, dtype, value in [
        ("input_ids", "INT32", np.array(ids, dtype=np.int32)),
        ("sampling_parameters", "BYTES", np.array([PARAMS.encode()], dtype=object)),
        ("stream", "BOOL", np.array([True])),
        ("exclude_input_in_output", "BOOL", np.array([True])),
        ("return_output_ids", "BOOL", np.array([True])),
    ]:
        t = grpcclient.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        tensors.append(t)
    return tensors


def turn(client, ids, **session):
    """One streamed request; returns the generated token ids."""
    results = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(MODEL, inputs(ids), enable_empty_final_response=True, **session)
        out = []
        while True:
            result, error = results.get(timeout=30)
            assert error is None, error
            params = result.get_response().parameters
            ids_out = result.as_numpy("output_ids")
            if ids_out is not None:
                out.extend(int(i) for i in ids_out)
            if params["triton_final_response"].bool_param:
                return out
    finally:
        client.stop_stream()


def test_two_turn_conversation_sends_only_the_new_message():
    client = grpcclient.InferenceServerClient(URL)
    first, second = [72, 101, 108, 108, 111], [32, 97, 103, 97, 105, 110]
    t1 = turn(client, first, sequence_id=4242, sequence_start=True)
    t2 = turn(client, second, sequence_id=4242)
    assert len(t1) == 8 and len(t2) == 8
    stateless = turn(client, first + t1 + second)
    assert t2 == stateless, (t2, stateless)
    turn(client, [46], sequence_id=4242, sequence_end=True)
