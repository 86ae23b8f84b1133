"""The LLaDA mask predictor: a LLaMA-shaped transformer with bidirectional attention.

The network knows nothing about diffusion. It maps packed token ids to logits for the rows asked
for. Every forward writes its tokens' keys/values into `KVBuffers` at `layout.kv_index` and each
segment attends to a contiguous range of those buffers, so one code path serves a full canvas
(keys = its own fresh rows), a prefix cache (queries = block..end, keys = cached prefix + fresh)
and a dual cache (queries = block, keys = whole canvas with the block's rows refreshed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels.attention import attention
from weights.config import LLaDAConfig


@dataclass
class AttnLayout:
    """Where packed queries write their keys/values and which rows each segment attends to."""

    cu_q: torch.Tensor      # int32 [B+1], query offsets in the packed tokens
    k_start: torch.Tensor   # int32 [B], first key row of each segment in the KV buffers
    k_len: torch.Tensor     # int32 [B], number of key rows of each segment
    kv_index: torch.Tensor  # int64 [T], buffer row each packed token's K/V are written to
    max_q: int
    max_k: int

    @classmethod
    def build(cls, q_lens, k_starts, k_lens, kv_index, device) -> "AttnLayout":
        cu = [0]
        for n in q_lens:
            cu.append(cu[-1] + n)
        i32 = dict(dtype=torch.int32, device=device)
        return cls(
            cu_q=torch.tensor(cu, **i32),
            k_start=torch.tensor(list(k_starts), **i32),
            k_len=torch.tensor(list(k_lens), **i32),
            kv_index=torch.as_tensor(kv_index, dtype=torch.int64, device=device),
            max_q=max(q_lens, default=0),
            max_k=max(k_lens, default=0),
        )


class KVBuffers:
    """Per-layer key and value rows, [capacity, n_kv_heads, head_dim] each."""

    def __init__(self, config: LLaDAConfig, capacity: int, device, dtype):
        shape = (capacity, config.n_kv_heads, config.head_dim)
        self.capacity = capacity
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) in at least fp32, cast back, then scaled."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(acc)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def rotate_half(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[-1] // 2
    return torch.cat((-t[..., half:], t[..., :half]), dim=-1)


class Rotary(nn.Module):
    """GPT-NeoX rotary embedding at absolute canvas positions (applied in fp32 or wider)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def tables(self, positions: torch.Tensor, dtype: torch.dtype):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        j = torch.arange(0, self.head_dim, 2, device=positions.device, dtype=acc)
        inv_freq = 1.0 / (self.theta ** (j / self.head_dim))
        angles = positions.to(acc).unsqueeze(-1) * inv_freq
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos()[:, None, :], emb.sin()[:, None, :]

    @staticmethod
    def apply(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        tf = t.to(cos.dtype)
        return (tf * cos + rotate_half(tf) * sin).to(t.dtype)


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
        if k_buf is None:  # no buffers: every segment attends to its own fresh rows
            k_all, v_all = k, v
        else:
            k_buf.index_copy_(0, layout.kv_index, k.to(k_buf.dtype))
            v_buf.index_copy_(0, layout.kv_index, v.to(v_buf.dtype))
            k_all, v_all = k_buf, v_buf
        o = attention(q, k_all, v_all, layout.cu_q, layout.k_start, layout.k_len,
                      layout.max_q, layout.max_k)
        x = x + self.attn_out(o.reshape(t, cfg.d_model))
        m = rms_norm(x, self.ff_norm.weight, cfg.rms_norm_eps)
        if self.gate_up is not None:
            gate, up = F.linear(m, self.gate_up).chunk(2, dim=-1)
        else:
            gate, up = self.ff_proj(m), self.up_proj(m)
        return x + self.ff_out(F.silu(gate) * up)


class LLaDAModel(nn.Module):
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

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    def forward(self, ids, positions, layout: AttnLayout, kv: KVBuffers | None = None,
                logits_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [rows, embedding_size] for `logits_rows` of the packed tokens (all if None)."""
        x = self.wte(ids)
        cos, sin = self.rotary.tables(positions, x.dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, layout,
                      kv.k[i] if kv is not None else None, kv.v[i] if kv is not None else None)
        if logits_rows is not None:
            x = x.index_select(0, logits_rows)
        return self.ff_out(rms_norm(x, self.ln_f.weight, self.config.rms_norm_eps))

    def full_logits(self, ids) -> torch.Tensor:
        """Full bidirectional forward of whole canvases: ids [B, L] tensor -> logits [B, L, V];
        a list of id lists of different lengths -> a list of [L_i, V] tensors."""
        if isinstance(ids, torch.Tensor):
            b, n = ids.shape
            seqs = None
            flat = ids.reshape(-1).to(self.device)
            lens = [n] * b
        else:
            seqs = [list(s) for s in ids]
            lens = [len(s) for s in seqs]
            flat = torch.tensor([t for s in seqs for t in s], dtype=torch.int64, device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lens])
        starts = [sum(lens[:i]) for i in range(len(lens))]
        layout = AttnLayout.build(lens, starts, lens, torch.arange(flat.numel()), self.device)
        logits = self.forward(flat, positions, layout)
        if seqs is None:
            return logits.view(b, n, -1)
        return list(torch.split(logits, lens))
