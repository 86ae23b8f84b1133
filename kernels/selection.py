"""Confidence selection: the candidate token per position and which positions to unmask.

Two functions, each with a PyTorch reference and a dispatcher that the sampler calls:

- `sample_candidates`: per row of logits, the candidate token (argmax at temperature 0, a
  Gumbel-max sample otherwise, noise from `kernels.rng`) and its softmax probability under the
  un-noised logits.
- `transfer_mask`: per request, among the rows it owns, the top k by confidence (k from its
  schedule) or the threshold rule (the most confident, plus every row at or above the threshold).

Sampling filters (`top_k`, `top_p`, `min_p`) are a plain PyTorch step in front of candidate
sampling: `restrict_logits` sets the logits outside each row's kept set to -inf (`apply_filters`
does it for the rows that have filters), and the candidate and its confidence then come from the
same `sample_candidates` as every other row, so the confidence is the candidate's probability under
the restricted, renormalised distribution. A step without filtered requests never calls them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kernels import rng

NEG_INF = float("-inf")


def sample_candidates_reference(logits, temperature, seed, nonce, position, ban_ids=None,
                                ban_rows=None):
    """(x0 int64 [N], conf float32 [N]) computed in float64, as the reference sampler does.
    `ban_ids` get logit -inf, on every row or only on the rows flagged by `ban_rows` (bool [N])."""
    n, vocab = logits.shape
    l = logits.to(torch.float64)
    if ban_ids:
        l = l.clone() if l.data_ptr() == logits.data_ptr() else l
        cols = torch.tensor(list(ban_ids), device=l.device)
        if ban_rows is None:
            l[:, cols] = NEG_INF
        else:
            rows = ban_rows.nonzero().squeeze(1)
            l[rows.unsqueeze(1), cols.unsqueeze(0)] = NEG_INF
    x0 = torch.argmax(l, dim=-1)
    hot = temperature > 0
    if bool(hot.any()):
        rows = hot.nonzero().squeeze(1)
        key = rng.row_key(seed[rows], nonce[rows], position[rows]).unsqueeze(1)
        tokens = torch.arange(vocab, device=logits.device, dtype=torch.int64).unsqueeze(0)
        u = rng.to_unit(rng.bits(key, tokens))
        t = temperature[rows].to(torch.float64).unsqueeze(1)
        noisy = l[rows] - t * torch.log(-torch.log(u))
        x0[rows] = torch.argmax(noisy, dim=-1)
    logz = torch.logsumexp(l, dim=-1)
    conf = torch.exp(l.gather(1, x0.unsqueeze(1)).squeeze(1) - logz)
    return x0, conf.to(torch.float32)


def sample_candidates_sharded(logits, temperature, seed, nonce, position, vocab_lo: int, tp,
                              ban_ids=None, ban_rows=None):
    """`sample_candidates_reference` over a vocabulary split across ranks, without gathering it.

    `logits` [N, V/size] are this rank's columns, global token ids vocab_lo .. vocab_lo + V/size.
    Each rank reduces its shard per row to five numbers (its best score: the logit, or at
    temperature > 0 the Gumbel-noised logit with the counter-based noise of the global token id;
    that token's global id and logit; the shard's max logit and its sum of exp(logit - max)); one
    all-gather of these [N, 5] float64 rows combines them. The winner is the best score, ties to the
    lowest global id (the first rank, then argmax's first index: what argmax over the whole
    vocabulary gives), and its confidence exp(logit - logZ) with logZ = M + log(sum_r s_r
    exp(m_r - M)): the same candidate as over the full vocabulary, the same confidence up to the
    rounding of the normaliser's sum in float64 (before the cast to float32). Every rank returns
    the same (x0, conf)."""
    n, width = logits.shape
    l = logits.to(torch.float64)
    hi = vocab_lo + width
    mine = [i - vocab_lo for i in (ban_ids or ()) if vocab_lo <= i < hi]
    if mine:
        l = l.clone() if l.data_ptr() == logits.data_ptr() else l
        cols = torch.tensor(mine, device=l.device)
        if ban_rows is None:
            l[:, cols] = NEG_INF
        else:
            rows = ban_rows.nonzero().squeeze(1)
            l[rows.unsqueeze(1), cols.unsqueeze(0)] = NEG_INF
    score = l
    hot = temperature > 0
    if bool(hot.any()):
        key = rng.row_key(seed, nonce, position).unsqueeze(1)
        tokens = torch.arange(vocab_lo, hi, device=l.device, dtype=torch.int64).unsqueeze(0)
        u = rng.to_unit(rng.bits(key, tokens))
        t = temperature.to(torch.float64).unsqueeze(1)
        score = torch.where(hot.unsqueeze(1), l - t * torch.log(-torch.log(u)), l)
    best, idx = score.max(dim=-1)
    m = l.max(dim=-1).values
    safe_m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(l - safe_m.unsqueeze(1)).sum(-1)
    local = torch.stack([best, (idx + vocab_lo).to(torch.float64), l.gather(1, idx.unsqueeze(1)).squeeze(1),
                         m, s], dim=1)
    allr = tp.all_gather(local)                      # [size, N, 5]
    win = allr[:, :, 0].argmax(dim=0)                # first rank with the best score
    pick = allr.gather(0, win.view(1, n, 1).expand(1, n, 5)).squeeze(0)
    x0 = pick[:, 1].to(torch.int64)
    ms, ss = allr[:, :, 3], allr[:, :, 4]
    big = ms.max(dim=0).values
    safe_big = torch.where(torch.isfinite(big), big, torch.zeros_like(big))
    z = (ss * torch.exp(ms - safe_big.unsqueeze(0)).nan_to_num(0.0)).sum(0)
    logz = safe_big + torch.log(z)
    conf = torch.exp(pick[:, 2] - logz)
    return x0, conf.to(torch.float32)


def transfer_mask_loop(conf, cu_rows, k, threshold):
    """The reference's per-request loop (the oracle and the baseline the benchmarks beat)."""
    out = torch.zeros(conf.shape[0], dtype=torch.bool, device=conf.device)
    cu = cu_rows.tolist()
    for b in range(len(cu) - 1):
        c = conf[cu[b]:cu[b + 1]]
        cand = int(torch.isfinite(c).sum()) if c.numel() else 0
        thr = float(threshold[b])
        kk = cand if thr > 0 else min(int(k[b]), cand)
        if kk == 0:
            continue
        vals, idx = torch.topk(c, kk)
        keep = torch.ones(kk, dtype=torch.bool, device=conf.device)
        if thr > 0:
            keep[1:] = vals[1:] >= thr
        out[cu[b] + idx[keep]] = True
    return out


