"""Drafting only where it pays (sampler.draft_gate): the gate's choice from measured costs, its
probes and backoff, and a batch that drafts under it keeps every id, event and NFE of the run
without drafting while its draft rows follow the costs."""

import random
from dataclasses import replace

import pytest
import torch

from ckpt_factory import make_moe_checkpoint
from sampler.draft_gate import DraftGate, gate_for
from sampler.generate import generate
from sampler.params import SamplingParams
from sampler.strategies import make_batch
from weights.checkpoint import load_checkpoint

from golden_sets import TINY_LLADA


def _run_gate(gate, cost, steps):
    """Drive `gate` for `steps` steps, each costing cost(drafting) = (seconds, advanced); returns
    the mode of every step."""
    modes = []
    for _ in range(steps):
        modes.append(gate.drafting)
        gate.record(*cost(gate.drafting))
    return modes


def _runs(modes):
    """[(mode, length)] of consecutive equal modes."""
    out = []
    for m in modes:
        if out and out[-1][0] == m:
            out[-1][1] += 1
        else:
            out.append([m, 1])
    return [tuple(x) for x in out]


def test_plain_cheaper_per_advanced_step_turns_drafting_off():
    """Drafting steps advance 2 steps for 3 s, plain ones 1 for 1 s: after the warm-up (its first
    step not counted) and a plain probe, the gate prefers plain steps."""
    gate = DraftGate(warmup=2, probe=2, interval=8, max_interval=64)
    modes = _run_gate(gate, lambda d: (3.0, 2) if d else (1.0, 1), 7)
    assert modes[:5] == [True, True, True, False, False]
    assert gate.preferred is False and gate.drafting is False and gate.switches == 1
    assert gate.cost(True) == pytest.approx(1.5) and gate.cost(False) == pytest.approx(1.0)


def test_drafting_cheaper_keeps_drafting_and_backs_off_its_probes():
    """Drafting steps 1.2 s for 2 steps against plain 1 s for 1: drafting stays, and the plain
    probes come after 2, then 8, 16, 32 drafting steps (each drafting run after a probe has one
    uncounted step first: it starts from no guesses)."""
    gate = DraftGate(warmup=2, probe=2, interval=8, max_interval=32, overhead=1.0)
    modes = _run_gate(gate, lambda d: (1.2, 2) if d else (1.0, 1), 3 + 2 + 17 + 2 + 33 + 2 + 33 + 2 + 33)
    assert _runs(modes) == [(True, 3), (False, 2), (True, 17), (False, 2), (True, 33), (False, 2),
                            (True, 33), (False, 2), (True, 33)]
    assert gate.preferred is True and gate.switches == 0 and gate.interval == 32


def test_plain_preferred_reprobes_drafting_with_backoff():
    """Once plain is preferred, drafting is probed (1 uncounted + 2 counted steps) after 8, 16, 32
    plain steps, then every 32 (the cap)."""
    gate = DraftGate(warmup=2, probe=2, interval=8, max_interval=32, overhead=1.0)
    modes = _run_gate(gate, lambda d: (5.0, 2) if d else (1.0, 1), 3 + 2 + 8 + 3 + 16 + 3 + 32 + 3 + 32 + 3)
    assert _runs(modes) == [(True, 3), (False, 10), (True, 3), (False, 16), (True, 3), (False, 32),
                            (True, 3), (False, 32), (True, 3)]
    assert gate.switches == 1


def test_a_losing_probe_is_spaced_to_cost_little():
    """After a probe that lost (drafting 3x a plain step per advanced step), the next probe waits
    until its extra cost is at most `overhead` of the time: (2 + 1) probe steps x 2 extra / 0.02,
    not the doubled interval."""
    gate = DraftGate(warmup=4, probe=2, interval=8, max_interval=4096, start=False)
    modes = _run_gate(gate, lambda d: (3.0, 1) if d else (1.0, 1), 4 + 3 + 400)
    assert _runs(modes) == [(False, 4), (True, 3), (False, 301), (True, 3), (False, 96)]
    assert gate.interval == 602 and not gate.preferred  # then the doubling takes over


