"""Tensor and expert parallelism: the layout a network is built with when it runs on several ranks.

`TensorParallel(rank, size, group)` is chosen at load time and handed to the network. Megatron-style:

- attention: q/k/v column-parallel by heads and KV heads (rank r holds heads r*H/N .. and KV heads
  r*K/N .., so grouped-query pairs stay on one rank), the output projection row-parallel, one
  all-reduce (its bias added once, after the reduction);
- dense SwiGLU and shared experts: gate/up column-parallel, down row-parallel, one all-reduce;
- routed experts: expert-parallel, rank r holds experts r*E/N .. (E/N whole experts), the router
  replicated; each rank adds the contribution of its experts for every routed token, and the shared
  expert's partial sum rides on the same all-reduce;
- embedding and LM head vocabulary-parallel (rows r*V/N ..): the embedding all-reduces its rows, the
  LM head gives each rank the logits of its vocabulary shard (selection combines the shards
  without gathering them: `kernels.selection.sample_candidates_sharded`).

`Shard` says which part of a checkpoint tensor a rank loads: the concatenation, along `dim`, of the
rank's 1/N chunk of each part (one part for a plain tensor; q, k and v for a fused q/k/v tensor).
The loader reads exactly that with `safe_open(...).get_slice`, so no rank holds the whole model.

`check_divisible(config, n)` refuses a size that does not divide a sharded dimension, with one line
naming the field and the sizes that would work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallel:
    rank: int
    size: int
    group: object = None  # a torch.distributed process group (None: the default group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the ranks (in place; returns `x`). Identical on every rank."""
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[size, *x.shape]: every rank's `x`, in rank order."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.stack(parts)

    def chunk(self, total: int) -> tuple[int, int]:
        """[lo, hi) of this rank's equal share of `total`."""
        n = total // self.size
        return self.rank * n, (self.rank + 1) * n

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [N, V] from every rank's shard [N, V/size] (every rank gets them)."""
        parts = self.all_gather(logits)
        return torch.cat(list(parts), dim=-1)


class ParallelError(ValueError):
    """A parallel layout the model cannot take; the message is one line naming the field."""


def sharded_fields(config) -> list[tuple[str, int]]:
    """(config field, size) of every dimension a tensor-parallel size must divide."""
    out = [("num_attention_heads", config.n_heads), ("num_key_value_heads", config.n_kv_heads),
           ("vocab_size (embedding rows)", config.embedding_size)]
    for field, attr in (("intermediate_size", "dense_width"), ("mlp_hidden_size", "mlp_hidden_size"),
                        ("num_experts", "num_experts"), ("shared expert width", "shared_width")):
        v = getattr(config, attr, None)
        if v:
            out.append((field, int(v)))
    return out


def check_divisible(config, size: int) -> None:
    """ParallelError unless `size` divides every sharded dimension of `config`."""
    if size < 1:
        raise ParallelError(f"tensor-parallel size must be at least 1, got {size}")
    import math

    fields = sharded_fields(config)
    g = math.gcd(*(v for _, v in fields))
    ok = [n for n in range(1, g + 1) if g % n == 0]
    for field, v in fields:
        if v % size:
            raise ParallelError(f"tensor-parallel size {size} does not divide {field}={v}; sizes that "
                                f"divide every sharded dimension of this model: "
                                f"{', '.join(map(str, ok))}")


@dataclass(frozen=True)
class Shard:
    """A rank's part of a checkpoint tensor: along `dim`, its chunk of each of `parts` (the full
    sizes of the fused pieces along `dim`; None: the whole dimension as one part)."""

    dim: int
    parts: tuple[int, ...] | None = None

    def ranges(self, full: int, tp: TensorParallel) -> list[tuple[int, int]]:
        parts = self.parts or (full,)
        if sum(parts) != full:
            raise ValueError(f"parts {parts} do not add up to {full}")
        out, start = [], 0
        for p in parts:
            lo, hi = p // tp.size * tp.rank, p // tp.size * (tp.rank + 1)
            out.append((start + lo, start + hi))
            start += p
        return out


def read_shard(handle, name: str, shard: Shard | None, tp: TensorParallel | None) -> torch.Tensor:
    """The part of checkpoint tensor `name` this rank holds, read with `get_slice` (only those bytes)."""
    if shard is None or tp is None or tp.size == 1:
        return handle.get_tensor(name)
    sl = handle.get_slice(name)
    shape = sl.get_shape()
    pieces = []
    for lo, hi in shard.ranges(shape[shard.dim], tp):
        index = tuple(slice(lo, hi) if d == shard.dim else slice(None) for d in range(len(shape)))
        pieces.append(sl[index])
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=shard.dim)


def init_from_env(backend: str | None = None) -> TensorParallel | None:
    """The layout of a process started by a launcher (`torchrun`, or `llada-serve`'s own ranks):
    RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in the environment. None when WORLD_SIZE <= 1."""
    import os

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return None
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return TensorParallel(dist.get_rank(), dist.get_world_size())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, size, port, backend, fn, args, results):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(size), LOCAL_RANK=str(rank))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=size)
    try:
        out = fn(TensorParallel(rank, size), *args)
        if rank == 0:  # plain pickle: the result outlives this process (no shared-memory handles)
            import pickle

            results.put(pickle.dumps(out))
    finally:
        dist.destroy_process_group()


def run_ranks(size: int, fn, *args, backend: str | None = None):
    """Run `fn(tp, *args)` on `size` local ranks (one process each, rendezvous on a free local
    port; gloo on the CPU, NCCL on GPUs, rank r on GPU r) and return rank 0's result. A rank that
    fails fails the call (torch.multiprocessing stops the others)."""
    import torch.multiprocessing as mp

    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= size else "gloo"
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    procs = mp.start_processes(_rank_main, args=(size, free_port(), backend, fn, args, results),
                               nprocs=size, join=False, start_method="spawn")
    import pickle

    while not procs.join(timeout=0.05):  # raises when a rank fails (the others are stopped)
        if not results.empty():
            out = pickle.loads(results.get())
            while not procs.join():
                pass
            return out
    return pickle.loads(results.get())
