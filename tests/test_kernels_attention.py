"""The Triton attention kernel against the PyTorch reference.

Without a GPU they run under the Triton interpreter on CPU tensors (tests/kernel_testing.py sets
TRITON_INTERPRET=1 before triton is imported; checked). With a GPU (or TRITON_INTERPRET=0 exported) the same tests
run the compiled kernels on CUDA.
Inputs are fresh random draws every run; the seed is printed and named in every failure
(KERNEL_TEST_SEED=<n> replays one).
"""

import math

import pytest
import torch

from kernel_testing import SEED, case_random, dtypes, kernel_module  # first: chooses the interpreter
from kernels.attention import attention_reference  # noqa: E402

attn_mod, DEVICE = kernel_module("kernels.attention_triton", "_attn_fwd")
INTERPRET = DEVICE == "cpu"


DTYPE_PARAMS, DTYPES = dtypes(INTERPRET)  # bf16 on CUDA only
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (3e-3, 2e-2), torch.bfloat16: (2e-2, 5e-2)}


@pytest.fixture
def gen(request):
    return case_random(request)


def _layout(q_lens, k_ranges, device=DEVICE):
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    cu_q = torch.tensor(cu, dtype=torch.int32, device=device)
    k_start = torch.tensor([s for s, _ in k_ranges], dtype=torch.int32, device=device)
    k_len = torch.tensor([n for _, n in k_ranges], dtype=torch.int32, device=device)
    return cu_q, k_start, k_len


# Compiled on a GPU, every new shape class would run the autotuner (several compilations): pin the
# tiles there, and exercise the autotuned launch in one test of its own.
FIXED = None if INTERPRET else (32, 32)


def _check(q, k, v, cu_q, k_start, k_len, extra_rows=0, scale=None, max_q="auto", blocks=FIXED,
           ctx="", tol=None):
    """Run the kernel into a NaN-poisoned buffer; compare every element with a float64 oracle."""
    tq, h, d = q.shape
    out = torch.full((tq + extra_rows, h, d), float("nan"), dtype=q.dtype, device=q.device)
    n_lens = (cu_q[1:] - cu_q[:-1]).tolist()
    mq = max(n_lens) if max_q == "auto" else max_q
    res = attn_mod.attention_triton(q, k, v, cu_q, k_start, k_len, mq, None, scale,
                                    out=out[:tq], _blocks=blocks)
    assert res.data_ptr() == out.data_ptr()
    ref = attention_reference(q.double(), k.double(), v.double(), cu_q, k_start, k_len, None, None,
                              scale)
    got = out[:tq].double()
    msg = f"seed {SEED} {ctx} q_lens={n_lens} k_start={k_start.tolist()} k_len={k_len.tolist()}"
    assert not torch.isnan(got).any(), f"unwritten or NaN outputs: {msg}"
    atol, rtol = tol or TOL[q.dtype]
    err = (got - ref).abs()
    bad = err > atol + rtol * ref.abs()
    assert not bad.any(), f"max err {err.max().item():.3g} at {bad.nonzero()[:5].tolist()}: {msg}"
    if extra_rows:
        assert torch.isnan(out[tq:]).all(), f"kernel wrote past the packed rows: {msg}"
    # The dtype-matched reference (what the CPU path serves) agrees to the same tolerance.
    ref_same = attention_reference(q, k, v, cu_q, k_start, k_len, None, None, scale).double()
    assert torch.allclose(got, ref_same, atol=2 * atol, rtol=2 * rtol), msg


