"""Bad input gets an OpenAI error body (never a 500), and overload, disconnects, timeouts and failing
steps leave the server serving."""

from __future__ import annotations

import dataclasses
import threading
import time

import httpx
import pytest

from sampler.scheduler import EngineConfig
from server.app import create_app
from test_server_helpers import metric, metrics, post

POISON = 299  # a prompt holding this id makes the wrapped model raise inside the step


class SlowModel:
    """Wraps the network: sleeps per forward, raises when a poisoned id is in the batch."""

    def __init__(self, model, delay: float = 0.0, poison: int | None = None):
        self.inner, self.delay, self.poison = model, delay, poison
        self.config, self.device, self.dtype = model.config, model.device, model.dtype

    def __call__(self, ids, *args, **kwargs):
        if self.poison is not None and bool((ids == self.poison).any()):
            raise RuntimeError("injected failure inside the step")
        if self.delay:
            time.sleep(self.delay)
        return self.inner(ids, *args, **kwargs)


@pytest.fixture(scope="module")
def server(bundle, serve):
    return serve(bundle)


@pytest.fixture(scope="module")
def keyed(bundle, serve):
    return serve(bundle, max_batch_tokens=1024, api_key="sekrit")


@pytest.fixture(scope="module")
def slow(bundle, live_server):
    b = dataclasses.replace(bundle, model=SlowModel(bundle.model, delay=0.02, poison=POISON))
    return live_server(create_app(b, EngineConfig(max_batch_size=1, max_queue=1, max_batch_tokens=2048),
                                  served_model_name="tiny"))


def assert_error(r: httpx.Response, status: int, param="?", code="?"):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and "Traceback" not in err["message"]
    if param != "?":
        assert err["param"] == param, err
    if code != "?":
        assert err["code"] == code, err
    return err


GOOD = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 8}

TABLE = [
    # (name, body, status, param)
    ("not json", b"{\"prompt\": [1, 2", 400, None),
    ("not an object", b"[1, 2, 3]", 400, None),
    ("wrong type max_tokens", dict(GOOD, max_tokens="many"), 400, "max_tokens"),
    ("wrong type temperature", dict(GOOD, temperature="hot"), 400, "temperature"),
    ("wrong type prompt", dict(GOOD, prompt={"a": 1}), 400, "?"),
    ("wrong type stream", dict(GOOD, stream="yes please"), 400, "stream"),
    ("unknown field ignored", dict(GOOD, frobnicate=1), 200, None),
    ("max_tokens as a string", dict(GOOD, max_tokens="8"), 400, "max_tokens"),
    ("n as a boolean", dict(GOOD, n=True), 400, "n"),
    ("stream as a string", dict(GOOD, stream="no"), 400, "stream"),
    ("mask id in a token-id prompt", dict(GOOD, prompt=[1, 2, 300, 4]), 400, "prompt"),
    ("mask id in a batch of id prompts", dict(GOOD, prompt=[[1, 2], [300]]), 400, "prompt"),
    ("top_k below -1", dict(GOOD, top_k=-5), 400, "top_k"),
    ("min_p above 1", dict(GOOD, min_p=1.5), 400, "min_p"),
    ("unknown model", dict(GOOD, model="gpt-4"), 404, "model"),
    ("too long", dict(GOOD, prompt=[1] * 500, max_tokens=32), 400, "max_tokens"),
    ("steps not a multiple of blocks", dict(GOOD, max_tokens=16, block_length=8, steps=3), 400, "steps"),
    ("steps over gen_length", dict(GOOD, max_tokens=8, steps=9), 400, "steps"),
    ("fewer steps than tokens", dict(GOOD, max_tokens=16, block_length=8, steps=4), 200, None),
    ("threshold out of range", dict(GOOD, threshold=1.5), 400, "threshold"),
    ("bad remasking", dict(GOOD, remasking="sideways"), 400, "remasking"),
    ("bad cache", dict(GOOD, cache="lru"), 400, "cache"),
    ("cfg with cache", dict(GOOD, cfg_scale=1.0, cache="dual"), 400, "cfg_scale"),
    ("negative temperature", dict(GOOD, temperature=-1), 400, "temperature"),
    ("negative seed", dict(GOOD, seed=-3), 400, "seed"),
    ("zero block_length", dict(GOOD, block_length=0), 400, "block_length"),
    ("n zero", dict(GOOD, n=0), 400, "n"),
    ("n over the limit", dict(GOOD, n=1000), 400, "n"),
    ("max_tokens zero", dict(GOOD, max_tokens=0), 400, "max_tokens"),
    ("max_tokens negative", dict(GOOD, max_tokens=-5), 400, "max_tokens"),
    ("max_tokens over the model", dict(GOOD, max_tokens=100000), 400, "max_tokens"),
    ("empty string prompt", dict(GOOD, prompt=""), 400, "prompt"),
    ("empty list prompt", dict(GOOD, prompt=[]), 400, "prompt"),
    ("empty id list", dict(GOOD, prompt=[[]]), 400, "prompt"),
    ("missing prompt", {"model": "tiny"}, 400, "prompt"),
    ("id over the vocabulary", dict(GOOD, prompt=[1, 5000]), 400, "prompt"),
    ("negative id", dict(GOOD, prompt=[-1, 2]), 400, "prompt"),
    ("text on a tokenizer-less model", dict(GOOD, prompt="hello"), 400, "prompt"),
    ("top_p out of range", dict(GOOD, top_p=1.5), 400, "top_p"),
    ("presence_penalty", dict(GOOD, presence_penalty=0.5), 400, "presence_penalty"),
    ("frequency_penalty", dict(GOOD, frequency_penalty=1.0), 400, "frequency_penalty"),
    ("logprobs over 20", dict(GOOD, logprobs=21), 400, "logprobs"),
    ("best_of", dict(GOOD, best_of=3), 400, "best_of"),
    ("logit_bias", dict(GOOD, logit_bias={"5": 10}), 400, "logit_bias"),
    ("echo", dict(GOOD, echo=True), 400, "echo"),
    ("too many stops", dict(GOOD, stop=[str(i) for i in range(40)]), 400, "stop"),
    ("neutral values accepted", dict(GOOD, top_p=1, presence_penalty=0, frequency_penalty=0, logprobs=None,
                                     user="u", best_of=1), 200, None),
]


