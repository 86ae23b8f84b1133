"""Structured output: grammar-constrained unmasking (sampler.constraint, the frontier rule of
sampler.llada_batch). Answers are valid by construction whatever the model: checked on the embedded
default model and on the golden tiny checkpoint (random weights) with the tests' tiny tokenizer."""

from __future__ import annotations

import json
import re
import shutil

import jsonschema
import pytest
import torch

from bench.bench_constrained import PERSON
from sampler.constraint import ConstraintError, GrammarVocab, compile_constraint
from sampler.device_step import Bucket, Layout, apply_grammar
from sampler.generate import cut_answer, generate
from sampler.params import ParamError, SamplingParams
from weights import default_model_path
from weights.checkpoint import load_checkpoint

SCORES = {
    "type": "object",
    "properties": {
        "scores": {"type": "array", "items": {"type": "number", "minimum": -10, "maximum": 10,
                                                "multipleOf": 0.25},
                   "minItems": 1, "maxItems": 3},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["scores", "ok", "tags"], "additionalProperties": False,
}
NUMBERS = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
           "minItems": 2, "maxItems": 5}
SCHEMAS = [PERSON, SCORES, NUMBERS]
REGEXES = [r"\(\d{3}\) \d{3}-\d{4}", r"[a-z]{2,5}@[a-z]{3}\.(com|org)"]
CHOICES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def default_bundle():
    return load_checkpoint(default_model_path(), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def golden_bundle(golden_dir, tmp_path_factory):
    """The golden checkpoint's weights with the tests' tiny tokenizer (the set ships none)."""
    from ckpt_factory import add_tokenizer

    path = tmp_path_factory.mktemp("golden-tok") / "tiny-llada"
    shutil.copytree(golden_dir, path)
    add_tokenizer(path)
    return load_checkpoint(path, device="cpu", dtype="float32")


def prompt_of(bundle, text="sort: d b a"):
    return bundle.tokenizer.chat_ids([{"role": "user", "content": text}])


def params_grid(constraints, n, gen_length):
    """n requests per constraint: temperatures 0 and 1, seeds, and three decoding modes."""
    out = []
    for c in constraints:
        for i in range(n):
            mode = i % 3
            out.append(SamplingParams(
                gen_length=gen_length, temperature=float(i % 2), seed=i, constraint=c,
                block_length=gen_length // 4 if mode else None,
                threshold=0.9 if mode == 2 else None,
                cache="dual" if mode == 2 else "none"))
    return out


def answers(bundle, params, prompt):
    gens = generate(bundle, [prompt] * len(params), params)
    stops = set(bundle.special.stop)
    out = []
    for g in gens:
        assert any(t in stops for t in g.gen_ids), "the answer must end where the grammar accepts"
        ids = cut_answer(g.gen_ids, stops)
        out.append((ids, bundle.tokenizer.decode(ids), g))
    return out


def replay_accepts(constraint, ids) -> bool:
    """An independent check at token level: a fresh matcher takes every id and accepts at the end."""
    state = constraint.start()
    for t in ids:
        if not state.accepts(t):
            return False
        state.commit(t)
    return state.accepting


@pytest.mark.parametrize("which", ["default", "golden"])
def test_json_schema_answers_validate(which, request):
    bundle = request.getfixturevalue(f"{which}_bundle")
    vocab = GrammarVocab.of(bundle)
    cons = [compile_constraint("json_schema", s, vocab, field="response_format") for s in SCHEMAS]
    params = params_grid(cons, 68, 128)  # 204 requests
    results = answers(bundle, params, prompt_of(bundle))
    assert len(results) >= 200
    temps = set()
    for (ids, text, _), p in zip(results, params):
        schema = SCHEMAS[cons.index(p.constraint)]
        jsonschema.validate(json.loads(text), schema)
        assert replay_accepts(p.constraint, ids)
        temps.add(p.temperature)
    assert temps == {0.0, 1.0}
    # sampling at temperature 1 explores: not every answer of a schema is the same
    assert len({text for (_, text, _), p in zip(results, params) if p.temperature == 1}) > 10


@pytest.mark.parametrize("which", ["default", "golden"])
def test_regex_and_choice_always_match(which, request):
    bundle = request.getfixturevalue(f"{which}_bundle")
    vocab = GrammarVocab.of(bundle)
    cons = [compile_constraint("regex", r, vocab, field="guided_regex") for r in REGEXES]
    cons.append(compile_constraint("choice", CHOICES, vocab, field="guided_choice"))
    params = params_grid(cons, 20, 32)
    for (ids, text, _), p in zip(answers(bundle, params, prompt_of(bundle)), params):
        if p.constraint.kind == "choice":
            assert text in CHOICES
        else:
            assert re.fullmatch(REGEXES[cons.index(p.constraint)], text), text
        assert replay_accepts(p.constraint, ids)


def test_json_object_answers_parse_when_they_end(default_bundle):
    """JSON mode (any object): every answer that ends is an object; compact (no free whitespace)."""
    vocab = GrammarVocab.of(default_bundle)
    c = compile_constraint("json_object", None, vocab, field="response_format")
    params = [SamplingParams(gen_length=64, temperature=1.0, seed=s, constraint=c) for s in range(24)]
    gens = generate(default_bundle, [prompt_of(default_bundle)] * len(params), params)
    stops = set(default_bundle.special.stop)
    ended = 0
    for g in gens:
        ids = cut_answer(g.gen_ids, stops)
        text = default_bundle.tokenizer.decode(ids)
        assert text.startswith("{")
        if len(ids) < len(g.gen_ids):  # it ended: only where the grammar accepts
            ended += 1
            assert isinstance(json.loads(text), dict)
        assert replay_accepts(c, ids) == (len(ids) < len(g.gen_ids))
    assert ended > 0


def test_unconstrained_batchmates_are_untouched(default_bundle):
    """Batch invariance for unconstrained requests: the same ids and NFE with or without
    constrained requests in the batch, in every decoding mode."""
    vocab = GrammarVocab.of(default_bundle)
    c = compile_constraint("json_schema", PERSON, vocab)
    prompt = prompt_of(default_bundle)
    plain = [SamplingParams(gen_length=32, seed=1, temperature=1.0),
             SamplingParams(gen_length=32, block_length=8, threshold=0.8, cache="dual"),
             SamplingParams(gen_length=32, block_length=16, steps=16, cache="prefix", top_k=5,
                            temperature=1.0, seed=4)]
    alone = generate(default_bundle, [prompt] * 3, plain)
    mixed_params = [plain[0], SamplingParams(gen_length=96, constraint=c), plain[1],
                    SamplingParams(gen_length=96, temperature=1.0, seed=2, constraint=c), plain[2]]
    mixed = generate(default_bundle, [prompt] * 5, mixed_params)
    for a, m in zip(alone, [mixed[0], mixed[2], mixed[4]]):
        assert a.gen_ids == m.gen_ids and a.nfe == m.nfe


def test_forced_tokens_cost_no_forward(default_bundle):
    vocab = GrammarVocab.of(default_bundle)
    prompt = prompt_of(default_bundle)
    one = compile_constraint("choice", ["sorted"], vocab)
    fixed = compile_constraint("regex", r"answer: [0-9]", vocab)
    gens = generate(default_bundle, [prompt, prompt], [SamplingParams(gen_length=16, constraint=one),
                                                        SamplingParams(gen_length=16, constraint=fixed)],
                    keep_events=True)
    tok = default_bundle.tokenizer
    stops = default_bundle.special.stop
    assert tok.decode(cut_answer(gens[0].gen_ids, stops)) == "sorted"
    assert gens[0].nfe == 0  # the whole answer is forced: no forward at all
    assert re.fullmatch(r"answer: [0-9]", tok.decode(cut_answer(gens[1].gen_ids, stops)))
    assert gens[1].nfe == 1  # "answer: " forced, one forward for the digit, the end forced
    # events cover every position exactly once and reconstruct the span
    for g in gens:
        seen = {}
        for ev in g.events:
            for p, t in zip(ev.positions, ev.token_ids):
                assert p not in seen
                seen[p] = t
        assert [seen[p] for p in range(16)] == g.gen_ids


def test_confident_rows_commit_several_per_forward(default_bundle):
    """Threshold decoding commits the frontier plus the following confident, grammatical rows."""
    vocab = GrammarVocab.of(default_bundle)
    c = compile_constraint("regex", r"[a-z]( [a-z]){2,5}", vocab)
    prompt = prompt_of(default_bundle, "sort: d b a")
    one = generate(default_bundle, [prompt], SamplingParams(gen_length=32, constraint=c))[0]
    fast = generate(default_bundle, [prompt], SamplingParams(gen_length=32, threshold=0.5,
                                                               constraint=c))[0]
    stops = default_bundle.special.stop
    text = default_bundle.tokenizer.decode(cut_answer(fast.gen_ids, stops))
    assert re.fullmatch(r"[a-z]( [a-z]){2,5}", text)
    assert fast.nfe < one.nfe


def test_grammar_mask_paths_agree():
    """The CPU path (frontier rows only) and the fixed-shape CUDA path mask the same logits."""
    torch.manual_seed(0)
    R, V = 6, 11
    logits = torch.randn(R, V)
    mask = torch.ones(4, V, dtype=torch.bool)  # 3 slots + the dummy
    mask[1, 5:] = False
    mask[2, :3] = False

    class RI:  # the per-row fields apply_grammar reads
        frontier = torch.tensor([-1, -1, 2, 2, 0, 0])
        prompt_len = torch.tensor([4, 4, 4, 4, 3, 3])

    class RQ:
        slot = torch.tensor([0, 1, 2, 3])

    lay = Layout(None, None, None, None, None, torch.tensor([0, 0, 1, 1, 2, 2]),
                 torch.ones(R, dtype=torch.bool), torch.tensor([4, 5, 6, 7, 3, 4]), None, RI, None)
    a, b = logits.clone(), logits.clone()
    apply_grammar(a, lay, RQ, mask, dynamic=True)
    apply_grammar(b, lay, RQ, mask, dynamic=False)
    assert torch.equal(a, b)
    assert torch.isinf(a[2, 5:]).all() and torch.isinf(a[4, :3]).all()
    untouched = [0, 1, 3, 5]
    assert torch.equal(a[untouched], logits[untouched])
    assert Bucket.fit(1, 16, 16, 16, False, constrained=True).constrained


def test_invalid_constraints_name_the_field(default_bundle):
    vocab = GrammarVocab.of(default_bundle)
    cases = [("regex", "a(", "guided_regex", "regex"),
             ("json_schema", {"type": "object", "properties": {"a": {"type": "strin"}}}, "response_format", "strin"),
             ("json_schema", "{not json", "guided_json", "not valid JSON"),
             ("json_schema", [1, 2], "guided_json", "object"),
             ("grammar", "start: missing_rule", "guided_grammar", "missing_rule"),
             ("choice", [], "guided_choice", "non-empty"),
             ("choice", ["a", 3], "guided_choice", "strings"),
             ("json_schema", {"type": "string", "format": "no-such-format"}, "response_format", "no-such-format")]
    for kind, spec, field, words in cases:
        with pytest.raises(ConstraintError) as e:
            compile_constraint(kind, spec, vocab, field=field)
        assert e.value.field == field and field in str(e.value) and words in str(e.value), str(e.value)
        assert isinstance(e.value, ParamError)


def test_refused_combinations(default_bundle):
    vocab = GrammarVocab.of(default_bundle)
    c = compile_constraint("regex", "[a-z]+", vocab, field="guided_regex")
    for bad, field in ((dict(logprobs=2), "logprobs"), (dict(ban_eos=True), "ban_eos"),
                       (dict(remasking="random"), "remasking")):
        with pytest.raises(ParamError) as e:
            SamplingParams(gen_length=8, constraint=c, **bad).validate(4, 256)
        assert e.value.field == field
    with pytest.raises(ParamError) as e:
        SamplingParams(gen_length=8, block_length=8, steps=8, threshold=0.9,
                       constraint=c).validate(4, 256, block_diffusion=True)
    assert e.value.field == "guided_regex"
    prompt = prompt_of(default_bundle)
    with pytest.raises(ParamError) as e:
        generate(default_bundle, [prompt], SamplingParams(gen_length=8, constraint=c), suffixes=[[7, 8]])
    assert e.value.field == "guided_regex"


def run_pipelined(bundle, prompt, params):
    """The CUDA engine's path on the CPU: padded buckets, fixed-shape stages (no value-dependent
    branches) and pipelined steps (launch step n+1, then read step n)."""
    from sampler import device_step as ds
    from sampler.strategies import make_batch

    batch = make_batch(bundle.model, bundle.special, capacity_tokens=4096, max_requests=8,
                       pad_to_buckets=True)
    batch._device_step = lambda plan, bucket: ds.device_step(
        batch.model, batch.kv, batch.tokens, batch.state, batch.fstate, plan, bucket, batch.mask_id,
        batch.eos_id, batch.stop_ids_d, batch.capacity, dynamic=False,
        grammar_mask=batch.grammar_mask if bucket.constrained else None)
    for i, p in enumerate(params):
        batch.add(i, prompt, p)
    done = {}
    for _ in range(2000):
        if len(done) == len(params):
            break
        for ev in batch.step_async():
            if ev.finished:
                done[ev.request_id] = (ev.gen_ids, ev.nfe)
    return [done[i] for i in range(len(params))]


def test_pipelined_fixed_shape_path(default_bundle):
    vocab = GrammarVocab.of(default_bundle)
    c = compile_constraint("json_schema", PERSON, vocab)
    prompt = prompt_of(default_bundle)
    plain = [SamplingParams(gen_length=32, block_length=16, threshold=0.9, cache="dual"),
             SamplingParams(gen_length=32, temperature=1.0, seed=3)]
    cons = [SamplingParams(gen_length=128, constraint=c),
            SamplingParams(gen_length=128, temperature=1.0, seed=5, block_length=32, threshold=0.9,
                           cache="dual", constraint=c)]
    alone = run_pipelined(default_bundle, prompt, plain)
    mixed = run_pipelined(default_bundle, prompt, [plain[0], cons[0], plain[1], cons[1]])
    assert [mixed[0], mixed[2]] == alone
    stops = set(default_bundle.special.stop)
    for ids, _ in (mixed[1], mixed[3]):
        jsonschema.validate(json.loads(default_bundle.tokenizer.decode(cut_answer(ids, stops))), PERSON)
    # the same answers as the exact-shape, unpipelined path
    ref = generate(default_bundle, [prompt] * 2, cons)
    assert [mixed[1][0], mixed[3][0]] == [g.gen_ids for g in ref]


def test_bench_constrained_runs(capsys):
    from bench.bench_constrained import main

    assert main(["--requests", "2"]) == 0  # non-zero when plain batchmates' ids or NFE changed
    out = capsys.readouterr().out
    assert "| mixed: plain + json_schema | 4 |" in out and "identical ids and NFE: True" in out


def test_guidance_filters_and_eos_bias_keep_answers_valid(default_bundle):
    """Classifier-free guidance, sampling filters, EOS bias and deferred stops act on the masked
    frontier row; the answers stay valid."""
    vocab = GrammarVocab.of(default_bundle)
    c = compile_constraint("json_schema", NUMBERS, vocab)
    prompt = prompt_of(default_bundle)
    params = [SamplingParams(gen_length=48, cfg_scale=1.5, constraint=c),
              SamplingParams(gen_length=48, temperature=1.0, seed=9, top_k=3, top_p=0.9, min_p=0.05,
                             threshold=0.5, block_length=16, cache="prefix", constraint=c),
              SamplingParams(gen_length=48, eos_bias=-5.0, defer_eos=True, temperature=1.0, seed=2,
                             constraint=c)]
    for (ids, text, _), p in zip(answers(default_bundle, params, prompt), params):
        jsonschema.validate(json.loads(text), NUMBERS)
        assert replay_accepts(c, ids)


def test_constrained_requests_never_draft_and_keep_their_answers(default_bundle):
    """Exact parallel decoding beside structured output: a constrained request commits on the host
    (the frontier rule) and runs at depth 0 whatever it asks; its answer and NFE are those of depth
    0, and a drafting plain batchmate keeps its own ids while drafting."""
    vocab = GrammarVocab.of(default_bundle)
    c = compile_constraint("json_schema", PERSON, vocab)
    prompt = prompt_of(default_bundle)
    params = [SamplingParams(gen_length=96, constraint=c, temperature=1.0, seed=3),
              SamplingParams(gen_length=32, block_length=32, steps=32)]
    base = generate(default_bundle, [prompt] * 2, params)
    drafted = generate(default_bundle, [prompt] * 2, params, draft_depth=4)
    for a, b in zip(base, drafted):
        assert a.gen_ids == b.gen_ids and a.nfe == b.nfe
    assert drafted[0].forwards == drafted[0].nfe  # the constrained one did not draft
    assert drafted[1].forwards < base[1].forwards  # the plain one did
    jsonschema.validate(json.loads(default_bundle.tokenizer.decode(
        cut_answer(drafted[0].gen_ids, default_bundle.special.stop))), PERSON)
