"""The draft_depth request field over a live server: same answers, usage and the per-step stream
report forwards, the drafting metrics move, bad values are 400s."""

from __future__ import annotations

import pytest

from sampler.scheduler import EngineConfig
from server.app import create_app
from test_server_helpers import metric, metrics, post, sse_events
from weights.checkpoint import load_checkpoint

PROMPT = [5, 17, 42, 7, 99, 3]
BODY = {"model": "tiny", "prompt": PROMPT, "max_tokens": 32, "block_length": 32, "steps": 32}


@pytest.fixture(scope="module")
def bundle(golden_dir):
    return load_checkpoint(golden_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def server(bundle, live_server):
    app = create_app(bundle, EngineConfig(max_batch_size=8, max_batch_tokens=2048, draft_budget=1024,
                                          adaptive_drafting=False),
                     served_model_name="tiny")
    return live_server(app)


def complete(server, **body):
    r = post(server.url, "/v1/completions", {**BODY, **body})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("extra", [{}, {"temperature": 0.8, "seed": 4}, {"cache": "dual"}])
def test_same_answer_fewer_forwards(server, extra):
    before = metrics(server.url)
    off = complete(server, draft_depth=0, **extra)
    on = complete(server, draft_depth=4, **extra)
    after = metrics(server.url)
    assert on["choices"][0]["token_ids"] == off["choices"][0]["token_ids"]
    assert off["usage"]["forwards"] == 32
    assert on["usage"]["forwards"] < off["usage"]["forwards"]
    d = {n: metric(after, n) - metric(before, n)
         for n in ("llada_draft_steps_accepted_total", "llada_draft_rows_total", "llada_steps_per_forward_count",
                   "llada_steps_per_forward_sum")}
    # Both requests' forwards are observed; the steps they advanced add up to both schedules.
    assert d["llada_steps_per_forward_count"] == off["usage"]["forwards"] + on["usage"]["forwards"]
    assert d["llada_steps_per_forward_sum"] == 64
    assert d["llada_draft_steps_accepted_total"] == 32 - on["usage"]["forwards"]
    assert d["llada_draft_rows_total"] > 0


def test_step_stream_reports_each_forward(server):
    events = sse_events(server.url + "/v1/completions", {**BODY, "draft_depth": 4, "stream_steps": True})
    steps = [e for e in events if isinstance(e, dict) and e["object"] == "diffusion.step"]
    assert [e["step"] for e in steps] == list(range(1, 33))
    assert [e["nfe"] for e in steps] == list(range(1, 33))
    by_forward = {}
    for e in steps:
        by_forward.setdefault(e["forwards"], []).append(e)
    assert sorted(by_forward) == list(range(1, len(by_forward) + 1))
    for evs in by_forward.values():
        assert {e["forward_steps"] for e in evs} == {len(evs)}
    done = next(e for e in events if isinstance(e, dict) and e["object"] == "diffusion.done")
    assert done["forwards"] == len(by_forward) < done["nfe"] == 32


@pytest.mark.parametrize("value", [9, -1, "4", 1.5])
def test_bad_draft_depth_is_a_400(server, value):
    r = post(server.url, "/v1/completions", {**BODY, "draft_depth": value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] in ("draft_depth", "body.draft_depth", None) or "draft_depth" in r.text


def test_block_diffusion_drafts_with_the_same_answer(live_server):
    """A LLaDA2.x model takes draft_depth per request and the server default: the answer and NFE
    equal those without drafts, with fewer forwards; the metrics count the accepted steps."""
    from golden_sets import TINY_LLADA2

    b2 = load_checkpoint(TINY_LLADA2, device="cpu", dtype="float32")
    srv = live_server(create_app(b2, EngineConfig(max_batch_size=2, max_batch_tokens=1024, draft_depth=4,
                                                      adaptive_drafting=False),
                                 served_model_name="tiny"))
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 32, "block_length": 8, "steps": 8,
            "threshold": 1.0}
    before = metrics(srv.url)
    off = post(srv.url, "/v1/completions", {**body, "draft_depth": 0})
    on = post(srv.url, "/v1/completions", {**body, "draft_depth": 3})
    default = post(srv.url, "/v1/completions", body)  # the server's --draft-depth applies
    after = metrics(srv.url)
    assert off.status_code == on.status_code == default.status_code == 200, on.text
    off, on, default = off.json(), on.json(), default.json()
    assert on["choices"][0]["token_ids"] == off["choices"][0]["token_ids"] == default["choices"][0]["token_ids"]
    assert on["usage"]["forwards"] < off["usage"]["forwards"]
    assert default["usage"]["forwards"] < off["usage"]["forwards"]
    # each answer took the steps of the run without drafts: the accepted ones make up the difference
    accepted = metric(after, "llada_draft_steps_accepted_total") - metric(before, "llada_draft_steps_accepted_total")
    assert accepted == 2 * off["usage"]["forwards"] - on["usage"]["forwards"] - default["usage"]["forwards"]