def _rand(shape, dtype):
    return torch.randn(shape, device=DEVICE, dtype=torch.float32).to(dtype)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_packed_self_attention_ragged_gqa(dtype, gen):
    """Each segment attends to its own packed rows; lengths 1, tile +- 1 and random; GQA 4:2."""
    h, kh, d = 4, 2, 32
    q_lens = [1, 15, 17, gen.randint(2, 40)]
    gen.shuffle(q_lens)
    cu_q, _, _ = _layout(q_lens, [(0, 0)] * len(q_lens))
    k_start = cu_q[:-1].clone()
    k_len = cu_q[1:] - cu_q[:-1]
    t = int(cu_q[-1])
    q, k, v = _rand((t, h, d), dtype), _rand((t, kh, d), dtype), _rand((t, kh, d), dtype)
    _check(q, k, v, cu_q, k_start, k_len, extra_rows=3, ctx=f"{dtype}")


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_query_slices_over_longer_keys(dtype, gen):
    """Block queries (a slice) over a longer, arbitrary key range; ranges overlap; MQA."""
    h, kh, d = 4, 1, 16
    tk = 120
    q_lens, ranges = [], []
    for ql in (1, gen.randint(2, 20), 16, 33):
        kl = gen.randint(ql, 70)
        ranges.append((gen.randint(0, tk - kl), kl))
        q_lens.append(ql)
    cu_q, k_start, k_len = _layout(q_lens, ranges)
    t = int(cu_q[-1])
    q, k, v = _rand((t, h, d), dtype), _rand((tk, kh, d), dtype), _rand((tk, kh, d), dtype)
    _check(q, k, v, cu_q, k_start, k_len, ctx=f"{dtype}")


@pytest.mark.parametrize("d", [64, 128])
def test_head_dims_that_matter(d, gen):
    h, kh = 2, 2
    q_lens = [gen.randint(1, 20), 17]
    ranges = [(0, gen.randint(1, 40)), (5, 31)]
    cu_q, k_start, k_len = _layout(q_lens, ranges)
    t = int(cu_q[-1])
    for dtype in DTYPES:
        q, k, v = _rand((t, h, d), dtype), _rand((40, kh, d), dtype), _rand((40, kh, d), dtype)
        _check(q, k, v, cu_q, k_start, k_len, ctx=f"d={d} {dtype}")


@pytest.mark.parametrize("d", [16, 256])
def test_head_dim_extremes(d, gen):
    q_lens, ranges = [3, 18], [(0, 18), (2, 20)]
    cu_q, k_start, k_len = _layout(q_lens, ranges)
    q, k, v = _rand((21, 2, d), torch.float32), _rand((24, 1, d), torch.float32), _rand(
        (24, 1, d), torch.float32)
    _check(q, k, v, cu_q, k_start, k_len, ctx=f"d={d}")


@pytest.mark.parametrize("d", [8, 12, 24])
def test_head_dims_not_a_power_of_two(d, gen):
    """Small test models have head dims like 12: zero-padded to the next power of two (>= 16)."""
    q_lens, ranges = [3, 17], [(0, 20), (4, 17)]
    cu_q, k_start, k_len = _layout(q_lens, ranges)
    for dtype in DTYPES:
        q, k, v = _rand((20, 4, d), dtype), _rand((22, 2, d), dtype), _rand((22, 2, d), dtype)
        _check(q, k, v, cu_q, k_start, k_len, extra_rows=2, ctx=f"d={d} {dtype}")


@pytest.mark.parametrize("blocks", [(32, 16), (16, 32)])
def test_other_tile_shapes_and_strided_inputs(blocks, gen):
    """Unequal tile sizes; q, k, v as strided views of one fused QKV projection; custom scale."""
    h, kh, d = 4, 2, 16
    q_lens = [gen.randint(1, 50), 1, 32]
    cu_q, _, _ = _layout(q_lens, [(0, 0)] * 3)
    t = int(cu_q[-1])
    k_start, k_len = cu_q[:-1].clone(), cu_q[1:] - cu_q[:-1]
    qkv = _rand((t, h + 2 * kh, d), torch.float16)
    q, k, v = qkv[:, :h], qkv[:, h:h + kh], qkv[:, h + kh:]
    assert not q.is_contiguous()
    _check(q, k, v, cu_q, k_start, k_len, scale=0.3, blocks=blocks, ctx=f"blocks={blocks}")


def test_large_logits_stay_finite(gen):
    """Scores far above exp's range: the running max must keep the softmax finite."""
    h, d = 2, 32
    q_lens, ranges = [5, 20], [(0, 30), (10, 25)]
    cu_q, k_start, k_len = _layout(q_lens, ranges)
    q = _rand((25, h, d), torch.float32) * 8
    k = _rand((35, h, d), torch.float32) * 8
    v = _rand((35, h, d), torch.float32)
    # Scores of several hundred: fp32 rounding of the score itself bounds the agreement.
    _check(q, k, v, cu_q, k_start, k_len, ctx="large scores", tol=(2e-4, 2e-4))


