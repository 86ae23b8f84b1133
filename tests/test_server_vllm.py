"""vLLM's request surface through the official openai client (extras in extra_body) and raw httpx:
stop_token_ids, min_tokens, include_stop_str_in_output, ignore_eos as a fixed length, request ids,
priority, return_tokens_as_token_ids, stop_reason, /tokenize, /detokenize, /version, and the vLLM
fields this server refuses by name."""

from __future__ import annotations

import logging
import time

import httpx
import openai
import pytest

from test_server_helpers import post, sse_events

USER = {"role": "user", "content": "hello world"}


@pytest.fixture(scope="module")
def server(chat_bundle, serve):
    return serve(chat_bundle, "tiny-chat", max_batch_tokens=4096)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


def complete(client, **kw):
    kw.setdefault("max_tokens", 12)
    extra = kw.pop("extra_body", {})
    return client.completions.create(model="tiny-chat", prompt=kw.pop("prompt", "hello"), extra_body=extra, **kw)


def stops_of(server):
    return set(server.app.state.service.stop_ids)


# ---------------------------------------------------------------- stop ids, min_tokens, ignore_eos

def test_stop_token_ids_end_the_answer_and_name_the_id(client):
    plain = complete(client, max_tokens=16).choices[0]
    ids = plain.token_ids
    assert len(ids) >= 4, "the answer must be long enough to cut, or the test proves nothing"
    stop = ids[3]
    first = ids.index(stop)
    r = complete(client, max_tokens=16, extra_body={"stop_token_ids": [stop]}).choices[0]
    assert r.token_ids == ids[:first] and stop not in r.token_ids
    assert r.finish_reason == "stop" and r.stop_reason == stop
    kept = complete(client, max_tokens=16, extra_body={"stop_token_ids": [stop],
                                                       "include_stop_str_in_output": True}).choices[0]
    assert kept.token_ids == ids[:first + 1] and kept.stop_reason == stop
    assert plain.stop_reason is None


def test_stop_token_ids_are_checked_against_the_vocabulary(client, server):
    vocab = server.app.state.service.vocab_size
    for bad in ([vocab], [-1]):
        with pytest.raises(openai.BadRequestError) as e:
            complete(client, extra_body={"stop_token_ids": bad})
        assert e.value.body["param"] == "stop_token_ids"
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, extra_body={"stop_token_ids": [1] * 257})
    assert e.value.body["param"] == "stop_token_ids"


def test_ignore_eos_gives_exactly_max_tokens(client, server):
    """A strong EOS bias ends the answer at once; ignore_eos makes it exactly max_tokens tokens
    without any stop id (vLLM's fixed-length benchmarking)."""
    biased = complete(client, max_tokens=10, extra_body={"eos_bias": 40.0}).choices[0]
    assert biased.token_ids == [] and biased.finish_reason == "stop"
    for n in (1, 4, 10, 33):
        r = complete(client, max_tokens=n, extra_body={"eos_bias": 40.0, "ignore_eos": True})
        c = r.choices[0]
        assert len(c.token_ids) == n == r.usage.completion_tokens
        assert not stops_of(server) & set(c.token_ids) and c.finish_reason == "length"
    chat = client.chat.completions.create(model="tiny-chat", messages=[USER], max_tokens=6,
                                          extra_body={"ignore_eos": True, "eos_bias": 40.0})
    assert chat.usage.completion_tokens == 6 and chat.choices[0].finish_reason == "length"


def test_min_tokens_holds_stops_off_the_first_tokens(client, server):
    for k in (1, 5, 12):
        c = complete(client, max_tokens=12, extra_body={"eos_bias": 40.0, "min_tokens": k}).choices[0]
        assert len(c.token_ids) >= k and not stops_of(server) & set(c.token_ids[:k])
    plain = complete(client, max_tokens=16).choices[0].token_ids
    stop = plain[1]
    c = complete(client, max_tokens=16, extra_body={"stop_token_ids": [stop], "min_tokens": 3}).choices[0]
    assert len(c.token_ids) >= 3 and stop not in c.token_ids[3:]
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, max_tokens=4, extra_body={"min_tokens": 5})
    assert e.value.body["param"] == "min_tokens"


def test_stop_strings_wait_for_min_tokens_and_can_be_kept(client):
    text = complete(client, max_tokens=16).choices[0].text
    assert len(text) >= 6, "the answer must be long enough to cut"
    stop = text[2:4]
    r = complete(client, max_tokens=16, stop=[stop]).choices[0]
    assert r.text == text[:text.index(stop)] and r.stop_reason == stop and r.finish_reason == "stop"
    kept = complete(client, max_tokens=16, stop=[stop], extra_body={"include_stop_str_in_output": True}).choices[0]
    assert kept.text == text[:text.index(stop) + len(stop)] and kept.stop_reason == stop
    late = complete(client, max_tokens=16, stop=[stop], extra_body={"min_tokens": 16}).choices[0]
    assert late.text == text and late.stop_reason is None  # the whole answer is below min_tokens


def test_stop_reason_is_streamed(server):
    body = {"prompt": "hello", "max_tokens": 16}
    ids = post(server.url, "/v1/completions", body).json()["choices"][0]["token_ids"]
    events = sse_events(server.url + "/v1/completions", dict(body, stream=True, stop_token_ids=[ids[2]]))
    last = [e for e in events if isinstance(e, dict) and e["choices"]][-1]["choices"][0]
    assert last["finish_reason"] == "stop" and last["stop_reason"] == ids[2]
    chat = sse_events(server.url + "/v1/chat/completions", {"messages": [USER], "max_tokens": 4, "stream": True})
    last = [e for e in chat if isinstance(e, dict) and e["choices"]][-1]["choices"][0]
    assert "stop_reason" in last and last["stop_reason"] is None


# ---------------------------------------------------------------- request ids and priority

def test_request_ids_on_every_response(server, caplog):
    url = server.url
    r = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "request_id": "job-7"})
    assert r.headers["x-request-id"] == "job-7"
    r = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2}, headers={"x-request-id": "hdr-1"})
    assert r.headers["x-request-id"] == "hdr-1"
    a = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2}).headers["x-request-id"]
    b = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2}).headers["x-request-id"]
    assert a.startswith("req-") and a != b
    err = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 0, "request_id": "bad-one"})
    assert err.status_code == 400 and err.headers["x-request-id"] == "bad-one"
    assert httpx.get(url + "/v1/nowhere").headers["x-request-id"].startswith("req-")
    with httpx.stream("POST", url + "/v1/chat/completions", json={"messages": [USER], "max_tokens": 2,
                                                                  "stream": True, "request_id": "s-1"}) as s:
        assert s.headers["x-request-id"] == "s-1"
        s.read()
    bad = post(url, "/v1/completions", {"prompt": "hi", "request_id": "a\u00e9"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "request_id"
    bad = post(url, "/v1/completions", {"prompt": "hi"}, headers={"x-request-id": "x" * 300})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-request-id"


def _wait_for_line(caplog, text):
    deadline = time.monotonic() + 5  # the guard logs once the response is over
    while True:
        lines = [r.getMessage() for r in caplog.records if text in r.getMessage()]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


def test_the_log_line_names_the_request_and_cannot_be_forged(server, caplog):
    caplog.set_level(logging.INFO, logger="llada.server")
    post(server.url, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "request_id": "log-me"})
    lines = _wait_for_line(caplog, "request 'log-me'")
    assert lines and lines[-1].startswith("POST /v1/completions 200")
    r = post(server.url, "/v1/completions", {"prompt": "hi", "request_id": "x\nPOST /v1/completions 200"})
    assert r.status_code == 400
    assert _wait_for_line(caplog, "/v1/completions 400")
    assert sum(r.getMessage().startswith("POST /v1/completions 200") for r in caplog.records) == 1
    assert all("\n" not in r.getMessage() for r in caplog.records)


def test_priority_is_bounded(client):
    for p in (-5, 0, 7):
        assert complete(client, extra_body={"priority": p}).choices[0].finish_reason in ("stop", "length")
    for p in (2**31, -(2**31) - 1):
        with pytest.raises(openai.BadRequestError) as e:
            complete(client, extra_body={"priority": p})
        assert e.value.body["param"] == "priority"


# ---------------------------------------------------------------- logprobs by id

def test_return_tokens_as_token_ids(client):
    r = complete(client, max_tokens=6, logprobs=2, extra_body={"return_tokens_as_token_ids": True}).choices[0]
    assert r.logprobs.tokens == [f"token_id:{t}" for t in r.token_ids]
    assert all(k.startswith("token_id:") for top in r.logprobs.top_logprobs for k in top)
    chat = client.chat.completions.create(model="tiny-chat", messages=[USER], max_tokens=4, logprobs=True,
                                          top_logprobs=1, extra_body={"return_tokens_as_token_ids": True})
    assert all(t.token.startswith("token_id:") for t in chat.choices[0].logprobs.content)


# ---------------------------------------------------------------- refused by name

@pytest.mark.parametrize("field,value", [
    ("prompt_logprobs", 1), ("use_beam_search", True), ("length_penalty", 0.5), ("allowed_token_ids", [1]),
    ("bad_words", ["x"]), ("truncate_prompt_tokens", 5), ("logits_processors", ["x"]), ("prompt_embeds", "x")])
def test_known_vllm_fields_we_do_not_honour_are_400(client, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, extra_body={field: value})
    assert e.value.body["param"] == field
    if field == "prompt_logprobs":
        assert "/v1/loglikelihood" in e.value.body["message"]


@pytest.mark.parametrize("field,value", [
    ("chat_template", "{{ messages }}"), ("documents", [{"text": "x"}]), ("add_special_tokens", True),
    ("prompt_logprobs", 0), ("min_tokens", -1)])
def test_chat_refuses_by_name_too(client, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-chat", messages=[USER], max_tokens=4, extra_body={field: value})
    assert e.value.body["param"] == field


def test_neutral_vllm_values_and_unknown_fields_are_accepted(client, caplog):
    base = complete(client).choices[0].text
    caplog.set_level(logging.WARNING, logger="llada.server")
    r = complete(client, extra_body={"prompt_logprobs": None, "use_beam_search": False, "length_penalty": 1.0,
                                     "bad_words": [], "frobnicate": 3})
    assert r.choices[0].text == base
    assert any("frobnicate" in rec.getMessage() for rec in caplog.records)


# ---------------------------------------------------------------- /tokenize, /detokenize, /version

def test_tokenize_matches_what_the_endpoints_run(server, chat_bundle):
    url = server.url
    t = post(url, "/tokenize", {"prompt": "hello world", "return_token_strs": True}).json()
    run = post(url, "/v1/completions", {"prompt": "hello world", "max_tokens": 1}).json()
    assert t["count"] == len(t["tokens"]) == run["usage"]["prompt_tokens"]
    assert t["max_model_len"] == 256 and len(t["token_strs"]) == t["count"]
    assert t["tokens"] == chat_bundle.tokenizer.encode("hello world")
    c = post(url, "/tokenize", {"messages": [USER], "model": "tiny-chat"}).json()
    chat = post(url, "/v1/chat/completions", {"messages": [USER], "max_tokens": 1}).json()
    assert c["count"] == chat["usage"]["prompt_tokens"] and "token_strs" not in c
    no_gen = post(url, "/tokenize", {"messages": [USER], "add_generation_prompt": False}).json()
    assert no_gen["count"] < c["count"]
    d = post(url, "/detokenize", {"tokens": t["tokens"]}).json()
    assert d == {"prompt": "hello world"}


@pytest.mark.parametrize("path,body,param", [
    ("/tokenize", {"prompt": "x", "model": "other"}, "model"),
    ("/tokenize", {"prompt": ""}, "prompt"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "x", "messages": [USER]}, "messages"),
    ("/tokenize", {"prompt": "x", "add_special_tokens": True}, "add_special_tokens"),
    ("/tokenize", {"prompt": "x" * 100_000}, "prompt"),
    ("/detokenize", {"tokens": [10 ** 6]}, "tokens"),
    ("/detokenize", {"tokens": [1] * 300}, "tokens"),
])
def test_tokenize_refusals(server, path, body, param):
    r = post(server.url, path, body)
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["param"] == param


def test_version(server):
    from server.metrics import _version

    r = httpx.get(server.url + "/version")
    assert r.status_code == 200 and r.json() == {"version": _version()} and r.json()["version"]


def test_streamed_answers_equal_whole_ones(server):
    base = {"prompt": "hello", "max_tokens": 16}
    ids = post(server.url, "/v1/completions", base).json()["choices"][0]
    stop = ids["text"][3:5]
    for extra in ({"stop": [stop]}, {"stop": [stop], "include_stop_str_in_output": True},
                  {"stop": [stop], "min_tokens": 8}, {"stop_token_ids": [ids["token_ids"][4]], "min_tokens": 2},
                  {"ignore_eos": True, "eos_bias": 40.0}):
        whole = post(server.url, "/v1/completions", dict(base, **extra)).json()["choices"][0]
        events = [e for e in sse_events(server.url + "/v1/completions", dict(base, stream=True, **extra))
                  if isinstance(e, dict) and e["choices"]]
        assert "".join(e["choices"][0]["text"] for e in events) == whole["text"], extra
        last = events[-1]["choices"][0]
        assert (last["finish_reason"], last["stop_reason"]) == (whole["finish_reason"], whole["stop_reason"])


def test_tokenize_bodies_are_guarded_like_the_api(server, chat_bundle, serve):
    r = httpx.post(server.url + "/tokenize", content=b'{"prompt": "hi"}', headers={"content-type": "text/plain"})
    assert r.status_code == 415
    keyed = serve(chat_bundle, "tiny-chat", api_key="k1", max_body_bytes=1 << 20)
    assert post(keyed.url, "/tokenize", {"prompt": "hi"}).status_code == 401
    assert post(keyed.url, "/tokenize", {"prompt": "hi"}, headers={"authorization": "Bearer k1"}).status_code == 200
    big = post(keyed.url, "/detokenize", {"tokens": [1] * 600_000}, headers={"authorization": "Bearer k1"})
    assert big.status_code == 413
    assert httpx.get(keyed.url + "/version").status_code == 200  # like /health


def test_where_min_tokens_does_not_apply(server, serve):
    from golden_sets import TINY_LLADA2
    from weights.checkpoint import load_checkpoint

    r = post(server.url, "/v1/completions", {"prompt": "a<|mdm_mask|>b", "infill": True, "min_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens"
    l2 = serve(load_checkpoint(TINY_LLADA2, "cpu", "float32"), "l2")
    body = {"prompt": [374, 324, 142, 441], "max_tokens": 8}
    r = post(l2.url, "/v1/completions", dict(body, min_tokens=2))
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens"
    a = post(l2.url, "/v1/completions", dict(body, ignore_eos=True)).json()["choices"][0]  # LLaDA2.x: ban_eos
    b = post(l2.url, "/v1/completions", dict(body, ban_eos=True)).json()["choices"][0]
    assert a["token_ids"] == b["token_ids"]
    plain = post(l2.url, "/v1/completions", body).json()["choices"][0]["token_ids"]
    assert len(plain) >= 2, "the answer must be long enough to cut"
    s = post(l2.url, "/v1/completions", dict(body, stop_token_ids=[plain[1]])).json()["choices"][0]
    assert s["stop_reason"] == plain[1] and s["token_ids"] == plain[:plain.index(plain[1])]
