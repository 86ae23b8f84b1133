"""What an operator relies on: every response counted and logged once, a log no client can forge or
flood, the metrics (and the README's table of them), the drain on SIGTERM, Allow on 405, /health,
and /docs without internet access."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sampler.scheduler import EngineConfig
from server import logsafe
from server.app import create_app
from server.metrics import TPF_BUCKETS, Metrics
from test_server_errors import assert_error
from test_server_helpers import metric, metrics, post, sse_events

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 8}
PAIR = {"pairs": [{"context": [1, 2, 3], "continuation": [4, 5]}], "mc_samples": 2}


@pytest.fixture(scope="module")
def server(bundle, serve):
    return serve(bundle, max_body_bytes=4096, body_timeout=0.5)


def _delta(before, after, name, **labels):
    return metric(after, name, **labels) - metric(before, name, **labels)


def _lines(caplog, needle):
    return [r.getMessage() for r in caplog.records if needle in r.getMessage()]


# ---------------------------------------------------------------- every response counted and logged once
def test_catch_all_500_is_counted_and_logged_once(server, monkeypatch, caplog):
    import server.routes as routes

    def broken(*a, **k):
        raise RuntimeError("injected bug")

    monkeypatch.setattr(routes, "completion_prompts", broken)
    uvicorn_records = []
    catcher = logging.Handler()
    catcher.emit = uvicorn_records.append
    logging.getLogger("uvicorn.error").addHandler(catcher)
    before = metrics(server.url)
    try:
        with caplog.at_level(logging.INFO, logger="llada.server"):
            r = post(server.url, "/v1/completions", GOOD)
            err = assert_error(r, 500)
            time.sleep(0.1)
    finally:
        logging.getLogger("uvicorn.error").removeHandler(catcher)
    assert err == {"message": "internal server error", "type": "server_error", "param": None, "code": None}
    assert not [rec for rec in uvicorn_records if rec.exc_info]  # uvicorn saw no exception: one traceback
    after = metrics(server.url)
    assert _delta(before, after, "llada_requests_total", endpoint="/v1/completions", status=500) == 1
    assert sum(_delta(before, after, "llada_requests_total", endpoint="/v1/completions", status=s)
               for s in (200, 400, 499, 500)) == 1
    assert len(_lines(caplog, "POST /v1/completions 500")) == 1
    assert len([r for r in caplog.records if r.exc_info]) == 1  # one traceback, from the handler


def test_guard_refusals_on_scoring_are_counted_and_scoring_200s_logged(bundle, live_server, caplog):
    srv = live_server(create_app(bundle, EngineConfig(max_batch_tokens=2048), served_model_name="tiny",
                                 api_key="k", max_body_bytes=2048, body_timeout=0.3))
    key = {"Authorization": "Bearer k"}
    ep = "/v1/loglikelihood"
    before = metrics(srv.url)
    with caplog.at_level(logging.INFO, logger="llada.server"):
        assert_error(post(srv.url, ep, PAIR), 401)
        assert_error(httpx.post(srv.url + ep, content=b"{}", headers={**key, "Content-Type": "text/plain"}), 415)
        assert_error(post(srv.url, ep, {"pairs": [{"context": "x" * 4000, "continuation": "y"}]}, key), 413)
        with socket_to(srv.port) as s:  # a body that never arrives: 408
            s.sendall(b"POST /v1/loglikelihood HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer k\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
            assert read_all(s).startswith(b"HTTP/1.1 408")
        with socket_to(srv.port) as s:  # hangs up during the upload: 499
            s.sendall(b"POST /v1/loglikelihood HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer k\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
            time.sleep(0.05)
        ok = post(srv.url, ep, PAIR, key)
        assert ok.status_code == 200, ok.text
        deadline = time.monotonic() + 5
        while metric(metrics(srv.url), "llada_requests_total", endpoint=ep, status=499) < 1:
            assert time.monotonic() < deadline, "the 499 was not counted"
            time.sleep(0.02)
    after = metrics(srv.url)
    for status in (401, 415, 413, 408, 499, 200):
        assert _delta(before, after, "llada_requests_total", endpoint=ep, status=status) == 1, status
    assert len(_lines(caplog, f"POST {ep} 200")) == 1
    assert "1 pair(s), 5 tokens" in _lines(caplog, f"POST {ep} 200")[0]
    assert _delta(before, after, "llada_request_duration_seconds_count", endpoint=ep) == 1
    for status in (401, 415, 413, 408, 499):
        assert len(_lines(caplog, f"POST {ep} {status}")) == 1, status


class socket_to:
    def __init__(self, port):
        import socket

        self.s = socket.create_connection(("127.0.0.1", port), timeout=5)

    def __enter__(self):
        return self.s

    def __exit__(self, *exc):
        self.s.close()


def read_all(s) -> bytes:
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except OSError:
        pass
    return data


def test_streams_are_counted_once_with_their_finish_reasons(server, caplog):
    before = metrics(server.url)
    with caplog.at_level(logging.INFO, logger="llada.server"):
        events = sse_events(server.url + "/v1/completions", dict(GOOD, stream=True, n=2, seed=1))
        plain = post(server.url, "/v1/completions", dict(GOOD, max_tokens=4))
        assert plain.status_code == 200
        time.sleep(0.1)
    after = metrics(server.url)
    assert events[-1] == "[DONE]"
    assert _delta(before, after, "llada_requests_total", endpoint="/v1/completions", status=200) == 2
    reasons = [c["finish_reason"] for e in events[:-1] for c in e["choices"] if c["finish_reason"]]
    reasons += [c["finish_reason"] for c in plain.json()["choices"]]
    for reason in ("stop", "length"):
        assert _delta(before, after, "llada_request_finished_total", reason=reason) == reasons.count(reason)
    assert _delta(before, after, "llada_request_prompt_tokens_count") == 2
    assert _delta(before, after, "llada_request_generation_tokens_sum") == \
        _delta(before, after, "llada_generated_tokens_total")
    assert _delta(before, after, "llada_request_queue_time_seconds_count") == 3  # per generation
    assert _delta(before, after, "llada_time_to_first_token_seconds_count") == 3
    assert len(_lines(caplog, "POST /v1/completions 200 (stream)")) == 1
    assert len(_lines(caplog, "POST /v1/completions 200:")) == 1


# ---------------------------------------------------------------- the log: escaped, clipped, not flooded
def test_client_values_reach_the_log_escaped_and_clipped(server, caplog):
    with caplog.at_level(logging.INFO, logger="llada.server"):
        r = httpx.post(server.url + "/v1/x%0A2026-01-01 00:00:00 ERROR forged%0D%00", json=GOOD)
        assert r.status_code == 404
        r = httpx.post(server.url + "/v1/" + "a" * 60_000, json=GOOD)
        assert r.status_code in (400, 404, 414, 431)
        assert post(server.url, "/v1/completions", dict(GOOD, model="evil\nINFO forged")).status_code == 404
        assert post(server.url, "/v1/completions", dict(GOOD, **{"x\nERROR forged": 1})).status_code == 200
        time.sleep(0.1)
    messages = [r.getMessage() for r in caplog.records]
    assert any("forged" in m for m in messages)
    for m in messages:
        assert "\n" not in m and "\r" not in m and "\x00" not in m, m
        assert len(m) < 1200, len(m)
    assert any("\\n2026-01-01" in m for m in messages)


def test_log_guard_escapes_and_rate_limits():
    now = [0.0]
    guard = logsafe.LogGuard(burst=5, window=60.0, clock=lambda: now[0])
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(guard)
    log = logging.getLogger("llada.test.guard")
    log.propagate = False
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        log.warning("path %s", "/a\nFORGED line\x1b[31m")
        try:
            raise ValueError("bad template\n2026-01-01 00:00:00 ERROR forged by a client")
        except ValueError:
            log.error("rendering failed", exc_info=True)
        for i in range(1000):
            try:
                raise OSError(24, "Too many open files")
            except OSError:
                log.error("accept failed (%d)", i, exc_info=True)
        now[0] = 61.0
        try:
            raise OSError(24, "Too many open files")
        except OSError:
            log.error("accept failed (%d)", 1000, exc_info=True)
        log.info("x" * 100_000)
        for i in range(100):  # one info line per response: never rate-limited
            log.info("POST /v1/completions 200: request %d", i)
    finally:
        log.removeHandler(handler)
    text = out.getvalue()
    first = text.splitlines()[0]
    assert first.startswith("path /a\\nFORGED line\\x1b[31m")
    assert not any(line.startswith("FORGED") for line in text.splitlines())
    assert text.count("accept failed") == 6  # 5 in the first minute, then one saying what was dropped
    assert "[995 similar message(s) suppressed in the last 60 s]" in text
    assert text.count("Traceback") == 7
    assert "  | ValueError: bad template" in text and "  | 2026-01-01 00:00:00 ERROR forged" in text
    assert not any(line.startswith("2026-01-01") for line in text.splitlines())
    assert max(len(line) for line in text.splitlines()) <= logsafe.MAX_LINE_CHARS + 40
    assert text.count("POST /v1/completions 200: request") == 100


# ---------------------------------------------------------------- metrics
def _quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile over cumulative (upper bound, count) pairs."""
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return float("nan")


