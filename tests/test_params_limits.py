"""Request parameters at their limits: numbers the engine cannot hold, wrong types, and list sizes refused
before the body is read element by element; every one a 400 naming the field, never a 500."""

from __future__ import annotations

import json

import pytest

from sampler.params import MAX_CFG_SCALE, MAX_TEMPERATURE, MIN_THRESHOLD, SamplingParams
from sampler.scheduler import EngineConfig
from server.app import create_app
from test_server_errors import assert_error
from test_server_helpers import post

GOOD = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 8}


@pytest.fixture(scope="module")
def server(bundle, serve):
    return serve(bundle, max_body_bytes=64 * 1024, body_timeout=0.5)


def raw_json(obj) -> bytes:
    """JSON with ASCII escapes, so lone surrogates travel as '\\ud800' (as browsers and SDKs send them)."""
    return json.dumps(obj).encode()


# ---------------------------------------------------------------- numbers in the engine's precision
@pytest.mark.parametrize("field,value,words", [
    ("threshold", 7e-46, "threshold must be a number in [1.1754944e-38, 1]"),   # 0.0 in float32
    ("threshold", 1e-40, "threshold must be a number in [1.1754944e-38, 1]"),   # a subnormal
    ("temperature", 3.5e38, f"temperature must be a number in [0, {MAX_TEMPERATURE:g}]"),  # > float32 max
    ("temperature", 1e300, "temperature must be a number in [0,"),
    ("cfg_scale", 1e38, f"cfg_scale must be a number in [0, {MAX_CFG_SCALE:g}]"),
])
def test_numbers_the_engine_cannot_hold_are_400s_naming_the_range(server, field, value, words):
    err = assert_error(post(server.url, "/v1/completions", dict(GOOD, **{field: value})), 400, field)
    assert words in err["message"], err


@pytest.mark.parametrize("field,value", [("threshold", MIN_THRESHOLD), ("temperature", MAX_TEMPERATURE),
                                         ("cfg_scale", MAX_CFG_SCALE)])
def test_the_ends_of_each_range_are_served(server, field, value):
    r = post(server.url, "/v1/completions", dict(GOOD, seed=1, **{field: value}))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_params_validate_in_float32():
    SamplingParams(gen_length=8, threshold=MIN_THRESHOLD).validate(1)
    for bad in (dict(threshold=7e-46), dict(threshold=float("nan")), dict(temperature=float("inf")),
                dict(cfg_scale=MAX_CFG_SCALE * 1.01), dict(temperature=-0.5)):
        with pytest.raises(ValueError):
            SamplingParams(gen_length=8, **bad).validate(1)


@pytest.mark.parametrize("extra,param", [
    ({"prompt": [[True], [False]]}, "prompt"), ({"prompt": [5, 5.0]}, "prompt"),
    ({"max_tokens": "8"}, "max_tokens"), ({"n": True}, "n"), ({"stream": "no"}, "stream"),
    ({"temperature": "0.5"}, "temperature"), ({"seed": 1.5}, "seed"),
])
def test_wrong_types_are_400s_not_coerced(server, extra, param):
    assert_error(post(server.url, "/v1/completions", dict(GOOD, **extra)), 400, param)


# ---------------------------------------------------------------- cheap bounds first, heavy work off the loop
def test_prompt_count_is_checked_before_any_prompt_is_read(bundle, live_server, monkeypatch):
    import server.routes

    srv = live_server(create_app(bundle, EngineConfig(max_batch_tokens=2048), served_model_name="tiny"))
    calls = []
    real = server.routes.completion_prompts
    monkeypatch.setattr(server.routes, "completion_prompts", lambda *a: calls.append(1) or real(*a))
    body = raw_json({"prompt": [[1]] * 200_000})
    assert len(body) < 1 << 20
    # A list no request can use is refused on its length, before it is validated element by element.
    err = assert_error(post(srv.url, "/v1/completions", body), 400, "prompt")
    assert "the prompt list has 200000 prompts" in err["message"] and not calls
    err = assert_error(post(srv.url, "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "x"}] * 600}), 400, "messages")
    assert "600 messages" in err["message"]
    err = assert_error(post(srv.url, "/v1/completions", dict(GOOD, stop=["x"] * 10_000)), 400, "stop")
    err = assert_error(post(srv.url, "/v1/completions", dict(GOOD, prompt=[[1]] * 20, n=13)), 400, "n")
    assert "260 generations" in err["message"] and not calls
    err = assert_error(post(srv.url, "/v1/completions", dict(GOOD, prompt=[[1]] * 20, n=16)), 400, "n")
    assert "320 generations" in err["message"] and not calls
    assert post(srv.url, "/v1/completions", GOOD).status_code == 200 and calls
