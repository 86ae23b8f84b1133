"""The API on LLaDA2.x and LLaDA-MoE checkpoints: the LLaDA2 parameters, the released defaults of
the loaded checkpoint, edits in the per-step stream, the checkpoint's own chat template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from sampler.generate import cut_answer, generate
from sampler.params import LLADA21_DEFAULTS, SamplingParams
from sampler.scheduler import EngineConfig
from server.app import create_app
from test_server_helpers import post, sse_events
from weights.checkpoint import load_checkpoint

from golden_sets import GOLDEN_ROOT as SHARED
PROMPT = [5, 17, 42, 7, 99, 3, 250, 31, 8, 64, 12]
# The LLaDA2 prompt format, as the released tokenizers' chat template renders it.
TEMPLATE = ("{% for m in messages %}<role>{{ m['role'] | upper | replace('USER', 'HUMAN') }}</role>"
            "{{ m['content'] }}<|role_end|>{% endfor %}"
            "{% if add_generation_prompt %}<role>ASSISTANT</role>{% endif %}")


@pytest.fixture(scope="module")
def llada21_dir(tmp_path_factory):
    """The golden LLaDA2 checkpoint as a 2.1 release (its remote code has token editing) with a
    word-level tokenizer holding the LLaDA2 special tokens and chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path_factory.mktemp("l21") / "tiny-llada2.1"
    shutil.copytree(SHARED / "tiny-llada2", d)
    for f in d.iterdir():
        f.chmod(0o644)
    (d / "modeling_llada2_moe.py").write_text("def generate(self, editing_threshold=0.9): ...\n")
    vocab = {f"w{i}": i for i in range(480)}
    vocab.update({"<role>": 480, "</role>": 481, "SYSTEM": 482, "HUMAN": 483, "ASSISTANT": 484,
                  "<|role_end|>": 485, "<|endoftext|>": 496, "<|mask|>": 499})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.add_special_tokens(["<role>", "</role>", "<|role_end|>", "<|endoftext|>", "<|mask|>"])
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "chat_template": TEMPLATE}))
    return d


@pytest.fixture(scope="module")
def l20(live_server):
    bundle = load_checkpoint(SHARED / "tiny-llada2", "cpu", "float32")
    return bundle, live_server(create_app(bundle, EngineConfig(max_batch_tokens=2048), served_model_name="l20"))


@pytest.fixture(scope="module")
def l21(llada21_dir, live_server):
    bundle = load_checkpoint(llada21_dir, "cpu", "float32")
    return bundle, live_server(create_app(bundle, EngineConfig(max_batch_tokens=2048), served_model_name="l21"))