def test_the_gate_follows_a_change_of_costs():
    """Drafting expensive at first, then cheap: the next drafting probe finds it cheaper and the
    gate drafts again (its probe interval back at the start)."""
    gate = DraftGate(warmup=2, probe=2, interval=4, max_interval=64, window=2, overhead=1.0)
    cheap = [False]
    cost = lambda d: ((0.5, 2) if cheap[0] else (5.0, 2)) if d else (1.0, 1)
    _run_gate(gate, cost, 20)
    assert gate.preferred is False
    cheap[0] = True
    modes = _run_gate(gate, cost, 40)
    assert gate.preferred is True and gate.switches == 2 and gate.interval >= 8  # kept since
    assert sum(modes[-20:]) >= 17  # drafting again, apart from a plain probe


def test_the_uncounted_first_drafting_step_and_margin():
    """The first step of a drafting phase (it only guesses) is not counted, however slow; costs
    within the margin keep the preferred mode."""
    gate = DraftGate(warmup=1, probe=1, interval=4, max_interval=4, margin=0.1)
    gate.record(100.0, 1)  # the first step: not counted
    assert gate.cost(True) is None
    gate.record(1.0, 1)
    assert gate.drafting is False  # the plain probe
    gate.record(0.95, 1)  # 5 % cheaper: inside the margin
    assert gate.preferred is True and gate.drafting is True
    with pytest.raises(ValueError):
        DraftGate(probe=0)


