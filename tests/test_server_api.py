"""The OpenAI-compatible API over a live uvicorn server on the golden checkpoint (token-id prompts)."""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import openai
import pytest

from sampler.generate import cut_answer, generate
from sampler.params import SamplingParams
from test_server_helpers import metric, metrics, post, sse_events

PROMPT = [5, 17, 42, 7, 99, 3]


@pytest.fixture(scope="module")
def server(bundle, serve):
    return serve(bundle, max_batch_size=32, max_batch_tokens=4096, max_queue=256)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def complete(server, **body):
    body.setdefault("model", "tiny")
    r = post(server.url, "/v1/completions", body)
    assert r.status_code == 200, r.text
    return r.json()


def test_health_ready_models(server, client):
    assert httpx.get(server.url + "/health").status_code == 200
    r = httpx.get(server.url + "/ready")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_completion_equals_the_sampler(server, bundle):
    out = complete(server, prompt=PROMPT, max_tokens=16, block_length=8, steps=8)
    (choice,) = out["choices"]
    ref = generate(bundle, [PROMPT], SamplingParams(gen_length=16, block_length=8, steps=8))[0]
    want = cut_answer(ref.gen_ids, bundle.special.stop)
    assert choice["token_ids"] == want
    assert choice["text"] == "".join(f"<{t}>" for t in want)
    assert choice["finish_reason"] == ("length" if len(want) == 16 else "stop")
    assert out["usage"] == {"prompt_tokens": len(PROMPT), "completion_tokens": len(want),
                            "total_tokens": len(PROMPT) + len(want), "forwards": ref.nfe}
    assert out["object"] == "text_completion" and out["model"] == "tiny"


def test_max_tokens_rounds_up_to_the_block_and_cuts(server, bundle):
    out = complete(server, prompt=PROMPT, max_tokens=5, block_length=4)
    ref = generate(bundle, [PROMPT], SamplingParams(gen_length=8, block_length=4, steps=8))[0]
    want = cut_answer(ref.gen_ids, bundle.special.stop)[:5]
    assert out["choices"][0]["token_ids"] == want


@pytest.mark.parametrize("extra", [
    {},
    {"block_length": 4, "steps": 8},
    {"threshold": 0.3, "block_length": 8},
    {"cache": "prefix", "block_length": 4, "steps": 16},
    {"cache": "dual", "block_length": 8, "threshold": 0.5},
    {"cfg_scale": 1.0, "block_length": 8, "steps": 8},
    {"temperature": 0.8, "seed": 11},
])
def test_stream_deltas_concatenate_to_the_answer(client, extra):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=16, extra_body=extra)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert not chunks[-1].choices


def test_text_is_sent_as_it_becomes_final(server):
    events = sse_events(server.url + "/v1/completions",
                        {"prompt": PROMPT, "max_tokens": 32, "block_length": 8, "stream": True, "ban_eos": True})
    assert events[-1] == "[DONE]"
    texts = [e["choices"][0]["text"] for e in events[:-1] if e["choices"][0]["text"]]
    assert len(texts) >= 2  # several pieces, not one at the end


def test_n_and_seeds(client):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=16, temperature=1.5, seed=1234,
              extra_body={"block_length": 8, "ban_eos": True})
    a = client.completions.create(n=3, **kw)
    b = client.completions.create(n=3, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # reproducible
    assert len({c.text for c in a.choices}) > 1  # sub-requests draw different seeds
    one = client.completions.create(n=1, **kw)
    assert one.choices[0].text == a.choices[0].text
    other = client.completions.create(n=1, **dict(kw, seed=4321))
    assert other.choices[0].text != a.choices[0].text
    streamed = {}
    for c in client.completions.create(n=3, stream=True, **kw):
        for ch in c.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + ch.text
    assert [streamed[i] for i in range(3)] == [c.text for c in a.choices]


def test_prompt_lists_and_batches_of_prompts(server):
    out = complete(server, prompt=[PROMPT, [9, 8, 7]], max_tokens=8, n=2)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    alone = complete(server, prompt=[9, 8, 7], max_tokens=8)
    assert out["choices"][2]["text"] == alone["choices"][0]["text"]
    assert out["usage"]["prompt_tokens"] == len(PROMPT) + 3


def test_stop_strings(client):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=16, extra_body={"block_length": 8, "ban_eos": True})
    full = client.completions.create(**kw).choices[0]
    pieces = full.text.split(">")
    stop = pieces[3] + ">"  # the 4th token's text
    cut = full.text[:full.text.index(stop)]
    got = client.completions.create(stop=[stop, "never-appears"], **kw)
    assert got.choices[0].text == cut and got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens == cut.count("<")
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, stop=stop, **kw))
    assert streamed == cut


