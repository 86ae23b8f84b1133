"""Function tools on chat completions (server.tools) through the official openai client and
LangChain: `tool_choice` required / named calls always validate against their function's
parameters (hundreds of sampled requests on the embedded default model and on the golden
checkpoint with the tests' tokenizer), auto and none, parallel calls, streamed calls that reassemble
to the whole answer, conversations with tool messages, the fallback prompt format, and 400s naming
the field."""

from __future__ import annotations

import json
import shutil

import jsonschema
import openai
import pytest

from server.schemas import ChatCompletionRequest
from server.tools import CallReader, parse_tool_calls, prompt_messages, tool_request
from weights import default_model_path
from weights.checkpoint import load_checkpoint


def tool(name, properties, description=None, closed=True):
    fn = {"name": name, "parameters": {"type": "object", "properties": properties, "required": list(properties)}}
    if closed:
        fn["parameters"]["additionalProperties"] = False
    if description:
        fn["description"] = description
    return {"type": "function", "function": fn}


# Small schemas: the embedded default model has a 256-token context and a near character-level
# tokenizer, so its prompt (with the tools preamble) and answer must fit in it.
ADD = tool("add", {"a": {"type": "integer", "minimum": 0, "maximum": 99}}, closed=False)
PICK = tool("pick", {"c": {"enum": ["x", "y", "z"]}}, closed=False)
NAME = tool("nm", {"s": {"type": "string", "pattern": "^[a-z]{1,4}$"}}, closed=False)
SMALL = [ADD, PICK, NAME]
# Richer ones for the golden checkpoint (512 tokens): nested objects, arrays, numbers, booleans.
ORDER = tool("order", {
    "it": {"type": "object", "properties": {"q": {"type": "integer", "minimum": 1, "maximum": 9}},
           "required": ["q"], "additionalProperties": False},
    "g": {"type": "boolean"}})
SCORE = tool("score", {"xs": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1,
                                                         "multipleOf": 0.5}, "minItems": 1, "maxItems": 3}})
USER = [{"role": "user", "content": "add 2 3"}]


@pytest.fixture(scope="module")
def golden_tok_path(golden_dir, tmp_path_factory):
    """The golden checkpoint's weights with the tests' tiny tokenizer (the set ships none)."""
    from ckpt_factory import add_tokenizer

    path = tmp_path_factory.mktemp("golden-tools") / "tiny-llada"
    shutil.copytree(golden_dir, path)
    add_tokenizer(path)
    return path


@pytest.fixture(scope="module", params=["default", "golden"])
def server(request, serve, golden_tok_path):
    path = default_model_path() if request.param == "default" else golden_tok_path
    srv = serve(load_checkpoint(path, device="cpu", dtype="float32"), name="m", max_batch_tokens=8192)
    srv.which = request.param
    return srv


def client_of(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=300)


def check_call(call, tools):
    """A call in OpenAI's shape whose arguments validate against its function's parameters."""
    assert call.type == "function" and call.id.startswith("call_") and len(call.id) > 10
    params = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert call.function.name in params
    jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])


def test_required_calls_always_validate(server):
    """>= 200 sampled answers per model under tool_choice required, temperatures 0 and 1."""
    c = client_of(server)
    sets = [[t] for t in SMALL] if server.which == "default" else [[ORDER], [SCORE], [ADD, PICK]]
    seen, texts = 0, set()
    for tools in sets:
        for t, n, seeds in ((0.0, 3, (0, 1)), (1.0, 16, (1, 2, 3, 4))):
            for seed in seeds:
                r = c.chat.completions.create(model="m", messages=USER, tools=tools, tool_choice="required",
                                              max_tokens=56 if server.which == "default" else 128,
                                              temperature=t, n=n, seed=seed)
                for ch in r.choices:
                    calls = ch.message.tool_calls
                    assert ch.message.content is None and calls
                    if ch.finish_reason == "length":  # parallel calls ran on: only the last one is cut
                        assert len(calls) >= 2
                        calls = calls[:-1]
                    else:
                        assert ch.finish_reason == "tool_calls", ch
                    for call in calls:
                        check_call(call, tools)
                        texts.add(call.function.arguments)
                    seen += 1
    assert seen >= 200
    assert len(texts) > 10  # sampling explores: not one answer repeated


