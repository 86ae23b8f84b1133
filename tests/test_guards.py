"""The guards in front of the routes (server/guards.py, server/connection.py): body size, content type,
Host, slow or vanished clients, unparsable JSON, 405s, what user input is echoed and the API key first."""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import threading
import time

import httpx
import pytest

from sampler.scheduler import EngineConfig
from server.app import create_app
from test_server_errors import SlowModel, assert_error
from test_server_helpers import metric, metrics, post

GOOD = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 8}


@pytest.fixture(scope="module")
def server(bundle, serve):
    return serve(bundle, max_body_bytes=64 * 1024, body_timeout=0.5)


def raw_json(obj) -> bytes:
    """JSON with ASCII escapes, so lone surrogates travel as '\\ud800' (as browsers and SDKs send them)."""
    return json.dumps(obj).encode()


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
