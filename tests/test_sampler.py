"""The diffusion samplers: golden conformance, the reference oracle, batch invariance, seeds."""

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ckpt_factory import make_checkpoint
from sampler import conformance
from sampler.generate import cut_answer, generate
from sampler.params import ParamError, SamplingParams
from sampler.reference import reference_generate
from sampler.rules import quota, quota_at
from sampler.strategies import make_batch
from weights.checkpoint import load_checkpoint

from golden_sets import TINY_LLADA as GOLDEN


@pytest.fixture(scope="module")
def golden():
    return load_checkpoint(GOLDEN, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """A checkpoint of other dimensions (GQA, head dim 16, 3 layers) the golden cases never saw."""
    d = make_checkpoint(tmp_path_factory.mktemp("other") / "m", d_model=64, n_layers=3, n_heads=4,
                        n_kv_heads=2, mlp_hidden_size=72, vocab_size=150, seed=11)
    return load_checkpoint(d, device="cpu", dtype="float64")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_golden_conformance(dtype, capsys):
    rc = conformance.main(["--model", str(GOLDEN), "--cases", str(GOLDEN / "cases.json"), "--dtype", dtype])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.strip().splitlines()[-1] == "12 passed, 0 failed"


def test_conformance_reports_a_mismatch(tmp_path, capsys):
    import json
    data = json.loads((GOLDEN / "cases.json").read_text())
    data["cases"] = data["cases"][:2]
    data["cases"][1]["expected_ids"] = list(data["cases"][1]["expected_ids"])
    data["cases"][1]["expected_ids"][5] = (data["cases"][1]["expected_ids"][5] + 1) % 300
    f = tmp_path / "cases.json"
    f.write_text(json.dumps(data))
    rc = conformance.main(["--model", str(GOLDEN), "--cases", str(f)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "first difference at position 5" in out
    assert out.strip().splitlines()[-1] == "1 passed, 1 failed"


def test_schedule_is_linear():
    assert quota(10, 4) == [3, 3, 2, 2]
    assert quota(8, 8) == [1] * 8
    assert sum(quota(37, 5)) == 37


def test_the_device_applies_the_same_quota_rule():
    """The device step evaluates `quota_at` on tensors, one request per element: the same counts
    as the host's (and the oracles') schedule."""
    masked = torch.tensor([10, 10, 10, 10, 37, 0, 7])
    steps = torch.tensor([4, 4, 4, 4, 5, 3, 7])
    step = torch.tensor([0, 1, 2, 3, 4, 2, 6])
    want = [quota(int(m), int(s))[int(i)] for m, s, i in zip(masked, steps, step)]
    got = quota_at(masked, steps, step)
    assert got.dtype == torch.int64 and got.tolist() == want


MODES = [
    dict(),
    dict(remasking="random", seed=5),
    dict(cfg_scale=1.5),
    dict(threshold=0.3),
    dict(temperature=0.8, seed=123),
    dict(temperature=0.5, seed=9, threshold=0.2),
    dict(ban_eos=True),
    dict(defer_eos=True),
    dict(eos_bias=-2.5),
    dict(eos_bias=4.0, cfg_scale=1.0, temperature=0.6, seed=2),
    dict(min_tokens=7, eos_bias=6.0),
    dict(min_tokens=16, temperature=0.7, seed=5, top_k=20),
]


@pytest.mark.parametrize("extra", MODES, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()) or "plain")
def test_batched_step_matches_reference_oracle(other, extra):
    """The batched step equals the straightforward one-request implementation (exact mode)."""
    rnd = random.Random(hash(tuple(sorted(extra.items()))) & 0xFFFF)
    for gen, block, steps in [(24, 8, 12), (16, 16, 16), (20, 4, 20)]:
        params = SamplingParams(gen_length=gen, block_length=block, steps=steps, **extra)
        prompt = [rnd.randrange(0, 139) for _ in range(rnd.randrange(1, 12))]
        want, fwd = reference_generate(other.model, prompt, params, other.special.mask, other.special.stop)
        got = generate(other, [prompt], params)[0]
        assert got.gen_ids == want
        if params.threshold is None:
            assert got.nfe == fwd == steps


def _mixed_requests(rnd, vocab):
    specs = [
        SamplingParams(gen_length=16, block_length=8, steps=16),
        SamplingParams(gen_length=24, block_length=8, steps=12, remasking="random", seed=3),
        SamplingParams(gen_length=16, block_length=4, steps=8, cfg_scale=1.0),
        SamplingParams(gen_length=32, block_length=8, steps=32, cache="prefix"),
        SamplingParams(gen_length=32, block_length=16, steps=16, cache="dual"),
        SamplingParams(gen_length=24, block_length=8, threshold=0.4, cache="dual"),
        SamplingParams(gen_length=16, block_length=8, threshold=0.5, cache="prefix", temperature=0.7, seed=8),
        SamplingParams(gen_length=16, steps=16, temperature=1.0, seed=77),
    ]
    return [([rnd.randrange(0, vocab) for _ in range(rnd.randrange(1, 20))], p) for p in specs]


def test_batch_invariance_every_mode(golden):
    """A request alone and inside a batch of four with other lengths and parameters: same ids."""
    rnd = random.Random(1234)
    reqs = _mixed_requests(rnd, 290)
    alone = [generate(golden, [p], sp)[0].gen_ids for p, sp in reqs]
    for i, (prompt, sp) in enumerate(reqs):
        mates = [reqs[(i + j) % len(reqs)] for j in (1, 3, 5)]
        group = [(prompt, sp)] + mates
        rnd.shuffle(group)
        out = generate(golden, [g[0] for g in group], [g[1] for g in group])
        pos = next(j for j, g in enumerate(group) if g[0] is prompt and g[1] is sp)
        assert out[pos].gen_ids == alone[i], f"request {i} ({sp}) changed when batched"


def test_continuous_admission_does_not_change_results(golden):
    """Requests joining mid-way (other requests at other points of their schedules) change nothing."""
    rnd = random.Random(7)
    reqs = _mixed_requests(rnd, 290)
    alone = [generate(golden, [p], sp)[0].gen_ids for p, sp in reqs]
    batch = make_batch(golden.model, golden.special, capacity_tokens=2048, max_requests=4)
    pending = list(enumerate(reqs))
    done = {}
    while pending or len(batch):
        while pending and batch.can_admit(len(pending[0][1][0]), pending[0][1][1]):
            i, (p, sp) = pending.pop(0)
            batch.add(i, p, sp)
            break  # one new request per step: everyone joins at a different point
        for ev in batch.step():
            if ev.finished:
                done[ev.request_id] = ev.gen_ids
                batch.remove(ev.request_id)
    assert [done[i] for i in range(len(reqs))] == alone


def test_seeded_sampling_is_reproducible_and_seed_dependent(golden):
    prompt = [5, 17, 42, 99]
    sp = SamplingParams(gen_length=32, block_length=8, steps=32, temperature=1.0, seed=2024)
    a = generate(golden, [prompt], sp)[0].gen_ids
    b = generate(golden, [prompt], sp)[0].gen_ids
    c = generate(golden, [prompt], sp.with_seed(2025))[0].gen_ids
    assert a == b
    assert a != c


def test_temperature_zero_ignores_seed(golden):
    prompt = [5, 17, 42, 99]
    sp = SamplingParams(gen_length=16, steps=16, seed=1)
    assert generate(golden, [prompt], sp)[0].gen_ids == generate(golden, [prompt], sp.with_seed(2))[0].gen_ids


def test_events_account_for_every_position(golden):
    sp = SamplingParams(gen_length=24, block_length=8, threshold=0.3, cache="dual")
    res = generate(golden, [[1, 2, 3]], sp, keep_events=True)[0]
    seen = {}
    for ev in res.events:
        for pos, tok in zip(ev.positions, ev.token_ids):
            assert pos not in seen
            seen[pos] = tok
        assert 8 * ev.block <= min(ev.positions) and max(ev.positions) < 8 * (ev.block + 1)
    assert res.events[-1].masks_remaining == 0 and res.events[-1].finished
    assert [seen[i] for i in range(24)] == res.gen_ids
    assert [ev.masks_remaining for ev in res.events] == sorted(
        [ev.masks_remaining for ev in res.events], reverse=True)


def test_ban_eos_never_emits_eos(golden):
    sp = SamplingParams(gen_length=32, block_length=8, steps=32, ban_eos=True)
    for p in ([1], [250, 251, 252], list(range(30))):
        assert 301 not in generate(golden, [p], sp)[0].gen_ids


def test_eos_bias_moves_eos_both_ways(golden):
    """A bias far below every logit gap keeps EOS out like ban_eos; far above, every position
    takes EOS; at 0 the ids are those of the plain request."""
    sp = SamplingParams(gen_length=16, block_length=8, steps=16)
    for p in ([1], [250, 251, 252]):
        plain = generate(golden, [p], sp)[0].gen_ids
        assert generate(golden, [p], replace(sp, eos_bias=0.0))[0].gen_ids == plain
        assert 301 not in generate(golden, [p], replace(sp, eos_bias=-100.0))[0].gen_ids
        assert generate(golden, [p], replace(sp, eos_bias=100.0))[0].gen_ids == [301] * 16


def test_cut_answer():
    assert cut_answer([5, 6, 301, 7], [301, 302]) == [5, 6]
    assert cut_answer([5, 6], [301]) == [5, 6]


@pytest.mark.parametrize("kwargs,field", [
    (dict(gen_length=30, block_length=8), "block_length"),
    (dict(gen_length=32, block_length=8, steps=30), "steps"),
    (dict(gen_length=16, steps=32), "steps"),
    (dict(gen_length=0), "gen_length"),
    (dict(gen_length=16, steps=0), "steps"),
    (dict(gen_length=16, threshold=0.0), "threshold"),
    (dict(gen_length=16, threshold=1.5), "threshold"),
    (dict(gen_length=16, temperature=-0.1), "temperature"),
    (dict(gen_length=16, temperature=float("nan")), "temperature"),
    (dict(gen_length=16, cfg_scale=-1.0), "cfg_scale"),
    (dict(gen_length=16, cfg_scale=1.0, cache="dual"), "cfg_scale"),
    (dict(gen_length=16, remasking="sometimes"), "remasking"),
    (dict(gen_length=16, cache="paged"), "cache"),
    (dict(gen_length=16, seed=-1), "seed"),
    (dict(gen_length=16, eos_bias=float("nan")), "eos_bias"),
    (dict(gen_length=16, eos_bias=-101), "eos_bias"),
    (dict(gen_length=16, eos_bias="1"), "eos_bias"),
    (dict(gen_length=16, block_length=True), "block_length"),
])
def test_validation_errors(kwargs, field):
    with pytest.raises(ParamError) as e:
        SamplingParams(**kwargs).validate(prompt_len=4, max_sequence_length=512)
    assert e.value.field == field
    assert str(e.value)


def test_canvas_over_max_sequence_length_names_the_numbers(golden):
    with pytest.raises(ParamError) as e:
        SamplingParams(gen_length=500, steps=500).validate(prompt_len=20, max_sequence_length=512)
    assert "520" in str(e.value) and "512" in str(e.value)
    batch = make_batch(golden.model, golden.special, capacity_tokens=4096, max_requests=2)
    with pytest.raises(ParamError):
        batch.add("x", [1] * 20, SamplingParams(gen_length=500, steps=500))
    with pytest.raises(ParamError, match="outside the vocabulary"):
        batch.add("y", [1, 320], SamplingParams(gen_length=8))
    assert len(batch) == 0 and batch.rows_in_use == 0


def test_capacity_is_respected_and_freed(golden):
    batch = make_batch(golden.model, golden.special, capacity_tokens=64, max_requests=4)
    sp = SamplingParams(gen_length=16)
    assert batch.can_admit(10, sp)
    batch.add("a", [1] * 10, sp)
    batch.add("b", [1] * 10, sp)
    assert not batch.can_admit(20, sp)
    batch.remove("a")
    assert batch.can_admit(10, sp)
    batch.remove("b")
    assert batch.rows_in_use == 0 and batch.can_admit(48, sp)


def test_min_tokens_keeps_stop_ids_out_of_the_first_positions(other):
    """With a strong EOS bias the answer ends at once; min_tokens moves every stop id past its
    positions (batched step and oracle alike), and 0 changes nothing."""
    stops = set(other.special.stop)
    prompt = [5, 17, 33]
    base = SamplingParams(gen_length=16, block_length=8, steps=16, eos_bias=8.0)
    plain = generate(other, [prompt], base)[0].gen_ids
    assert plain[0] in stops, "the bias must make the first position a stop id, or the test proves nothing"
    for k in (1, 9, 16):
        params = replace(base, min_tokens=k)
        got = generate(other, [prompt, prompt], [params, base])
        assert not stops & set(got[0].gen_ids[:k])
        assert got[1].gen_ids == plain  # a batchmate without min_tokens is untouched
        want, _ = reference_generate(other.model, prompt, params, other.special.mask, other.special.stop)
        assert got[0].gen_ids == want
    with pytest.raises(ParamError):
        replace(base, min_tokens=17).validate(3)
