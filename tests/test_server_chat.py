"""Chat and text prompts through the openai client, on a checkpoint with a tokenizer and a chat template
(a tiny random-weight model built for the test; the answers are gibberish but deterministic)."""

from __future__ import annotations

import openai
import pytest

from sampler.generate import cut_answer, generate
from sampler.params import SamplingParams
from sampler.scheduler import EngineConfig
from server.app import create_app
from test_server_helpers import post, sse_events
from weights.checkpoint import load_checkpoint

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def server(chat_bundle, serve):
    return serve(chat_bundle, "tiny-chat")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


def test_chat_matches_the_sampler_on_the_template(client, chat_bundle):
    out = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=16,
                                         extra_body={"block_length": 8})
    ids = chat_bundle.tokenizer.apply_chat_template(MESSAGES)
    ref = generate(chat_bundle, [ids], SamplingParams(gen_length=16, block_length=8, steps=16))[0]
    want = cut_answer(ref.gen_ids, chat_bundle.special.stop)
    msg = out.choices[0].message
    assert msg.role == "assistant" and msg.content == chat_bundle.tokenizer.decode(want)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(want)
    assert out.object == "chat.completion"


def test_chat_stream_equals_whole(client):
    for extra in ({}, {"block_length": 4, "threshold": 0.2}, {"temperature": 1.0, "seed": 7}):
        kw = dict(model="tiny-chat", messages=MESSAGES, max_tokens=24, extra_body=extra)
        whole = client.chat.completions.create(**kw)
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
            [whole.choices[0].finish_reason]
        assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_text_completion_and_stop_string(client, chat_bundle):
    kw = dict(model="tiny-chat", prompt="the quick brown", max_tokens=24, extra_body={"ban_eos": True})
    full = client.completions.create(**kw).choices[0].text
    assert full
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = full[:full.index(stop)]
    got = client.completions.create(stop=stop, **kw)
    assert got.choices[0].text == cut and got.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, stop=stop, **kw))
    assert streamed == cut
    chat_n = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=8, n=2,
                                            temperature=1.0, seed=3)
    assert [c.index for c in chat_n.choices] == [0, 1]


def test_chat_per_step_stream_has_text_pieces(server, chat_bundle):
    body = {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 16, "block_length": 8,
            "stream_steps": True}
    events = sse_events(server.url + "/v1/chat/completions", body)
    steps = [e for e in events if isinstance(e, dict) and e.get("object") == "diffusion.step"]
    assert steps[-1]["masks_remaining"] == 0
    for e in steps:
        assert e["tokens"] == [chat_bundle.tokenizer.decode([t], skip_special_tokens=False) for t in e["token_ids"]]
    done = next(e for e in events if isinstance(e, dict) and e.get("object") == "diffusion.done")
    whole = post(server.url, "/v1/chat/completions", {k: v for k, v in body.items() if k != "stream_steps"})
    assert done["text"] == whole.json()["choices"][0]["message"]["content"]


def test_chat_errors(server):
    r = post(server.url, "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = post(server.url, "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hello"}, {"type": "text", "text": " world"}]}], "max_tokens": 4})
    assert r.status_code == 200


def test_default_model_serves_chat_out_of_the_box(live_server):
    from weights import default_model_path

    path = default_model_path()
    if not (path / "config.json").is_file():
        pytest.skip("the embedded default model is not in weights/default yet")
    b = load_checkpoint(path, device="cpu", dtype="float32")
    srv = live_server(create_app(b, EngineConfig(max_batch_tokens=4096)))
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
    name = client.models.list().data[0].id
    msgs = [{"role": "user", "content": "Reverse the list: a b c d"}]
    out = client.chat.completions.create(model=name, messages=msgs, max_tokens=32)
    ids = b.tokenizer.apply_chat_template(msgs)
    ref = generate(b, [ids], SamplingParams(gen_length=32, block_length=32, steps=32))[0]
    assert out.choices[0].message.content == b.tokenizer.decode(cut_answer(ref.gen_ids, b.special.stop))
    assert out.choices[0].finish_reason == "stop"  # the model ends its answer
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=name, messages=msgs, max_tokens=32, stream=True) if c.choices)
    assert streamed == out.choices[0].message.content


def test_chat_honours_eos_bias(server, chat_bundle):
    """The chat endpoint takes eos_bias too: its ids equal the sampler's with the same bias."""
    messages = [{"role": "user", "content": "hello there"}]
    prompt = chat_bundle.tokenizer.chat_ids(messages, add_generation_prompt=True)
    for bias in (-100.0, 100.0):
        r = post(server.url, "/v1/chat/completions", {"messages": messages, "max_tokens": 8, "block_length": 8,
                                                      "eos_bias": bias})
        assert r.status_code == 200, r.text
        sp = SamplingParams(gen_length=8, block_length=8, eos_bias=bias)
        ids = cut_answer(generate(chat_bundle, [prompt], sp)[0].gen_ids, chat_bundle.special.stop, 8)
        ch = r.json()["choices"][0]
        assert ch["message"]["content"] == chat_bundle.tokenizer.decode(ids, skip_special_tokens=True)
        assert ch["finish_reason"] == ("length" if bias < 0 else "stop")
        assert len(ids) == (8 if bias < 0 else 0)