def transfer_mask_reference(conf, cu_rows, k, threshold):
    """Vectorised over requests: pad to [B, max rows], one stable sort, rank against k."""
    b = cu_rows.numel() - 1
    n = conf.shape[0]
    if n == 0 or b == 0:
        return torch.zeros(n, dtype=torch.bool, device=conf.device)
    counts = cu_rows[1:] - cu_rows[:-1]
    req = torch.repeat_interleave(torch.arange(b, device=conf.device), counts, output_size=n)
    col = torch.arange(n, device=conf.device) - cu_rows[:-1][req]
    width = int(counts.max())
    padded = torch.full((b, width), NEG_INF, dtype=conf.dtype, device=conf.device)
    padded[req, col] = conf
    order = torch.sort(padded, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(width, device=conf.device).expand(b, width))
    r = rank[req, col]
    thr = threshold.to(conf.dtype)[req]
    kk = k.to(r.dtype)[req]
    chosen = torch.where(thr > 0, (r == 0) | (conf >= thr), r < kk)
    return chosen & torch.isfinite(conf)


@dataclass(frozen=True)
class RowFilters:
    """Per-row sampling filters (tensors [N] on the logits' device); neutral values filter nothing:
    top_k <= 0, top_p >= 1, min_p <= 0."""

    top_k: torch.Tensor  # int64
    top_p: torch.Tensor  # float64
    min_p: torch.Tensor  # float64

    def active(self, temperature: torch.Tensor) -> torch.Tensor:
        """bool [N]: rows the filters change (greedy rows never: argmax is always kept)."""
        return (temperature > 0) & ((self.top_k > 0) | (self.top_p < 1) | (self.min_p > 0))

    def take(self, rows: torch.Tensor) -> "RowFilters":
        return RowFilters(self.top_k[rows], self.top_p[rows], self.min_p[rows])


