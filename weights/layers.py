"""The decoder every family is built on: the packed layout and KV buffers, RMSNorm, rotary
embeddings, grouped-query attention over the packed layout, the SwiGLU feed-forward, the one
transformer layer (`DecoderLayer`) and the network skeleton (`DecoderLM`).

Every network maps packed token ids to logits. A forward writes its tokens' keys/values into
`KVBuffers` at `layout.kv_index` and segment b attends to buffer rows
`k_start[b] : k_start[b] + k_len[b]`, so one code path serves a full canvas, the cache modes and
block diffusion (one segment per block, its keys running from the canvas start to the block's end).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kernels.attention import attention
from weights.parallel import Shard


@dataclass
class AttnLayout:
    """Where packed queries write their keys/values and which rows each segment attends to."""

    cu_q: torch.Tensor      # int32 [B+1], query offsets in the packed tokens
    k_start: torch.Tensor   # int32 [B], first key row of each segment in the KV buffers
    k_len: torch.Tensor     # int32 [B], number of key rows of each segment
    kv_index: torch.Tensor  # int64 [T], buffer row each packed token's K/V are written to
    max_q: int
    max_k: int
    _host: tuple | None = field(default=None, repr=False, compare=False)

    def host_lists(self) -> tuple | None:
        """(cu_q, k_start, k_len) as Python lists, read once per layout, on a CPU only (on CUDA
        the kernel reads the tensors and a read-back would synchronise)."""
        if self._host is None and self.cu_q.device.type == "cpu":
            self._host = (self.cu_q.tolist(), self.k_start.tolist(), self.k_len.tolist())
        return self._host

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

    @classmethod
    def canvases(cls, lens, device, block_length: int | None = None) -> "AttnLayout":
        """Whole canvases packed back to back, keys = their own fresh rows: fully bidirectional,
        or block-causal with `block_length` (one segment per block, keys up to the block's end)."""
        q_lens, k_starts, k_lens = [], [], []
        start = 0
        for n in lens:
            step = n if block_length is None else block_length
            for lo in range(0, n, step):
                hi = min(lo + step, n)
                q_lens.append(hi - lo)
                k_starts.append(start)
                k_lens.append(hi)
            start += n
        return cls.build(q_lens, k_starts, k_lens, torch.arange(start), device)


class KVBuffers:
    """Per-layer key and value rows, [capacity, n_kv_heads, head_dim] each (`n_kv_heads`: the KV
    heads this rank holds, default all of them)."""

    def __init__(self, config, capacity: int, device, dtype, n_kv_heads: int | None = None):
        shape = (capacity, config.n_kv_heads if n_kv_heads is None else n_kv_heads, config.head_dim)
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
    """GPT-NeoX rotary embedding at absolute canvas positions (tables in fp32 or wider).

    `rotary_dim` < head_dim rotates the first rotary_dim dims of each head only (partial rotary);
    the frequencies are theta^(-2j / rotary_dim)."""

    def __init__(self, head_dim: int, theta: float, rotary_dim: int | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = head_dim if rotary_dim is None else rotary_dim
        self.theta = theta

    def tables(self, positions: torch.Tensor, dtype: torch.dtype):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        r = self.rotary_dim
        j = torch.arange(0, r, 2, device=positions.device, dtype=acc)
        inv_freq = 1.0 / (self.theta ** (j / r))
        angles = positions.to(acc).unsqueeze(-1) * inv_freq
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos()[:, None, :], emb.sin()[:, None, :]

    @staticmethod
    def apply(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        r = cos.shape[-1]
        rot, rest = (t, None) if r == t.shape[-1] else (t[..., :r], t[..., r:])
        tf = rot.to(cos.dtype)
        out = (tf * cos + rotate_half(tf) * sin).to(t.dtype)
        return out if rest is None else torch.cat((out, rest), dim=-1)


def attend(q, k, v, layout: AttnLayout, k_buf, v_buf) -> torch.Tensor:
    """Write the fresh keys/values to the layer's buffers (if any), then packed attention."""
    if k_buf is None:  # no buffers: every segment attends to the fresh packed rows
        k_all, v_all = k, v
    else:
        k_buf.index_copy_(0, layout.kv_index, k.to(k_buf.dtype))
        v_buf.index_copy_(0, layout.kv_index, v.to(v_buf.dtype))
        k_all, v_all = k_buf, v_buf
    return attention(q, k_all, v_all, layout.cu_q, layout.k_start, layout.k_len,
                     layout.max_q, layout.max_k, host=layout.host_lists)


class Attention(nn.Module):
    """Grouped-query self-attention with one fused q/k/v product, optional per-head QK RMSNorm,
    optional clamp of q/k/v, partial rotary, and an output projection.

    `qkv` is [(H + 2K) d, D]: q heads, then k heads, then v heads. `out` is [D, H d]. With `tp`
    (`weights.parallel.TensorParallel`) H and K are this rank's heads (H/N, K/N): q/k/v
    column-parallel, `out` row-parallel, its partial products summed by one all-reduce and the
    output bias added after it."""

    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int, eps: float,
                 qk_norm: bool, qkv_bias: bool = False, out_bias: bool = False,
                 clip: float | None = None, tp=None):
        super().__init__()
        self.tp = tp if tp is not None and tp.size > 1 else None
        if self.tp is not None:
            n_heads, n_kv_heads = n_heads // tp.size, n_kv_heads // tp.size
        self.h, self.kh, self.d, self.eps, self.clip = n_heads, n_kv_heads, head_dim, eps, clip
        rows = (n_heads + 2 * n_kv_heads) * head_dim
        self.qkv = nn.Parameter(torch.empty(rows, hidden))
        self.qkv_bias = nn.Parameter(torch.empty(rows)) if qkv_bias else None
        self.out = nn.Parameter(torch.empty(hidden, n_heads * head_dim))
        self.out_bias = nn.Parameter(torch.empty(hidden)) if out_bias else None
        self.q_norm = nn.Parameter(torch.ones(head_dim)) if qk_norm else None
        self.k_norm = nn.Parameter(torch.ones(head_dim)) if qk_norm else None

    def q_k_v(self, fused: torch.Tensor):
        """The q, k and v rows of a fused weight or bias (views: writing them writes `fused`)."""
        return fused.split([self.h * self.d, self.kh * self.d, self.kh * self.d], dim=0)

    def forward(self, x, cos, sin, layout: AttnLayout, k_buf, v_buf):
        t = x.shape[0]
        h, kh, d = self.h, self.kh, self.d
        q, k, v = F.linear(x, self.qkv, self.qkv_bias).split([h * d, kh * d, kh * d], dim=-1)
        q, k, v = q.reshape(t, h, d), k.reshape(t, kh, d), v.reshape(t, kh, d)
        if self.q_norm is not None:
            q, k = rms_norm(q, self.q_norm, self.eps), rms_norm(k, self.k_norm, self.eps)
        if self.clip is not None:
            q, k, v = (u.clamp(-self.clip, self.clip) for u in (q, k, v))
        q, k = Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)
        o = attend(q, k, v, layout, k_buf, v_buf)
        if self.tp is None:
            return F.linear(o.reshape(t, h * d), self.out, self.out_bias)
        y = self.tp.all_reduce(F.linear(o.reshape(t, h * d), self.out))
        return y if self.out_bias is None else y + self.out_bias


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused: `gate_up` [2F, D], `down` [D, F]. With
    `tp` F is this rank's share (gate/up column-parallel, down row-parallel, one all-reduce)."""

    def __init__(self, hidden: int, width: int, tp=None):
        super().__init__()
        self.tp = tp if tp is not None and tp.size > 1 else None
        if self.tp is not None:
            width //= tp.size
        self.gate_up = nn.Parameter(torch.empty(2 * width, hidden))
        self.down = nn.Parameter(torch.empty(hidden, width))

    def gate_up_down(self):
        """The gate, up and down weights (gate and up as views of `gate_up`)."""
        width = self.down.shape[1]
        return self.gate_up[:width], self.gate_up[width:], self.down

    def partial(self, x):
        """This rank's term of the output (the whole output on one rank)."""
        gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down)

    def forward(self, x):
        y = self.partial(x)
        return y if self.tp is None else self.tp.all_reduce(y)


