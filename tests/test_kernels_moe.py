"""The grouped MoE Triton kernels against the PyTorch reference, and the reference against the
plain formula.

Without a GPU the kernels run under the Triton interpreter on CPU tensors (fp32 and fp16); with
one, compiled on CUDA. Inputs are fresh random draws every run (KERNEL_TEST_SEED=<n> replays one).
"""

import pytest
import torch
import torch.nn.functional as F

from kernel_testing import SEED, case_random, dtypes, kernel_module  # first: chooses the interpreter

from kernels.moe import moe_ffn, moe_ffn_reference  # noqa: E402

moe_mod, DEVICE = kernel_module("kernels.moe_triton", "_moe_up")
DTYPE_PARAMS, _ = dtypes(DEVICE == "cpu")  # bf16 compiled on CUDA only


@pytest.fixture
def gen(request):
    return case_random(request)


def _problem(gen, t, d, f, e, k, dtype, device="cpu", skew=False):
    x = torch.randn(t, d).to(dtype)
    gate_up = (torch.randn(e, 2 * f, d) / d ** 0.5).to(dtype)
    down = (torch.randn(e, d, f) / f ** 0.5).to(dtype)
    if skew:  # most tokens on two experts, several experts with no token at all
        pool = [0, 1] + [gen.randrange(e) for _ in range(2)]
        ids = torch.tensor([gen.sample(pool if len(set(pool)) >= k else range(e), k) for _ in range(t)])
    else:
        ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    w = torch.rand(t, k)
    return [a.to(device) for a in (x, ids, w, gate_up, down)]


def _plain(x, ids, w, gate_up, down):
    """Per token, per choice, in float64: the formula as written."""
    f = down.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = gate_up[e].double() @ x[t].double()
            out[t] += w[t, j].double() * (down[e].double() @ (F.silu(h[:f]) * h[f:]))
    return out


def test_reference_equals_the_plain_formula(gen):
    x, ids, w, gu, dn = _problem(gen, 23, 20, 12, 7, 3, torch.float64)
    assert torch.allclose(moe_ffn_reference(x, ids, w, gu, dn), _plain(x, ids, w, gu, dn), atol=1e-12)


def test_reference_keeps_tokens_apart(gen):
    """A token's output does not depend on which other tokens share the call (up to the matmul's
    rounding, which may depend on the row count)."""
    x, ids, w, gu, dn = _problem(gen, 30, 16, 8, 5, 2, torch.float64)
    whole = moe_ffn_reference(x, ids, w, gu, dn)
    part = moe_ffn_reference(x[7:12], ids[7:12], w[7:12], gu, dn)
    assert torch.allclose(whole[7:12], part, atol=1e-13)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("t,d,f,e,k,skew", [
    (37, 48, 40, 6, 2, False),   # dims that are not multiples of the tiles
    (5, 32, 16, 16, 4, False),   # fewer tokens than experts: most tiles empty
    (64, 16, 24, 8, 1, True),    # top-1, skewed load, idle experts
    (1, 24, 8, 4, 4, False),     # one token to every expert
])
def test_kernel_matches_reference(gen, dtype, t, d, f, e, k, skew):
    x, ids, w, gu, dn = _problem(gen, t, d, f, e, k, dtype, DEVICE, skew)
    got = moe_mod.moe_ffn_triton(x, ids, w, gu, dn)
    want = moe_ffn_reference(x, ids, w, gu, dn)
    assert got.dtype == dtype and got.shape == (t, d)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol * max(1.0, want.float().abs().max().item()), f"KERNEL_TEST_SEED={SEED}: error {err}"


def test_kernel_tiles_do_not_change_the_result(gen):
    x, ids, w, gu, dn = _problem(gen, 40, 32, 32, 6, 2, torch.float32, DEVICE)
    a = moe_mod.moe_ffn_triton(x, ids, w, gu, dn, _tiles=(16, 16, 16))
    b = moe_mod.moe_ffn_triton(x, ids, w, gu, dn, _tiles=(32, 32, 16))
    assert torch.allclose(a, b, atol=1e-5)


def test_align_groups_pairs_by_expert(gen):
    t, k, e, bm = 29, 3, 9, 8
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)]).to(DEVICE)
    ids[ids == 4] = 5  # expert 4 idle
    rows, tile_e = moe_mod.align(ids, e, bm)
    n = t * k
    assert rows.numel() % bm == 0 and tile_e.numel() == rows.numel() // bm
    flat = ids.reshape(-1).cpu()
    seen = []
    for tile in range(tile_e.numel()):
        chunk = rows[tile * bm:(tile + 1) * bm].cpu()
        real = chunk[chunk < n]
        if int(tile_e[tile]) < 0:
            assert len(real) == 0
            continue
        assert bool((flat[real.long()] == int(tile_e[tile])).all())
        seen += real.tolist()
    assert sorted(seen) == list(range(n))  # every pair exactly once
    assert 4 not in tile_e.tolist()


def test_dispatcher_uses_the_reference_off_cuda(gen):
    x, ids, w, gu, dn = _problem(gen, 9, 16, 8, 4, 2, torch.float64)
    assert torch.equal(moe_ffn(x, ids, w, gu, dn), moe_ffn_reference(x, ids, w, gu, dn))
    assert moe_ffn(x[:0], ids[:0], w[:0], gu, dn).shape == (0, 16)
