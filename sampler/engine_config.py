"""What an engine is configured with (the CLI's flags; a follower rank builds the same batch from it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    max_batch_size: int = 32          # running requests per step
    max_batch_tokens: int = 16384     # canvas rows (prompt + generated, twice with CFG) in the batch
    max_queue: int = 256              # waiting requests; beyond it submissions are refused (429)
    request_timeout: float | None = 600.0  # seconds from submission; None or <= 0: no limit
    early_stop: bool = True           # leave the batch once the answer is final
    idle_wait: float = 0.05           # seconds the loop sleeps when there is nothing to do
    cpu_threads_live: tuple = ()      # CPU: intra-op thread counts the engine keeps choosing between
    #                                   while serving (sampler/thread_tuner.py); empty: the count stays
    cpu_threads_probe_s: float = 2.0  # stepping seconds between tries of the other count (it backs off)
    cuda_graphs: bool = True          # replay captured CUDA graphs of the step (CUDA only)
    pipelined: bool | None = None     # read step n's events while step n+1 runs (default: on CUDA)
    draft_depth: int = 0              # exact parallel decoding for requests that leave theirs unset
    draft_budget: int = 2048          # per step: query tokens with drafts, and rows of the draft pool
    adaptive_drafting: bool | None = None  # draft rows only while measured steps say they pay
                                           # (sampler.draft_gate); None: on for a CPU, off on CUDA