@pytest.mark.parametrize("name,body,status,param", TABLE, ids=[t[0] for t in TABLE])
def test_error_table(server, name, body, status, param):
    r = post(server.url, "/v1/completions", body)
    if status == 200:
        assert r.status_code == 200, r.text
    else:
        assert_error(r, status, param)


CHAT_TABLE = [
    ("no tokenizer", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}, 400, "prompt"),
    ("no messages", {"model": "tiny", "messages": []}, 400, "messages"),
    ("bad role", {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "?"),
    ("tools", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [{"x": 1}]}, 400, "tools.0.type"),
]


@pytest.mark.parametrize("name,body,status,param", CHAT_TABLE, ids=[t[0] for t in CHAT_TABLE])
def test_chat_error_table(server, name, body, status, param):
    assert_error(post(server.url, "/v1/chat/completions", body), status, param)


def test_mask_id_refusal_names_the_position(server):
    err = assert_error(post(server.url, "/v1/completions", dict(GOOD, prompt=[1, 2, 300, 4])), 400, "prompt",
                       "mask_token_in_prompt")
    assert "position 2" in err["message"] and "300" in err["message"]


@pytest.fixture(scope="module")
def strict(bundle, live_server):
    return live_server(create_app(bundle, EngineConfig(max_batch_tokens=1024), served_model_name="tiny",
                                  strict_fields=True))


def test_strict_fields_refuses_unknown_fields(strict, caplog):
    assert_error(post(strict.url, "/v1/completions", dict(GOOD, frobnicate=1)), 400, "frobnicate", "unknown_field")
    chat = {"messages": [{"role": "user", "content": "hi", "mood": "sunny"}]}
    assert_error(post(strict.url, "/v1/chat/completions", chat), 400, "messages.0.mood", "unknown_field")
    # known fields, ignored ones and nulls are still accepted
    ok = post(strict.url, "/v1/completions", dict(GOOD, store=False, metadata={"a": "b"}, n=None, stream=None,
                                                   top_k=-1, min_p=0, ignore_eos=None))
    assert ok.status_code == 200, ok.text


