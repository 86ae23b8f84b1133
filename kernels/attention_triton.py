"""Fused bidirectional (non-causal) flash attention over packed variable-length segments.

Same contract as `kernels.attention.attention_reference`:

- q [Tq, H, D] holds the queries of B segments back to back; segment b owns rows
  `cu_q[b]:cu_q[b+1]` (int32 [B+1]);
- k, v [Tk, KH, D], H % KH == 0 (grouped-query attention: query head h reads key head
  h // (H // KH));
- segment b attends, with no mask inside the range, to key rows
  `k_start[b] : k_start[b] + k_len[b]`, so a query slice (the current block) may read a longer
  key range (the cache modes);
- the result [Tq, H, D] is in q's dtype; scores, softmax and the output accumulate in fp32;
- D is any head dim up to 256 (powers of two unpadded, others zero-padded in registers).

One program computes one tile of BLOCK_M queries of one segment for one head: the grid is
(ceil(max_q / BLOCK_M), H, B) and a program whose tile lies past its segment's end returns at
once, so no host synchronisation is needed to build it (the launch stays capturable in a CUDA
graph) and no arithmetic is spent on padding. Inside a program the keys of the segment are
streamed in tiles of BLOCK_N with the online softmax (running max and running sum, in base 2 with
the scale folded into one multiplier). Edges (queries past the segment, keys past k_len) are masked.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from kernels.launch import autotune_allowed, cached_config, capture_launches, launch_options, size_class

__all__ = ["attention_triton", "autotune_allowed", "cached_config", "capture_launches"]

_LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    """True when kernels run in the Triton interpreter (TRITON_INTERPRET=1)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older Triton: the environment variable itself
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _compiled(t: torch.Tensor) -> bool:
    """True when a launch on `t` runs the compiled (autotuned) kernel: a CUDA tensor, no interpreter."""
    return t.is_cuda and not _interpreting()


@triton.jit
def _attn_tile(acc, m_i, l_i, q, k_base, v_base, k_rows, n_ok, stride_kt, stride_vt, offs_d, d_ok,
               qk_scale, MASKED: tl.constexpr, EVEN_D: tl.constexpr, IEEE: tl.constexpr):
    """One key tile of the online softmax; MASKED only for the segment's ragged last tile,
    EVEN_D false only for head dims that are not a power of two (zero-padded to BLOCK_D)."""
    if MASKED or (not EVEN_D):
        kt = tl.load(k_base + k_rows[None, :] * stride_kt + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
    else:
        kt = tl.load(k_base + k_rows[None, :] * stride_kt + offs_d[:, None])
    if IEEE:
        s = tl.dot(q, kt, input_precision="ieee")
    else:
        s = tl.dot(q, kt)
    if MASKED:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    # Every tile holds at least one real key, so m_new is finite.
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if MASKED or (not EVEN_D):
        vt = tl.load(v_base + k_rows[:, None] * stride_vt + offs_d[None, :],
                     mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        vt = tl.load(v_base + k_rows[:, None] * stride_vt + offs_d[None, :])
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["b_bucket"])
def _attn_fwd(
    q_ptr, k_ptr, v_ptr, o_ptr,
    cu_q_ptr, k_start_ptr, k_len_ptr,
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_ot, stride_oh,
    qk_scale,  # softmax scale * log2(e)
    q_bucket,  # autotuning key only (the query-length class of the launch)
    b_bucket,  # autotuning key only (the segment-count class of the launch, kernels.launch.size_class)
    GROUP: tl.constexpr,  # H // KH
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two (at least 16)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs: full-precision products instead of tf32
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    seg = tl.program_id(2)

    q0 = tl.load(cu_q_ptr + seg)
    q_len = tl.load(cu_q_ptr + seg + 1) - q0
    if tile * BLOCK_M >= q_len:
        return
    k0 = tl.load(k_start_ptr + seg)
    k_len = tl.load(k_len_ptr + seg)
    kv_head = head // GROUP

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < q_len

    q_rows = (q0 + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=m_ok[:, None] & d_ok[None, :], other=0.0,
    )

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    n_full = (k_len // BLOCK_N) * BLOCK_N
    for n0 in range(0, n_full, BLOCK_N):
        k_rows = (k0 + n0 + offs_n).to(tl.int64)
        acc, m_i, l_i = _attn_tile(acc, m_i, l_i, q, k_base, v_base, k_rows, offs_n < BLOCK_N,
                                   stride_kt, stride_vt, offs_d, d_ok, qk_scale,
                                   MASKED=False, EVEN_D=BLOCK_D == HEAD_DIM, IEEE=IEEE)
    if n_full < k_len:
        k_rows = (k0 + n_full + offs_n).to(tl.int64)
        acc, m_i, l_i = _attn_tile(acc, m_i, l_i, q, k_base, v_base, k_rows,
                                   (n_full + offs_n) < k_len, stride_kt, stride_vt, offs_d, d_ok,
                                   qk_scale, MASKED=True, EVEN_D=BLOCK_D == HEAD_DIM, IEEE=IEEE)

    # An empty key range gives zeros (as the reference's empty product does).
    denom = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / denom[:, None]
    tl.store(
        o_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )


def _cuda_configs():
    cfgs = []
    for bm, bn, warps, stages in (
        (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4),
        (64, 64, 4, 3), (64, 128, 4, 3), (64, 32, 4, 4),
        (32, 64, 4, 3), (32, 128, 4, 3), (32, 32, 4, 4), (16, 64, 4, 3),
    ):
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages))
    return cfgs


def _prune(configs, named_args, **kwargs):
    """Keep tiles that fit the head dimension and do not dwarf the longest query segment."""
    d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    q_bucket = named_args["q_bucket"]
    out = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if d >= 256 and (bm > 64 or bn > 64):
            continue
        if bm > max(16, q_bucket) or (q_bucket >= 64 and bm < 64):
            continue
        out.append(c)
    return out or [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2)]


