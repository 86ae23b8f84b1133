"""Structured output through the official openai client: response_format (json_object, json_schema)
and vLLM's guided_json / guided_regex / guided_choice on chat and completions, with the embedded
default model and with a random-weight checkpoint; bad constraints are a 400 naming the field."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from sampler.scheduler import EngineConfig
from server.app import create_app
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
REGEX = r"[a-z]{2,4}-[0-9]{2}"


@pytest.fixture(scope="module", params=["default", "random"])
def client(request, live_server, tiny_tokenizer_model):
    path = default_model_path() if request.param == "default" else tiny_tokenizer_model
    bundle = load_checkpoint(path, device="cpu", dtype="float32")
    srv = live_server(create_app(bundle, EngineConfig(max_batch_tokens=8192), served_model_name="m"))
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)


USER = [{"role": "user", "content": "sort: d b a"}]


def test_json_schema_and_json_object(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    for t in (0.0, 1.0):
        r = client.chat.completions.create(model="m", messages=USER, max_tokens=96, temperature=t, n=3,
                                           seed=7, response_format=fmt)
        for c in r.choices:
            assert c.finish_reason == "stop"
            jsonschema.validate(json.loads(c.message.content), SCHEMA)
    r = client.chat.completions.create(model="m", messages=USER, max_tokens=96,
                                       extra_body={"guided_json": json.dumps(SCHEMA)})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    r = client.completions.create(model="m", prompt="x", max_tokens=96, extra_body={"guided_json": SCHEMA})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)
    r = client.chat.completions.create(model="m", messages=USER, max_tokens=64, temperature=1.0, n=4, seed=1,
                                       response_format={"type": "json_object"})
    for c in r.choices:
        assert c.message.content.startswith("{")
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict)


def test_regex_and_choice(client):
    r = client.completions.create(model="m", prompt="sort: d b a", max_tokens=16, temperature=1.0, n=4,
                                  seed=3, extra_body={"guided_regex": REGEX})
    assert all(re.fullmatch(REGEX, c.text) for c in r.choices)
    r = client.chat.completions.create(model="m", messages=USER, max_tokens=8, temperature=1.0, n=4, seed=2,
                                       extra_body={"guided_choice": ["red", "green", "blue"]})
    assert all(c.message.content in ("red", "green", "blue") for c in r.choices)
    # an answer the grammar forces whole finishes without a forward
    r = client.chat.completions.create(model="m", messages=USER, max_tokens=24,
                                       extra_body={"guided_choice": ["only this"]})
    assert r.choices[0].message.content == "only this" and r.choices[0].finish_reason == "stop"
    # streamed: the chunks join to a valid answer
    text = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model="m", messages=USER, max_tokens=96, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}})
        if ch.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("extra,param", [
    ({"guided_regex": "a("}, "guided_regex"),
    ({"guided_json": {"type": "strin"}}, "guided_json"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
      "properties": {"a": {"type": "string", "format": "no-such"}}}}}}, "response_format"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
    ({"guided_regex": "a+", "logprobs": True}, "logprobs"),
    ({"guided_regex": "a+", "ignore_eos": True}, "ignore_eos"),
    ({"guided_regex": "a+", "min_tokens": 2}, "min_tokens"),
    ({"guided_regex": "a+", "ban_eos": True}, "ban_eos"),
])
def test_bad_constraints_are_a_400_naming_the_field(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=USER, max_tokens=8, extra_body=extra)
    assert e.value.body["param"] == param


def test_suffix_with_a_constraint_is_refused(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt="a", suffix="b", max_tokens=8,
                                  extra_body={"guided_regex": "a+"})
    assert e.value.body["param"] == "guided_regex"


def test_grammar_and_structured_outputs(client):
    lark = 'start: "(" num ("+" num)* ")"\nnum: /[0-9]{1,2}/\n'
    r = client.completions.create(model="m", prompt="x", max_tokens=24, temperature=1.0, n=3, seed=4,
                                  extra_body={"guided_grammar": lark})
    assert all(re.fullmatch(r"\([0-9]{1,2}(\+[0-9]{1,2})*\)", c.text) for c in r.choices)
    gbnf = 'root ::= "x" [0-9] [0-9]'
    r = client.completions.create(model="m", prompt="x", max_tokens=8, extra_body={"guided_grammar": gbnf})
    assert re.fullmatch(r"x[0-9]{2}", r.choices[0].text)
    r = client.chat.completions.create(model="m", messages=USER, max_tokens=96,
                                       extra_body={"structured_outputs": {"json": SCHEMA}})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    r = client.chat.completions.create(model="m", messages=USER, max_tokens=8,
                                       extra_body={"structured_outputs": {"choice": ["up", "down"]}})
    assert r.choices[0].message.content in ("up", "down")
    r = client.completions.create(model="m", prompt="x", max_tokens=16,
                                  extra_body={"structured_outputs": {"regex": REGEX}})
    assert re.fullmatch(REGEX, r.choices[0].text)
    for extra, param in (({"structured_outputs": {"xml": "x"}}, "structured_outputs.xml"),
                         ({"structured_outputs": {"grammar": "start: nope"}}, "structured_outputs.grammar"),
                         ({"guided_grammar": "start: nope"}, "guided_grammar"),
                         ({"guided_grammar": "a", "structured_outputs": {"regex": "a"}},
                          "structured_outputs.regex")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="m", messages=USER, max_tokens=8, extra_body=extra)
        assert e.value.body["param"] == param


# Unbounded languages (a free string, an open array, an unbounded integer, any JSON object) close
# inside the answer's room: the closing rule follows a short completion once the room left is
# about its length, so the answer is valid JSON even when the model would write on forever.
UNBOUNDED = {"type": "object", "properties": {"name": {"type": "string"},
                                              "tags": {"type": "array", "items": {"type": "string"}},
                                              "n": {"type": "integer"}},
             "required": ["name", "tags", "n"]}


@pytest.mark.parametrize("max_tokens", [None, 48, 40])
def test_unbounded_languages_close_inside_the_room(client, max_tokens):
    for temperature, seed in [(0.0, 0), (1.0, 1), (1.0, 2)]:
        kw = dict(model="m", messages=[{"role": "user", "content": "a person"}], max_tokens=max_tokens,
                  temperature=temperature, seed=seed)
        r = client.chat.completions.create(**kw, response_format={
            "type": "json_schema", "json_schema": {"name": "p", "schema": UNBOUNDED}})
        c = r.choices[0]
        jsonschema.validate(json.loads(c.message.content), UNBOUNDED)
        assert c.finish_reason == "stop"
        assert max_tokens is None or r.usage.completion_tokens <= max_tokens
        r = client.chat.completions.create(**kw, response_format={"type": "json_object"})
        assert isinstance(json.loads(r.choices[0].message.content), dict)
