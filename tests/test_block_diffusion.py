"""Block diffusion (LLaDA2.0 / LLaDA2.1) in the batched step, and LLaDA-MoE through the LLaDA sampler:
golden conformance, the one-request oracle, batch invariance, events, the exact block cache."""

import random
from pathlib import Path

import pytest

from ckpt_factory import make_checkpoint, make_moe_checkpoint
from sampler import conformance
from sampler.generate import generate
from sampler.params import ParamError, SamplingParams
from sampler.reference import reference_generate
from sampler.reference_llada2 import llada2_generate
from sampler.strategies import make_batch, rows_needed
from weights.checkpoint import load_checkpoint

from golden_sets import GOLDEN_ROOT as SHARED
LLADA2, LLADA_MOE = SHARED / "tiny-llada2", SHARED / "tiny-llada-moe"


# float64 one at a time is left to the command line (the same code path as float32, slower).
@pytest.mark.parametrize("directory,dtype,batched,count", [
    (LLADA2, "float32", False, 16), (LLADA2, "float32", True, 16), (LLADA2, "float64", True, 16),
    (LLADA_MOE, "float32", False, 9), (LLADA_MOE, "float64", True, 9),
])
def test_golden_conformance(directory, dtype, batched, count, capsys):
    argv = ["--model", str(directory), "--cases", str(directory / "cases.json"), "--dtype", dtype]
    rc = conformance.main(argv + (["--batched"] if batched else []))
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.strip().splitlines()[-1] == f"{count} passed, 0 failed"


@pytest.fixture(scope="module")
def other2(tmp_path_factory):
    """A LLaDA2 checkpoint of other dimensions than the golden one (head_dim 12, 12 experts in 3 groups)."""
    d = make_moe_checkpoint(tmp_path_factory.mktemp("l2") / "m", "llada2", seed=7)
    return load_checkpoint(d, "cpu", "float64")


@pytest.fixture(scope="module")
def other_moe(tmp_path_factory):
    d = make_moe_checkpoint(tmp_path_factory.mktemp("lm") / "m", "llada-moe", seed=8)
    return load_checkpoint(d, "cpu", "float64")


V20 = dict(threshold=0.6)
V21 = dict(threshold=0.6, editing_threshold=0.4, max_post_steps=3)
CASES = [
    (13, dict(gen_length=20, block_length=8, steps=8, **V20)),
    (16, dict(gen_length=16, block_length=8, steps=4, threshold=1.0)),
    (5, dict(gen_length=24, block_length=4, steps=6, minimal_topk=2, threshold=0.3)),
    (9, dict(gen_length=30, block_length=8, steps=8, threshold=0.2, eos_early_stop=True)),
    (11, dict(gen_length=20, block_length=8, **V21)),
    (3, dict(gen_length=18, block_length=16, threshold=0.5, editing_threshold=0.2, max_post_steps=2,
             num_to_transfer=2)),
    (20, dict(gen_length=24, block_length=8, threshold=0.3, editing_threshold=0.1, max_post_steps=0,
              eos_early_stop=True)),
]


def _prompt(rnd, n, vocab=280):
    return [rnd.randrange(vocab) for _ in range(n)]


@pytest.mark.parametrize("plen,kw", CASES)
def test_batched_step_matches_the_oracle(other2, plen, kw):
    prompt = _prompt(random.Random(plen), plen)
    sp = SamplingParams(**kw).for_block_diffusion()
    want, nfe = llada2_generate(other2.model, prompt, sp, other2.special.mask, other2.special.eos)
    got = generate(other2, [prompt], sp)[0]
    assert (got.gen_ids, got.nfe) == (want, nfe)


def test_batch_invariance_mixed_settings_joining_mid_schedule(other2):
    """Every case, each with its own block length, thresholds and editing settings, in one batch
    with requests joining at different steps, gives what it gives alone."""
    rnd = random.Random(1)
    reqs = [(_prompt(rnd, plen), SamplingParams(**kw)) for plen, kw in CASES]
    alone = [generate(other2, [p], sp)[0] for p, sp in reqs]
    batch = make_batch(other2.model, other2.special, capacity_tokens=1024, max_requests=8)
    joins = {0: [0, 1], 2: [2, 3], 5: [4], 9: [5, 6]}
    done, step = {}, 0
    while len(done) < len(reqs):
        for i in joins.get(step, []):
            batch.add(i, *reqs[i])
        for ev in batch.step():
            if ev.finished:
                done[ev.request_id] = (ev.gen_ids, ev.nfe)
                batch.remove(ev.request_id)
        step += 1
    assert [done[i] for i in range(len(reqs))] == [(a.gen_ids, a.nfe) for a in alone]