def test_empty_segments_and_empty_key_ranges(gen):
    """A segment with no queries writes nothing; one with no keys gives zeros (as the reference)."""
    h, d = 2, 16
    q_lens, ranges = [0, 4, 3, 0], [(0, 5), (0, 0), (2, 19), (0, 3)]
    cu_q, k_start, k_len = _layout(q_lens, ranges)
    q, k, v = _rand((7, h, d), torch.float32), _rand((21, h, d), torch.float32), _rand(
        (21, h, d), torch.float32)
    _check(q, k, v, cu_q, k_start, k_len, ctx="empty")
    out = attn_mod.attention_triton(q, k, v, cu_q, k_start, k_len, None, None, None)
    assert torch.equal(out[0:4], torch.zeros_like(out[0:4]))


def test_max_q_from_cu_and_dense_layout(gen):
    """max_q=None reads it from cu_q; a dense batch (the reference's batched branch)."""
    h, kh, d, b, n = 2, 1, 32, 3, 19
    cu_q = torch.arange(0, b * n + 1, n, dtype=torch.int32, device=DEVICE)
    k_start, k_len = cu_q[:-1].clone(), torch.full((b,), n, dtype=torch.int32, device=DEVICE)
    q, k, v = _rand((b * n, h, d), torch.float16), _rand((b * n, kh, d), torch.float16), _rand(
        (b * n, kh, d), torch.float16)
    _check(q, k, v, cu_q, k_start, k_len, max_q=None, ctx="dense")


def test_rejects_bad_shapes():
    q = torch.zeros(4, 3, 16, device=DEVICE)
    k = torch.zeros(4, 2, 16, device=DEVICE)
    cu, ks, kl = _layout([4], [(0, 4)])
    with pytest.raises(ValueError):
        attn_mod.attention_triton(q, k, k, cu, ks, kl, 4, 4, None)
    q = torch.zeros(4, 2, 288, device=DEVICE)
    k = torch.zeros(4, 2, 288, device=DEVICE)
    with pytest.raises(ValueError):
        attn_mod.attention_triton(q, k, k, cu, ks, kl, 4, 4, None)


def test_scale_default_matches_reference(gen):
    d = 64
    cu, ks, kl = _layout([7], [(0, 9)])
    q, k, v = _rand((7, 1, d), torch.float32), _rand((9, 1, d), torch.float32), _rand(
        (9, 1, d), torch.float32)
    a = attn_mod.attention_triton(q, k, v, cu, ks, kl, 7, 9, None)
    b = attn_mod.attention_triton(q, k, v, cu, ks, kl, 7, 9, 1.0 / math.sqrt(d))
    assert torch.allclose(a, b, atol=1e-6), f"seed {SEED}"


def test_autotuned_launch(gen):
    """The launch without pinned tiles (autotuned on CUDA, 16x16 under the interpreter)."""
    h, kh, d = 4, 2, 64
    q_lens, ranges = [gen.randint(1, 40), 40, 7], [(0, 45), (10, 40), (3, 60)]
    cu_q, k_start, k_len = _layout(q_lens, ranges)
    t = int(cu_q[-1])
    q, k, v = _rand((t, h, d), torch.float16), _rand((64, kh, d), torch.float16), _rand(
        (64, kh, d), torch.float16)
    _check(q, k, v, cu_q, k_start, k_len, blocks=None, ctx="autotuned")


def test_the_reference_takes_the_layouts_lists():
    """A layout's Python lists (read once per layout) give the reference the same output as reading
    its tensors, dense and segmented, and the lists are read once however many layers ask."""
    from weights.layers import AttnLayout

    g = torch.Generator().manual_seed(SEED)
    q, k, v = (torch.randn(12, 2, 8, generator=g) for _ in range(3))
    for lens, starts, klens in [([12], [0], [12]), ([4, 8, 0], [0, 4, 12], [4, 8, 1])]:
        lay = AttnLayout.build(lens, starts, klens, torch.arange(12), "cpu")
        want = attention_reference(q, k, v, lay.cu_q, lay.k_start, lay.k_len)
        got = attention_reference(q, k, v, lay.cu_q, lay.k_start, lay.k_len, host=lay.host_lists)
        assert torch.equal(got, want)
        assert lay.host_lists() is lay.host_lists()