class DecoderLayer(nn.Module):
    """The one transformer layer of every family, pre-norm: x + attn(norm(x)), then x + mlp(norm(x)).
    `mlp` is a `SwiGLU` or a `weights.moe.MoE`."""

    def __init__(self, hidden: int, eps: float, attn: Attention, mlp: nn.Module):
        super().__init__()
        self.eps = eps
        self.attn_norm = nn.Parameter(torch.ones(hidden))
        self.mlp_norm = nn.Parameter(torch.ones(hidden))
        self.attn = attn
        self.mlp = mlp

    def forward(self, x, cos, sin, layout: AttnLayout, k_buf, v_buf):
        x = x + self.attn(rms_norm(x, self.attn_norm, self.eps), cos, sin, layout, k_buf, v_buf)
        return x + self.mlp(rms_norm(x, self.mlp_norm, self.eps))


class DecoderLM(nn.Module):
    """Embedding ([embedding_size, hidden]), `DecoderLayer`s, final RMSNorm and LM head (tied to the
    embedding when the config says so). Each family's network builds the layers and names its
    checkpoint tensors (`checkpoint_tensors()`: name -> the parameter, or the view of a fused or
    stacked one, that the tensor is loaded into)."""

    def __init__(self, config, layers, tp=None):
        super().__init__()
        self.config = config
        self.tp = tp if tp is not None and tp.size > 1 else None
        d, rows = config.hidden_size, config.embedding_size
        # This rank's vocabulary rows [vocab_lo, vocab_lo + rows) of the embedding and the LM head.
        self.vocab_lo = 0
        if self.tp is not None:
            self.vocab_lo, hi = self.tp.chunk(rows)
            rows = hi - self.vocab_lo
        self.embedding = nn.Parameter(torch.empty(rows, d))
        self.layers = nn.ModuleList(layers)
        self.norm = nn.Parameter(torch.ones(d))
        self.lm_head = None if config.tie_word_embeddings else nn.Parameter(torch.empty(rows, d))
        self.rotary = Rotary(config.head_dim, config.rope_theta, config.rotary_dim)

    @property
    def device(self) -> torch.device:
        return self.embedding.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.dtype

    @property
    def n_kv_heads(self) -> int:
        """KV heads held on this rank (the KV buffers' width)."""
        return self.layers[0].attn.kh if len(self.layers) else self.config.n_kv_heads

    def embed(self, ids):
        if self.tp is None:
            return F.embedding(ids, self.embedding)
        local = ids - self.vocab_lo
        mine = (local >= 0) & (local < self.embedding.shape[0])
        x = F.embedding(local.clamp(0, self.embedding.shape[0] - 1), self.embedding)
        return self.tp.all_reduce(x.masked_fill(~mine.unsqueeze(1), 0))

    def head(self, x):
        """Final norm and LM head: hidden states [N, D] -> logits [N, embedding_size] (with `tp`:
        this rank's vocabulary shard, columns vocab_lo .. vocab_lo + embedding_size / N)."""
        w = self.embedding if self.lm_head is None else self.lm_head
        return F.linear(rms_norm(x, self.norm, self.config.rms_norm_eps), w)

    def forward(self, ids, positions, layout: AttnLayout, kv: KVBuffers | None = None,
                logits_rows: torch.Tensor | None = None, tables=None) -> torch.Tensor:
        """Logits [rows, embedding_size] for `logits_rows` of the packed tokens (all if None).
        `tables`: `rotary_tables(positions)` computed earlier for the same positions (a caller
        whose steps repeat a layout keeps them), else computed here."""
        x = self.embed(ids)
        cos, sin = self.rotary.tables(positions, x.dtype) if tables is None else tables
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, layout,
                      kv.k[i] if kv is not None else None, kv.v[i] if kv is not None else None)
        if logits_rows is not None:
            x = x.index_select(0, logits_rows)
        return self.head(x)

    def rotary_tables(self, positions: torch.Tensor):
        """The rotary (cos, sin) tables `forward` uses for these packed positions."""
        return self.rotary.tables(positions, self.dtype)

    def full_logits(self, ids, block_length: int | None = None) -> torch.Tensor:
        """Forward of whole canvases from position 0: ids [B, L] tensor -> logits [B, L, V]; a list
        of id lists of different lengths -> a list of [L_i, V] tensors. Attention is bidirectional,
        or block-causal when `block_length` is given (blocks laid from position 0)."""
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
        layout = AttnLayout.canvases(lens, self.device, block_length)
        logits = self.forward(flat, positions, layout)
        if self.tp is not None:
            logits = self.tp.gather_vocab(logits)
        if seqs is None:
            return logits.view(b, n, -1)
        return list(torch.split(logits, lens))

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Checkpoint tensor name -> the parameter (or the view of one) it is loaded into. With `tp`:
        the tensors this rank holds (its experts only), shaped as its parts of them."""
        raise NotImplementedError

    def fused_parts(self) -> dict[str, tuple[int, ...]]:
        """Checkpoint tensors that fuse pieces split separately across ranks (a fused q/k/v):
        name -> the pieces' full sizes along the split dimension."""
        return {}

    def checkpoint_shards(self) -> dict[str, object]:
        """Checkpoint tensor name -> `weights.parallel.Shard` (the part this rank reads) or None
        (the whole tensor). The split dimension is where this rank's tensor is smaller than the
        checkpoint's (the same network built for one rank)."""
        mine = self.checkpoint_tensors()
        if self.tp is None:
            return {name: None for name in mine}
        with torch.device("meta"):
            full = {n: tuple(t.shape) for n, t in type(self)(self.config).checkpoint_tensors().items()}
        fused = self.fused_parts()
        out = {}
        for name, t in mine.items():
            dims = [d for d, (a, b) in enumerate(zip(t.shape, full[name])) if a != b]
            if len(dims) > 1:
                raise ValueError(f"{name}: rank shape {tuple(t.shape)} differs from {full[name]} in "
                                 "more than one dimension")
            out[name] = Shard(dims[0], fused.get(name)) if dims else None
        return out

    @staticmethod
    def swiglu_tensors(prefix: str, mlp: SwiGLU) -> dict[str, torch.Tensor]:
        gate, up, down = mlp.gate_up_down()
        return {prefix + "gate_proj.weight": gate, prefix + "up_proj.weight": up,
                prefix + "down_proj.weight": down}

    def common_tensors(self, embedding: str) -> dict[str, torch.Tensor]:
        out = {embedding: self.embedding, "model.norm.weight": self.norm}
        if self.lm_head is not None:
            out["lm_head.weight"] = self.lm_head
        return out
