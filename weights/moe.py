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
    SwiGLU expert. `route(m, router, expert_bias) -> (ids, weights)` is the family's router."""

    def __init__(self, hidden: int, n_experts: int, width: int, shared_width: int, expert_bias: bool,
                 route):
        super().__init__()
        self.router = nn.Parameter(torch.empty(n_experts, hidden))
        self.expert_bias = nn.Parameter(torch.zeros(n_experts)) if expert_bias else None
        self.gate_up = nn.Parameter(torch.empty(n_experts, 2 * width, hidden))
        self.down = nn.Parameter(torch.empty(n_experts, hidden, width))
        self.shared = SwiGLU(hidden, shared_width) if shared_width else None
        self.route = route

    def forward(self, m):
        ids, w = self.route(m, self.router, self.expert_bias)
        out = moe_ffn(m, ids, w, self.gate_up, self.down)
        return out if self.shared is None else out + self.shared(m)

    def expert_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """`{prefix}{e}.{gate,up,down}_proj.weight` -> the expert's slices of the stacked weights."""
        width = self.down.shape[2]
        out = {}
        for e in range(self.gate_up.shape[0]):
            out[f"{prefix}{e}.gate_proj.weight"] = self.gate_up[e, :width]
            out[f"{prefix}{e}.up_proj.weight"] = self.gate_up[e, width:]
            out[f"{prefix}{e}.down_proj.weight"] = self.down[e]
        return out