@pytest.mark.parametrize("value", [1.0, 2.0, 4.0, 8.0])
def test_tokens_per_forward_quantiles_read_an_integer_rate_as_itself(value):
    m = Metrics(process_metrics=False)
    for _ in range(100):
        m.observe_finished(value)
    fam = next(f for f in text_string_to_metric_families(m.render().decode()) if f.name == "llada_tokens_per_forward")
    buckets = [(float(s.labels["le"]), s.value) for s in fam.samples if s.name.endswith("_bucket")]
    assert abs(_quantile(0.5, buckets) - value) < 1e-9
    assert abs(_quantile(0.9, buckets) - value) / value < 0.1
    assert value not in TPF_BUCKETS


def test_every_llada_series_names_the_model_and_operator_metrics_are_exposed(server):
    assert post(server.url, "/v1/completions", GOOD).status_code == 200
    text = httpx.get(server.url + "/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for f in fams.values():
        for s in f.samples:
            if s.name.startswith("llada_"):
                assert s.labels.get("model_name") == "tiny", s
    info = fams["llada_build"].samples[0].labels if "llada_build" in fams else fams["llada_build_info"].samples[0].labels
    assert info["family"] and info["device"] == "cpu" and info["dtype"] == "float32" and info["version"]
    assert "process_resident_memory_bytes" in fams and "python_info" in fams
    kv = [s.value for s in fams["llada_kv_buffer_usage_ratio"].samples]
    assert kv == [0.0]  # idle
    for reason in ("stop", "length", "abort", "error"):
        assert any(s.labels.get("reason") == reason for s in fams["llada_request_finished"].samples)


def test_kv_buffer_usage_follows_the_running_batch(bundle):
    from sampler.scheduler import Engine, Handle
    from sampler.params import SamplingParams

    m = Metrics(process_metrics=False)
    engine = Engine(bundle.model, bundle.special, EngineConfig(max_batch_tokens=1000), metrics=m)
    h = Handle(prompt_ids=[1, 2, 3], params=SamplingParams(gen_length=97, block_length=97, steps=97),
               sink=lambda item: None)
    engine._accepting = engine.alive = True  # admit by hand, without the engine thread
    engine.submit([h])
    with engine._cv:
        engine._admit()
    assert m.kv_usage._value.get() == pytest.approx(100 / 1000)


def _exposed(text: str) -> dict[str, set[str]]:
    """{exposed metric name: its label names} of a scrape (histogram `le` left out)."""
    out = {}
    for f in text_string_to_metric_families(text):
        name = f.name + ("_total" if f.type == "counter" else "_info" if f.type == "info" else "")
        labels = set()
        for s in f.samples:
            labels |= set(s.labels) - {"le", "quantile"}
        out[name] = labels
    return out


def _readme_metrics() -> dict[str, set[str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    out = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        first = line.split("|")[1]
        for name, labels in re.findall(r"`([a-z_:]+)(?:\{([a-z_,]*)\})?`", first):
            out[name] = set(filter(None, (labels or "").split(",")))
    return out


def test_readme_metrics_table_matches_a_live_scrape(server):
    assert post(server.url, "/v1/completions", GOOD).status_code == 200  # labelled series get samples
    assert post(server.url, "/v1/loglikelihood", PAIR).status_code == 200
    exposed = _exposed(httpx.get(server.url + "/metrics").text)
    documented = _readme_metrics()
    assert set(documented) == set(exposed), (set(documented) ^ set(exposed))
    for name, labels in exposed.items():
        if labels:
            assert documented[name] == labels, (name, documented[name], labels)


def test_dashboard_uses_the_new_operator_metrics():
    import json

    dash = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "llada-serve.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for name in ("llada_request_queue_time_seconds_bucket", "llada_time_to_first_token_seconds_bucket",
                 "llada_kv_buffer_usage_ratio", "llada_request_finished_total",
                 "llada_request_prompt_tokens_bucket", "llada_request_generation_tokens_bucket",
                 "process_resident_memory_bytes"):
        assert name in exprs, name


# ---------------------------------------------------------------- routes
def test_405_allow_lists_head_where_a_route_answers_it(server):
    for path in ("/health", "/ready", "/metrics", "/playground"):
        r = httpx.post(server.url + path, content=b"")
        assert r.status_code == 405
        assert r.headers["allow"] == "GET, HEAD", path
    assert httpx.get(server.url + "/v1/completions").headers["allow"] == "POST"


def test_health_and_ready_name_the_model(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "model": "tiny"}
    assert httpx.get(server.url + "/ready").json() == {"status": "ready", "model": "tiny"}


def test_docs_page_loads_its_assets_from_this_server(server):
    r = httpx.get(server.url + "/docs")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    html = r.text
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    assert refs and "://" not in html.replace("http://www.w3.org", "")  # no other origin named
    assert "'openapi.json'" in html or '"/openapi.json"' in html or "'/openapi.json'" in html
    for ref in refs:
        a = httpx.get(server.url + ref)
        assert a.status_code == 200, ref
        assert len(a.content) > 1000, ref
    js = httpx.get(server.url + "/docs/assets/swagger-ui-bundle.js")
    assert js.headers["content-type"].startswith("text/javascript") and b"SwaggerUIBundle" in js.content
    assert httpx.get(server.url + "/docs/assets/..%2Fcore.py").status_code == 404
    assert httpx.get(server.url + "/docs/assets/index.html").status_code == 404


# ---------------------------------------------------------------- drain
def test_sigterm_fails_ready_then_closes_the_listener_after_the_drain_delay(golden_dir, free_port, tmp_path):
    from test_server_cli import env, wait_ready

    delay = 2.0
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "--model", str(golden_dir), "--port", str(free_port),
             "--device", "cpu", "--shutdown-grace", "20", "--max-batch-tokens", "1024"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env(LLADA_DRAIN_DELAY=delay),
            start_new_session=True)
    base = f"http://127.0.0.1:{free_port}"
    long = {"prompt": [1, 2, 3], "max_tokens": 256, "block_length": 256, "steps": 256}
    out = {}
    try:
        wait_ready(proc, base, log_path)
        assert httpx.get(base + "/v1/a%0AINJECTED").status_code == 404
        keep = httpx.Client(base_url=base)
        assert keep.get("/ready").status_code == 200  # an idle keep-alive connection
        t = threading.Thread(target=lambda: out.update(r=httpx.post(base + "/v1/completions", json=long, timeout=60)))
        t.start()
        deadline = time.monotonic() + 15
        while metric(metrics(base), "llada_running_requests") != 1:
            assert time.monotonic() < deadline and "r" not in out, "the request was never admitted"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGTERM)
        t0 = time.monotonic()
        time.sleep(0.3)
        # Within the delay: the idle keep-alive connection and new connections are answered.
        r = keep.get("/ready")
        assert r.status_code == 503 and r.json()["status"] == "draining"
        assert r.headers["connection"] == "close"
        r = httpx.post(base + "/v1/completions", json={"prompt": [1, 2], "max_tokens": 4})
        assert_error(r, 503, code="shutting_down")
        assert httpx.get(base + "/ready").status_code == 503
        assert httpx.get(base + "/health").status_code == 200
        assert time.monotonic() - t0 < delay
        # After it: the listener is closed.
        while time.monotonic() - t0 < delay + 1.5:
            time.sleep(0.1)
        with pytest.raises(httpx.ConnectError):
            httpx.get(base + "/health", timeout=2)
        t.join(60)
        rc = proc.wait(timeout=30)
        keep.close()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    text = log_path.read_text()
    assert rc == 0, text
    assert out["r"].status_code == 200, out["r"].text  # in flight at SIGTERM: finished within the grace
    assert "Traceback" not in text
    # The CLI's log: the injected newline is escaped, no line was forged.
    assert "\\nINJECTED" in text and not any(line.startswith("INJECTED") for line in text.splitlines())


