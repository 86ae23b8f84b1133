"""Grouped mixture-of-experts feed-forward in two Triton kernels (CUDA; the interpreter in tests).

Same contract as `kernels.moe.moe_ffn_reference`. The (token, choice) pairs are grouped by expert
on the device without a host synchronisation (`align`): one stable sort of the pairs by expert,
each expert's run padded to a multiple of BLOCK_M, the padded list sized by its upper bound
(pairs + experts x (BLOCK_M - 1)), so the launch shapes depend on the token count only and a tile
past the last expert's run exits at once. Every tile of BLOCK_M rows belongs to one expert:

1. `_moe_up`: h = silu(x W_gate^T) * (x W_up^T) for the tile's tokens, gate and up read from the
   fused [2f, D] weight in one pass over D (two accumulators), h stored in the padded order;
2. `_moe_down`: y = h W_down^T, rounded to the model dtype (what an expert module returns), times
   the pair's routing weight in fp32, stored at the pair's own row of an fp32 [pairs, D] buffer.

The k weighted outputs of a token are then summed in a fixed order (choice 0, 1, ...), so the
result is deterministic and does not depend on which other tokens share the launch (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention_triton import _interpreting


@triton.jit
def _moe_up(x_ptr, w_ptr, rows_ptr, tile_e_ptr, h_ptr, n_pairs, dim, width,
            stride_xt, stride_we, stride_wn, stride_ht,
            TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_e_ptr + pid_m)
    if e < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(rows_ptr + offs_m)
    valid = pair < n_pairs
    tok = (tl.where(valid, pair, 0) // TOPK).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < width
    w_base = w_ptr + e.to(tl.int64) * stride_we
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < dim
        a = tl.load(x_ptr + tok[:, None] * stride_xt + offs_k[None, :],
                    mask=valid[:, None] & k_ok[None, :], other=0.0)
        wmask = k_ok[:, None] & n_ok[None, :]
        wg = tl.load(w_base + offs_n[None, :] * stride_wn + offs_k[:, None], mask=wmask, other=0.0)
        wu = tl.load(w_base + (width + offs_n[None, :]) * stride_wn + offs_k[:, None], mask=wmask, other=0.0)
        if IEEE:
            acc_g += tl.dot(a, wg, input_precision="ieee")
            acc_u += tl.dot(a, wu, input_precision="ieee")
        else:
            acc_g += tl.dot(a, wg)
            acc_u += tl.dot(a, wu)
    dt = h_ptr.dtype.element_ty
    g = acc_g.to(dt).to(tl.float32)
    u = acc_u.to(dt).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    h = (act * u).to(dt)
    tl.store(h_ptr + offs_m[:, None].to(tl.int64) * stride_ht + offs_n[None, :], h,
             mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _moe_down(h_ptr, w_ptr, rows_ptr, tile_e_ptr, wt_ptr, out_ptr, n_pairs, dim, width,
              stride_ht, stride_we, stride_wn, stride_ot,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_e_ptr + pid_m)
    if e < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(rows_ptr + offs_m)
    valid = pair < n_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < dim
    w_base = w_ptr + e.to(tl.int64) * stride_we
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, width, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < width
        a = tl.load(h_ptr + offs_m[:, None].to(tl.int64) * stride_ht + offs_k[None, :],
                    mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + offs_n[None, :] * stride_wn + offs_k[:, None],
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
    wt = tl.load(wt_ptr + pair, mask=valid, other=0.0)
    y = acc.to(h_ptr.dtype.element_ty).to(tl.float32) * wt[:, None]
    safe = tl.where(valid, pair, 0).to(tl.int64)
    tl.store(out_ptr + safe[:, None] * stride_ot + offs_n[None, :], y, mask=valid[:, None] & n_ok[None, :])


def align(ids: torch.Tensor, n_experts: int, block_m: int):
    """(rows int32 [cap], tile_expert int32 [cap / block_m]): the pair ids grouped by expert, each
    expert's run padded to a multiple of block_m with the sentinel n_pairs; the expert of every
    tile, -1 past the last run. Device-side only (no host synchronisation)."""
    flat = ids.reshape(-1)
    n = flat.numel()
    dev = flat.device
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=n_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    sorted_e = flat[order]
    start = torch.cumsum(counts, 0) - counts
    dest = (pad_end - padded)[sorted_e] + torch.arange(n, device=dev) - start[sorted_e]
    cap = triton.cdiv(n + min(n_experts, n) * (block_m - 1), block_m) * block_m
    rows = torch.full((cap,), n, dtype=torch.int32, device=dev)
    rows[dest] = order.to(torch.int32)
    tile_start = torch.arange(0, cap, block_m, device=dev)
    tile_e = torch.searchsorted(pad_end, tile_start, right=True)
    tile_e = torch.where(tile_e < n_experts, tile_e, torch.full_like(tile_e, -1)).to(torch.int32)
    return rows, tile_e


def _blocks(t: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps): small row tiles for decoding-sized batches."""
    if _interpreting():
        return 16, 16, 16, 4
    bm = 16 if t <= 64 else (32 if t <= 512 else 64)
    return bm, 64, (32 if dtype == torch.float32 else 64), 4


def moe_ffn_triton(x, ids, weights, gate_up, down, _tiles=None):
    """Grouped experts on the GPU; same arguments and result as `moe_ffn_reference`.
    `_tiles=(BLOCK_M, BLOCK_N, BLOCK_K)` pins the tile sizes (tests)."""
    t, d = x.shape
    k = ids.shape[1]
    n_experts, two_f, d_w = gate_up.shape
    width = two_f // 2
    if d_w != d or down.shape != (n_experts, d, width):
        raise ValueError(f"gate_up {tuple(gate_up.shape)} / down {tuple(down.shape)} do not match x {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported dtype {x.dtype}")
    x = x.contiguous()
    gate_up, down = gate_up.contiguous(), down.contiguous()
    bm, bn, bk, warps = _blocks(t, x.dtype)
    if _tiles is not None:
        bm, bn, bk = _tiles
    n_pairs = t * k
    rows, tile_e = align(ids, n_experts, bm)
    n_tiles = tile_e.numel()
    ieee = x.dtype == torch.float32
    h = torch.empty(rows.numel(), width, dtype=x.dtype, device=x.device)
    _moe_up[(n_tiles, triton.cdiv(width, bn))](
        x, gate_up, rows, tile_e, h, n_pairs, d, width,
        x.stride(0), gate_up.stride(0), gate_up.stride(1), h.stride(0),
        TOPK=k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, IEEE=ieee, num_warps=warps, num_stages=2)
    pair_out = torch.empty(n_pairs, d, dtype=torch.float32, device=x.device)
    w = weights.reshape(-1).to(torch.float32).contiguous()
    _moe_down[(n_tiles, triton.cdiv(d, bn))](
        h, down, rows, tile_e, w, pair_out, n_pairs, d, width,
        h.stride(0), down.stride(0), down.stride(1), pair_out.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, IEEE=ieee, num_warps=warps, num_stages=2)
    return pair_out.view(t, k, d).sum(1).to(x.dtype)