def test_unknown_fields_are_logged_by_name(server, caplog):
    with caplog.at_level("WARNING", logger="llada.server"):
        r = post(server.url, "/v1/completions", dict(GOOD, frobnicate=1, stream_options={"zap": 1}))
    assert r.status_code == 200, r.text
    assert any("frobnicate" in m and "stream_options.zap" in m for m in caplog.messages), caplog.messages


def test_unknown_paths_and_methods(server):
    assert_error(httpx.get(server.url + "/v1/nothing"), 404)
    assert_error(httpx.get(server.url + "/v1/completions"), 405)


def test_bad_input_leaves_the_server_serving(server):
    for _, body, _, _ in TABLE:
        post(server.url, "/v1/completions", body)
    assert post(server.url, "/v1/completions", GOOD).status_code == 200
    assert httpx.get(server.url + "/ready").status_code == 200


def test_api_key(keyed):
    assert_error(post(keyed.url, "/v1/completions", GOOD), 401, code="missing_api_key")
    assert_error(post(keyed.url, "/v1/completions", GOOD, headers={"Authorization": "Bearer nope"}), 401,
                 code="invalid_api_key")
    assert_error(httpx.get(keyed.url + "/v1/models"), 401)
    ok = post(keyed.url, "/v1/completions", GOOD, headers={"Authorization": "Bearer sekrit"})
    assert ok.status_code == 200
    for path in ("/health", "/ready", "/metrics", "/"):
        assert httpx.get(keyed.url + path).status_code == 200, path
    m = metrics(keyed.url)
    assert metric(m, "llada_requests_total", endpoint="/v1/completions", status=401) == 2


def _wait_for(pred, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _gauges(url):
    m = metrics(url)
    return metric(m, "llada_running_requests"), metric(m, "llada_queue_length")


def test_full_queue_answers_429_at_once(slow):
    long = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 48, "block_length": 16}
    results = {}
    t1 = threading.Thread(target=lambda: results.update(a=post(slow.url, "/v1/completions", long)))
    t1.start()
    _wait_for(lambda: _gauges(slow.url)[0] == 1, what="A running")
    t2 = threading.Thread(target=lambda: results.update(b=post(slow.url, "/v1/completions", long)))
    t2.start()
    _wait_for(lambda: _gauges(slow.url)[1] == 1, what="B queued")
    t0 = time.monotonic()
    r = post(slow.url, "/v1/completions", long)
    assert time.monotonic() - t0 < 1.0
    err = assert_error(r, 429, code="queue_full")
    assert err["type"] == "rate_limit_error"
    assert int(r.headers["Retry-After"]) >= 1
    t1.join(30)
    t2.join(30)
    assert results["a"].status_code == 200 and results["b"].status_code == 200
    assert metric(metrics(slow.url), "llada_requests_total", endpoint="/v1/completions", status=429) == 1


def test_disconnect_mid_stream_frees_the_slot(slow):
    body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 64, "block_length": 8, "stream_steps": True}
    with httpx.stream("POST", slow.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        seen = 0
        for line in lines:
            if line.startswith("data: ") and "diffusion.step" in line:
                seen += 1
                if seen == 3:
                    break
        assert _gauges(slow.url)[0] == 1
        at_disconnect = metric(metrics(slow.url), "llada_forwards_total")
    _wait_for(lambda: _gauges(slow.url) == (0, 0), timeout=5.0, what="running gauge back to 0")
    # It left the batch long before its 64 steps were done.
    assert metric(metrics(slow.url), "llada_forwards_total") - at_disconnect < 30
    assert post(slow.url, "/v1/completions", {"model": "tiny", "prompt": [1], "max_tokens": 4}).status_code == 200


@pytest.mark.parametrize("extra", [{}, {"stop": "never"}])
def test_disconnect_while_waiting_for_a_whole_answer(slow, extra):
    body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 128, "block_length": 8, "ban_eos": True, **extra}
    before = metric(metrics(slow.url), "llada_forwards_total")
    with pytest.raises(httpx.TimeoutException):
        httpx.post(slow.url + "/v1/completions", json=body, timeout=0.3)
    _wait_for(lambda: _gauges(slow.url) == (0, 0), timeout=5.0, what="running gauge back to 0")
    # 128 steps would have run to the end; the server noticed the client leave and stopped early.
    assert metric(metrics(slow.url), "llada_forwards_total") - before < 100