def test_llada_moe_runs_the_llada_sampler_unchanged(other_moe):
    """Every LLaDA mode (schedule, threshold, caches, CFG) on a LLaDA-MoE checkpoint: the batched
    step equals the one-request oracle in exact mode and is batch invariant."""
    rnd = random.Random(2)
    mixed = [
        (_prompt(rnd, 7), SamplingParams(gen_length=16, block_length=8, steps=8)),
        (_prompt(rnd, 12), SamplingParams(gen_length=16, block_length=4, steps=16, cfg_scale=1.0)),
        (_prompt(rnd, 5), SamplingParams(gen_length=16, block_length=8, threshold=0.5, cache="dual")),
        (_prompt(rnd, 9), SamplingParams(gen_length=24, block_length=8, steps=12, cache="prefix")),
    ]
    alone = [generate(other_moe, [p], sp)[0].gen_ids for p, sp in mixed]
    together = [g.gen_ids for g in generate(other_moe, [p for p, _ in mixed], [sp for _, sp in mixed])]
    assert together == alone
    for (p, sp), got in zip(mixed[:2], alone[:2]):
        want, _ = reference_generate(other_moe.model, p, sp, other_moe.special.mask, other_moe.special.stop)
        assert got == want


def test_events_replay_to_the_result_and_final_tokens_never_change(other2):
    """Unmaskings and edits in the step events rebuild the final canvas; tokens before
    `final_upto` never change afterwards; 2.1 reports edits."""
    rnd = random.Random(3)
    for plen, kw in CASES:
        g = generate(other2, [_prompt(rnd, plen)], SamplingParams(**kw), keep_events=True)[0]
        canvas = [None] * kw["gen_length"]
        frozen = 0
        edits = 0
        for ev in g.events:
            for p, t in zip(ev.positions, ev.token_ids):
                assert p >= frozen and canvas[p] is None
                canvas[p] = t
            for p, t in zip(ev.edited_positions, ev.edited_token_ids):
                assert p >= frozen and canvas[p] is not None and canvas[p] != t
                canvas[p] = t
                edits += 1
            assert ev.final_upto is not None and ev.final_upto >= frozen
            frozen = ev.final_upto
        assert g.events[-1].finished and frozen == kw["gen_length"]
        assert canvas[:len(g.gen_ids)] == g.gen_ids
        if "editing_threshold" not in kw:
            assert edits == 0
    # The low editing thresholds do edit on this model.
    g = generate(other2, [_prompt(random.Random(4), 11)],
                 SamplingParams(gen_length=24, block_length=8, threshold=0.5, editing_threshold=0.05),
                 keep_events=True)[0]
    assert sum(len(ev.edited_positions) for ev in g.events) > 0