def complete(server, **body):
    r = post(server.url, "/v1/completions", body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_models_endpoint_names_family_and_decoding(l20, l21):
    for (_, srv), decoding in ((l20, "llada2.0"), (l21, "llada2.1")):
        card = httpx.get(srv.url + "/v1/models").json()["data"][0]["llada"]
        assert card["family"] == "llada2" and card["decoding"] == decoding


def test_defaults_are_the_released_generate(l20, l21):
    """No diffusion fields: LLaDA2.0's generate defaults (block 32, steps 32, threshold 0.95) on a 2.0
    checkpoint; plus editing (0.9, 16 post steps) on a 2.1 one. max_tokens is gen_length exactly."""
    for (bundle, srv), extra in ((l20, {}), (l21, dict(editing_threshold=0.9, max_post_steps=16))):
        got = complete(srv, prompt=PROMPT, max_tokens=20)
        ref = generate(bundle, [PROMPT], SamplingParams(gen_length=20, block_length=32, steps=32,
                                                        threshold=0.95, **extra))[0]
        assert got["token_ids"] == cut_answer(ref.gen_ids, bundle.special.stop, 20)
    assert LLADA21_DEFAULTS["editing_threshold"] == 0.9


def test_llada2_parameters_equal_the_sampler(l20):
    bundle, srv = l20
    body = dict(prompt=PROMPT, max_tokens=21, block_length=8, steps=4, threshold=0.5, minimal_topk=2,
                eos_early_stop=True, editing_threshold=0.3, max_post_steps=2, num_to_transfer=2)
    got = complete(srv, **body)
    sp = SamplingParams(gen_length=21, block_length=8, steps=4, threshold=0.5, minimal_topk=2,
                        eos_early_stop=True, editing_threshold=0.3, max_post_steps=2, num_to_transfer=2)
    assert got["token_ids"] == cut_answer(generate(bundle, [PROMPT], sp)[0].gen_ids, bundle.special.stop, 21)


def test_step_stream_reports_edits(l21):
    bundle, srv = l21
    body = {"prompt": PROMPT, "max_tokens": 24, "block_length": 8, "threshold": 0.5,
            "editing_threshold": 0.05, "stream_steps": True}
    events = sse_events(srv.url + "/v1/completions", body)
    steps = [e for e in events if isinstance(e, dict) and e.get("object") == "diffusion.step"]
    canvas = [None] * 24
    edits = 0
    for e in steps:
        for p, t in zip(e["positions"], e["token_ids"]):
            canvas[p] = t
        assert len(e["edited_positions"]) == len(e["edited_token_ids"]) == len(e["edited_tokens"])
        for p, t in zip(e["edited_positions"], e["edited_token_ids"]):
            assert canvas[p] is not None and canvas[p] != t
            canvas[p] = t
            edits += 1
    assert edits > 0
    (done,) = [e for e in events if isinstance(e, dict) and e.get("object") == "diffusion.done"]
    assert done["token_ids"] and canvas[:len(done["token_ids"])] == done["token_ids"]


@pytest.mark.parametrize("body,param", [
    ({"editing_threshold": 1.5}, "editing_threshold"), ({"minimal_topk": 0}, "minimal_topk"),
    ({"cfg_scale": 1.0}, "cfg_scale"), ({"max_post_steps": -1}, "max_post_steps"),
    ({"num_to_transfer": "2"}, "num_to_transfer"), ({"remasking": "random"}, "remasking"),
    ({"logprobs": 2}, "logprobs"), ({"temperature": 1.0, "top_p": 0.5}, "top_p"),
    ({"infill": True, "prompt": [5, 499, 7], "max_tokens": None}, "infill"), ({"eos_bias": -1.0}, "eos_bias"),
])
def test_bad_llada2_parameters_are_400s(l20, body, param):
    _, srv = l20
    r = post(srv.url, "/v1/completions", dict(dict(prompt=PROMPT, max_tokens=8), **body))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_llada2_parameters_are_refused_on_other_families(live_server):
    bundle = load_checkpoint(SHARED / "tiny-llada-moe", "cpu", "float32")
    srv = live_server(create_app(bundle, EngineConfig(max_batch_tokens=1024), served_model_name="moe"))
    r = post(srv.url, "/v1/completions", dict(prompt=PROMPT, max_tokens=8, editing_threshold=0.5))
    assert r.status_code == 400 and r.json()["error"]["param"] == "editing_threshold"
    # LLaDA-MoE runs the LLaDA sampler with its usual fields.
    got = complete(srv, prompt=PROMPT, max_tokens=8, block_length=4, steps=8, cfg_scale=0.5)
    sp = SamplingParams(gen_length=8, block_length=4, steps=8, cfg_scale=0.5)
    assert got["token_ids"] == cut_answer(generate(bundle, [PROMPT], sp)[0].gen_ids, bundle.special.stop, 8)


def test_chat_uses_the_checkpoints_template_and_role_end_stops(l21):
    bundle, srv = l21
    tok = bundle.tokenizer
    msgs = [{"role": "system", "content": "SYSTEM"}, {"role": "user", "content": "w7 w8 w9"}]
    ids = tok.apply_chat_template(msgs)
    assert ids[:3] == [480, 482, 481] and ids[-3:] == [480, 484, 481]
    assert 485 in bundle.special.stop and 496 in bundle.special.stop
    r = post(srv.url, "/v1/chat/completions", dict(messages=msgs, max_tokens=16, threshold=0.5))
    assert r.status_code == 200, r.text
    sp = SamplingParams(gen_length=16, threshold=0.5, editing_threshold=0.9, max_post_steps=16)
    want = cut_answer(generate(bundle, [ids], sp)[0].gen_ids, bundle.special.stop, 16)
    assert r.json()["choices"][0]["message"]["content"] == tok.decode(want)