def test_named_function_and_parallel_calls(server):
    c = client_of(server)
    tools = [ADD, PICK]
    r = c.chat.completions.create(model="m", messages=USER, tools=tools, max_tokens=56, temperature=1.0, n=16,
                                  seed=5, tool_choice={"type": "function", "function": {"name": "pick"}})
    for ch in r.choices:
        assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1
        assert ch.message.tool_calls[0].function.name == "pick"
        check_call(ch.message.tool_calls[0], tools)
    if server.which == "default":
        return  # two calls do not fit the default model's context
    kw = dict(model="m", messages=USER, tools=[SCORE], tool_choice="required", max_tokens=128, temperature=1.0,
              n=16)
    counts = []
    for seed in (3, 4):
        for ch in c.chat.completions.create(seed=seed, **kw).choices:
            calls = ch.message.tool_calls
            counts.append(len(calls))
            for call in calls[:-1] if ch.finish_reason == "length" else calls:
                check_call(call, [SCORE])
            assert len({call.id for call in calls}) == len(calls)
    assert max(counts) >= 2  # the model chose a second call (the grammar admits them by default)
    for ch in c.chat.completions.create(seed=4, parallel_tool_calls=False, **kw).choices:
        assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1
        check_call(ch.message.tool_calls[0], [SCORE])


def test_the_grammar_admits_parallel_calls_only_when_asked(golden_tok_path):
    """The tool grammar, replayed token by token on the checkpoint's own tokenizer: two calls are a
    sentence of it with parallel_tool_calls (the default), not without, nor under a named function;
    text that opens a call must be a call under auto."""
    from types import SimpleNamespace

    from server.tools import tool_constraint

    bundle = load_checkpoint(golden_tok_path, device="cpu", dtype="float32")
    svc = SimpleNamespace(bundle=bundle)
    two = ('<tool_call>{"name":"add","arguments":{"a":7}}</tool_call>\n'
           '<tool_call>{"name":"pick","arguments":{"c":"y"}}</tool_call>')
    one = two.split("\n")[0]

    def accepts(text, **kw):
        state = tool_constraint(svc, ChatCompletionRequest(messages=USER, tools=[ADD, PICK], **kw)).start()
        for t in bundle.tokenizer.encode(text):
            if not state.accepts(t):
                return False
            state.commit(t)
        return state.accepting

    assert accepts(two, tool_choice="required") and accepts(one, tool_choice="required")
    assert not accepts(two, tool_choice="required", parallel_tool_calls=False)
    assert accepts(one, tool_choice="required", parallel_tool_calls=False)
    assert not accepts(two, tool_choice={"type": "function", "function": {"name": "add"}})
    assert not accepts(one.replace("7", "700"), tool_choice="required")  # maximum 99
    assert not accepts("hello", tool_choice="required")
    assert accepts("hello", tool_choice="auto") and accepts(two, tool_choice="auto")
    assert not accepts("<tool_call>hello", tool_choice="auto")
    assert tool_constraint(svc, ChatCompletionRequest(messages=USER, tools=[ADD], tool_choice="none")) is None


def test_auto_and_none(server):
    c = client_of(server)
    r = c.chat.completions.create(model="m", messages=USER, tools=[ADD], max_tokens=56, temperature=1.0, n=16,
                                  seed=9)
    for ch in r.choices:  # auto: text or calls, never text that opens a call
        if ch.message.tool_calls:
            assert ch.finish_reason in ("tool_calls", "length") and ch.message.content is None
            if ch.finish_reason == "tool_calls":
                check_call(ch.message.tool_calls[0], [ADD])
        else:
            assert not (ch.message.content or "").startswith("<tool_call>")
    r_none = c.chat.completions.create(model="m", messages=USER, tools=[ADD], tool_choice="none", max_tokens=16)
    plain = c.chat.completions.create(model="m", messages=USER, max_tokens=16)
    assert r_none.choices[0].message.tool_calls is None
    assert r_none.choices[0].message.content == plain.choices[0].message.content  # plain generation
    assert r_none.usage.prompt_tokens == plain.usage.prompt_tokens < r.usage.prompt_tokens