def test_a_failing_step_fails_its_requests_and_the_server_keeps_serving(slow):
    before = metrics(slow.url)
    r = post(slow.url, "/v1/completions", {"model": "tiny", "prompt": [1, POISON, 3], "max_tokens": 8})
    err = assert_error(r, 500, code="step_failed")
    assert err["type"] == "server_error"
    events = []
    with httpx.stream("POST", slow.url + "/v1/completions", timeout=30,
                      json={"model": "tiny", "prompt": [POISON], "max_tokens": 8, "stream": True}) as s:
        assert s.status_code == 200
        events = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert '"error"' in events[-2] and events[-1] == "data: [DONE]"
    ok = post(slow.url, "/v1/completions", {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 8})
    assert ok.status_code == 200
    after = metrics(slow.url)
    assert metric(after, "llada_step_failures_total") - metric(before, "llada_step_failures_total") == 2
    assert _gauges(slow.url) == (0, 0)
    assert httpx.get(slow.url + "/ready").status_code == 200


def test_request_timeout(bundle, live_server):
    b = dataclasses.replace(bundle, model=SlowModel(bundle.model, delay=0.02))
    srv = live_server(create_app(b, EngineConfig(max_batch_tokens=1024, request_timeout=0.3),
                                 served_model_name="tiny"))
    r = post(srv.url, "/v1/completions", {"model": "tiny", "prompt": [1, 2], "max_tokens": 64})
    assert_error(r, 504, code="timeout")
    assert _gauges(srv.url) == (0, 0)
    assert post(srv.url, "/v1/completions", {"model": "tiny", "prompt": [1, 2], "max_tokens": 4}).status_code == 200


def test_draining_refuses_new_work_and_reports_not_ready(bundle, live_server):
    srv = live_server(create_app(bundle, EngineConfig(max_batch_tokens=256), served_model_name="tiny"))
    assert httpx.get(srv.url + "/ready").status_code == 200
    srv.app.state.engine.stop_intake()
    assert httpx.get(srv.url + "/ready").status_code == 503
    assert httpx.get(srv.url + "/health").status_code == 200
    assert_error(post(srv.url, "/v1/completions", GOOD), 503, code="shutting_down")


def test_queued_streams_get_keepalive_comments(slow, monkeypatch):
    import server.job

    monkeypatch.setattr(server.job, "KEEPALIVE_S", 0.2)
    long = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 48, "block_length": 16}
    t = threading.Thread(target=lambda: post(slow.url, "/v1/completions", long))
    t.start()
    _wait_for(lambda: _gauges(slow.url)[0] == 1, what="the first request running")
    with httpx.stream("POST", slow.url + "/v1/completions", timeout=30,
                      json={"model": "tiny", "prompt": [4, 5], "max_tokens": 8, "stream": True}) as r:
        lines = list(r.iter_lines())
    t.join(30)
    assert ": keep-alive" in lines
    assert lines[-2] == "data: [DONE]" or lines[-1] == "data: [DONE]"


class FailAt:
    """Raises on the k-th forward only."""

    def __init__(self, model, k):
        self.inner, self.k, self.calls = model, k, 0
        self.config, self.device, self.dtype = model.config, model.device, model.dtype

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.k:
            raise RuntimeError("injected failure on one forward")
        return self.inner(*args, **kwargs)


def test_one_failed_choice_fails_the_request_promptly(bundle, live_server):
    b = dataclasses.replace(bundle, model=FailAt(bundle.model, k=2))
    srv = live_server(create_app(b, EngineConfig(max_batch_size=1, max_batch_tokens=256), served_model_name="tiny"))
    t0 = time.monotonic()
    r = post(srv.url, "/v1/completions", {"prompt": [1, 2], "max_tokens": 4, "block_length": 4, "n": 2},
             timeout=20)
    assert_error(r, 500, code="step_failed")
    assert time.monotonic() - t0 < 10
    assert post(srv.url, "/v1/completions", {"prompt": [1, 2], "max_tokens": 4}).status_code == 200
