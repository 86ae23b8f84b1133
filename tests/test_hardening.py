"""Hardening: what a careless or hostile client sends gets a clear 4xx (never a 500, a traceback or a
stall), admission is fair across requests, and draining keeps its promise. One test per defect."""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import socket
import threading
import time

import httpx
import pytest

from sampler.params import MAX_CFG_SCALE, MAX_TEMPERATURE, MIN_THRESHOLD, SamplingParams
from sampler.scheduler import Engine, EngineConfig, Handle
from server.app import create_app
from test_server_errors import SlowModel, assert_error
from test_server_helpers import metric, metrics, post
from weights.checkpoint import load_checkpoint

GOOD = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 8}


@pytest.fixture(scope="module")
def bundle(golden_dir):
    return load_checkpoint(golden_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def chat_bundle(tiny_tokenizer_model):
    return load_checkpoint(tiny_tokenizer_model, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def server(bundle, live_server):
    return live_server(create_app(bundle, EngineConfig(max_batch_tokens=2048), served_model_name="tiny",
                                  max_body_bytes=64 * 1024, body_timeout=0.5))


@pytest.fixture(scope="module")
def chat_server(chat_bundle, live_server):
    return live_server(create_app(chat_bundle, EngineConfig(max_batch_tokens=2048), served_model_name="tiny"))


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


# ---------------------------------------------------------------- guards before the app
def test_body_over_the_limit_is_413_without_reading_it(server):
    big = raw_json(dict(GOOD, prompt=[1] * 40000))
    assert len(big) > 64 * 1024
    err = assert_error(post(server.url, "/v1/completions", big), 413, code="body_too_large")
    assert "65536 bytes" in err["message"]
    # Without a Content-Length (chunked upload) the count stops at the limit too.
    def chunks():
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]
    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(r, 413, code="body_too_large")
    assert post(server.url, "/v1/completions", GOOD).status_code == 200


def test_default_body_limit_follows_the_context_length():
    from server.guards import default_max_body_bytes

    assert default_max_body_bytes(256) == 1 << 20
    assert default_max_body_bytes(4096) == 8 << 20


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", None,
                                   "multipart/form-data; boundary=x"])
