"""Commit-time logprobs, sampling filters and infilling through the HTTP API and the official
openai client: OpenAI's shapes (whole and streamed), values equal to the oracle's direct
computation, the step extension, and the infill forms."""

from __future__ import annotations

import openai
import pytest

from sampler.params import SamplingParams
from sampler.reference import reference_generate
from sampler.scheduler import EngineConfig
from server.app import create_app
from test_server_helpers import post
from weights.checkpoint import load_checkpoint

PROMPT = [5, 17, 42, 7, 99, 3]


@pytest.fixture(scope="module")
def golden(golden_dir):
    return load_checkpoint(golden_dir, device="cpu", dtype="float64")


@pytest.fixture(scope="module")
def server(golden, serve):
    return serve(golden)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def chat(tiny_tokenizer_model, live_server):
    bundle = load_checkpoint(tiny_tokenizer_model, device="cpu", dtype="float64")
    srv = live_server(create_app(bundle, EngineConfig(max_batch_tokens=2048), served_model_name="chat"))
    return bundle, srv, openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def oracle(bundle, prompt, params, **kw):
    trace = {}
    ids, _ = reference_generate(bundle.model, prompt, params, bundle.special.mask, bundle.special.stop,
                                trace=trace, **kw)
    return ids, trace


def test_completion_logprobs_shape_and_values(client, golden):
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, logprobs=3,
                                    extra_body={"block_length": 8, "steps": 8, "ban_eos": True})
    choice = out.choices[0]
    lp = choice.logprobs
    ids = choice.model_extra["token_ids"]
    assert len(ids) == 8
    assert lp.tokens == [f"<{t}>" for t in ids]
    assert lp.text_offset == [len("".join(f"<{t}>" for t in ids[:i])) for i in range(8)]
    _, trace = oracle(golden, PROMPT, SamplingParams(gen_length=8, block_length=8, steps=8, ban_eos=True,
                                                     logprobs=3))
    steps = lp.model_extra["llada"]["steps"]
    for i in range(8):
        w_step, w_lp, w_top = trace[i]
        assert steps[i] == w_step
        assert lp.token_logprobs[i] == pytest.approx(w_lp, abs=1e-5)
        assert list(lp.top_logprobs[i]) == [f"<{t}>" for t, _ in w_top]
        assert list(lp.top_logprobs[i].values()) == pytest.approx([v for _, v in w_top], abs=1e-5)
    assert sorted(steps) == list(range(1, 9))  # one token per step


def test_streamed_logprobs_concatenate_to_the_whole(client):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=16, logprobs=2, seed=4, temperature=0.7,
              extra_body={"block_length": 8, "steps": 16, "ban_eos": True})
    whole = client.completions.create(**kw).choices[0].logprobs
    tokens, lps, steps, offsets = [], [], [], []
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                lps += c.logprobs.token_logprobs
                offsets += c.logprobs.text_offset
                steps += c.logprobs.model_extra["llada"]["steps"]
    assert tokens == whole.tokens and lps == whole.token_logprobs
    assert offsets == whole.text_offset and steps == whole.model_extra["llada"]["steps"]


def test_chat_logprobs_shape_stream_and_values(chat):
    bundle, srv, cl = chat
    msgs = [{"role": "user", "content": "hello world"}]
    kw = dict(model="chat", messages=msgs, max_tokens=6, logprobs=True, top_logprobs=2,
              extra_body={"block_length": 6, "steps": 6, "ban_eos": True, "defer_eos": False})
    out = cl.chat.completions.create(**kw)
    content = out.choices[0].logprobs.content
    prompt = bundle.tokenizer.apply_chat_template(msgs)
    ids, trace = oracle(bundle, prompt, SamplingParams(gen_length=6, block_length=6, steps=6, ban_eos=True,
                                                       logprobs=2))
    answer = []
    for t in ids:
        if t in bundle.special.stop:
            break
        answer.append(t)
    assert len(content) == len(answer)
    for i, c in enumerate(content):
        assert c.token == bundle.tokenizer.decode([answer[i]], skip_special_tokens=False)
        assert c.logprob == pytest.approx(trace[i][1], abs=1e-5)
        assert len(c.top_logprobs) == 2 and c.bytes == list(c.token.encode())
        assert c.model_extra["llada"]["step"] == trace[i][0]
    streamed = []
    for chunk in cl.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            if ch.logprobs is not None and ch.logprobs.content:
                streamed += ch.logprobs.content
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]


def test_no_logprobs_field_is_null(client):
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4)
    assert out.choices[0].logprobs is None