def test_per_step_stream(server):
    body = {"prompt": PROMPT, "max_tokens": 16, "block_length": 8, "steps": 8, "stream_steps": True}
    events = sse_events(server.url + "/v1/completions", body)
    whole = complete(server, **{k: v for k, v in body.items() if k != "stream_steps"})["choices"][0]
    assert events[-1] == "[DONE]"
    start = events[0]
    assert start["object"] == "diffusion.start" and start["gen_length"] == 16 and start["block_length"] == 8
    steps = [e for e in events if isinstance(e, dict) and e["object"] == "diffusion.step"]
    assert [e["step"] for e in steps] == list(range(1, 9))
    masks = [e["masks_remaining"] for e in steps]
    assert masks == sorted(masks, reverse=True) and masks[-1] == 0
    assert [e["block"] for e in steps] == [0] * 4 + [1] * 4
    canvas = [None] * 16
    for e in steps:
        assert len(e["positions"]) == len(e["token_ids"]) == len(e["tokens"]) == len(e["confidences"]) == 2
        for p, t, c in zip(e["positions"], e["token_ids"], e["confidences"]):
            assert canvas[p] is None and 0 < c <= 1
            canvas[p] = t
    assert None not in canvas
    done = next(e for e in events if isinstance(e, dict) and e["object"] == "diffusion.done")
    assert done["gen_ids"] == canvas
    stops = set(server.app.state.service.stop_ids)
    cut = []
    for t in canvas:
        if t in stops:
            break
        cut.append(t)
    assert cut == whole["token_ids"] and done["text"] == whole["text"]
    assert done["finish_reason"] == whole["finish_reason"]


def _mixed_requests():
    reqs = []
    for i in range(32):
        body = {"prompt": [(i * 7 + j) % 290 for j in range(3 + i % 9)], "max_tokens": [4, 8, 12, 16, 24][i % 5]}
        body["block_length"] = [4, 8, None][i % 3] or body["max_tokens"]
        if body["max_tokens"] % body["block_length"]:
            body["block_length"] = body["max_tokens"]
        if i % 4 == 1:
            body["threshold"] = 0.4
        if i % 4 == 2:
            body["cache"] = "prefix"
        if i % 6 == 5:
            body["cfg_scale"] = 0.5
            body.pop("cache", None)
        if i % 5 == 3:
            body["temperature"], body["seed"] = 0.7, i
        if i % 7 == 0:
            body["n"] = 2
        reqs.append(body)
    return reqs


def test_32_concurrent_requests_equal_each_alone(server):
    reqs = _mixed_requests()
    before = metrics(server.url)
    with cf.ThreadPoolExecutor(32) as ex:
        together = list(ex.map(lambda b: post(server.url, "/v1/completions", b, timeout=120), reqs))
    assert all(r.status_code == 200 for r in together), [r.text for r in together if r.status_code != 200]
    after = metrics(server.url)
    # They were batched: the mean batch size over these steps is above 1.
    steps = metric(after, "llada_batch_size_count") - metric(before, "llada_batch_size_count")
    rows = metric(after, "llada_batch_size_sum") - metric(before, "llada_batch_size_sum")
    assert rows / steps > 1.5
    for body, r in zip(reqs, together):
        alone = post(server.url, "/v1/completions", body)
        assert alone.status_code == 200
        assert [c["token_ids"] for c in r.json()["choices"]] == [c["token_ids"] for c in alone.json()["choices"]], body