# ---------------------------------------------------------------- system binaries: skip here, fail under CI
def test_a_missing_system_binary_skips_with_the_install_line_or_fails_under_ci(monkeypatch):
    import system_tools

    monkeypatch.setattr(system_tools.shutil, "which", lambda name: None)  # as on a machine without them
    monkeypatch.setattr(system_tools.os, "access", lambda path, mode: False)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y prometheus"):
        system_tools.require("promtool")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        system_tools.require("promtool")
    monkeypatch.setattr(system_tools.shutil, "which", lambda name: "/opt/bin/" + name if name == "sh" else None)
    assert system_tools.require("no-such-tool", "sh") == "/opt/bin/sh"  # an alternative found: no skip, no fail


# ---------------------------------------------------------------- what the README says about the edges
def test_protocol_errors_are_uvicorns_plain_text_400_and_not_counted(bundle):
    import uvicorn

    from conftest import LiveServer
    from server.connection import protocol_with_header_timeout

    srv = LiveServer(create_app(bundle, EngineConfig(max_batch_tokens=1024), served_model_name="tiny"))
    srv.server = uvicorn.Server(uvicorn.Config(srv.app, host="127.0.0.1", port=srv.port, log_level="warning",
                                               access_log=False, http=protocol_with_header_timeout(10)))
    srv.thread = threading.Thread(target=srv.server.run, daemon=True)
    srv.start()
    try:
        before = metrics(srv.url)
        head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        for raw in (b"GARBAGE\r\n\r\n", b"GET /health HTTP/1.1\r\n\r\n",
                    head + b"Content-Length: abc\r\n\r\n{}"):
            with socket_to(srv.port) as s:
                s.sendall(raw)
                data = read_all(s)
            assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n"), data
            assert b"content-type: text/plain" in data.lower() and data.endswith(b"Invalid HTTP request received.")
        after = metrics(srv.url)
        counted = [k for k in after if k[0] == "llada_requests_total" and after[k] != before.get(k, 0.0)]
        assert counted == []
    finally:
        srv.stop()


def test_the_lm_eval_model_name_is_registered_by_importing_the_adapter():
    pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model

    import evaluation.lm_eval_adapter as adapter

    assert get_model("llada-serve") is adapter.LLaDAServerLM
    lm = get_model("llada-serve").create_from_arg_string("base_url=http://127.0.0.1:9")
    assert isinstance(lm, adapter.LLaDAServerLM)
    readme = (ROOT / "README.md").read_text()
    assert "`lm_eval` command does not import it" in readme


def test_promtool_check_metrics_is_clean_on_a_live_scrape(server):
    import system_tools

    promtool = system_tools.require("promtool")
    assert post(server.url, "/v1/completions", GOOD).status_code == 200
    text = httpx.get(server.url + "/metrics").text
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr
