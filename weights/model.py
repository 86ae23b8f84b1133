"""The LLaDA mask predictor: a LLaMA-shaped transformer with bidirectional attention.

The network knows nothing about diffusion. It maps packed token ids to logits for the rows asked
for. Every forward writes its tokens' keys/values into `KVBuffers` at `layout.kv_index` and each
segment attends to a contiguous range of those buffers, so one code path serves a full canvas
(keys = its own fresh rows), a prefix cache (queries = block..end, keys = cached prefix + fresh)
and a dual cache (queries = block, keys = whole canvas with the block's rows refreshed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from weights.config import LLaDAConfig
from weights.layers import AttnLayout, KVBuffers, PackedLM, Rotary, attend, rms_norm

__all__ = ["AttnLayout", "KVBuffers", "Block", "LLaDAModel", "PREFIX"]

PREFIX = "model.transformer."  # checkpoint tensor names are PREFIX + parameter name


class Block(nn.Module):
    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
        self.cfg = cfg
        self.attn_norm = nn.Module()
        self.attn_norm.weight = nn.Parameter(torch.ones(d))
        self.ff_norm = nn.Module()
        self.ff_norm.weight = nn.Parameter(torch.ones(d))
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, d, bias=False)
        self.register_parameter("qkv", None)  # set by fuse()
        self.register_parameter("gate_up", None)

    def fuse(self) -> None:
        """Replace q/k/v and gate/up by one matrix each: one product instead of three and two.
        Serving calls it after loading; training keeps the checkpoint's separate projections."""
        if self.qkv is not None:
            return
        with torch.no_grad():
            self.qkv = nn.Parameter(torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]),
                                    requires_grad=False)
            self.gate_up = nn.Parameter(torch.cat([self.ff_proj.weight, self.up_proj.weight]),
                                        requires_grad=False)
        del self.q_proj, self.k_proj, self.v_proj, self.ff_proj, self.up_proj

    def forward(self, x, cos, sin, layout: AttnLayout, k_buf, v_buf):
        cfg = self.cfg
        t = x.shape[0]
        kv = cfg.n_kv_heads * cfg.head_dim
        n = rms_norm(x, self.attn_norm.weight, cfg.rms_norm_eps)
        if self.qkv is not None:
            q, k, v = F.linear(n, self.qkv).split([cfg.d_model, kv, kv], dim=-1)
        else:
            q, k, v = self.q_proj(n), self.k_proj(n), self.v_proj(n)
        q = q.reshape(t, cfg.n_heads, cfg.head_dim)
        k = k.reshape(t, cfg.n_kv_heads, cfg.head_dim)
        v = v.reshape(t, cfg.n_kv_heads, cfg.head_dim)
        q, k = Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)
        o = attend(q, k, v, layout, k_buf, v_buf)
        x = x + self.attn_out(o.reshape(t, cfg.d_model))
        m = rms_norm(x, self.ff_norm.weight, cfg.rms_norm_eps)
        if self.gate_up is not None:
            gate, up = F.linear(m, self.gate_up).chunk(2, dim=-1)
        else:
            gate, up = self.ff_proj(m), self.up_proj(m)
        return x + self.ff_out(F.silu(gate) * up)


class LLaDAModel(PackedLM):
    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.embedding_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.Module()
        self.ln_f.weight = nn.Parameter(torch.ones(config.d_model))
        self.ff_out = nn.Linear(config.d_model, config.embedding_size, bias=False)
        self.rotary = Rotary(config.head_dim, config.rope_theta)

    def fuse(self) -> "LLaDAModel":
        """Fuse every block's projections for serving (see Block.fuse)."""
        for block in self.blocks:
            block.fuse()
        return self

    def embed(self, ids):
        return self.wte(ids)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Checkpoint tensor name -> the parameter it is loaded into (before `fuse`)."""
        return {PREFIX + name: p for name, p in self.named_parameters()}

    def layer_list(self):
        return self.blocks

    def head(self, x):
        return self.ff_out(rms_norm(x, self.ln_f.weight, self.config.rms_norm_eps))
