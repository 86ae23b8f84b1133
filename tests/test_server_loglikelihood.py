"""POST /v1/loglikelihood over a live server: values equal the direct computation, text pairs are
split as the harnesses split them, bad input is a 400, and the OpenAI echo route points here."""

from __future__ import annotations

import concurrent.futures as cf
import statistics

import pytest

from sampler.likelihood import sample_masks
from sampler.reference import reference_loglikelihood
from test_server_helpers import post
from weights.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def golden(golden_dir):
    return load_checkpoint(golden_dir, device="cpu", dtype="float64")


@pytest.fixture(scope="module")
def server(golden, serve):
    return serve(golden, max_batch_tokens=512)


@pytest.fixture(scope="module")
def text_server(tiny_tokenizer_model, serve):
    bundle = load_checkpoint(tiny_tokenizer_model, device="cpu", dtype="float64")
    return bundle, serve(bundle, "chat", max_batch_tokens=512)


def score(url, **body):
    r = post(url, "/v1/loglikelihood", body)
    assert r.status_code == 200, r.text
    return r.json()


def test_values_equal_the_direct_computation(server, golden):
    pairs = [([5, 17, 40], [7, 99, 12, 150]), ([], [3, 4]), ([1, 2], [250])]
    out = score(server.url, pairs=[{"context": c, "continuation": y} for c, y in pairs], mc_samples=6, seed=5)
    assert out["object"] == "loglikelihood" and out["mc_samples"] == 6 and out["seed"] == 5
    for (ctx, cont), d in zip(pairs, out["data"]):
        values, greedy = reference_loglikelihood(golden.model, ctx, cont, sample_masks(5, ctx, cont, 6),
                                                 golden.special.mask)
        assert d["logprob"] == pytest.approx(statistics.fmean(values), abs=1e-9)
        assert d["is_greedy"] == greedy
        assert d["context_tokens"] == len(ctx) and d["continuation_tokens"] == len(cont)
    assert out["usage"]["forwards"] == sum(d["forwards"] for d in out["data"])
    again = score(server.url, pairs=[{"context": c, "continuation": y} for c, y in pairs], mc_samples=6, seed=5)
    assert again["data"] == out["data"]


def test_concurrent_requests_share_forwards(server):
    before = server.app.state.engine.scorer.forwards
    body = dict(pairs=[{"context": [i, i + 1], "continuation": [i + 2, i + 3, i + 4]} for i in range(8)],
                mc_samples=8)
    with cf.ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda _: score(server.url, **body), range(6)))
    first = [d["logprob"] for d in outs[0]["data"]]
    for o in outs:  # batchmates change nothing but the rounding of the batched products
        assert [d["logprob"] for d in o["data"]] == pytest.approx(first, rel=1e-12, abs=1e-12)
    canvases = sum(o["usage"]["forwards"] for o in outs)
    assert server.app.state.engine.scorer.forwards - before < canvases


def test_text_pairs_split_at_the_context(text_server):
    bundle, srv = text_server
    tok = bundle.tokenizer
    ctx, cont = "the quick brown", " fox jumps"
    out = score(srv.url, pairs=[{"context": ctx, "continuation": cont}], mc_samples=3)
    joint, c_ids = tok.encode(ctx + cont), tok.encode(ctx)
    assert joint[:len(c_ids)] == c_ids
    ids = score(srv.url, pairs=[{"context": c_ids, "continuation": joint[len(c_ids):]}], mc_samples=3)
    assert out["data"][0]["logprob"] == ids["data"][0]["logprob"]
    assert out["data"][0]["continuation_tokens"] == len(joint) - len(c_ids)


@pytest.mark.parametrize("body,param", [
    (dict(pairs=[]), "pairs"),
    (dict(pairs=[{"context": [1], "continuation": []}]), "pairs.0.continuation"),
    (dict(pairs=[{"context": [1], "continuation": [400]}]), "pairs.0.continuation"),
    (dict(pairs=[{"context": [300], "continuation": [4]}]), "pairs.0.context"),
    (dict(pairs=[{"context": [1], "continuation": [4]}], mc_samples=0), "mc_samples"),
    (dict(pairs=[{"context": [1], "continuation": [4]}], mc_samples=5000), "mc_samples"),
    (dict(pairs=[{"context": [1], "continuation": [4]}], cfg_scale=-1), "cfg_scale"),
    (dict(pairs=[{"context": [1], "continuation": [4]}], seed=-3), "seed"),
    (dict(pairs=[{"context": [1] * 300, "continuation": [4] * 300}]), "pairs.0"),
    (dict(pairs=[{"context": "text", "continuation": "needs a tokenizer"}]), "prompt"),
    (dict(pairs=[{"context": [1], "continuation": [4], "weight": 2}]), "pairs.0.weight"),
])
def test_bad_input_is_a_400_naming_the_field(server, body, param):
    r = post(server.url, "/v1/loglikelihood", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_the_openai_echo_route_names_the_endpoint_and_the_adapter(server):
    r = post(server.url, "/v1/completions", dict(prompt=[1, 2, 3], echo=True, logprobs=1, max_tokens=1))
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "/v1/loglikelihood" in msg and "evaluation.lm_eval_adapter" in msg
