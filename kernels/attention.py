"""Bidirectional (non-causal) attention over packed variable-length segments.

Segment b has queries q[cu_q[b]:cu_q[b+1]] and attends, with no causal mask, to the key/value
rows k[k_start[b] : k_start[b] + k_len[b]]. Queries may be a slice of a sequence (the current
block) while its keys are the whole sequence (the cache modes). Grouped-query attention when
k has fewer heads than q. The network calls `attention` only; it picks the Triton kernel on
CUDA and the PyTorch reference elsewhere.
"""

from __future__ import annotations

import math
import os

import torch


def attention_reference(q, k, v, cu_q, k_start, k_len, max_q=None, max_k=None, scale=None, host=None):
    """Plain PyTorch oracle: one softmax(q k^T) v per segment, accumulated in at least fp32.
    `host`: a callable giving (cu_q, k_start, k_len) as Python lists, or None (read here)."""
    tq, h, d = q.shape
    kh = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    lists = host() if host is not None else None
    cu, starts, lens = lists if lists is not None else (cu_q.tolist(), k_start.tolist(), k_len.tolist())
    dense = _dense_layout(cu, starts, lens, k.shape[0])
    if dense is not None:  # every segment attends to exactly its own rows: one batched product
        b, n = dense
        qs = q.to(acc).view(b, n, h, d).transpose(1, 2)
        ks_ = k.to(acc).view(b, n, kh, d).transpose(1, 2)
        vs_ = v.to(acc).view(b, n, kh, d).transpose(1, 2)
        if kh != h:
            ks_ = ks_.repeat_interleave(h // kh, dim=1)
            vs_ = vs_.repeat_interleave(h // kh, dim=1)
        probs = torch.softmax(torch.matmul(qs, ks_.transpose(-1, -2)) * scale, dim=-1)
        return torch.matmul(probs, vs_).transpose(1, 2).reshape(tq, h, d).to(q.dtype)
    live = [b for b in range(len(lens)) if cu[b + 1] > cu[b]]
    out = None if len(live) == 1 and cu[live[0] + 1] - cu[live[0]] == tq else torch.empty_like(q)
    for b in live:
        q0, q1 = cu[b], cu[b + 1]
        ks, kl = starts[b], lens[b]
        qs = q[q0:q1].to(acc).transpose(0, 1)  # [H, n, D]
        ks_ = k[ks:ks + kl].to(acc).transpose(0, 1)  # [KH, m, D]
        vs_ = v[ks:ks + kl].to(acc).transpose(0, 1)
        if kh != h:
            ks_ = ks_.repeat_interleave(h // kh, dim=0)
            vs_ = vs_.repeat_interleave(h // kh, dim=0)
        scores = torch.matmul(qs, ks_.transpose(1, 2)) * scale
        probs = torch.softmax(scores, dim=-1)
        seg = torch.matmul(probs, vs_).transpose(0, 1).to(q.dtype)
        if out is None:  # one segment holds every query: its result is the output
            return seg
        out[q0:q1] = seg
    return out if out is not None else torch.empty_like(q)


def _dense_layout(cu, starts, lens, tk):
    """(B, n) when all B segments have n queries attending to their own n packed keys."""
    b = len(cu) - 1
    if b == 0 or cu[-1] != tk or cu[-1] % b:
        return None
    n = cu[-1] // b
    if cu != list(range(0, cu[-1] + 1, n)):
        return None
    if starts != cu[:-1] or lens != [n] * b:
        return None
    return b, n


def _use_triton(q: torch.Tensor) -> bool:
    if not q.is_cuda or os.environ.get("LLADA_DISABLE_TRITON") == "1":
        return False
    # The kernel takes head dims up to 256; anything else stays on the reference.
    return q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.shape[-1] <= 256


def attention(q, k, v, cu_q, k_start, k_len, max_q=None, max_k=None, scale=None, host=None):
    """Dispatcher: the fused Triton kernel on CUDA, the PyTorch reference elsewhere. `host`: a
    callable giving the layout as Python lists, called by the reference only (a caller that keeps a
    layout keeps its lists; the kernel never reads them back)."""
    if _use_triton(q) and k.dtype == q.dtype and v.dtype == q.dtype:
        try:
            from kernels.attention_triton import attention_triton
        except ImportError:  # Triton missing on this CUDA machine: the reference still works
            pass
        else:
            return attention_triton(q, k, v, cu_q, k_start, k_len, max_q, max_k, scale)
    return attention_reference(q, k, v, cu_q, k_start, k_len, max_q, max_k, scale, host)