def test_streamed_calls_reassemble_to_the_whole_answer(server):
    c = client_of(server)
    tools = [ADD] if server.which == "default" else [ADD, PICK]
    kw = dict(model="m", messages=USER, tools=tools, tool_choice="required", max_tokens=56 if server.which ==
              "default" else 128, temperature=1.0, seed=11)
    whole = c.chat.completions.create(**kw).choices[0]
    chunks = [ch for ch in c.chat.completions.create(stream=True, **kw) if ch.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(ch.choices[0].finish_reason is None for ch in chunks[:-1])
    calls: dict[int, dict] = {}
    for ch in chunks[1:]:
        d = ch.choices[0].delta
        assert not d.content
        for tc in d.tool_calls or []:
            if tc.index not in calls:  # a call opens with its id, type and name
                assert tc.id.startswith("call_") and tc.type == "function" and tc.function.name
                calls[tc.index] = {"name": tc.function.name, "arguments": tc.function.arguments or ""}
            else:
                assert tc.id is None and tc.function.name is None
                calls[tc.index]["arguments"] += tc.function.arguments
    assert len(chunks) > 3  # the arguments came in pieces
    assert [calls[i] for i in sorted(calls)] == [{"name": t.function.name, "arguments": t.function.arguments}
                                                for t in whole.message.tool_calls]
    # the per-step diffusion stream still works and reports the calls at the end
    import httpx

    body = {**kw, "stream_steps": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=300) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    done = [e for e in events if e["object"] == "diffusion.done"][0]
    assert done["finish_reason"] == "tool_calls"
    assert [t["function"]["arguments"] for t in done["tool_calls"]] == [t.function.arguments
                                                                       for t in whole.message.tool_calls]


def test_a_conversation_with_tool_messages_round_trips(server):
    c = client_of(server)
    first = c.chat.completions.create(model="m", messages=USER, tools=[ADD], tool_choice="required",
                                      max_tokens=56, seed=1).choices[0].message
    call = first.tool_calls[0]
    msgs = USER + [first.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.id, "content": "5"}]
    r = c.chat.completions.create(model="m", messages=msgs, tools=[ADD], tool_choice="none", max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length")
    # without tools in the request, a past call and its result still render (the fallback format)
    r2 = c.chat.completions.create(model="m", messages=msgs, max_tokens=4)
    assert r2.usage.prompt_tokens == r.usage.prompt_tokens > 60  # none: no tools preamble
    if server.which == "default":
        return  # the tools preamble, a call and its result do not fit its context together
    r = c.chat.completions.create(model="m", messages=msgs, tools=[ADD], tool_choice="required", max_tokens=56)
    check_call(r.choices[0].message.tool_calls[0], [ADD])


@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools.0.function.name"),
    ({"tools": [ADD, ADD]}, "tools.1.function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [ADD], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [ADD], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [ADD], "tool_choice": "required", "logprobs": True}, "logprobs"),
    ({"tools": [ADD], "tool_choice": "required", "ignore_eos": True}, "ignore_eos"),
    ({"messages": USER + [{"role": "tool", "content": "5"}]}, "messages.1.tool_call_id"),
    ({"messages": USER + [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "add"}}]}]},
     "messages.1.tool_calls.0"),
    ({"parallel_tool_calls": "yes", "tools": [ADD]}, "parallel_tool_calls"),
])
def test_bad_tool_requests_are_a_400_naming_the_field(server, extra, param):
    c = client_of(server)
    body = {"model": "m", "messages": USER, "max_tokens": 8, **extra}
    with pytest.raises(openai.BadRequestError) as e:
        c.post("/chat/completions", body=body, cast_to=object)
    assert e.value.body["param"] == param, e.value.body


# ------------------------------------------------------------------------------- prompt and parsing
def test_fallback_prompt_format():
    tok = load_checkpoint(default_model_path(), device="cpu", dtype="float32").tokenizer
    assert not tok.supports_tools
    req = ChatCompletionRequest(messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "add 2 3"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}},
            {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": '{"a": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4"},
        {"role": "tool", "tool_call_id": "call_2", "content": "5"}], tools=[ADD])
    msgs = [{"role": m.role, "content": m.content or ""} for m in req.messages]
    out, extra = prompt_messages(tok, req, msgs)
    assert extra == {}
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("be brief\n\nTools:\n{\"name\":\"add\",\"parameters\":")
    assert out[2]["content"] == ('<tool_call>{"name":"add","arguments":{"a":2}}</tool_call>\n'
                                 '<tool_call>{"name":"add","arguments":{"a":3}}</tool_call>')
    assert out[3]["content"] == ('<tool_response>{"name": "add", "content": "4"}</tool_response>\n'
                                 '<tool_response>{"name": "add", "content": "5"}</tool_response>')