def _default_config(block_d, q_bucket):
    """(BLOCK_M, BLOCK_N, warps, stages) used where the autotuner may not run."""
    if q_bucket <= 16:
        return 16, 64, 4, 3
    if q_bucket <= 32:
        return 32, 64, 4, 3
    if block_d >= 256:
        return 64, 32, 4, 2
    if q_bucket <= 64:
        return 64, 64, 4, 3
    return 128, 64, 8, 3


_attn_fwd_tuned = None


def _tuned_kernel():
    global _attn_fwd_tuned
    if _attn_fwd_tuned is None:
        _attn_fwd_tuned = triton.autotune(
            configs=_cuda_configs(),
            key=["HEAD_DIM", "GROUP", "q_bucket", "b_bucket", "IEEE"],
            prune_configs_by={"early_config_prune": _prune},
        )(_attn_fwd)
    return _attn_fwd_tuned


def attention_triton(q, k, v, cu_q, k_start, k_len, max_q=None, max_k=None, scale=None,
                     out=None, _blocks=None):
    """Fused attention; same arguments and result as `attention_reference`.

    `max_q` (the longest query segment) sizes the grid; when None it is read from `cu_q` (a host
    synchronisation). `max_k` is accepted for the common signature and not needed. `out`, when
    given, is written in place (tests poison it first). `_blocks=(BLOCK_M, BLOCK_N)` pins the
    tile sizes (tests); otherwise the interpreter uses 16x16 tiles and CUDA autotunes (see
    `autotune_allowed` for CUDA graph capture).
    """
    tq, h, d = q.shape
    tk, kh, dk = k.shape
    if v.shape != k.shape or dk != d:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [Tk, KH, {d}]")
    if kh == 0 or h % kh:
        raise ValueError(f"query heads {h} not a multiple of key heads {kh}")
    if d < 1 or d > 256:
        raise ValueError(f"head dim {d} must be in 1..256")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported dtype {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError("q, k, v must share a dtype")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    b = cu_q.numel() - 1
    if out is None:
        out = torch.empty_like(q)
    if b <= 0 or tq == 0:
        return out
    if max_q is None:
        max_q = int((cu_q[1:] - cu_q[:-1]).max())
    max_q = int(max_q)
    if max_q <= 0:
        return out

    # Only the head dimension needs unit stride; rows and heads may be strided views.
    def last_contig(t):
        return t if t.stride(-1) == 1 else t.contiguous()

    q, k, v = last_contig(q), last_contig(k), last_contig(v)
    if out.stride(-1) != 1:
        raise ValueError("out must have a unit stride in its last dimension")
    cu_q = cu_q.to(device=q.device, dtype=torch.int32)
    k_start = k_start.to(device=q.device, dtype=torch.int32)
    k_len = k_len.to(device=q.device, dtype=torch.int32)

    q_bucket = min(128, triton.next_power_of_2(max_q))
    ieee = q.dtype == torch.float32
    block_d = max(16, triton.next_power_of_2(d))
    args = (
        q, k, v, out, cu_q, k_start, k_len,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        scale * _LOG2E, q_bucket, size_class(b),
    )
    if _blocks is not None or not _compiled(q):
        bm, bn = _blocks if _blocks is not None else (16, 16)
        grid = (triton.cdiv(max_q, bm), h, b)
        _attn_fwd[grid](*args, GROUP=h // kh, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn,
                        IEEE=ieee, num_warps=4, num_stages=2)
        return out

    kw = dict(GROUP=h // kh, HEAD_DIM=d, BLOCK_D=block_d, IEEE=ieee)
    tuner = _tuned_kernel()
    if autotune_allowed(q):
        def grid(meta):
            return (triton.cdiv(max_q, meta["BLOCK_M"]), h, b)

        tuner[grid](*args, **kw)
        return out
    # Inside a CUDA graph capture (or `capture_launches()`): the stored choice, launched with the
    # options the autotuner launched it with, so that it is the kernel already loaded.
    cfg = cached_config(tuner, args, kw)
    if cfg is None:
        bm, bn, warps, stages = _default_config(block_d, q_bucket)
        cfg = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
    _attn_fwd[(triton.cdiv(max_q, cfg.kwargs["BLOCK_M"]), h, b)](*args, **kw, **launch_options(cfg))
    return out
