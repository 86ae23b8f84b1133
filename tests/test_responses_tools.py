"""Function tools through POST /v1/responses, end to end: tool_choice required / named / none, the
calls' arguments validate against each function's parameters, the answer is the chat path's for the
same request, function_call / function_call_output items round-trip, the streamed
function_call_arguments events, and LangChain's bind_tools with use_responses_api=True.

These run on the chat path's tools (server/tools.py); without it the module is skipped."""

from __future__ import annotations

import json
import shutil
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

pytest.importorskip("server.tools")

from weights.checkpoint import load_checkpoint  # noqa: E402

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 999}},
       "required": ["a", "b"], "additionalProperties": False}
PARAMS = {"get_weather": WEATHER, "add": ADD}
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather",
          "parameters": WEATHER, "strict": True},
         {"type": "function", "name": "add", "description": "Add", "parameters": ADD, "strict": True}]
CHAT_TOOLS = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in TOOLS]
ASK = "What is the weather in Paris, in celsius?"


@pytest.fixture(scope="module")
def server(serve, golden_dir, tmp_path_factory):
    """The golden checkpoint with the tests' tiny tokenizer: the embedded default model's 256-token
    context cannot hold the fallback tools preamble of two tools and an answer, and the tiny BPE spends
    about a token per JSON character, so the copy's context is raised to 1024 (rotary positions)."""
    from ckpt_factory import add_tokenizer

    path = tmp_path_factory.mktemp("golden-responses-tools") / "tiny-llada"
    shutil.copytree(golden_dir, path)
    add_tokenizer(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_sequence_length": 1024}))
    return serve(load_checkpoint(path, device="cpu", dtype="float32"), name="m", max_batch_tokens=8192)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


def _calls(response) -> list:
    calls = [o for o in response.output if o.type == "function_call"]
    for c in calls:
        assert c.id.startswith("fc_") and c.call_id and c.status == "completed"
        jsonschema.validate(json.loads(c.arguments), PARAMS[c.name])
    return calls


def test_required_returns_calls_whose_arguments_validate(client):
    for t in (0.0, 1.0):
        for seed in range(3):
            r = client.responses.create(model="m", input=ASK, tools=TOOLS, tool_choice="required",
                                        max_output_tokens=128, temperature=t, extra_body={"seed": seed})
            assert r.status == "completed" and _calls(r)
            assert r.tool_choice == "required" and [tool.name for tool in r.tools] == ["get_weather", "add"]


def test_named_function_and_parallel_calls_off(client):
    r = client.responses.create(model="m", input="Add 2 and 3.", tools=TOOLS, max_output_tokens=128,
                                tool_choice={"type": "function", "name": "add"}, parallel_tool_calls=False)
    calls = _calls(r)
    assert len(calls) == 1 and calls[0].name == "add"


def test_tool_choice_none_answers_in_text(client):
    r = client.responses.create(model="m", input=ASK, tools=TOOLS, tool_choice="none", max_output_tokens=24)
    assert [o.type for o in r.output] == ["message"] and isinstance(r.output_text, str)


def test_calls_are_the_chat_path_calls(client):
    kw = dict(temperature=1.0, extra_body={"seed": 9})
    r = client.responses.create(model="m", input=ASK, tools=TOOLS, tool_choice="required", max_output_tokens=128,
                                **kw)
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": ASK}], tools=CHAT_TOOLS,
                                          tool_choice="required", max_completion_tokens=128, **kw)
    want = [(c.function.name, c.function.arguments) for c in chat.choices[0].message.tool_calls]
    assert [(c.name, c.arguments) for c in _calls(r)] == want  # call ids are fresh per request
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)


def test_streamed_function_call_events(client):
    kw = dict(model="m", input=ASK, tools=TOOLS, tool_choice="required", max_output_tokens=128)
    events = list(client.responses.create(**kw, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    final = events[-1].response
    calls = _calls(final)
    assert calls
    for call in calls:
        index = final.output.index(call)
        mine = [e for e in events if getattr(e, "output_index", None) == index]
        kinds = [e.type for e in mine]
        assert kinds[0] == "response.output_item.added" and mine[0].item.type == "function_call"
        assert kinds[-2:] == ["response.function_call_arguments.done", "response.output_item.done"]
        deltas = "".join(e.delta for e in mine if e.type == "response.function_call_arguments.delta")
        assert deltas == mine[-2].arguments == mine[-1].item.arguments == call.arguments
        assert mine[0].item.call_id == call.call_id and mine[0].item.id == call.id
    with client.responses.stream(**kw) as stream:
        helper = stream.get_final_response()
    assert _calls(helper)


def test_function_call_output_round_trip(server, client):
    first = client.responses.create(model="m", input=ASK, tools=TOOLS, tool_choice={"type": "function",
                                    "name": "get_weather"}, max_output_tokens=128)
    call = _calls(first)[0]
    items = [{"role": "user", "content": ASK},
             {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
             {"type": "function_call_output", "call_id": call.call_id, "output": "18 C, sunny"}]
    r = client.responses.create(model="m", input=items, tools=TOOLS, tool_choice="none", max_output_tokens=24)
    chat = client.chat.completions.create(model="m", tools=CHAT_TOOLS, tool_choice="none", max_tokens=24, messages=[
        {"role": "user", "content": ASK},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "18 C, sunny"}])
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    # the whole previous output sent back as input (what a client that keeps the history does)
    again = httpx.post(server.url + "/v1/responses", timeout=120, json={
        "model": "m", "tools": TOOLS, "max_output_tokens": 16,
        "input": [{"role": "user", "content": ASK}, *[o.model_dump(exclude_none=True) for o in first.output],
                  {"type": "function_call_output", "call_id": call.call_id, "output": "18 C"}]})
    assert again.status_code == 200, again.text


class GetWeather(BaseModel):
    """The weather in a city."""

    city: str = Field(max_length=12)
    unit: Literal["c", "f"]


def test_langchain_bind_tools(server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key="x", model="m", use_responses_api=True,
                     max_tokens=128, temperature=0, max_retries=0)
    bound = llm.bind_tools([GetWeather], tool_choice="required")
    msg = bound.invoke(ASK)
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "GetWeather"
    GetWeather.model_validate(msg.tool_calls[0]["args"])
    follow = llm.bind_tools([GetWeather]).invoke(
        [HumanMessage(ASK), msg, ToolMessage("18 C, sunny", tool_call_id=msg.tool_calls[0]["id"])])
    assert follow.response_metadata["status"] in ("completed", "incomplete")