@pytest.mark.parametrize("body,param", [
    (dict(logprobs=21), "logprobs"),
    (dict(logprobs=-1), "logprobs"),
    (dict(top_p=0.0, temperature=1.0), "top_p"),
    (dict(top_p=1.5, temperature=1.0), "top_p"),
    (dict(min_p=2.0, temperature=1.0), "min_p"),
    (dict(top_k=-5, temperature=1.0), "top_k"),
])
def test_bad_logprobs_and_filters_are_400(server, body, param):
    r = post(server.url, "/v1/completions", dict(prompt=PROMPT, max_tokens=4, **body))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_filters_change_sampled_requests_only(server, golden):
    base = dict(prompt=PROMPT, max_tokens=8, block_length=8, steps=8)
    greedy = post(server.url, "/v1/completions", dict(base, top_k=3, top_p=0.5)).json()
    plain = post(server.url, "/v1/completions", base).json()
    assert greedy["choices"][0]["token_ids"] == plain["choices"][0]["token_ids"]
    hot = dict(base, temperature=1.0, seed=11, ban_eos=True)
    filtered = post(server.url, "/v1/completions", dict(hot, top_k=2)).json()["choices"][0]["token_ids"]
    sp = SamplingParams(gen_length=8, block_length=8, steps=8, temperature=1.0, seed=11, ban_eos=True, top_k=2)
    want, _ = reference_generate(golden.model, PROMPT, sp, golden.special.mask, golden.special.stop)
    assert filtered == want


def test_suffix_is_fixed_context(server, golden):
    suffix_ids = [60, 61, 62]
    r = post(server.url, "/v1/completions", dict(prompt=PROMPT, suffix=suffix_ids, max_tokens=6, ban_eos=True))
    assert r.status_code == 400  # suffix is text in OpenAI's API; ids go through the infill form
    # the infill form with ids: markers where the span goes, the suffix after it
    mask = golden.special.mask
    body = dict(prompt=PROMPT + [mask] * 6 + suffix_ids, infill=True, ban_eos=True)
    out = post(server.url, "/v1/completions", body).json()
    ch = out["choices"][0]
    sp = SamplingParams(gen_length=6, steps=6, ban_eos=True)
    want, _ = reference_generate(golden.model, PROMPT, sp, mask, golden.special.stop, suffix_ids=suffix_ids)
    assert ch["token_ids"] == want
    assert ch["llada"]["gaps"] == [{"index": 0, "position": len(PROMPT), "token_ids": want,
                                    "text": "".join(f"<{t}>" for t in want)}]


def test_infill_several_gaps_with_ids(server, golden):
    mask = golden.special.mask
    prompt = [11, mask, mask, 12, 13, mask, 14, mask, mask, mask, 15]
    out = post(server.url, "/v1/completions", dict(prompt=prompt, infill=True)).json()
    ch = out["choices"][0]
    span = prompt[1:10]
    want, _ = reference_generate(golden.model, [11], SamplingParams(gen_length=9, steps=6), mask,
                                 golden.special.stop, suffix_ids=[15], span_ids=span)
    assert ch["token_ids"] == want
    gaps = ch["llada"]["gaps"]
    assert [(g["position"], len(g["token_ids"])) for g in gaps] == [(1, 2), (5, 1), (7, 3)]
    assert [g["token_ids"] for g in gaps] == [want[0:2], want[4:5], want[6:9]]
    filled = [11] + want + [15]
    assert ch["text"] == "".join(f"<{t}>" for t in filled)


@pytest.mark.parametrize("body,param", [
    (dict(prompt=PROMPT, infill=True), "prompt"),                       # nothing marked
    (dict(prompt=PROMPT + [300], infill=True, stream=True), "stream"),
    (dict(prompt=PROMPT + [300], infill=True, logprobs=1), "logprobs"),
    (dict(prompt=PROMPT + [300], infill=True, suffix="x"), "suffix"),
    (dict(prompt=PROMPT + [300], infill=True, steps=5), "steps"),
])
def test_infill_refusals(server, body, param):
    r = post(server.url, "/v1/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_text_infill_and_suffix_on_a_tokenizer_model(chat):
    bundle, srv, cl = chat
    tok = bundle.tokenizer
    out = cl.completions.create(model="chat", prompt="the quick <|mdm_mask|><|mdm_mask|> fox", max_tokens=None,
                                extra_body={"infill": True})
    ch = out.choices[0]
    gaps = ch.model_extra["llada"]["gaps"]
    assert len(gaps) == 1 and len(gaps[0]["token_ids"]) == 2
    assert ch.text.startswith("the quick") and ch.text.endswith(" fox")
    sfx = cl.completions.create(model="chat", prompt="the quick", suffix=" over the lazy dog", max_tokens=4,
                                extra_body={"ban_eos": True})
    ids = sfx.choices[0].model_extra["token_ids"]
    want, _ = reference_generate(bundle.model, tok.encode("the quick"), SamplingParams(gen_length=4, steps=4,
                                 ban_eos=True), bundle.special.mask, bundle.special.stop,
                                 suffix_ids=tok.encode(" over the lazy dog"))
    assert ids == [t for t in want][:len(ids)]