def test_gate_for_defaults():
    """On by default for a CPU, off on CUDA; on/off forced either way; never without a draft budget."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert isinstance(gate_for(None, cpu, 2048), DraftGate)
    assert not gate_for(None, cpu, 2048).drafting  # a LLaDA batch on a CPU starts plain
    assert gate_for(None, cpu, 2048, start_drafting=True).drafting  # block diffusion drafts first
    assert gate_for(True, cuda, 2048).drafting
    assert gate_for(None, cuda, 2048) is None
    assert isinstance(gate_for(True, cuda, 2048), DraftGate)
    assert gate_for(False, cpu, 2048) is None
    assert gate_for(True, cpu, 0) is None


def test_the_engine_config_reaches_the_batch(golden):
    """The server's engine: the gate by default on the CPU (with a draft budget), off when asked,
    none without a draft budget; block diffusion alike."""
    from sampler.scheduler import Engine, EngineConfig

    assert isinstance(Engine(golden.model, golden.special, EngineConfig(max_batch_tokens=256)).batch.gate, DraftGate)
    assert Engine(golden.model, golden.special,
                  EngineConfig(max_batch_tokens=256, adaptive_drafting=False)).batch.gate is None
    assert Engine(golden.model, golden.special, EngineConfig(max_batch_tokens=256, draft_budget=0)).batch.gate is None


def test_block_diffusion_batch_takes_the_flag(llada2):
    assert isinstance(make_batch(llada2.model, llada2.special, 256, 2, draft_budget=64).gate, DraftGate)
    assert make_batch(llada2.model, llada2.special, 256, 2, draft_budget=64, adaptive_drafting=False).gate is None


# ---------------------------------------------------------------------- batches under the gate
@pytest.fixture(scope="module")
def golden():
    return load_checkpoint(TINY_LLADA, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def llada2(tmp_path_factory):
    d = make_moe_checkpoint(tmp_path_factory.mktemp("gate2") / "m", "llada2", seed=7)
    return load_checkpoint(d, "cpu", "float64")


def _events(events):
    """What step events say, the forward accounting aside."""
    return [(e.request_id, e.step, e.block, e.positions, e.token_ids, [round(c, 6) for c in e.confidences],
             e.masks_remaining, e.nfe, e.finished, e.gen_ids, e.edited_positions, e.edited_token_ids)
            for e in events]


def _drive(bundle, reqs, gate=None, cost_per_draft_row=None, adaptive=True, budget=4096):
    """Run reqs (joining one per step) through one batch; `gate` replaces the batch's, and with
    `cost_per_draft_row` its clock reads the batch's work instead of the time: 1 per forward,
    that much per draft row. Returns (events per request, draft rows run at each step, the batch)."""
    batch = make_batch(bundle.model, bundle.special, capacity_tokens=2048, max_requests=len(reqs),
                       draft_budget=budget, adaptive_drafting=adaptive)
    if gate is not None:
        if cost_per_draft_row is not None:
            gate.clock = lambda: batch.forwards + cost_per_draft_row * batch.draft_rows_run
        batch.gate = gate
    pending, events, drafted = list(enumerate(reqs)), {i: [] for i in range(len(reqs))}, []
    while pending or len(batch):
        if pending:
            i, (p, sp) = pending.pop(0)
            batch.add(i, p, sp)
        before = batch.draft_rows_run
        for ev in batch.step():
            events[ev.request_id].append(ev)
            if ev.finished:
                batch.remove(ev.request_id)
        drafted.append(batch.draft_rows_run - before)
    return events, drafted, batch


LLADA_REQS = [
    SamplingParams(gen_length=32, block_length=8, steps=32, draft_depth=4),
    SamplingParams(gen_length=24, block_length=8, steps=24, cache="dual", draft_depth=3),
    SamplingParams(gen_length=16, block_length=8, steps=16, temperature=0.8, seed=5, cache="prefix",
                   draft_depth=4),
    SamplingParams(gen_length=24, block_length=8, threshold=0.9, cache="dual", draft_depth=4),
    SamplingParams(gen_length=16, block_length=4, steps=16, cfg_scale=1.0, draft_depth=2),
    SamplingParams(gen_length=16, steps=16, temperature=1.0, seed=7),  # not drafting
]


def _llada_reqs():
    rnd = random.Random(5)
    return [([rnd.randrange(0, 280) for _ in range(rnd.randrange(2, 10))], sp) for sp in LLADA_REQS]


def _flipping_gate(seed):
    """A gate on a clock of random step times that switches modes every step or few: the harshest
    plan changes."""
    rnd, now = random.Random(seed), [0.0]

    def clock():
        now[0] += rnd.random()
        return now[0]
    return DraftGate(clock=clock, warmup=1, probe=1, interval=1, max_interval=2, margin=0.0)


@pytest.mark.parametrize("gate", ["default", "expensive", "flipping"])
def test_llada_batch_under_the_gate_is_exact(golden, gate):
    """A mixed LLaDA batch with joins: every event (ids, positions, confidences, NFE) with the gate
    on equals the run with drafting always on and the run without drafting."""
    reqs = _llada_reqs()
    off, _, fixed = _drive(golden, reqs, adaptive=False)
    plain = [generate(golden, [p], replace(sp, draft_depth=0), keep_events=True)[0] for p, sp in reqs]
    g = {"default": None, "expensive": DraftGate(), "flipping": _flipping_gate(3)}[gate]
    on, drafted, batch = _drive(golden, reqs, gate=g, cost_per_draft_row=5.0 if gate == "expensive" else None)
    assert batch.gate is not None and fixed.gate is None
    for i in range(len(reqs)):
        assert _events(on[i]) == _events(off[i])
        assert [e[1:] for e in _events(on[i])] == [e[1:] for e in _events(plain[i].events)]
    if gate == "default":  # a CPU batch's own gate: plain first, drafting tried after its warm-up
        assert batch.gate.steps[False] > 0
        assert (batch.gate.steps[True] > 0) == (batch.gate.steps[False] > 32)
    else:
        assert batch.gate.steps[True] > 0 and batch.gate.steps[False] > 0  # both modes ran
    if gate == "flipping":  # steps with and without draft rows alternate all along
        assert sum(1 for a, b in zip(drafted, drafted[1:]) if (a > 0) != (b > 0)) >= 8


def test_expensive_drafts_stop_after_the_warm_up(golden):
    """Drafting made expensive (5 forwards' cost per draft row): after the warm-up and one plain
    probe the batch plans no draft rows until the next drafting probe (32 plain steps later)."""
    p, sp = _llada_reqs()[0]
    _, drafted, batch = _drive(golden, [(p, sp)], gate=DraftGate(), cost_per_draft_row=5.0)
    assert sum(drafted[:3]) > 0  # the warm-up drafted
    assert sum(drafted[3:]) == 0 and batch.gate.preferred is False
    # the same request with drafting always on keeps drafting to its end
    _, always, _ = _drive(golden, [(p, sp)], adaptive=False)
    assert sum(always[3:]) > 0


def test_cheap_drafts_continue(golden):
    """Drafting made cheap (a draft row costs 1 % of a forward): the batch keeps drafting after
    the warm-up, as with drafting always on, apart from its short plain probes."""
    p, sp = _llada_reqs()[0]
    _, drafted, batch = _drive(golden, [(p, replace(sp, gen_length=64, steps=64))],
                               gate=DraftGate(), cost_per_draft_row=0.01)
    assert batch.gate.preferred is True and batch.gate.switches == 0
    assert sum(drafted[6:]) > 0
    assert batch.gate.steps[False] <= 2 * batch.gate.probe  # the plain probes only


def test_requests_without_drafting_leave_the_gate_alone(golden):
    """A batch whose requests do not draft records nothing and plans as before."""
    reqs = [(p, replace(sp, draft_depth=0)) for p, sp in _llada_reqs()[:3]]
    events, drafted, batch = _drive(golden, reqs, gate=DraftGate(), cost_per_draft_row=5.0)
    assert sum(drafted) == 0 and sum(batch.gate.steps.values()) == 0
    alone = [generate(golden, [p], sp, keep_events=True)[0] for p, sp in reqs]
    assert [[e[1:] for e in _events(events[i])] for i in range(3)] == \
        [[e[1:] for e in _events(a.events)] for a in alone]


LLADA2_REQS = [
    SamplingParams(gen_length=24, block_length=8, steps=8, threshold=1.0, draft_depth=4),
    SamplingParams(gen_length=20, block_length=8, threshold=0.6, editing_threshold=0.4, max_post_steps=3,
                   draft_depth=3),
    SamplingParams(gen_length=24, block_length=8, steps=8, threshold=0.9, temperature=0.8, seed=5,
                   draft_depth=2),
]


@pytest.mark.parametrize("gate", ["expensive", "flipping"])
def test_block_diffusion_under_the_gate_is_exact(llada2, gate):
    """LLaDA2.x block diffusion drafts under the same gate: the events equal drafting always on."""
    rnd = random.Random(9)
    reqs = [([rnd.randrange(0, 200) for _ in range(rnd.randrange(2, 9))], sp) for sp in LLADA2_REQS]
    off, _, _ = _drive(llada2, reqs, adaptive=False)
    g = DraftGate() if gate == "expensive" else _flipping_gate(4)
    on, drafted, batch = _drive(llada2, reqs, gate=g, cost_per_draft_row=5.0 if gate == "expensive" else None)
    for i in range(len(reqs)):
        assert _events(on[i]) == _events(off[i])
    assert batch.gate.steps[True] > 0 and batch.gate.steps[False] > 0
    if gate == "flipping":
        assert sum(1 for a, b in zip(drafted, drafted[1:]) if (a > 0) != (b > 0)) >= 4
    if gate == "expensive":
        assert batch.gate.preferred is False and sum(drafted[3:]) == 0


def test_a_cpu_gate_starts_plain_and_finds_cheap_drafting_at_its_first_probe():
    """On a CPU the gate starts without drafts (short requests pay no probe) and tries drafting
    after its warm-up; where drafting is cheaper per advanced step it keeps it from then on."""
    gate = gate_for(None, torch.device("cpu"), 2048)
    assert not gate.drafting
    modes = []
    for _ in range(31):
        modes.append(gate.drafting)
        gate.record(1.0, 1)
    assert not any(modes)
    gate.record(1.0, 1)  # the 32nd plain step: the probe of drafting starts
    assert gate.drafting
    for _ in range(3):  # its uncounted first step, then the probe: 3 steps advanced per second
        gate.record(1.0, 3)
    assert gate.drafting and gate.preferred and gate.switches == 1
