"""Which decoding strategy a model runs, chosen once from its config.

`config.block_diffusion` (LLaDA2.x checkpoints) selects block diffusion
(`sampler.block_diffusion.BlockDiffusionBatch`); every other model runs the LLaDA step
(`sampler.llada_batch.LLaDABatch`). Both implement `sampler.batch.Batch`.
"""

from __future__ import annotations

from sampler.batch import Batch
from sampler.block_diffusion import BlockDiffusionBatch
from sampler.llada_batch import LLaDABatch
from sampler.params import SamplingParams


def is_block_diffusion(config) -> bool:
    return bool(getattr(config, "block_diffusion", False))


def batch_class(config) -> type[Batch]:
    return BlockDiffusionBatch if is_block_diffusion(config) else LLaDABatch


def make_batch(model, special, capacity_tokens: int = 16384, max_requests: int = 64,
               cuda_graphs: bool | None = None, pad_to_buckets: bool | None = None,
               draft_depth: int = 0, draft_budget: int = 0,
               adaptive_drafting: bool | None = None) -> Batch:
    """A batch of the model's strategy with `capacity_tokens` canvas rows and `max_requests` slots.
    `cuda_graphs` (default: on CUDA) and `pad_to_buckets` (default: on CUDA) concern the LLaDA
    step, whose device step is captured per bucket; block diffusion has neither. `draft_depth`
    (the default of requests that leave it unset) and `draft_budget` (per-step query tokens and
    draft pool rows) set exact parallel decoding in both strategies; `adaptive_drafting` (None: on
    for a CPU, off on CUDA) lets the batch plan draft rows only while its measured steps say they
    pay (`sampler.draft_gate`)."""
    if is_block_diffusion(model.config):
        return BlockDiffusionBatch(model, special, capacity_tokens, max_requests,
                                   draft_depth=draft_depth, draft_budget=draft_budget,
                                   adaptive_drafting=adaptive_drafting)
    return LLaDABatch(model, special, capacity_tokens, max_requests, cuda_graphs=cuda_graphs,
                      pad_to_buckets=pad_to_buckets, draft_depth=draft_depth, draft_budget=draft_budget,
                      adaptive_drafting=adaptive_drafting)


def rows_needed(prompt_len: int, params: SamplingParams, block_diffusion: bool = False) -> int:
    """Canvas rows a request holds under the strategy (`block_diffusion` or the LLaDA step)."""
    cls = BlockDiffusionBatch if block_diffusion else LLaDABatch
    return cls.rows_needed(prompt_len, params)