def restrict_logits(logits, temperature, filters: RowFilters):
    """float64 logits with every token outside the row's kept set at -inf.

    The kept set is decided on the distribution the candidate is drawn from, softmax(logits / T)
    (T = the row's temperature, > 0): top_k keeps the k most likely tokens; top_p then keeps the
    smallest most-likely-first prefix of the top-k-renormalised distribution whose mass reaches
    top_p (the most likely token always stays); min_p keeps the tokens whose probability is at least
    min_p times the most likely one's. Ties at a cut-off are broken by token id (lower first)."""
    n, vocab = logits.shape
    l = logits.to(torch.float64)
    if n == 0:
        return l
    t = temperature.to(torch.float64).clamp(min=1e-30).unsqueeze(1)
    scaled = l / t
    order = torch.sort(scaled, dim=1, descending=True, stable=True)
    sv, si = order.values, order.indices
    rank = torch.arange(vocab, device=l.device).unsqueeze(0)
    k = filters.top_k.to(l.device).unsqueeze(1)
    keep = (k <= 0) | (rank < k)
    lse = torch.logsumexp(torch.where(keep, sv, torch.full_like(sv, NEG_INF)), dim=1, keepdim=True)
    p = torch.exp(sv - lse).masked_fill(~keep, 0.0)
    before = torch.cumsum(p, dim=1) - p              # mass of the more likely tokens
    top_p = filters.top_p.to(l.device, torch.float64).unsqueeze(1)
    keep &= (top_p >= 1) | (before < top_p) | (rank == 0)
    min_p = filters.min_p.to(l.device, torch.float64).unsqueeze(1)
    keep &= (min_p <= 0) | (sv - sv[:, :1] >= torch.log(min_p.clamp(min=1e-300)))
    kept = torch.zeros_like(keep).scatter_(1, si, keep)
    return l.masked_fill(~kept, NEG_INF)


def apply_filters(logits, temperature, filters: RowFilters, banned=None, dynamic: bool | None = None):
    """`logits` with the filtered rows restricted (`restrict_logits`), in the logits' dtype (the kept
    values are unchanged, the others -inf); other rows untouched. `banned` marks tokens already
    excluded (EOS ban, mask re-draw) so the kept set is decided without them: None, a bool [N, V],
    or a pair (rows bool [N], columns bool [V]) meaning their outer product (built only for the rows
    it is needed on). `dynamic` (default: off CUDA) restricts only the filtered rows; otherwise
    shapes never depend on values (CUDA graphs): every row is restricted and the result chosen per
    row."""
    rows = filters.active(temperature)

    def excluded(sel=None):
        if banned is None:
            return None
        if isinstance(banned, tuple):
            r, c = banned
            return (r if sel is None else r[sel]).unsqueeze(1) & c
        return banned if sel is None else banned[sel]

    if (not logits.is_cuda) if dynamic is None else dynamic:
        idx = rows.nonzero().squeeze(1)
        out = logits.clone()
        if len(idx):
            sub, ban = logits[idx], excluded(idx)
            if ban is not None:
                sub = sub.masked_fill(ban, NEG_INF)
            out[idx] = restrict_logits(sub, temperature[idx], filters.take(idx)).to(logits.dtype)
        return out
    ban = excluded()
    src = logits if ban is None else logits.masked_fill(ban, NEG_INF)
    out = restrict_logits(src, temperature, filters).to(logits.dtype)
    return torch.where(rows.unsqueeze(1), out, logits)


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and os.environ.get("LLADA_DISABLE_TRITON") != "1"


def sample_candidates(logits, temperature, seed, nonce, position, ban_ids=None, ban_rows=None):
    """Dispatcher for candidate sampling (Triton on CUDA, PyTorch reference elsewhere)."""
    if _use_triton(logits):
        try:
            from kernels.selection_triton import sample_candidates_triton
        except ImportError:
            pass
        else:
            return sample_candidates_triton(logits, temperature, seed, nonce, position, ban_ids,
                                            ban_rows=ban_rows)
    return sample_candidates_reference(logits, temperature, seed, nonce, position, ban_ids, ban_rows)


def transfer_mask(conf, cu_rows, k, threshold):
    """Dispatcher for the transfer decision."""
    if _use_triton(conf):
        try:
            from kernels.selection_triton import transfer_mask_triton
        except ImportError:
            pass
        else:
            return transfer_mask_triton(conf, cu_rows, k, threshold)
    return transfer_mask_reference(conf, cu_rows, k, threshold)
