"""Tensor and expert parallelism on the CPU: two gloo ranks as processes (weights.parallel)."""

from __future__ import annotations

import pytest
import torch

from tests.golden_sets import GOLDEN_ROOT as GOLDEN_DIR
from weights.checkpoint import CheckpointError, load_checkpoint
from weights.family import read_config
from weights.parallel import ParallelError, Shard, TensorParallel, check_divisible, run_ranks

SETS = ("tiny-llada", "tiny-llada-moe", "tiny-llada2")


def _forwards(tp):
    """Per set: full logits (gathered) of a fixed batch, and this rank's parameters by name."""
    torch.set_num_threads(1)
    out = {}
    for s in SETS:
        b = load_checkpoint(GOLDEN_DIR / s, device="cpu", dtype="float64", tp=tp)
        ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = b.model.full_logits(ids, block_length=4 if b.config.block_diffusion else None)
        params = {n: t.clone() for n, t in b.model.checkpoint_tensors().items()}
        out[s] = (logits, params, b.model.vocab_lo)
    return out


@pytest.fixture(scope="module")
def rank0():
    return run_ranks(2, _forwards)


@pytest.mark.parametrize("name", SETS)
def test_two_ranks_compute_the_one_rank_forward(rank0, name):
    one = _forwards(None)[name][0]
    two = rank0[name][0]
    assert two.shape == one.shape
    assert torch.allclose(two, one, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", SETS)
def test_rank_holds_its_slices_only(rank0, name):
    """Rank 0 holds the first half of each split tensor (both halves of a fused q/k/v's pieces),
    the first half of the experts and whole copies of the replicated tensors."""
    from safetensors import safe_open
    import json

    path = GOLDEN_DIR / name
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    _, params, vocab_lo = rank0[name]
    assert vocab_lo == 0
    n_experts = sum(1 for n in index if n.endswith(".gate_proj.weight") and ".experts." in n)
    held = sum(1 for n in params if n.endswith(".gate_proj.weight") and ".experts." in n)
    assert held * 2 == n_experts
    smaller = 0
    for n, t in params.items():
        with safe_open(str(path / index[n]), framework="pt") as h:
            full = h.get_tensor(n).to(torch.float64)
        if "query_key_value" in n:  # fused: rank 0 holds the first half of q, of k and of v
            c = json.loads((path / "config.json").read_text())
            d = c["head_dim"]
            q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
            want = torch.cat([full[:q // 2], full[q:q + kv // 2], full[q + kv:q + kv + kv // 2]])
        elif t.shape == full.shape:
            want = full
        else:
            dim = next(i for i, (a, b) in enumerate(zip(t.shape, full.shape)) if a != b)
            want = full.narrow(dim, 0, t.shape[dim])
        smaller += t.numel() < full.numel()
        assert torch.equal(t, want), n
    assert smaller > 0


def test_shard_ranges_cover_fused_pieces():
    tp = TensorParallel(1, 2)
    assert Shard(0).ranges(8, tp) == [(4, 8)]
    assert Shard(0, (4, 2, 2)).ranges(8, tp) == [(2, 4), (5, 6), (7, 8)]


def test_size_that_does_not_divide_is_refused_by_field():
    cfg = read_config(GOLDEN_DIR / "tiny-llada" / "config.json")  # 4 heads, 320 rows, width 96
    check_divisible(cfg, 2)
    with pytest.raises(ParallelError) as e:
        check_divisible(cfg, 3)
    msg = str(e.value)
    assert "\n" not in msg and "num_attention_heads=4" in msg and "1, 2, 4" in msg 


def test_loader_refuses_a_size_that_does_not_divide():
    with pytest.raises(CheckpointError, match="num_attention_heads=4"):
        load_checkpoint(GOLDEN_DIR / "tiny-llada", device="cpu", tp=TensorParallel(0, 3))


# ---------------------------------------------------------------- selection over a split vocabulary
def _selection(tp):
    """Sharded candidates against the full-vocabulary reference, on rows with ties, bans and noise."""
    from kernels.selection import sample_candidates_reference, sample_candidates_sharded

    g = torch.Generator().manual_seed(5)
    n, v = 12, 40
    logits = torch.randn(n, v, generator=g, dtype=torch.float64)
    logits[0, 3] = logits[0, 27] = 9.0            # a tie across the two halves: the lower id wins
    logits[1, 30] = 9.0                           # the best token on rank 1 only
    logits[2, 5] = logits[2, 6] = 9.0             # a tie inside rank 0's half
    temp = torch.tensor([0.0] * 6 + [1.0, 0.5, 2.0, 1.0, 1.0, 0.7], dtype=torch.float32)
    seed = torch.arange(n, dtype=torch.int64) + 11
    nonce = torch.full((n,), 3, dtype=torch.int64)
    pos = torch.arange(n, dtype=torch.int64) * 2
    ban_rows = torch.zeros(n, dtype=torch.bool)
    ban_rows[[1, 4, 9]] = True
    out = []
    for ban_ids, rows in ((None, None), ([30], ban_rows), ([3, 27], None)):
        want = sample_candidates_reference(logits, temp, seed, nonce, pos, ban_ids, rows)
        lo = 0 if tp is None else tp.rank * v // 2
        local = logits if tp is None else logits[:, lo:lo + v // 2]
        got = None if tp is None else sample_candidates_sharded(local, temp, seed, nonce, pos, lo, tp,
                                                                ban_ids, rows)
        out.append((want, got))
    return out


def test_sharded_candidates_equal_full_vocabulary_selection():
    for (x_want, c_want), (x_got, c_got) in run_ranks(2, _selection):
        assert torch.equal(x_got, x_want)
        assert torch.allclose(c_got, c_want, rtol=1e-6, atol=0)
    (x0, _), _ = _selection(None)[0]
    assert x0[0] == 3 and x0[1] == 30 and x0[2] == 5


# ---------------------------------------------------------------- whole requests under TP 2
def _requests():
    from sampler.params import SamplingParams as P

    base = dict(gen_length=16, block_length=8, steps=8)
    return {
        "tiny-llada": [
            ([5, 9, 14, 3], P(**base, temperature=1.0, seed=7)),
            ([8, 2, 2, 40, 7], P(**base, temperature=0.8, seed=3, top_k=5, logprobs=3)),
            ([11, 12], P(**base, temperature=1.0, seed=1, top_p=0.8, min_p=0.05)),
            ([6, 6, 6], P(**base, temperature=0.5, seed=9, eos_bias=-3.0, ban_eos=True)),
            ([21, 4], P(**base, temperature=1.0, seed=2, defer_eos=True, cfg_scale=1.5)),
            ([31, 32, 33], P(**base, temperature=1.0, seed=4, remasking="random")),
            ([7, 1], P(**base, threshold=0.3, cache="dual")),
        ],
        "tiny-llada2": [
            ([5, 9, 14, 3], P(gen_length=16, temperature=1.0, seed=7)),
            ([8, 2, 40, 7], P(gen_length=16, ban_eos=True)),
        ],
    }


def _generate(tp):
    from sampler.generate import generate
    from sampler.likelihood import ScoreBatch, ScoreJob

    torch.set_num_threads(1)
    out = {}
    for name, reqs in _requests().items():
        b = load_checkpoint(GOLDEN_DIR / name, device="cpu", dtype="float64", tp=tp)
        blocks = b.config.block_diffusion
        params = [p.for_block_diffusion() if blocks else p for _, p in reqs]
        res = generate(b, [p for p, _ in reqs], params, keep_events=True)
        alone = [generate(b, [p], [q])[0].gen_ids for (p, _), q in zip(reqs[:2], params[:2])]
        logprobs = [[(e.logprobs, e.top_logprobs) for e in r.events] for r in res]
        out[name] = ([(r.gen_ids, r.nfe) for r in res], alone, logprobs)
        if not blocks:
            sb = ScoreBatch(b.model, b.special.mask)
            job = ScoreJob([([5, 9, 14], [3, 8, 2])], mc_samples=4, seed=1, cfg_scale=0.0, sink=None)
            sb.add(job)
            sb.run(sb.take(10_000))
            out[name + ":score"] = [(p.result().logprob, p.result().is_greedy) for p in job.state]
    return out


def test_requests_under_two_ranks_match_one_rank():
    """Sampled rows (Gumbel noise of global ids), filters, logprobs, EOS bias and bans, deferred
    stops, CFG, random remasking, threshold with the dual cache, block diffusion and scoring:
    identical ids, NFE and logprobs batched, and alone (batch invariance under TP)."""
    two = run_ranks(2, _generate)
    one = _generate(None)
    for name in _requests():
        ids1, alone1, lp1 = one[name]
        ids2, alone2, lp2 = two[name]
        assert ids2 == ids1, name
        assert alone2 == alone1 == [g for g, _ in ids1[:2]], name
        for a, b in zip(lp1, lp2):
            for (l1, t1), (l2, t2) in zip(a, b):
                assert (l1 is None) == (l2 is None)
                if l1 is not None:
                    assert l2 == pytest.approx(l1, abs=1e-9)
                    assert [[t for t, _ in alts] for alts in t2] == [[t for t, _ in alts] for alts in t1]
    (lp_two, greedy_two), = two["tiny-llada:score"]
    (lp_one, greedy_one), = one["tiny-llada:score"]
    assert lp_two == pytest.approx(lp_one, abs=1e-9) and greedy_two == greedy_one
    assert any(lp is not None for ev in one["tiny-llada"][2][1] for lp, _ in [ev])


@pytest.mark.parametrize("name", SETS)
def test_conformance_under_two_ranks(name, capsys):
    """Every golden case (ids and NFE) and the forward logits, batched, in fp64 on two ranks."""
    from sampler.conformance import main

    path = GOLDEN_DIR / name
    rc = main(["--model", str(path), "--cases", str(path / "cases.json"), "--dtype", "float64",
               "--batched", "--tensor-parallel-size", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASS forward_logits" in out and " 0 failed" in out


def test_drafting_asked_under_two_ranks_keeps_the_ids(capsys):
    """Under tensor parallelism requests run at draft depth 0 (the drafting stage selects over the
    whole vocabulary): asking for drafts changes nothing, every case still matches."""
    from sampler.conformance import main

    path = GOLDEN_DIR / "tiny-llada"
    rc = main(["--model", str(path), "--cases", str(path / "cases.json"), "--dtype", "float64",
               "--batched", "--tensor-parallel-size", "2", "--draft-depth", "4"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert " 0 failed" in out


# ---------------------------------------------------------------- the engine over two ranks
def _engine(tp, pipelined):
    """Rank 0: an engine with staggered submissions and a scoring job; rank 1: its follower."""
    import queue
    import time

    from sampler.likelihood import ScoreJob
    from sampler.runner import serve_follower
    from sampler.scheduler import Engine, EngineConfig, Handle
    from tests.test_scheduler import CASES

    torch.set_num_threads(1)
    b = load_checkpoint(GOLDEN_DIR / "tiny-llada", device="cpu", dtype="float32", tp=tp)
    cfg = EngineConfig(max_batch_size=4, max_batch_tokens=256, early_stop=False, pipelined=pipelined)
    if tp is not None and tp.rank != 0:
        serve_follower(b.model, b.special, cfg)
        return None
    eng = Engine(b.model, b.special, cfg).start()
    handles = []
    for i, (p, sp) in enumerate(CASES):
        q = queue.Queue()
        handles.append((eng.submit([Handle(p, sp, q.put)])[0], q))
        time.sleep(0.003 * i)
    sq = queue.Queue()
    eng.submit_score(ScoreJob([([5, 9, 14], [3, 8, 2])], mc_samples=4, seed=1, cfg_scale=0.0, sink=sq.put))
    out = []
    for _, q in handles:
        while True:
            kind, payload = q.get(timeout=120)
            if kind in ("done", "error"):
                break
        out.append((kind, payload.gen_ids if kind == "done" else str(payload)))
    kind, scores = sq.get(timeout=120)
    eng.shutdown(grace=0)
    return out, kind, [(s.logprob, s.is_greedy) for s in scores]


@pytest.mark.parametrize("pipelined", [False, True], ids=["events-at-once", "events-one-step-late"])
def test_engine_on_two_ranks_answers_as_on_one(pipelined):
    """Rank 0 plans and admits; the follower applies the broadcast operations and runs the same
    steps on its shard: every answer and the scoring result equal the one-rank engine's."""
    two = run_ranks(2, _engine, pipelined)
    one = _engine(None, pipelined)
    assert all(kind == "done" for kind, _ in one[0])
    assert two[0] == one[0]
    assert two[1] == one[1] == "done"
    assert two[2][0][0] == pytest.approx(one[2][0][0], abs=1e-4) and two[2][0][1] == one[2][0][1]


# ---------------------------------------------------------------- llada-serve --plan
FLASH = GOLDEN_DIR.parents[1] / "deploy" / "configs" / "LLaDA2.0-flash"


def _plan(*args):
    from tests.test_server_cli import run_cli

    return run_cli(["--plan", *args])


def test_plan_of_llada2_flash_without_weights():
    """The directory holds config.json only: the plan never reads weights."""
    assert not list(FLASH.glob("*.safetensors"))
    r = _plan("--model", str(FLASH), "--tensor-parallel-size", "2", "--plan-gpu", "H100")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "102.89B parameters" in out and "does not fit" in out
    assert "smallest tensor-parallel size that fits: 4" in out
    weights = float(out.split("weights")[1].split("GiB")[0])
    assert weights == pytest.approx(102.89e9 * 2 / 2 / 2**30, rel=0.01)  # half of the bf16 bytes
    r = _plan("--model", str(FLASH), "--tensor-parallel-size", "4", "--plan-gpu", "h200")
    assert r.returncode == 0 and "fits" in r.stdout and "does not fit" not in r.stdout


def test_plan_refuses_unknown_gpus_and_sizes():
    r = _plan("--model", str(FLASH), "--plan-gpu", "Z9")
    assert r.returncode == 2 and "H100" in r.stderr
    r = _plan("--model", str(FLASH), "--tensor-parallel-size", "8", "--plan-gpu", "H100")
    assert r.returncode == 2 and "num_key_value_heads=4" in r.stderr and "1, 2, 4" in r.stderr