def test_metrics_move_with_the_requests(server):
    before = metrics(server.url)
    outs = [complete(server, prompt=PROMPT[: 2 + i], max_tokens=8) for i in range(3)]
    bad = post(server.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 0})
    assert bad.status_code == 400
    after = metrics(server.url)

    def d(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert d("llada_requests_total", endpoint="/v1/completions", status=200) == 3
    assert d("llada_requests_total", endpoint="/v1/completions", status=400) == 1
    assert d("llada_prompt_tokens_total") == sum(o["usage"]["prompt_tokens"] for o in outs)
    assert d("llada_generated_tokens_total") == sum(o["usage"]["completion_tokens"] for o in outs)
    assert d("llada_request_duration_seconds_count", endpoint="/v1/completions") == 3
    assert d("llada_time_to_first_block_seconds_count") == 3
    assert d("llada_tokens_per_forward_count") == 3
    assert d("llada_forwards_total") >= 1 and d("llada_step_duration_seconds_count") == d("llada_forwards_total")
    assert metric(after, "llada_queue_length") == 0 and metric(after, "llada_running_requests") == 0
    assert metric(after, "llada_step_failures_total") == 0
    assert metric(after, "llada_gpu_memory_bytes") == 0  # CPU


def test_load_script_reports_throughput_and_latency(server):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "bench" / "load.py"), "--url", server.url, "--clients", "4",
                        "--requests", "12", "--time-limit", "60", "--prompt-ids", "1,2,3", "--max-tokens", "8",
                        "--stream", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] == 12 and out["errors"] == {} and out["requests_per_s"] > 0
    assert out["latency_s"]["p50"] <= out["latency_s"]["p99"] and out["first_chunk_s"]["p50"] is not None


def test_per_step_stream_with_n_and_threshold(server):
    body = {"prompt": PROMPT, "max_tokens": 16, "block_length": 8, "threshold": 0.3, "n": 2,
            "temperature": 1.0, "seed": 9, "stream_steps": True}
    events = [e for e in sse_events(server.url + "/v1/completions", body) if isinstance(e, dict)]
    whole = complete(server, **{k: v for k, v in body.items() if k != "stream_steps"})
    for i in (0, 1):
        steps = [e for e in events if e["object"] == "diffusion.step" and e["index"] == i]
        assert steps[-1]["masks_remaining"] == 0
        assert sum(len(e["positions"]) for e in steps) == 16
        assert len(steps) <= 16 and steps[-1]["nfe"] == len(steps)
        done = next(e for e in events if e["object"] == "diffusion.done" and e["index"] == i)
        assert done["token_ids"] == whole["choices"][i]["token_ids"]


def test_eos_bias_through_the_api(server, bundle):
    """eos_bias reaches the sampler: the ids equal generate's with the same bias (EOS id 301 on the
    golden model), a bias of -100 keeps EOS out (the answer runs to max_tokens), +100 makes the first
    position EOS (an empty answer), and a value out of range is a 400 naming the field."""
    body = {"model": "tiny", "prompt": [250, 251, 252], "max_tokens": 16, "block_length": 8, "steps": 16}
    for bias in (-100, -2.5, 0, 100):
        r = post(server.url, "/v1/completions", dict(body, eos_bias=bias))
        assert r.status_code == 200, r.text
        ch = r.json()["choices"][0]
        sp = SamplingParams(gen_length=16, block_length=8, steps=16, eos_bias=float(bias))
        want = cut_answer(generate(bundle, [[250, 251, 252]], sp)[0].gen_ids, bundle.special.stop, 16)
        assert ch["token_ids"] == want
        if bias == -100:
            assert len(want) == 16 and ch["finish_reason"] == "length"
        if bias == 100:
            assert want == [] and ch["finish_reason"] == "stop"
    for bad in (-100.5, 101):
        r = post(server.url, "/v1/completions", dict(body, eos_bias=bad))
        assert r.status_code == 400 and r.json()["error"]["param"] == "eos_bias", r.text
    r = post(server.url, "/v1/completions", dict(body, eos_bias="1"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "eos_bias"
