"""The mixture-of-experts feed-forward and the two routers of the family.

`MoE` routes each token to `top_k` experts, runs the experts on their own tokens only through
`kernels.moe.moe_ffn` (grouped by expert; no dense all-experts compute), and adds the shared expert.
The routers are the one place the families differ, each exactly as its reference computes it:

- `route_sigmoid_grouped` (LLaDA2.x): fp32 sigmoid scores, an expert bias used for choosing only,
  group-limited choice (groups ranked by the sum of their two best biased scores), the unbiased
  scores of the chosen experts renormalised and scaled by `routed_scaling_factor`.
- `route_softmax` (LLaDA-MoE): softmax over all experts in fp32 (of model-dtype logits), plus the
  expert bias when enabled, top-k, no renormalisation, weights cast to the model dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.moe import moe_ffn
from weights.layers import SwiGLU


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def route_sigmoid_grouped(m, router, expert_bias, top_k: int, n_group: int, topk_group: int,
                          scale: float):
    """(expert ids int64 [T, top_k], weights fp32 [T, top_k]) of LLaDA2.x's router."""
    acc = _acc(m.dtype)
    s = torch.sigmoid(F.linear(m.to(acc), router.to(acc)))
    biased = s + expert_bias.to(acc)
    t, e = biased.shape
    groups = biased.view(t, n_group, e // n_group)
    group_score = groups.topk(2, dim=-1).values.sum(-1)
    kept = torch.zeros_like(group_score, dtype=torch.bool)
    kept.scatter_(1, group_score.topk(topk_group, dim=-1).indices, True)
    biased = biased.masked_fill(~kept.repeat_interleave(e // n_group, dim=1), float("-inf"))
    ids = biased.topk(top_k, dim=-1).indices
    w = s.gather(1, ids)
    if top_k > 1:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return ids, w * scale


def route_softmax(m, router, expert_bias, top_k: int):
    """(expert ids int64 [T, top_k], weights in m's dtype [T, top_k]) of LLaDA-MoE's router."""
    p = torch.softmax(F.linear(m, router).to(_acc(m.dtype)), dim=-1)
    if expert_bias is not None:
        p = p + expert_bias.to(p.dtype)
    w, ids = p.topk(top_k, dim=-1)
    return ids, w.to(m.dtype)


class MoE(nn.Module):
    """Routed experts (stacked: `gate_up` [E, 2f, D], `down` [E, D, f]) plus an optional shared
    SwiGLU expert. `route(m, router, expert_bias) -> (ids, weights)` is the family's router.

    With `tp` (expert parallelism): the router is replicated, this rank stacks experts
    `expert_lo .. expert_lo + E/N` and runs every routed pair that lands on them (the other pairs
    are given id -1, which `moe_ffn` skips), the shared expert is split like a dense SwiGLU, and one
    all-reduce sums the ranks' routed and shared terms."""

    def __init__(self, hidden: int, n_experts: int, width: int, shared_width: int, expert_bias: bool,
                 route, tp=None):
        super().__init__()
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.router = nn.Parameter(torch.empty(n_experts, hidden))
        self.expert_bias = nn.Parameter(torch.zeros(n_experts)) if expert_bias else None
        self.expert_lo, local = 0, n_experts
        if self.tp is not None:
            self.expert_lo, hi = self.tp.chunk(n_experts)
            local = hi - self.expert_lo
        self.gate_up = nn.Parameter(torch.empty(local, 2 * width, hidden))
        self.down = nn.Parameter(torch.empty(local, hidden, width))
        self.shared = SwiGLU(hidden, shared_width, tp) if shared_width else None
        self.route = route

    def forward(self, m):
        ids, w = self.route(m, self.router, self.expert_bias)
        if self.tp is None:
            out = moe_ffn(m, ids, w, self.gate_up, self.down)
            return out if self.shared is None else out + self.shared(m)
        local = ids - self.expert_lo
        mine = (local >= 0) & (local < self.gate_up.shape[0])
        out = moe_ffn(m, torch.where(mine, local, -1), torch.where(mine, w, torch.zeros_like(w)),
                      self.gate_up, self.down)
        if self.shared is not None:
            out = out + self.shared.partial(m)
        return self.tp.all_reduce(out)

    def expert_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """`{prefix}{e}.{gate,up,down}_proj.weight` -> the expert's slices of the stacked weights
        (this rank's experts, by their global numbers)."""
        width = self.down.shape[2]
        out = {}
        for e in range(self.gate_up.shape[0]):
            g = self.expert_lo + e
            out[f"{prefix}{g}.gate_proj.weight"] = self.gate_up[e, :width]
            out[f"{prefix}{g}.up_proj.weight"] = self.gate_up[e, width:]
            out[f"{prefix}{g}.down_proj.weight"] = self.down[e]
        return out
