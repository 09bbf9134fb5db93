"""Issue 19, items 7 and 8: the Responses API (POST /v1/responses) with the official openai client,
streamed and whole, and its refusals; OpenAI fields kvflow cannot honour, refused with a 400 naming
the field or accepted with a warning logged once per field.

The app runs in this process (tests/test_server_hardening.py's InProcessServer, on the tiny model).
"""
from __future__ import annotations

import logging

import httpx
import openai
import pytest

from kvflow.entrypoints import protocol as P
from tests.test_server_hardening import KEY, TINY, InProcessServer, assert_error, post

pytestmark = pytest.mark.server

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def app_server(tiny_model_dir):
    srv = InProcessServer(tiny_model_dir("llama_gqa"))
    yield srv
    srv.stop()


@pytest.fixture
def client(app_server):
    return openai.OpenAI(base_url=f"{app_server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


# ---- item 8: honoured or refused, never silently dropped ------------------------------------------------

REFUSED = [
    ({"messages": USER + [{"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]}]},
     "messages[1].tool_calls[0].function.name"),
    ({"messages": USER + [{"role": "function", "name": "f", "content": "42"}]}, "messages[1].role"),
    ({"messages": [{"role": "assistant", "content": "", "function_call": {"name": "f", "arguments": "{}"}}]},
     "messages[0].function_call"),
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
    ({"messages": USER, "tool_choice": "required"}, "tool_choice"),
    ({"messages": USER, "functions": [{"name": "f"}]}, "functions"),
    ({"messages": USER, "function_call": {"name": "f"}}, "function_call"),
    ({"messages": USER, "modalities": ["text", "audio"]}, "modalities"),
    ({"messages": USER, "audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"messages": USER, "web_search_options": {}}, "web_search_options"),
]


@pytest.mark.parametrize("body,param", REFUSED, ids=[p for _, p in REFUSED])
def test_fields_that_change_the_answer_are_refused(app_server, body, param):
    err = assert_error(post(app_server, CHAT, {**body, "max_tokens": 2}), 400)
    assert err["param"] == param, err
    if param.endswith(("function_call", "functions", "].role")):
        assert "legacy function-calling" in err["message"]


def test_legacy_function_messages_are_refused_by_tokenize_too(app_server):
    body = {"messages": USER + [{"role": "function", "name": "f", "content": "42"}]}
    assert_error(post(app_server, "/tokenize", body), 400, "legacy function-calling")


IGNORED = {"parallel_tool_calls": True, "reasoning_effort": "low", "store": True, "metadata": {"k": "v"},
           "prediction": {"type": "content", "content": "hello"}, "service_tier": "auto", "verbosity": "low",
           "modalities": ["text"], "tool_choice": "none", "some_future_field": 1}


def test_harmless_fields_are_accepted(app_server):
    r = post(app_server, CHAT, {"messages": USER, "max_tokens": 2, **IGNORED})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None


def test_ignored_fields_warn_once_per_field(caplog, monkeypatch):
    monkeypatch.setattr(P, "_warned", set())
    body = {"messages": USER, **IGNORED}
    with caplog.at_level(logging.WARNING, logger="kvflow"):
        for _ in range(3):
            P.ChatCompletionRequest(**body).sampling_params()
    warned = [r.getMessage() for r in caplog.records if "accepted and ignored" in r.getMessage()]
    for field in ("reasoning_effort", "prediction", "store", "some_future_field"):
        assert sum(f"`{field}`" in m for m in warned) == 1, warned
    assert not any(f"`{f}`" in m for m in warned for f in ("modalities", "tool_choice", "parallel_tool_calls"))


def test_message_name_reaches_the_template():
    msg = P.ChatMessage(role="user", content="hi", name="ann")
    assert P.template_messages([msg]) == [{"role": "user", "content": "hi", "name": "ann"}]


# ---- item 7: the Responses API -------------------------------------------------------------------------

def test_responses_create_whole(client):
    r = client.responses.create(model=TINY, input="Hello", instructions="Be brief.", max_output_tokens=5,
                                temperature=0.0, extra_body={"top_k": 1, "ignore_eos": True})
    assert r.object == "response" and r.status == "incomplete" and r.id.startswith("resp")
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.output_text == r.output[0].content[0].text and r.output_text
    assert r.usage.output_tokens == 5 and r.usage.input_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + 5


def test_responses_stream_equals_whole(client):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": [{"type": "input_text", "text": "Count to three."}]}]
    kw = dict(model=TINY, input=messages, max_output_tokens=6, temperature=0.0, extra_body={"ignore_eos": True})
    whole = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = next(e for e in events if e.type == "response.output_text.done")
    assert deltas == done.text == whole.output_text
    last = events[-1].response
    assert last.output_text == whole.output_text and last.usage.output_tokens == 6


def test_responses_stream_has_event_lines_and_no_done(app_server):
    with httpx.stream("POST", f"{app_server.url}/v1/responses", timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"input": "Hi", "max_output_tokens": 3, "stream": True}) as r:
        text = r.read().decode()
    blocks = [b for b in text.split("\n\n") if b.strip() and not b.startswith(":")]
    assert blocks[0].startswith("event: response.created\ndata: {")
    assert blocks[-1].split("\n")[0] in ("event: response.completed", "event: response.incomplete")
    assert "[DONE]" not in text


@pytest.mark.parametrize("body,param", [
    ({"input": "x", "tools": [{"type": "function", "name": "f"}]}, "tools"),
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
     "input[0].content"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "input[0]"),
    ({"input": "x", "text": {"format": {"type": "json_object"}}}, "text.format"),
    ({"input": []}, "input"),
])
def test_responses_refusals(app_server, body, param):
    assert assert_error(post(app_server, "/v1/responses", body), 400)["param"] == param


def test_responses_bad_input_with_the_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=TINY, input="x", previous_response_id="resp_123")
    assert "previous_response_id" in str(e.value)
    r = client.responses.create(model=TINY, input="x", max_output_tokens=2, store=True)   # a no-op
    assert r.status in ("completed", "incomplete") and r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


# ---- scheduling fields (issue 10) -----------------------------------------------------------------------

def test_priority_and_user_in_the_body(app_server):
    r = post(app_server, CHAT, {"messages": USER, "max_tokens": 2, "user": "alice", "priority": 0})
    assert r.status_code == 200, r.text
    err = assert_error(post(app_server, CHAT, {"messages": USER, "max_tokens": 2, "priority": 3}), 400,
                       "only honoured with scheduling_policy='priority'")
    for bad in ("high", 1.5, None):
        err = assert_error(post(app_server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "priority": bad}), 400)
        assert err["param"] == "priority", err
    metrics = httpx.get(f"{app_server.url}/metrics").text
    assert 'kvflow:e2e_request_latency_by_priority_seconds_count{model_name="tiny-llama",priority="0"}' in metrics
    assert 'kvflow:step_token_budget{model_name="tiny-llama"} 2048.0' in metrics


