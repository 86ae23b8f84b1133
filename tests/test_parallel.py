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
