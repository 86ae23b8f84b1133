"""Grouped mixture-of-experts feed-forward: each expert applied to the tokens routed to it only.

    moe_ffn(x [T, D], ids int64 [T, k], weights [T, k], gate_up [E, 2f, D], down [E, D, f]) -> [T, D]

out[t] = sum over j of weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])) with e = ids[t, j],
gate_e / up_e the two halves of gate_up[e]. Each expert's output is rounded to x's dtype (what a
model-dtype expert module returns), the weighted sum accumulates in fp32 (fp64 for fp64 inputs) over
the k choices in a fixed order and is cast back to x's dtype. A pair with id -1 (with weight 0)
belongs to another rank's experts under expert parallelism and adds nothing (the reference skips
it; the Triton path runs it on expert 0 with its weight 0).

`moe_ffn_reference` (PyTorch, any device and dtype) groups the (token, choice) pairs by expert with
one stable sort and runs one pair of products per expert that has tokens. `moe_ffn_triton` does the
same on CUDA in two grouped kernels (see kernels/moe_triton.py). `moe_ffn` dispatches.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def moe_ffn_reference(x, ids, weights, gate_up, down):
    t, k = ids.shape
    width = down.shape[2]
    acc = _acc(x.dtype)
    flat = ids.reshape(-1)
    order = torch.sort(flat, stable=True).indices              # pairs grouped by expert
    skipped = int((flat < 0).sum())                            # id -1: another rank's expert
    order = order[skipped:]
    counts = torch.bincount(flat[flat >= 0], minlength=gate_up.shape[0]).tolist()
    pair_out = torch.zeros(t * k, x.shape[1], dtype=acc, device=x.device)
    w = weights.reshape(-1).to(acc)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start:start + n]
        start += n
        h = F.linear(x.index_select(0, pairs // k), gate_up[e])
        y = F.linear(F.silu(h[:, :width]) * h[:, width:], down[e])
        pair_out.index_copy_(0, pairs, y.to(acc) * w[pairs].unsqueeze(1))
    return pair_out.view(t, k, -1).sum(1).to(x.dtype)


def _use_triton(x: torch.Tensor) -> bool:
    if os.environ.get("LLADA_DISABLE_TRITON") == "1" or not x.is_cuda:
        return False
    return x.dtype in (torch.float16, torch.bfloat16, torch.float32)


def moe_ffn(x, ids, weights, gate_up, down):
    """Dispatcher: the grouped Triton kernels on CUDA, the PyTorch reference elsewhere."""
    if x.shape[0] == 0:
        return torch.zeros_like(x)
    if _use_triton(x) and gate_up.dtype == x.dtype and down.dtype == x.dtype:
        try:
            from kernels.moe_triton import moe_ffn_triton
        except ImportError:  # Triton missing on this CUDA machine: the reference still works
            pass
        else:
            # Pairs of another rank's experts (id -1, weight 0) run on expert 0 and add 0.
            return moe_ffn_triton(x, ids.clamp(min=0), weights, gate_up, down)
    return moe_ffn_reference(x, ids, weights, gate_up, down)
