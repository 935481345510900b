"""Interop suite, the OpenAI-compatible API with the official ``openai`` Python client against the
built-in ``tiny_decoder`` (a seeded random 2-layer Llama with a byte-level tokenizer, so outputs are
gibberish but deterministic at temperature 0): models list, chat completion (streamed and not),
completions, the ``x-session-id`` header, and a Responses conversation of 3 turns chained by
``previous_response_id`` in which turns 2 and 3 reuse the whole earlier conversation from the
worker-side session and turn 3's token ids equal a stateless request over the same token history;
and streamed Responses (``stream=True``): every event parsed by the client, the deltas equal to the
unstreamed answer, the streamed response stored and chained by ``previous_response_id``.

``return_token_ids`` (vLLM's extension, sent with ``extra_body``) makes the worker return token ids,
so exactness is checked on ids, not re-rendered text. Environment: ``NEURON_WORKER_HTTP_URL``
(default ``127.0.0.1:18000``).
"""

import os
import uuid

from openai import OpenAI

HTTP = os.environ.get("NEURON_WORKER_HTTP_URL", "127.0.0.1:18000")
MODEL = "tiny_decoder"


def client():
    return OpenAI(base_url=f"http://{HTTP}/v1", api_key="not-needed", max_retries=0, timeout=60)


def extra(obj, key):
    return obj.model_dump()[key]


def test_models_list():
    ids = [m.id for m in client().models.list()]
    assert MODEL in ids


def test_chat_completion_streamed_and_not():
    c = client()
    messages = [{"role": "user", "content": "hi"}]
    whole = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason in ("stop", "length")
    # The byte tokenizer's template: one token per byte of "<|user|>\nhi\n<|assistant|>\n".
    assert whole.usage.prompt_tokens == len("<|user|>\nhi\n<|assistant|>\n")
    assert 1 <= whole.usage.completion_tokens <= 8
    chunks = list(
        c.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions():
    r = client().completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0)
    assert r.object == "text_completion"
    assert r.usage.prompt_tokens == len("Hello") + 1  # the tokenizer's beginning-of-sequence token
    assert r.choices[0].finish_reason in ("stop", "length")


def test_session_header_on_chat_completions():
    c = client()
    session = {"x-session-id": f"openai-{uuid.uuid4().hex}"}
    ask = lambda text: c.chat.completions.create(  # noqa: E731
        model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=4, temperature=0,
        extra_headers=session, extra_body={"return_token_ids": True},
    )
    first = ask("one")
    second = ask("two")
    earlier = first.usage.prompt_tokens + first.usage.completion_tokens
    assert second.usage.prompt_tokens_details.cached_tokens == earlier - 1
    assert second.usage.prompt_tokens == earlier + len("\n<|user|>\ntwo\n<|assistant|>\n")


def test_responses_conversation_of_three_turns():
    c = client()
    turns = []
    previous = None
    for text in ["My name is Ada.", "What is my name?", "Say it again."]:
        r = c.responses.create(
            model=MODEL, input=text, previous_response_id=previous, max_output_tokens=6, temperature=0,
            extra_body={"return_token_ids": True},
        )
        assert r.status in ("completed", "incomplete")
        turns.append(r)
        previous = r.id
    history = [extra(r, "prompt_token_ids") + extra(r, "output_token_ids") for r in turns]
    assert turns[0].usage.input_tokens_details.cached_tokens == 0
    for before, r in zip(history, turns[1:]):
        # Everything earlier came from the session (all but the last sampled token, whose K/V the
        # follow-up computes): only the new message was prefilled.
        assert r.usage.input_tokens_details.cached_tokens == len(before) - 1
        assert extra(r, "prompt_token_ids")[: len(before)] == before
        assert r.usage.input_tokens == len(extra(r, "prompt_token_ids"))
    # Turn 3's tokens equal a stateless request over the same token history.
    out3 = extra(turns[2], "output_token_ids")
    alone = c.completions.create(
        model=MODEL, prompt=extra(turns[2], "prompt_token_ids"), max_tokens=len(out3), temperature=0,
        extra_body={"return_token_ids": True},
    )
    assert alone.choices[0].model_dump()["token_ids"] == out3
    got = c.responses.retrieve(turns[2].id)
    assert got.id == turns[2].id
    c.responses.delete(turns[2].id)


def test_responses_streamed_and_chained():
    """``stream=True`` on the Responses API: the client parses every event; the deltas add up to the
    text of the same seeded request unstreamed; the streamed response is stored, retrievable and
    continued by ``previous_response_id`` (cached tokens cover it), streamed or not."""
    c = client()
    ask = dict(model=MODEL, max_output_tokens=8, temperature=0.8, extra_body={"return_token_ids": True, "seed": 5})
    whole = c.responses.create(input="Once upon a time", **ask)
    events = list(c.responses.create(input="Once upon a time", stream=True, **ask))
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
    ]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert types[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert types[-1] == ("response.incomplete" if final.status == "incomplete" else "response.completed")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == final.output_text
    assert events[-4].text == text
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert c.responses.retrieve(final.id).output_text == text
    # Chained: a follow-up of the streamed response reuses the whole conversation from the session.
    before = extra(final, "prompt_token_ids") + extra(final, "output_token_ids")
    nxt = c.responses.create(input="And then?", previous_response_id=final.id, **ask)
    assert nxt.usage.input_tokens_details.cached_tokens == len(before) - 1
    assert extra(nxt, "prompt_token_ids")[: len(before)] == before
    # A streamed follow-up of that one continues the same session too.
    before = extra(nxt, "prompt_token_ids") + extra(nxt, "output_token_ids")
    events = list(c.responses.create(input="The end.", previous_response_id=nxt.id, stream=True, **ask))
    last = events[-1].response
    assert last.previous_response_id == nxt.id
    assert last.usage.input_tokens_details.cached_tokens == len(before) - 1
    assert extra(last, "prompt_token_ids")[: len(before)] == before
    c.responses.delete(last.id)