def test_finished_blocks_are_computed_once(other2):
    """The prompt's whole blocks are prefilled once, a finished block's keys/values are written once
    with its final tokens, and every other forward row is the current block."""
    rows = []
    model = other2.model
    real = model.forward

    def counting(ids, *a, **k):
        rows.append(ids.numel())
        return real(ids, *a, **k)

    model.forward = counting
    try:
        prompt = _prompt(random.Random(5), 19)  # two whole prompt blocks of 8, the third holds its tail
        sp = SamplingParams(gen_length=21, block_length=8, steps=8, threshold=1.0)
        g = generate(other2, [prompt], sp)[0]
    finally:
        del model.forward
    decoded_blocks = (19 + 21 + 7) // 8 - 19 // 8
    assert g.nfe == len(rows) == 40 - 19  # threshold 1.0: one token per step, canvas of 5 blocks
    assert sum(rows) == 8 * (19 // 8 + g.nfe + decoded_blocks - 1)


@pytest.mark.parametrize("kwargs,field", [
    (dict(cfg_scale=1.0), "cfg_scale"), (dict(remasking="random"), "remasking"),
    (dict(minimal_topk=0), "minimal_topk"), (dict(minimal_topk=40), "minimal_topk"),
    (dict(editing_threshold=1.5), "editing_threshold"), (dict(threshold=-0.1), "threshold"),
    (dict(max_post_steps=-1), "max_post_steps"), (dict(num_to_transfer=0), "num_to_transfer"),
    (dict(eos_early_stop="yes"), "eos_early_stop"), (dict(block_length=0), "block_length"),
    (dict(eos_bias=-1.0), "eos_bias"),
])
def test_block_diffusion_validation(kwargs, field):
    sp = SamplingParams(gen_length=32, **kwargs).for_block_diffusion()
    with pytest.raises(ParamError) as e:
        sp.validate(10, 512, block_diffusion=True)
    assert e.value.field == field


@pytest.mark.parametrize("field,value", [("editing_threshold", 0.5), ("minimal_topk", 2),
                                         ("eos_early_stop", True), ("max_post_steps", 3)])
def test_llada2_options_are_refused_on_other_models(tmp_path, field, value):
    bundle = load_checkpoint(make_checkpoint(tmp_path / "dense"), "cpu", "float32")
    batch = make_batch(bundle.model, bundle.special, capacity_tokens=256, max_requests=2)
    with pytest.raises(ParamError) as e:
        batch.add(0, [1, 2, 3], SamplingParams(gen_length=8, **{field: value}))
    assert e.value.field == field


def test_gen_length_need_not_be_a_multiple_of_the_block(other2):
    batch = make_batch(other2.model, other2.special, capacity_tokens=64, max_requests=2)
    sp = SamplingParams(gen_length=13, block_length=8, steps=4)
    assert rows_needed(6, sp, block_diffusion=True) == 24  # 6 + 13 rounded up to 3 blocks
    batch.add("a", [1] * 6, sp)
    assert batch.rows_in_use == 24


def test_the_strategy_follows_the_config(other2, tmp_path):
    """make_batch picks the class from config.block_diffusion; both honour the same interface."""
    from sampler.batch import Batch
    from sampler.block_diffusion import BlockDiffusionBatch
    from sampler.llada_batch import LLaDABatch
    dense = load_checkpoint(make_checkpoint(tmp_path / "dense"), "cpu", "float32")
    sp = SamplingParams(gen_length=8, block_length=8, steps=8)
    for bundle, cls in ((other2, BlockDiffusionBatch), (dense, LLaDABatch)):
        batch = make_batch(bundle.model, bundle.special, capacity_tokens=64, max_requests=2)
        assert type(batch) is cls and isinstance(batch, Batch)
        assert batch.rows_needed(5, sp) == rows_needed(5, sp, cls is BlockDiffusionBatch)
        batch.add("r", [1, 2, 3, 4, 5], sp)
        first = batch.step_async()  # LLaDA: launched, read with the next call; LLaDA2.x: at once
        assert batch.in_flight == (not first) == (cls is LLaDABatch)
        batch.discard()  # a failed step's results are forgotten
        assert not batch.in_flight
        events = list(first)
        while not (events and events[-1].finished):
            events += batch.step()
        assert events[-1].gen_ids == batch.canvas("r")[:len(events[-1].gen_ids)]
        batch.remove("r")
        assert len(batch) == 0 and batch.rows_in_use == 0


def test_engine_serves_block_diffusion_and_early_completion_keeps_the_answer(other2):
    """Through the engine thread: staggered LLaDA2.0/2.1 requests give what generate() gives;
    leaving early once the answer is final (finished blocks only, under editing) changes nothing."""
    import queue
    import time

    from sampler.generate import cut_answer
    from sampler.scheduler import Engine, EngineConfig, Handle

    def run(early):
        eng = Engine(other2.model, other2.special, EngineConfig(max_batch_size=4, max_batch_tokens=512,
                                                                  early_stop=early)).start()
        try:
            out = []
            rnd = random.Random(6)
            for i, (plen, kw) in enumerate(CASES):
                q = queue.Queue()
                h = Handle(prompt_ids=_prompt(rnd, plen), params=SamplingParams(**kw), sink=q.put,
                           answer_limit=6)
                eng.submit([h])
                out.append((h, q))
                time.sleep(0.002 * i)
            results = []
            for h, q in out:
                while True:
                    kind, payload = q.get(timeout=120)
                    if kind in ("done", "error"):
                        assert kind == "done", payload
                        results.append((h, payload))
                        break
            return results
        finally:
            eng.shutdown(grace=0)

    late, early = run(False), run(True)
    stop = other2.special.stop
    assert sum(a.steps - b.steps for (_, a), (_, b) in zip(late, early)) > 0
    for (h, a), (_, b) in zip(late, early):
        want = generate(other2, [h.prompt_ids], h.params)[0]
        assert a.gen_ids == want.gen_ids and a.nfe == want.nfe and not a.early
        assert cut_answer(a.gen_ids, stop, 6) == cut_answer(b.gen_ids, stop, 6)
        assert b.steps <= a.steps


def test_generate_cli_on_a_llada2_checkpoint(capsys):
    """llada-generate takes the LLaDA2 options and prints the reference's answer (case llada2.1_9)."""
    import json

    from sampler import generate_cli

    case = json.loads((LLADA2 / "cases.json").read_text())["cases"][9]
    generate_cli.main(["--model", str(LLADA2), "--prompt-ids", ",".join(map(str, case["prompt_ids"])),
                       "--gen-length", "32", "--block-length", "8", "--threshold", "0.7",
                       "--editing-threshold", "0.5"])
    answer = [int(t) for t in capsys.readouterr().out.split()]
    assert answer == case["expected_ids"][:-1]  # cut before the EOS