TOOLS_TEMPLATE = (
    "{% if tools %}TOOLS {{ tools | tojson }}\n{% endif %}{% for m in messages %}[{{ m.role }}]"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}"
    "{% endfor %}{% else %}{{ m.content }}{% endif %}{% if m.tool_call_id %} ({{ m.tool_call_id }}){% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")


def test_a_template_with_tools_renders_them_itself(tiny_tokenizer_model, tmp_path):
    path = tmp_path / "tools-template"
    shutil.copytree(tiny_tokenizer_model, path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TOOLS_TEMPLATE}))
    tok = load_checkpoint(path, device="cpu", dtype="float32").tokenizer
    assert tok.supports_tools
    req = ChatCompletionRequest(messages=[
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "add", "arguments": '{"a":1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "2"}], tools=[ADD])
    msgs, extra = prompt_messages(tok, req, [{"role": m.role, "content": m.content or ""} for m in req.messages])
    text = tok.render_chat(msgs, True, **extra)
    assert text.startswith('TOOLS [{"type": "function", "function": {"name": "add"')
    assert text.endswith('[user]hi[assistant]CALL add {"a": 1}[tool]2 (c1)[assistant]')
    bad = ChatCompletionRequest(messages=[{"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a":"<|eot_id|>"}'}}]}])
    with pytest.raises(Exception) as e:
        prompt_messages(tok, bad, [{"role": "assistant", "content": ""}])
    assert e.value.param == "messages.0.tool_calls"


def test_parse_and_stream_reader():
    text = ('<tool_call>{"name":"f","arguments":{"s":"}</tool_call>","n":[1,{"k":2}]}}</tool_call>\n'
            '<tool_call>{"name":"g","arguments":{}}</tool_call>')
    content, calls = parse_tool_calls(text)
    assert content is None
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("f", '{"s":"}</tool_call>","n":[1,{"k":2}]}'), ("g", "{}")]
    assert parse_tool_calls("hello") == ("hello", [])
    assert parse_tool_calls('<tool_call>{"name":"f","arguments":{') == ('<tool_call>{"name":"f","arguments":{', [])
    # fed one character at a time, the deltas rebuild the same calls
    r = CallReader(calls_only=False)
    deltas = [d for ch in text for d in r.feed(ch)] + r.finish()
    rebuilt: dict[int, str] = {}
    for d in deltas:
        for tc in d["tool_calls"]:
            rebuilt[tc["index"]] = rebuilt.get(tc["index"], "") + tc["function"]["arguments"]
    assert list(rebuilt.values()) == [c["function"]["arguments"] for c in calls]
    r = CallReader(calls_only=False)
    assert [d for ch in "<tool hi" for d in r.feed(ch)] == [{"content": "<tool "}, {"content": "h"},
                                                          {"content": "i"}]
    assert tool_request(ChatCompletionRequest(messages=USER)) is None
    assert tool_request(ChatCompletionRequest(messages=USER, tools=[ADD])).choice == "auto"


# ----------------------------------------------------------------------------------------- LangChain
def test_langchain_bind_tools_and_structured_output(server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI
    from typing import Literal

    from pydantic import BaseModel, Field

    class Pick(BaseModel):
        c: Literal["x", "y", "z"]

    class Add(BaseModel):
        a: int = Field(ge=0, le=99)

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key="x", model="m", max_tokens=56, temperature=0,
                     max_retries=0, timeout=300)
    bound = llm.bind_tools([Add], tool_choice="required")
    msg = bound.invoke("add 2 3")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "Add"
    assert 0 <= msg.tool_calls[0]["args"]["a"] <= 99
    # the call and its result go back in the conversation
    # (with the tools again where the context holds them all: not the default model's 256 tokens)
    follow = (llm if server.which == "default" else llm.bind_tools([Add])).invoke(
        [HumanMessage("add 2 3"), msg, ToolMessage("5", tool_call_id=msg.tool_calls[0]["id"])])
    assert isinstance(follow.content, str) or follow.tool_calls
    for method in ("function_calling", "json_schema"):
        out = llm.with_structured_output(Pick, method=method).invoke("pick")
        assert isinstance(out, Pick) and out.c in "xyz"
    if server.which == "default":
        return  # JSON mode admits any object: the default model writes one key until the length runs out
    out = llm.with_structured_output({"title": "Pick", "description": "Pick a letter.", "type": "object",
                                      "properties": {"c": {"type": "string"}}}, method="json_mode").invoke("pick")
    assert isinstance(out, dict)
