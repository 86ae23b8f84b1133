"""Memory plan of a tensor-parallel deployment, from config.json alone (no weights are read).

Per rank, in bytes:

- weights: this rank's parameters (its heads, its MLP share, its experts, its vocabulary rows, plus
  the replicated norms, router and expert bias), counted on the network built on the meta device
  with the rank's layout (`weights.parallel`), times the dtype's size;
- KV buffers: n_layers x 2 x (max_batch_tokens + 1 scratch row) x (KV heads / N) x head_dim x dtype;
- graph pool (an estimate): the activations of one step at max_batch_tokens packed tokens, which
  the captured step keeps in its memory pool: per token the residual stream and its norm (2 D), the
  rank's q/k/v and attention output ((H + 2K) d / N + H d / N), the MLP's gate/up and product
  (3 F / N for a dense layer; for an MoE layer 3 f x top_k for the routed pairs, which may all land
  on one rank, plus 3 S f / N), in the model dtype, and the logits over the rank's vocabulary
  shard (V / N values in the model dtype plus a float32 copy) of max_batch_size x 128 rows (each
  request's current block, taken as up to 128 positions; at most max_batch_tokens rows);
- runtime reserve: 2 GiB for the CUDA context, NCCL buffers and allocator slack (a round figure).

`plan(...)` returns the figures; `format_plan` the lines `llada-serve --plan` prints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weights.checkpoint import build_network
from weights.parallel import TensorParallel, sharded_fields

GIB = 2**30
RESERVE = 2 * GIB

# Memory of one GPU, bytes (the marketed capacity; what CUDA reports is a little less).
GPUS = {"H100": 80e9, "H200": 141e9, "A100": 80e9, "A100-40": 40e9, "L40S": 48e9, "H20": 96e9}

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}


@dataclass
class RankPlan:
    size: int
    weights: int
    kv: int
    graphs: int
    reserve: int = RESERVE

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.graphs + self.reserve


def rank_weights(config, size: int, dtype_bytes: int) -> int:
    tp = TensorParallel(0, size) if size > 1 else None
    model = build_network(config, "meta", None, tp)
    return sum(p.numel() for p in model.parameters()) * dtype_bytes


def rank_plan(config, size: int, dtype_bytes: int, max_batch_tokens: int, max_batch_size: int) -> RankPlan:
    c = config
    t = max_batch_tokens
    kv = c.n_layers * 2 * (t + 1) * (c.n_kv_heads // size) * c.head_dim * dtype_bytes
    d, hd = c.hidden_size, c.head_dim
    attn = (c.n_heads + 2 * c.n_kv_heads) * hd // size + c.n_heads * hd // size
    dense = 3 * (getattr(c, "dense_width", None) or getattr(c, "mlp_hidden_size", 0)) // size
    mlp = dense
    if getattr(c, "num_experts", None):
        mlp = max(dense, 3 * c.expert_width * c.num_experts_per_tok + 3 * (c.shared_width or 0) // size)
    act = t * (2 * d + attn + mlp) * dtype_bytes
    rows = min(t, max_batch_size * 128)
    logits = rows * (c.embedding_size // size) * (dtype_bytes + 4)
    return RankPlan(size, rank_weights(c, size, dtype_bytes), kv, act + logits)


def valid_sizes(config, largest: int = 8) -> list[int]:
    fields = sharded_fields(config)
    return [n for n in range(1, largest + 1) if all(v % n == 0 for _, v in fields)]


def plan(config, size: int, dtype: str, max_batch_tokens: int, max_batch_size: int,
         gpu_bytes: float | None):
    """(this size's RankPlan, fits or None when no GPU is known, smallest fitting size up to 8 or None)."""
    b = DTYPE_BYTES[dtype]
    mine = rank_plan(config, size, b, max_batch_tokens, max_batch_size)
    if gpu_bytes is None:
        return mine, None, None
    smallest = next((n for n in valid_sizes(config)
                     if rank_plan(config, n, b, max_batch_tokens, max_batch_size).total <= gpu_bytes), None)
    return mine, mine.total <= gpu_bytes, smallest


def format_plan(name: str, config, size: int, dtype: str, max_batch_tokens: int, max_batch_size: int,
                gpu: str | None, gpu_bytes: float | None) -> list[str]:
    mine, fits, smallest = plan(config, size, dtype, max_batch_tokens, max_batch_size, gpu_bytes)

    def gib(n):
        return f"{n / GIB:.1f} GiB"

    lines = [
        f"model {name}: {config.family}, {config.num_parameters / 1e9:.2f}B parameters, {dtype}",
        f"tensor-parallel size {size}, max_batch_tokens {max_batch_tokens}, max_batch_size "
        f"{max_batch_size}; per rank:",
        f"  weights        {gib(mine.weights)}",
        f"  KV buffers     {gib(mine.kv)}",
        f"  graph pool     {gib(mine.graphs)} (estimate: one step's activations and logits)",
        f"  runtime        {gib(mine.reserve)} (reserve: CUDA context, NCCL, allocator slack)",
        f"  total          {gib(mine.total)}",
    ]
    if gpu_bytes is None:
        lines.append("no GPU named (--plan-gpu) and none here: fit not judged")
    else:
        lines.append(f"on {gpu} ({gpu_bytes / GIB:.1f} GiB): {'fits' if fits else 'does not fit'}")
        lines.append(f"smallest tensor-parallel size that fits: {smallest}" if smallest is not None
                     else "no tensor-parallel size up to 8 fits on one node of these GPUs")
    lines.append(f"sizes this model can be split into (up to 8): "
                 f"{', '.join(map(str, valid_sizes(config)))}")
    return lines


def local_gpu() -> tuple[str, float] | None:
    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    return p.name, float(p.total_memory)