def test_api_bodies_must_be_json(server, ctype):
    headers = {} if ctype is None else {"Content-Type": ctype}
    r = httpx.post(server.url + "/v1/completions", content=raw_json(GOOD), headers=headers)
    assert_error(r, 415, code="unsupported_media_type")
    ok = httpx.post(server.url + "/v1/completions", content=raw_json(GOOD),
                    headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200, ok.text


def test_allowed_hosts(bundle, live_server):
    from server.guards import default_allowed_hosts

    assert default_allowed_hosts("0.0.0.0") is None
    assert set(default_allowed_hosts("127.0.0.1")) >= {"127.0.0.1", "localhost"}
    srv = live_server(create_app(bundle, EngineConfig(max_batch_tokens=256), served_model_name="tiny",
                                 allowed_hosts=default_allowed_hosts("127.0.0.1")))
    for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example"):
        assert_error(httpx.get(srv.url + "/v1/models", headers={"Host": host}), 400, code="invalid_host")
        assert_error(post(srv.url, "/v1/completions", GOOD, headers={"Host": host}), 400, code="invalid_host")
    for host in (f"localhost:{srv.port}", f"127.0.0.1:{srv.port}", "LOCALHOST"):
        assert httpx.get(srv.url + "/health", headers={"Host": host}).status_code == 200


def _raw(port: int, head: bytes, body: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(head + body)
    return s


def _head(length: int) -> bytes:
    return (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def _response(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    s.close()
    return data


def test_a_slow_body_gets_408(server):
    t0 = time.monotonic()
    data = _response(_raw(server.port, _head(100), b'{"prompt": [1,'))
    assert data.startswith(b"HTTP/1.1 408"), data
    assert b"body_timeout" in data
    assert time.monotonic() - t0 < 5


def test_disconnect_during_upload_is_a_499_and_one_info_line(server, caplog):
    before = metric(metrics(server.url), "llada_requests_total", endpoint="/v1/completions", status=499)
    with caplog.at_level(logging.INFO, logger="llada.server"):
        s = _raw(server.port, _head(1000), b'{"prompt": [1, 2')
        time.sleep(0.05)
        s.close()
        deadline = time.monotonic() + 5
        while metric(metrics(server.url), "llada_requests_total", endpoint="/v1/completions",
                     status=499) == before:
            assert time.monotonic() < deadline, "the disconnect was not counted"
            time.sleep(0.02)
    lines = [r for r in caplog.records if "disconnected while sending" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO and lines[0].exc_info is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# ---------------------------------------------------------------- fair admission
def _handle(prompt, params, done_order, tag):
    q = queue.Queue()

    def sink(item):
        if item[0] in ("done", "error"):
            done_order.append(tag)
        q.put(item)
    return Handle(prompt_ids=list(prompt), params=params, sink=sink)


def test_a_short_request_finishes_promptly_behind_a_wall_of_n16_requests(bundle):
    """Four requests of 16 sub-requests each fill a 4-slot batch 16 times over; a one-choice request
    arriving after them runs within the next two waves instead of after all 64 (first come first served)."""
    eng = Engine(SlowModel(bundle.model, delay=0.002), bundle.special,
                 EngineConfig(max_batch_size=4, max_batch_tokens=1024)).start()
    try:
        order: list = []
        wall = SamplingParams(gen_length=8, block_length=8)
        walls = [[_handle([1 + w, 2], wall, order, f"wall{w}") for _ in range(16)] for w in range(4)]
        for hs in walls:
            eng.submit(hs)
        short = _handle([9], SamplingParams(gen_length=4, block_length=4), order, "short")
        eng.submit([short])
        deadline = time.monotonic() + 60
        while len(order) < 65:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert order.index("short") <= 8, order
        # Every wall request got its share: each had sub-requests done among the first 16 answers.
        assert {t for t in order[:16] if t != "short"} == {"wall0", "wall1", "wall2", "wall3"}
    finally:
        eng.shutdown(grace=0)


def test_fair_queue_order():
    from sampler.fair_queue import FairQueue

    fq = FairQueue()
    fq.push("a", ["a1", "a2", "a3"])
    fq.push("b", ["b1"])
    got = []
    for _ in range(3):
        g, item = fq.peek()
        fq.admitted(g, item)
        got.append(item)
    assert got == ["a1", "b1", "a2"]  # b, with nothing running, goes before a's second
    fq.push("c", ["c1"])
    assert fq.peek() == ("c", "c1")   # fewest running first
    fq.finished("a")
    fq.finished("a")
    assert fq.peek() == ("a", "a3")   # a has none running and was served before c arrived
    assert len(fq) == 2 and sorted(fq.clear()) == ["a3", "c1"] and len(fq) == 0


# ---------------------------------------------------------------- drain
def test_drain_fails_what_is_left_at_the_grace_with_503_and_closes_connections(bundle, live_server):
    b = dataclasses.replace(bundle, model=SlowModel(bundle.model, delay=0.02))
    srv = live_server(create_app(b, EngineConfig(max_batch_size=2, max_batch_tokens=1024), served_model_name="tiny"))
    long = {"prompt": [1, 2, 3], "max_tokens": 256, "block_length": 256, "steps": 256}
    out = {}

    def plain():
        out["plain"] = httpx.post(srv.url + "/v1/completions", json=long, timeout=30)

    def stream():
        with httpx.stream("POST", srv.url + "/v1/completions", json=dict(long, stream=True), timeout=30) as r:
            out["stream"] = [line for line in r.iter_lines() if line.startswith("data: ")]
    threads = [threading.Thread(target=plain), threading.Thread(target=stream)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while metric(metrics(srv.url), "llada_running_requests") < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    t0 = time.monotonic()
    srv.app.state.engine.drain(0.3)
    with httpx.Client() as c:  # a keep-alive client gets 503 and is told to close
        r = c.post(srv.url + "/v1/completions", json=GOOD)
        assert_error(r, 503, code="shutting_down")
        assert r.headers["connection"] == "close"
    for t in threads:
        t.join(10)
    assert time.monotonic() - t0 < 2.0
    assert_error(out["plain"], 503, code="shutting_down")
    assert out["plain"].headers["connection"] == "close"
    assert '"shutting_down"' in out["stream"][-2] and out["stream"][-1] == "data: [DONE]"
    m = metrics(srv.url)
    assert metric(m, "llada_requests_total", endpoint="/v1/completions", status=503) == 3
    assert metric(m, "llada_requests_total", endpoint="/v1/completions", status=499) == 0


def test_sigterm_past_the_grace_answers_503_and_exits_within_a_second(golden_dir, free_port, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from test_server_cli import ROOT, env, wait_ready

    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "--model", str(golden_dir), "--port", str(free_port),
             "--device", "cpu", "--shutdown-grace", "1", "--max-batch-size", "1", "--max-batch-tokens", "1024"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env(), start_new_session=True)
    base = f"http://127.0.0.1:{free_port}"
    long = {"prompt": [1, 2, 3], "max_tokens": 512 - 3, "block_length": 509, "steps": 509}
    out: dict = {}

    def plain(i):
        out[i] = httpx.post(base + "/v1/completions", json=long, timeout=30)

    def stream(i):
        with httpx.stream("POST", base + "/v1/completions", json=dict(long, stream=True), timeout=30) as r:
            out[i] = [line for line in r.iter_lines() if line.startswith("data: ")]
    try:
        wait_ready(proc, base, log_path)
        # Bound to loopback, the CLI answers loopback names only (DNS rebinding gets 400).
        assert_error(httpx.get(base + "/v1/models", headers={"Host": "rebind.example"}), 400, code="invalid_host")
        threads = [threading.Thread(target=plain if i % 2 else stream, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 15
        while metric(metrics(base), "llada_queue_length") != 5:
            assert time.monotonic() < deadline, "the requests never queued"
            time.sleep(0.01)
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=15)
        exit_after = time.monotonic() - t0
        for t in threads:
            t.join(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    text = log_path.read_text()
    assert rc == 0, text
    assert exit_after < 1 + 1.5, (exit_after, text)
    for i in range(6):
        if i % 2:
            assert out[i].status_code in (200, 503), out[i].text
            if out[i].status_code == 503:
                assert_error(out[i], 503, code="shutting_down")
        else:
            assert out[i][-1] == "data: [DONE]", out[i]
            assert '"finish_reason"' in out[i][-2] or '"shutting_down"' in out[i][-2], out[i][-2:]
    assert sum(1 for i in range(1, 6, 2) if out[i].status_code == 503) >= 2
    assert "Traceback" not in text and "CancelledError" not in text and "Internal Server Error" not in text


def test_slow_headers_are_cut_off(bundle):
    import uvicorn

    from server.connection import protocol_with_header_timeout
    from conftest import _free_port

    port = _free_port()
    slow = dataclasses.replace(bundle, model=SlowModel(bundle.model, delay=0.01))
    app = create_app(slow, EngineConfig(max_batch_tokens=256), served_model_name="tiny")
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                        http=protocol_with_header_timeout(0.4)))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 20
        while not srv.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # A keep-alive client with a complete request is served and may send the next one.
        with httpx.Client() as c:
            assert c.get(f"http://127.0.0.1:{port}/health").status_code == 200
            time.sleep(0.6)  # idle, under uvicorn's keep-alive timeout
            assert c.get(f"http://127.0.0.1:{port}/health").status_code == 200
        # A client trickling its headers is closed after the timeout.
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        t0 = time.monotonic()
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        closed = None
        for _ in range(40):
            try:
                s.sendall(b"X-Slow: 1\r\n")
                if s.recv(1, socket.MSG_DONTWAIT) == b"":
                    closed = time.monotonic() - t0
                    break
            except BlockingIOError:
                pass
            except OSError:
                closed = time.monotonic() - t0
                break
            time.sleep(0.05)
        s.close()
        assert closed is not None and closed < 1.5, closed
        # A long-running request is not cut: the timer stops once its headers are in.
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                       json={"prompt": [1, 2], "max_tokens": 64, "block_length": 64, "steps": 64})
        assert r.status_code == 200 and r.elapsed.total_seconds() > 0.4
    finally:
        srv.should_exit = True
        t.join(10)


# ---------------------------------------------------------------- bad input that used to be a 500
def test_deeply_nested_json_is_a_400_without_a_traceback(server, caplog):
    body = b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    with caplog.at_level(logging.INFO):
        err = assert_error(post(server.url, "/v1/completions", body), 400, code="invalid_json")
    assert "nests deeper" in err["message"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert post(server.url, "/v1/completions", GOOD).status_code == 200


@pytest.mark.parametrize("extra,param", [
    ({"prompt": [[True], [False]]}, "prompt"), ({"prompt": [5, 5.0]}, "prompt"),
    ({"max_tokens": "8"}, "max_tokens"), ({"n": True}, "n"), ({"stream": "no"}, "stream"),
    ({"temperature": "0.5"}, "temperature"), ({"seed": 1.5}, "seed"),
])
def test_wrong_types_are_400s_not_coerced(server, extra, param):
    assert_error(post(server.url, "/v1/completions", dict(GOOD, **extra)), 400, param)


def test_405_carries_allow_and_operator_endpoints_answer_head(server):
    r = httpx.get(server.url + "/v1/completions")
    assert_error(r, 405)
    assert r.headers["allow"] == "POST"
    for path in ("/health", "/ready", "/metrics", "/", "/playground"):
        r = httpx.head(server.url + path)
        assert r.status_code == 200 and r.content == b"", path
    assert "allow" in httpx.head(server.url + "/v1/completions").headers


def test_user_input_is_echoed_as_a_short_prefix(server, bundle, live_server, caplog):
    long = "m" * 50_000
    with caplog.at_level(logging.INFO, logger="llada.server"):
        r = post(server.url, "/v1/completions", dict(GOOD, model=long))
        err = assert_error(r, 404, "model")
        assert len(r.content) < 400 and "(50002 characters)" in err["message"]
        assert post(server.url, "/v1/completions", dict(GOOD, **{long: 1})).status_code == 200  # ignored, logged
        strict = live_server(create_app(bundle, EngineConfig(max_batch_tokens=256), served_model_name="tiny",
                                        strict_fields=True))
        err = assert_error(post(strict.url, "/v1/completions", dict(GOOD, **{long: 1})), 400)
        assert len(err["message"]) < 200 and len(err["param"]) < 100
        err = assert_error(post(server.url, "/v1/completions", dict(GOOD, prompt=[10 ** 4000])), 400)
        assert len(err["message"]) < 200
        r = httpx.get(server.url + "/v1/models", headers={"Host": "h" * 5000})  # no allow-list: served
        assert r.status_code == 200
    assert max(len(rec.getMessage()) for rec in caplog.records) < 400


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


def test_guard_flags_are_checked():
    from test_server_cli import run_cli

    r = run_cli(["--max-body-bytes", "10", "--model", "x"])
    assert r.returncode == 2 and "--max-body-bytes" in r.stderr
    r = run_cli(["--header-timeout", "0", "--model", "x"])
    assert r.returncode == 2 and "--header-timeout" in r.stderr


def test_no_body_is_read_without_the_api_key(bundle, live_server):
    srv = live_server(create_app(bundle, EngineConfig(max_batch_tokens=256), served_model_name="tiny",
                                 api_key="k", body_timeout=0.3))
    # Headers only, a body promised and never sent: refused at once with 401, not 408 after the timeout.
    t0 = time.monotonic()
    data = _response(_raw(srv.port, _head(100000)))
    assert data.startswith(b"HTTP/1.1 401"), data
    assert b"missing_api_key" in data and time.monotonic() - t0 < 0.3
    ok = post(srv.url, "/v1/completions", GOOD, headers={"Authorization": "Bearer k"})
    assert ok.status_code == 200
    m = metrics(srv.url)
    assert metric(m, "llada_requests_total", endpoint="/v1/completions", status=401) == 1


def test_a_started_server_freezes_what_startup_allocated(bundle):
    """With freeze_gc (what llada-serve sets), the objects of start-up move to the collector's
    permanent generation, so the collections a large request triggers do not walk them."""
    import asyncio
    import gc

    app = create_app(bundle, EngineConfig(max_batch_tokens=256), freeze_gc=True)

    async def start_and_stop():
        async with app.router.lifespan_context(app):
            return gc.get_freeze_count()

    try:
        assert asyncio.run(start_and_stop()) > 10_000
    finally:
        gc.unfreeze()
    plain = create_app(bundle, EngineConfig(max_batch_tokens=256))

    async def plain_start():
        async with plain.router.lifespan_context(plain):
            return gc.get_freeze_count()

    assert asyncio.run(plain_start()) == 0
