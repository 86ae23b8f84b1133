"""The embedded default model: loads, tokenizes, renders its chat template, answers held-out prompts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "training"))

from sampler.generate import cut_answer, generate  # noqa: E402
from sampler.params import SamplingParams  # noqa: E402
from tasks import TASKS, TaskSet, is_held_out  # noqa: E402
from weights import default_model_path  # noqa: E402
from weights.checkpoint import load_checkpoint  # noqa: E402

MODEL = default_model_path()


@pytest.fixture(scope="module")
def bundle():
    torch.set_num_threads(2)
    return load_checkpoint(MODEL, device="cpu", dtype="float32")


def test_files_in_hugging_face_layout():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json", "README.md"):
        assert (MODEL / name).is_file(), name
    cfg = json.loads((MODEL / "config.json").read_text())
    assert cfg["model_type"] == "llada" and cfg["architectures"] == ["LLaDAModelLM"]
    assert (MODEL / "model.safetensors").stat().st_size < 30 * 2**20


def test_loads_through_load_checkpoint(bundle):
    cfg = bundle.config
    assert 5e5 < cfg.num_parameters < 2e7
    tok = bundle.tokenizer
    assert tok is not None
    assert bundle.special.mask == tok.token_to_id("<|mdm_mask|>")
    assert bundle.special.eos == tok.token_to_id("<|endoftext|>")
    assert bundle.special.eot == tok.token_to_id("<|eot_id|>")
    assert bundle.special.bos == tok.token_to_id("<|startoftext|>")


@pytest.mark.parametrize("text", ["Sort the list: q b x a", "What is 47 + 38?", "Hello!",
                                  "Ünïcödé ☃ and\ttabs\nnewlines  spaces"])
def test_tokenizer_round_trips(bundle, text):
    tok = bundle.tokenizer
    assert tok.decode(tok.encode(text)) == text


def test_digits_are_single_tokens(bundle):
    tok = bundle.tokenizer
    assert len(tok.encode("12345")) == 5


def test_chat_template_renders_llama3_shape(bundle):
    tok = bundle.tokenizer
    text = tok.render_chat([{"role": "user", "content": " Hi "}], add_generation_prompt=True)
    assert text == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    no_prompt = tok.render_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                add_generation_prompt=False)
    assert no_prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nb<|eot_id|>")
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert ids[0] == bundle.special.bos
    assert ids.count(tok.token_to_id("<|start_header_id|>")) == 2


def test_held_out_split_never_overlaps_training():
    ts = TaskSet()
    held = ts.heldout(30)
    stream = ts.stream(seed=0, split="train")
    train_keys = {(ex.task, ex.key) for _, ex in zip(range(5000), stream)}
    for name, exs in held.items():
        assert exs, name
        for ex in exs:
            assert is_held_out(name, ex.key)
            assert (name, ex.key) not in train_keys
    assert {t.name for t in TASKS if t.evaluate} == set(held)


def test_answers_held_out_prompts_through_the_sampler(bundle):
    held = TaskSet().heldout(4)
    exs = [ex for name in ("copy", "reverse", "sort", "count", "first_last") for ex in held[name]]
    tok = bundle.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": ex.prompt}]) for ex in exs]
    gens = generate(bundle, prompts, SamplingParams(gen_length=16, steps=16))
    got = [tok.decode(cut_answer(g.gen_ids, bundle.special.stop)).strip() for g in gens]
    right = sum(g == ex.answer for g, ex in zip(got, exs))
    assert right >= 0.8 * len(exs), list(zip([e.prompt for e in exs], got))
    assert all(g.nfe == 16 for g in gens)


def test_fills_gaps_in_held_out_alphabet_runs(bundle):
    """The infill path on the default model: held-out runs with every other inner letter masked in
    the answer canvas; the model fills most of them (the evaluation table reports the rate)."""
    tok, mask = bundle.tokenizer, bundle.special.mask
    exs = TaskSet().heldout(20)["alphabet"]
    prompts, spans = [], []
    for ex in exs:
        run = ex.answer.split()
        prompts.append(tok.apply_chat_template([{"role": "user", "content": f"Letters from {run[0]} to {run[-1]}"}]))
        ids = tok.encode(ex.answer)
        spans.append([mask if 0 < i < len(ids) - 1 and i % 2 else t for i, t in enumerate(ids)] + [bundle.special.eot])
    params = [SamplingParams(gen_length=len(s), steps=s.count(mask)) for s in spans]
    gens = generate(bundle, prompts, params, spans=spans)
    for g, s in zip(gens, spans):
        assert [t for t, x in zip(g.gen_ids, s) if x != mask] == [x for x in s if x != mask]
    right = sum(tok.decode(g.gen_ids[:-1]) == ex.answer for g, ex in zip(gens, exs))
    assert len(exs) >= 8 and right >= 0.5 * len(exs), (right, len(exs))
