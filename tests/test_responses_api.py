"""POST /v1/responses through the official openai client (responses.create, the raw event stream,
responses.stream) and LangChain's ChatOpenAI(use_responses_api=True), against the embedded default
model: the answer, its usage and its log-probabilities are the chat path's for the same request;
text.format is enforced; stateful and unknown-tool requests are 400s naming the field. The
conversion functions (input items, tools, tool_choice, text.format) are tested directly."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel, TypeAdapter

from server.errors import ApiError
from server.responses_api import (ResponseBuilder, ResponseStream, chat_messages, chat_request,
                                  chat_response_format, chat_tool_choice, chat_tools, renamed)
from server.responses_schemas import ResponsesRequest
from test_server_helpers import metric, metrics
from weights import default_model_path
from weights.checkpoint import load_checkpoint

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
                   "n": {"type": "integer", "minimum": 0, "maximum": 99},
                   "kind": {"enum": ["a", "b"]},
                   "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2}},
    "required": ["name", "n", "kind", "tags"], "additionalProperties": False,
}
SAMPLED = {"seed": 11, "steps": 12, "block_length": 8}  # diffusion extras, as chat takes them


@pytest.fixture(scope="module")
def default_bundle():
    return load_checkpoint(default_model_path(), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def server(serve, default_bundle):
    return serve(default_bundle, name="m", max_batch_tokens=4096)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


EVENT = TypeAdapter(ResponseStreamEvent)  # the SDK's own types, validated (not just constructed)


def _events(raw: list[bytes]) -> list:
    """SSE bytes -> the SDK's event objects, each validated; the `event:` line names its type."""
    out = []
    for block in b"".join(raw).split(b"\n\n"):
        if block.startswith(b"event: "):
            head, data = block.split(b"\n", 1)
            ev = EVENT.validate_python(json.loads(data.removeprefix(b"data: ")))
            assert head.decode() == f"event: {ev.type}"
            out.append(ev)
    assert [e.sequence_number for e in out] == list(range(len(out)))
    return out


def _error(server, body: dict) -> tuple[int, dict]:
    r = httpx.post(server.url + "/v1/responses", json=body, timeout=60)
    return r.status_code, r.json()["error"]


