"""The server's lifecycle: draining at the grace, SIGTERM past the grace, and the startup gc freeze."""

from __future__ import annotations

import dataclasses
import threading
import time

import httpx

from sampler.scheduler import EngineConfig
from server.app import create_app
from test_server_errors import SlowModel, assert_error
from test_server_helpers import metric, metrics

GOOD = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 8}


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
