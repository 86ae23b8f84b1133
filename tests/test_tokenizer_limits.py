"""Text and the tokenizer under hostile input: lone surrogates, text longer than the context can hold
(refused before encoding), and tokenizing off the event loop without holding the GIL."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from test_server_errors import assert_error
from test_server_helpers import post


@pytest.fixture(scope="module")
def chat_server(chat_bundle, serve):
    return serve(chat_bundle)


def raw_json(obj) -> bytes:
    """JSON with ASCII escapes, so lone surrogates travel as '\\ud800' (as browsers and SDKs send them)."""
    return json.dumps(obj).encode()


# ---------------------------------------------------------------- lone surrogates
def test_lone_surrogates_are_encoded_not_a_500(chat_server, chat_bundle):
    body = raw_json({"prompt": "ab\ud800", "max_tokens": 4})
    assert b"\\ud800" in body
    r = post(chat_server.url, "/v1/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(chat_bundle.tokenizer.encode("ab\ufffd"))
    r = post(chat_server.url, "/v1/chat/completions",
             raw_json({"messages": [{"role": "user", "content": "x\udc00y"}], "max_tokens": 4}))
    assert r.status_code == 200, r.text


def test_text_longer_than_the_context_can_hold_is_refused_before_encoding(chat_server, chat_bundle, monkeypatch):
    tok = chat_bundle.tokenizer
    per, ctx = tok.max_chars_per_token, chat_bundle.config.max_sequence_length
    assert per and per < 64
    encoded = []
    real = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text: encoded.append(len(text)) or real(text))
    text = "a" * (ctx * per + 1)
    err = assert_error(post(chat_server.url, "/v1/completions", {"prompt": text}), 400, "prompt",
                       code="context_length_exceeded")
    assert f"{ctx * per + 1} characters" in err["message"]
    assert_error(post(chat_server.url, "/v1/chat/completions",
                      {"messages": [{"role": "user", "content": text}]}), 400, "messages")
    assert_error(post(chat_server.url, "/v1/chat/completions",
                      {"messages": [{"role": "user", "content": ""}] * (ctx + 1)}), 400, "messages")
    assert_error(post(chat_server.url, "/v1/completions", {"prompt": [1] * (ctx + 1)}), 400, "prompt",
                 code="context_length_exceeded")
    assert not encoded
    # Within the bound the text is encoded; this one is still too long for the context, in tokens.
    assert_error(post(chat_server.url, "/v1/completions", {"prompt": "a" * (ctx * 4)}), 400)
    assert encoded == [ctx * 4]


@pytest.mark.parametrize("path,body,method", [
    ("/v1/completions", {"prompt": "slow to encode", "max_tokens": 4}, "encode"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}, "render_chat"),
])
def test_tokenizing_and_templating_leave_the_event_loop_free(chat_server, chat_bundle, monkeypatch, path,
                                                             body, method):
    tok = chat_bundle.tokenizer
    real = getattr(tok, method)

    def slow(*a, **k):
        time.sleep(3.0)  # a long encode or render that lets other threads run, as both do
        return real(*a, **k)
    monkeypatch.setattr(tok, method, slow)
    out = {}
    t = threading.Thread(target=lambda: out.update(r=post(chat_server.url, path, body)))
    t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    assert httpx.get(chat_server.url + "/health", timeout=5).status_code == 200
    assert httpx.get(chat_server.url + "/metrics", timeout=5).status_code == 200
    took = time.monotonic() - t0
    assert "r" not in out  # the slow request is still being prepared
    t.join(30)
    assert out["r"].status_code == 200, out["r"].text
    assert took < 2.0, took  # on the event loop, they would have waited for the 3 s preparation


def test_encoding_releases_the_gil(chat_bundle):
    tok = chat_bundle.tokenizer
    text = "hello world, " * 20_000
    ticks, done = [0], threading.Event()

    def ticker():
        while not done.is_set():
            ticks[0] += 1
            time.sleep(0.001)
    t = threading.Thread(target=ticker)
    t.start()
    t0 = time.monotonic()
    tok.encode(text)
    took = time.monotonic() - t0
    during = ticks[0]
    done.set()
    t.join()
    # A GIL-holding encode lets the ticker run once or twice; a releasing one about once a millisecond.
    assert during >= max(3, int(took * 100)), (took, during)