# ---------------------------------------------------------------- conversion functions
def test_input_items_become_chat_messages():
    assert chat_messages("be brief", "hi") == [{"role": "system", "content": "be brief"},
                                               {"role": "user", "content": "hi"}]
    items = [
        {"role": "developer", "content": "rules"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"},
                                                         {"type": "input_text", "text": "b"}]},
        {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
         "content": [{"type": "output_text", "text": "let me look", "annotations": []}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "f", "arguments": "{\"x\":1}"},
        {"type": "function_call", "call_id": "call_2", "name": "g", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "2"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "ok"}]},
        {"role": "user", "content": "so?"},
        {"type": "function_call", "call_id": "call_3", "name": "f", "arguments": "{}"},
    ]
    msgs = chat_messages(None, items)
    assert msgs[0] == {"role": "developer", "content": "rules"}
    assert msgs[1] == {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    # consecutive calls join the assistant message before them (parallel calls of one turn)
    assert msgs[2]["role"] == "assistant" and msgs[2]["content"] == [{"type": "text", "text": "let me look"}]
    assert [c["id"] for c in msgs[2]["tool_calls"]] == ["call_1", "call_2"]
    assert msgs[2]["tool_calls"][0] == {"id": "call_1", "type": "function",
                                        "function": {"name": "f", "arguments": "{\"x\":1}"}}
    assert msgs[3] == {"role": "tool", "tool_call_id": "call_1", "content": "2"}
    assert msgs[4] == {"role": "tool", "tool_call_id": "call_2", "content": "ok"}
    # a call after a user message opens an assistant message of its own
    assert msgs[6] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_3", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}


@pytest.mark.parametrize("items, param", [
    ([], "input"),
    ([{"role": "robot", "content": "x"}], "input.0.role"),
    ([{"type": "reasoning", "summary": []}], "input.0.type"),
    ([{"type": "item_reference", "id": "msg_1"}], "input.0.type"),
    ([{"role": "user", "content": 3}], "input.0.content"),
    ([{"role": "user", "content": [{"type": "input_text", "text": None}]}], "input.0.content.0.text"),
    ([{"type": "function_call", "call_id": "c", "name": "f"}], "input.0.arguments"),
    ([{"type": "function_call_output", "output": "x"}], "input.0.call_id"),
    ([{"type": "function_call_output", "call_id": "c", "output": [{"type": "input_image"}]}],
     "input.0.output.content.0.type"),
])
def test_bad_input_items_are_refused_by_path(items, param):
    with pytest.raises(ApiError) as e:
        chat_messages(None, items)
    assert e.value.status == 400 and e.value.param == param


def test_tools_tool_choice_and_text_format_take_chat_shapes():
    params = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    tools = [{"type": "function", "name": "f", "description": "d", "parameters": params, "strict": True},
             {"type": "function", "name": "g"}]
    assert chat_tools(tools) == [
        {"type": "function", "function": {"name": "f", "description": "d", "parameters": params, "strict": True}},
        {"type": "function", "function": {"name": "g"}}]
    for kind in ("web_search", "file_search", "mcp", "custom"):
        with pytest.raises(ApiError) as e:
            chat_tools([tools[0], {"type": kind}])
        assert e.value.param == "tools.1.type" and kind in e.value.message
    with pytest.raises(ApiError) as e:
        chat_tools([{"type": "function", "function": {"name": "f"}}])  # chat's shape is not the Responses one
    assert e.value.param == "tools.0.name"
    for plain in ("none", "auto", "required", None):
        assert chat_tool_choice(plain) == plain
    assert chat_tool_choice({"type": "function", "name": "f"}) == {"type": "function", "function": {"name": "f"}}
    assert chat_tool_choice({"type": "allowed_tools", "mode": "required",
                             "tools": [{"type": "function", "name": "g"}]}) == {
        "type": "allowed_tools", "allowed_tools": {"mode": "required",
                                                   "tools": [{"type": "function", "function": {"name": "g"}}]}}
    for bad in ("sometimes", {"type": "web_search_preview"}, {"type": "function"}):
        with pytest.raises(ApiError) as e:
            chat_tool_choice(bad)
        assert e.value.param == "tool_choice"
    assert chat_response_format({"type": "text"}) == {"type": "text"}
    assert chat_response_format({"type": "json_object"}) == {"type": "json_object"}
    assert chat_response_format({"type": "json_schema", "name": "t", "schema": SCHEMA, "strict": True}) == {
        "type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA, "strict": True}}
    for bad, param in (({"type": "json_schema", "name": "t"}, "text.format.schema"),
                       ({"type": "xml"}, "text.format.type")):
        with pytest.raises(ApiError) as e:
            chat_response_format(bad)
        assert e.value.param == param


def test_chat_errors_name_the_responses_field():
    e = renamed(ApiError(400, "max_tokens must be >= 1, got 0", param="max_tokens"))
    assert (e.param, e.message) == ("max_output_tokens", "max_output_tokens must be >= 1, got 0")
    assert renamed(ApiError(400, "x", param="messages.3.content")).param == "input"
    assert renamed(ApiError(400, "x", param="response_format")).param == "text.format"
    assert renamed(ApiError(400, "x", param="seed")).param == "seed"
    assert renamed(ApiError(400, "x", param="prompt")).param == "input"


def test_a_checkpoint_without_a_tokenizer_is_a_400_naming_input(serve, bundle):
    srv = serve(bundle, name="tiny")
    r = httpx.post(srv.url + "/v1/responses", json={"input": "hi"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    assert r.json()["error"]["code"] == "no_tokenizer"


def test_chat_request_carries_the_fields_and_the_extras():
    req = ResponsesRequest.model_validate({
        "model": "m", "input": "hi", "instructions": "sys", "max_output_tokens": 9, "temperature": 0.5,
        "top_p": 0.9, "text": {"format": {"type": "json_object"}}, "stream": True, "store": False,
        "include": ["message.output_text.logprobs"], "top_logprobs": 3, "parallel_tool_calls": False,
        "seed": 4, "steps": 8, "block_length": 4, "draft_depth": 2, "stop": ["x"], "metadata": {"a": "b"}})
    body = chat_request(req)
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]
    assert body == {"model": "m", "messages": messages,
                    "max_completion_tokens": 9, "temperature": 0.5, "top_p": 0.9,
                    "response_format": {"type": "json_object"}, "stream": True,
                    "stream_options": {"include_usage": True}, "store": False, "logprobs": True, "top_logprobs": 3,
                    "parallel_tool_calls": False, "seed": 4, "steps": 8, "block_length": 4, "draft_depth": 2,
                    "stop": ["x"], "metadata": {"a": "b"}}


CALLS_BODY = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
    "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None, "message": {
        "role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}},
            {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}}],
    "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12, "forwards": 3}}


def test_tool_calls_of_a_chat_answer_become_function_call_items():
    tools = [{"type": "function", "name": "f"}, {"type": "function", "name": "g"}]
    req = ResponsesRequest.model_validate({"input": "x", "tool_choice": "required", "tools": tools})
    r = TypeAdapter(Response).validate_python(ResponseBuilder(req, "m").from_chat(CALLS_BODY))
    assert r.status == "completed" and r.output_text == "" and r.tool_choice == "required"
    assert [(o.type, o.call_id, o.name, o.arguments, o.status) for o in r.output] == [
        ("function_call", "call_a", "f", "{\"x\": 1}", "completed"),
        ("function_call", "call_b", "g", "{}", "completed")]
    assert all(o.id.startswith("fc_") for o in r.output)
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (7, 5, 12)
    text_too = json.loads(json.dumps(CALLS_BODY))
    text_too["choices"][0]["message"]["content"] = "Checking."
    r = TypeAdapter(Response).validate_python(ResponseBuilder(req, "m").from_chat(text_too))
    assert [o.type for o in r.output] == ["message", "function_call", "function_call"]
    assert r.output_text == "Checking."


def _chunk(delta: dict, finish=None) -> bytes:
    body = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _stream(req: ResponsesRequest, chunks: list[bytes]) -> list:
    async def chat_body():
        for c in chunks:
            yield c

    async def run():
        return [e async for e in ResponseStream(ResponseBuilder(req, "m")).events(chat_body())]
    return _events(asyncio.run(run()))


def test_streamed_tool_call_chunks_become_function_call_events():
    """Chat's streamed tool calls (OpenAI's chunk shape: an id and a name first, then argument
    pieces by index) after some text: the message closes before the first call opens, each call
    before the next, and the final response holds the items in order."""
    req = ResponsesRequest.model_validate({"input": "x", "tools": [{"type": "function", "name": "f"}]})
    usage = {"id": "c", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}}
    events = _stream(req, [
        _chunk({"role": "assistant", "content": ""}), _chunk({"content": "Let me see."}),
        _chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                "function": {"name": "f", "arguments": ""}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"x\":"}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
        _chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                                "function": {"name": "f", "arguments": "{}"}}]}),
        _chunk({}, "tool_calls"), b"data: " + json.dumps(usage).encode() + b"\n\n", b"data: [DONE]\n\n"])
    assert [e.type for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    first = events[8].item
    assert first.type == "function_call" and first.call_id == "call_a" and first.name == "f" and first.arguments == ""
    assert [e.output_index for e in events[8:13]] == [1] * 5 and events[11].arguments == "{\"x\":1}"
    final = events[-1].response
    assert [(o.type, getattr(o, "arguments", None)) for o in final.output] == [
        ("message", None), ("function_call", "{\"x\":1}"), ("function_call", "{}")]
    assert final.output_text == "Let me see." and final.usage.total_tokens == 14 and final.status == "completed"


def test_a_stream_without_text_still_has_its_message_and_an_error_fails_it():
    req = ResponsesRequest.model_validate({"input": "x", "max_output_tokens": 4})
    events = _stream(req, [_chunk({"role": "assistant", "content": ""}), _chunk({}, "length"),
                           b"data: [DONE]\n\n"])
    assert [e.type for e in events][2:] == [
        "response.output_item.added", "response.content_part.added", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.incomplete"]
    assert events[-1].response.output[0].status == "incomplete"
    error = {"error": {"message": "the queue is full", "type": "rate_limit_error", "param": None,
                       "code": "queue_full", "status": 429}}
    events = _stream(req, [_chunk({"content": "a"}), b"data: " + json.dumps(error).encode() + b"\n\n",
                           b"data: [DONE]\n\n"])
    assert [e.type for e in events][-2:] == ["error", "response.failed"]
    assert events[-2].code == "queue_full" and events[-2].message == "the queue is full"
    assert events[-1].response.error.code == "rate_limit_exceeded" and events[-1].response.status == "failed"


# ---------------------------------------------------------------- through the official client
def test_create_is_the_chat_answer(client):
    kw = dict(temperature=1.0, top_p=0.9, extra_body=SAMPLED)
    r = client.responses.create(model="m", instructions="Answer briefly.", input="Name three colors.",
                                max_output_tokens=24, store=True, metadata={"k": "v"}, user="u1", **kw)
    chat = client.chat.completions.create(model="m", messages=[
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name three colors."}],
        max_completion_tokens=24, **kw)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "m"
    assert r.output_text == chat.choices[0].message.content and r.output_text
    (item,) = r.output
    assert item.type == "message" and item.id.startswith("msg_") and item.role == "assistant"
    assert item.content[0].type == "output_text" and item.content[0].annotations == []
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (
        chat.usage.prompt_tokens, chat.usage.completion_tokens, chat.usage.total_tokens)
    assert r.usage.input_tokens_details.cached_tokens == 0 and r.usage.output_tokens_details.reasoning_tokens == 0
    finished = chat.choices[0].finish_reason == "stop"
    assert r.status == ("completed" if finished else "incomplete") and item.status == r.status
    assert r.metadata == {"k": "v"} and r.user == "u1" and r.store is False  # accepted, nothing is stored
    assert (r.temperature, r.top_p, r.max_output_tokens, r.instructions) == (1.0, 0.9, 24, "Answer briefly.")
    raw = httpx.post(f"{client.base_url}responses", timeout=60, json={
        "model": "m", "instructions": "Answer briefly.", "input": "Name three colors.", "max_output_tokens": 24,
        "temperature": 1.0, "top_p": 0.9, **SAMPLED}).json()
    assert TypeAdapter(Response).validate_python(raw).output_text == r.output_text  # every required field


def test_list_input_is_the_chat_conversation(client):
    items = [{"role": "developer", "content": "Reply in one word."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
             {"type": "message", "role": "assistant", "content": [
                 {"type": "output_text", "text": "Hello", "annotations": []}]},
             {"role": "user", "content": "And again?"}]
    r = client.responses.create(model="m", input=items, max_output_tokens=16)
    chat = client.chat.completions.create(model="m", max_tokens=16, messages=[
        {"role": "developer", "content": "Reply in one word."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "And again?"}])
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens


def test_cut_by_max_output_tokens_is_incomplete(client):
    long = dict(model="m", input="Tell me a long story about a cat.", max_output_tokens=3)
    r = client.responses.create(**long)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete" and r.usage.output_tokens == 3
    events = list(client.responses.create(**long, stream=True))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-1].response.output_text == r.output_text


EXPECTED = ["response.created", "response.in_progress", "response.output_item.added",
            "response.content_part.added", "response.output_text.delta", "response.output_text.done",
            "response.content_part.done", "response.output_item.done", "response.completed"]


def test_stream_events_in_the_sdk_sequence(server, client):
    kw = dict(model="m", input="Count to five.", max_output_tokens=32, temperature=1.0, extra_body=SAMPLED)
    whole = client.responses.create(**kw)
    assert whole.status == "completed"
    events = list(client.responses.create(**kw, stream=True))
    raw = {"model": "m", "input": "Count to five.", "max_output_tokens": 32, "temperature": 1.0, **SAMPLED,
           "stream": True}
    with httpx.stream("POST", server.url + "/v1/responses", json=raw, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        validated = _events(list(r.iter_bytes()))
    assert [e.type for e in validated] == [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) >= 1 and kinds == EXPECTED[:4] + [d.type for d in deltas] + EXPECTED[5:]
    item_id = events[2].item.id
    assert all(d.item_id == item_id and d.output_index == 0 and d.content_index == 0 for d in deltas)
    text = "".join(d.delta for d in deltas)
    assert text == whole.output_text == events[5].text == events[7].item.content[0].text
    created, done = events[0].response, events[-1].response
    assert created.status == "in_progress" and created.output == [] and created.id == done.id
    assert done.output_text == text and done.output[0].id == item_id
    assert done.usage.model_dump() == whole.usage.model_dump()


def test_stream_helper(client):
    kw = dict(model="m", input="Say hello.", max_output_tokens=16)
    with client.responses.stream(**kw) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == client.responses.create(**kw).output_text
    assert final.status == "completed" and final.usage.output_tokens > 0


class Pick(BaseModel):
    letter: Literal["a", "b", "c"]
    ok: bool


def test_text_format_is_enforced(client):
    fmt = {"type": "json_schema", "name": "thing", "schema": SCHEMA, "strict": True}
    for t in (0.0, 1.0):
        r = client.responses.create(model="m", input="sort: d b a", max_output_tokens=96, temperature=t,
                                    text={"format": fmt}, extra_body={"seed": 5})
        assert r.status == "completed"
        jsonschema.validate(json.loads(r.output_text), SCHEMA)
        assert r.text.format.type == "json_schema"
    with client.responses.stream(model="m", input="sort: d b a", max_output_tokens=96,
                                 text={"format": fmt}) as stream:
        final = stream.get_final_response()
    jsonschema.validate(json.loads(final.output_text), SCHEMA)
    r = client.responses.create(model="m", input="x", max_output_tokens=48, text={"format": {"type": "json_object"}})
    assert r.output_text.startswith("{")
    # the SDK's parse helper (a pydantic model as text_format: a strict json_schema)
    parsed = client.responses.parse(model="m", input="pick one", max_output_tokens=32, text_format=Pick)
    assert isinstance(parsed.output_parsed, Pick)
    # the structured-output fields chat takes pass through as well
    r = client.responses.create(model="m", input="x", max_output_tokens=8,
                                extra_body={"guided_choice": ["red", "green"]})
    assert r.output_text in ("red", "green")


def test_logprobs_are_the_chat_logprobs(client):
    kw = dict(temperature=1.0, extra_body=SAMPLED)
    r = client.responses.create(model="m", input="Say hi", max_output_tokens=16, top_logprobs=2,
                                include=["message.output_text.logprobs"], **kw)
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Say hi"}],
                                          max_tokens=16, logprobs=True, top_logprobs=2, **kw)
    got = r.output[0].content[0].logprobs
    want = chat.choices[0].logprobs.content
    assert [(x.token, x.logprob) for x in got] == [(x.token, x.logprob) for x in want] and got
    assert all(len(x.top_logprobs) == 2 for x in got)
    events = list(client.responses.create(model="m", input="Say hi", max_output_tokens=16, top_logprobs=2,
                                          include=["message.output_text.logprobs"], stream=True, **kw))
    streamed = [x.token for e in events if e.type == "response.output_text.delta" for x in e.logprobs]
    assert streamed == [x.token for x in got]


@pytest.mark.parametrize("body, status, param", [
    ({"previous_response_id": "resp_abc"}, 400, "previous_response_id"),
    ({"conversation": "conv_1"}, 400, "conversation"),
    ({"background": True}, 400, "background"),
    ({"truncation": "auto"}, 400, "truncation"),
    ({"include": ["reasoning.encrypted_content"]}, 400, "include"),
    ({"tools": [{"type": "web_search"}]}, 400, "tools.0.type"),
    ({"tool_choice": {"type": "file_search"}}, 400, "tool_choice"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, 400, "text.format.schema"),
    ({"max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"max_output_tokens": 100000}, 400, "max_output_tokens"),
    ({"input": []}, 400, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400, "input"),
    ({"block_length": 0}, 400, "block_length"),
    ({"seed": -1}, 400, "seed"),
    ({"max_output_tokens": "8"}, 400, "max_output_tokens"),
    ({"model": "other"}, 404, "model"),
])
def test_refusals_name_the_field(server, body, status, param):
    code, err = _error(server, {"model": "m", "input": "hi", **body})
    assert code == status and err["param"] == param, err
    assert err["type"] in ("invalid_request_error", "not_found_error") and err["message"]


def test_the_route_is_in_the_openapi_document(server):
    spec = httpx.get(server.url + "/openapi.json", timeout=10).json()
    post = spec["paths"]["/v1/responses"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ResponsesRequest")
    assert post["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    documented = set(spec["components"]["schemas"]["ResponsesRequest"]["properties"])
    assert set(ResponsesRequest.model_fields) <= documented and {"input", "steps", "seed"} <= documented


def test_previous_response_id_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="m", input="hi", previous_response_id="resp_1")
    assert e.value.param == "previous_response_id" and "stateless" in e.value.message


def test_stored_responses_do_not_exist(client):
    for call in (client.responses.retrieve, client.responses.delete, client.responses.input_items.list):
        with pytest.raises(openai.NotFoundError) as e:
            call("resp_123")
        assert e.value.code == "response_not_found" and "stateless" in e.value.message


def test_input_longer_than_the_context_is_refused_before_validation(server, default_bundle):
    ctx = default_bundle.config.max_sequence_length
    code, err = _error(server, {"input": [{"role": "user", "content": "x"}] * (ctx + 1)})
    assert code == 400 and err["param"] == "input" and err["code"] == "context_length_exceeded"


def test_unknown_fields_warn_or_fail_as_on_chat(server, serve, default_bundle, caplog):
    r = httpx.post(server.url + "/v1/responses", json={"input": "hi", "max_output_tokens": 4, "frobnicate": 1})
    assert r.status_code == 200 and r.json()["status"] in ("completed", "incomplete")
    strict = serve(default_bundle, name="m", strict_fields=True)
    r = httpx.post(strict.url + "/v1/responses", json={"input": "hi", "frobnicate": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "frobnicate"
    # a chat-only field is not a Responses field: never honoured silently
    r = httpx.post(strict.url + "/v1/responses", json={"input": "hi", "n": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


class FailAt:
    """The model, raising on every forward from its k-th on."""

    def __init__(self, model, k):
        self.inner, self.k, self.calls = model, k, 0
        self.config, self.device, self.dtype = model.config, model.device, model.dtype

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls >= self.k:
            raise RuntimeError("injected failure on one forward")
        return self.inner(*args, **kwargs)


def test_engine_failure_mid_stream_is_response_failed(serve, default_bundle):
    failing = serve(dataclasses.replace(default_bundle, model=FailAt(default_bundle.model, k=3)), name="m")
    client = openai.OpenAI(base_url=failing.url + "/v1", api_key="x", max_retries=0, timeout=60)
    events = list(client.responses.create(model="m", input="Count to ten.", max_output_tokens=32, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-2:] == ["error", "response.failed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.code == "server_error" and failed.id == events[0].response.id
    with client.responses.stream(model="m", input="Count to ten.", max_output_tokens=32) as stream:
        list(stream)
        with pytest.raises(RuntimeError):
            stream.get_final_response()


class Slow:
    """The model, sleeping before each forward."""

    def __init__(self, model, delay):
        self.inner, self.delay = model, delay
        self.config, self.device, self.dtype = model.config, model.device, model.dtype

    def __call__(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.inner(*args, **kwargs)


def test_a_client_gone_mid_stream_stops_the_work_and_is_a_499(serve, default_bundle):
    slow = serve(dataclasses.replace(default_bundle, model=Slow(default_bundle.model, 0.05)), name="m")
    body = {"input": "Count to ten.", "max_output_tokens": 64, "block_length": 64, "stream": True,
            "ban_eos": True}  # 64 forwards: about 3 s
    t0 = time.monotonic()
    with httpx.stream("POST", slow.url + "/v1/responses", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines) == "event: response.created"

    def settled():
        m = metrics(slow.url)
        return (metric(m, "llada_requests_total", endpoint="/v1/responses", status=499) == 1
                and metric(m, "llada_running_requests") == 0)
    while not settled():
        assert time.monotonic() - t0 < 2.5, "the disconnect was not counted, or the work went on"
        time.sleep(0.05)


# ---------------------------------------------------------------- LangChain
def test_langchain_use_responses_api(server, client):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key="x", model="m", use_responses_api=True,
                     max_tokens=16, temperature=0, max_retries=0)
    msg = llm.invoke("Say hi")
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Say hi"}],
                                          max_tokens=16, temperature=0)
    assert msg.text == chat.choices[0].message.content and msg.response_metadata["id"].startswith("resp_")
    assert msg.usage_metadata["input_tokens"] == chat.usage.prompt_tokens
    assert msg.usage_metadata["output_tokens"] == chat.usage.completion_tokens
    assert "".join(chunk.text for chunk in llm.stream("Say hi")) == msg.text

    class Thing(BaseModel):
        name: str
        n: int

    schema = Thing.model_json_schema()
    schema["properties"]["name"]["maxLength"] = 6
    schema["properties"]["n"].update(minimum=0, maximum=99)
    json_llm = ChatOpenAI(base_url=server.url + "/v1", api_key="x", model="m", use_responses_api=True,
                          max_tokens=96, temperature=0, max_retries=0)
    structured = json_llm.with_structured_output(schema, method="json_schema", strict=True)
    out = structured.invoke("a thing")
    jsonschema.validate(out, schema)
