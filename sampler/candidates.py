"""The candidates of a step, shared by both decoding strategies: per logit row the token it would
take and its confidence.

`draw`: the candidate (argmax at temperature 0, a seeded Gumbel-max sample otherwise; EOS banned on
the rows that ask; sampling filters in front when given) and its probability. A candidate equal to
the mask id would leave its position masked for ever: such rows take the draw again with the mask
logit at -inf (same noise, same EOS ban, filters decided again without it). With `dynamic` the
re-draw runs only when some row needs it; otherwise (CUDA graphs) it is computed for every row and
used by those rows only.

`ban_stops`: the stop ids' logits at -inf on the rows of positions below a request's min_tokens.
`defer_stops`: with `defer_eos`, stop-token candidates rank below every other candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.selection import apply_filters, sample_candidates, sample_candidates_sharded

DEFERRED = -1.0  # confidence given to deferred EOS/EoT candidates: below every probability


@dataclass(frozen=True)
class VocabShard:
    """This rank's vocabulary columns [lo, lo + width) of a tensor-parallel LM head."""

    tp: object   # weights.parallel.TensorParallel
    lo: int

    def column(self, logits, token: int):
        """The local column of global `token` in `logits`, or None when another rank holds it."""
        j = token - self.lo
        return j if 0 <= j < logits.shape[1] else None


def vocab_shard(model) -> VocabShard | None:
    """The model's vocabulary shard, or None on one rank."""
    tp = getattr(model, "tp", None)
    return None if tp is None else VocabShard(tp, model.vocab_lo)


def add_to_column(logits, token: int, value, shard: VocabShard | None):
    """logits[:, token] += value (in place), on the rank that holds `token`."""
    j = token if shard is None else shard.column(logits, token)
    if j is not None:
        logits[:, j] += value


@dataclass
class Draw:
    x0: torch.Tensor     # int64 [N]
    conf: torch.Tensor   # float32 [N]
    dist: torch.Tensor | None = None  # with keep_dist: the logits each row's candidate came from


def draw(logits, temp, seed, nonce, position, ban, eos_id: int, mask_id: int, filters=None,
         dynamic: bool = True, keep_dist: bool = False, shard: VocabShard | None = None) -> Draw:
    """Candidates of `logits` [N, V] (modified in place when the re-draw runs). `ban`: bool [N],
    the rows whose EOS is banned, or None (no row); `filters`: RowFilters or None (needs `ban`). `keep_dist`: also return the
    distribution each row drew from (EOS ban aside), for its log-probabilities. `shard`: the
    logits are this rank's vocabulary columns (module docstring)."""
    if shard is not None:
        if filters is None and not keep_dist:
            return _draw_sharded(logits, temp, seed, nonce, position, ban, eos_id, mask_id, dynamic, shard)
        logits = shard.tp.gather_vocab(logits)
    ban_ids = None if ban is None else [eos_id]
    if filters is not None:  # the filtered rows' logits restricted, the EOS ban decided first
        eos_col = torch.arange(logits.shape[1], device=logits.device) == eos_id
        dist = apply_filters(logits, temp, filters, (ban, eos_col))
    else:
        dist = logits
        if keep_dist:
            mask_logit = logits[:, mask_id].clone()  # the re-draw below bans it in place
    x0, conf = sample_candidates(dist, temp, seed, nonce, position, ban_ids=ban_ids, ban_rows=ban)
    redo = x0 == mask_id
    redrawn = not dynamic or bool(redo.any())
    if redrawn:
        logits[:, mask_id] = float("-inf")
        dist_b = apply_filters(logits, temp, filters, (ban, eos_col)) if filters is not None else logits
        x0b, confb = sample_candidates(dist_b, temp, seed, nonce, position, ban_ids=ban_ids,
                                       ban_rows=ban)
        x0 = torch.where(redo, x0b, x0)
        conf = torch.where(redo, confb.to(conf.dtype), conf)
    out = Draw(x0, conf)
    if keep_dist:
        if filters is None:
            out.dist = logits
            if redrawn:
                logits[:, mask_id] = torch.where(redo, torch.full_like(mask_logit, float("-inf")),
                                                 mask_logit)
        else:
            out.dist = torch.where(redo.unsqueeze(1), dist_b, dist) if redrawn else dist
    return out


def _draw_sharded(logits, temp, seed, nonce, position, ban, eos_id, mask_id, dynamic, shard):
    ban_ids = None if ban is None else [eos_id]
    x0, conf = sample_candidates_sharded(logits, temp, seed, nonce, position, shard.lo, shard.tp,
                                         ban_ids=ban_ids, ban_rows=ban)
    redo = x0 == mask_id
    if not dynamic or bool(redo.any()):  # identical on every rank: x0 is
        j = shard.column(logits, mask_id)
        if j is not None:
            logits[:, j] = float("-inf")
        x0b, confb = sample_candidates_sharded(logits, temp, seed, nonce, position, shard.lo, shard.tp,
                                               ban_ids=ban_ids, ban_rows=ban)
        x0 = torch.where(redo, x0b, x0)
        conf = torch.where(redo, confb.to(conf.dtype), conf)
    return Draw(x0, conf)


def ban_stops(logits, below, stop_ids: torch.Tensor, shard: VocabShard | None = None) -> None:
    """Set the `stop_ids` columns of the rows flagged by `below` (bool [N]) to -inf, in place: those
    positions cannot take a stop id (SamplingParams.min_tokens)."""
    cols = stop_ids
    if shard is not None:  # this rank's columns only (a data-dependent shape: no graph capture here)
        cols = stop_ids - shard.lo
        cols = cols[(cols >= 0) & (cols < logits.shape[1])]
    if cols.numel():
        sub = logits.index_select(1, cols)
        sub = torch.where(below.unsqueeze(1), torch.full_like(sub, float("-inf")), sub)
        logits.index_copy_(1, cols, sub)


def defer_stops(conf, x0, defer, stop_ids: torch.Tensor, dynamic: bool = True):
    """`conf` with the candidates in `stop_ids` of the rows flagged by `defer` set to DEFERRED."""
    if not dynamic or bool(defer.any()):
        defer = defer & torch.isin(x0, stop_ids)
        conf = torch.where(defer, torch.full_like(conf, DEFERRED), conf)
    return conf
