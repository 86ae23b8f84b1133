"""Counting rules shared by the batched steps and the one-request oracles.

Each rule is written once here and imported by both sides, so an oracle never checks the engine
against a copy of the engine's own rule and production code never imports an oracle.
"""

from __future__ import annotations


def quota_at(masked, steps, step):
    """Positions to unmask at step `step` (0-based) of `steps` when `masked` are to be spread over
    them: masked // steps, the first masked % steps steps one more. Works on Python ints and,
    elementwise, on int64 tensors (the device step computes it for every request at once)."""
    return masked // steps + (step < masked % steps)


def quota(masked: int, steps: int) -> list[int]:
    """The whole schedule: `quota_at` for every step (LLaDA's s/t schedule of one block, and
    LLaDA2.0's tokens per step of a block)."""
    return [int(quota_at(masked, steps, i)) for i in range(steps)]


def cut_after_eos(ids: list[int], eos_id: int) -> list[int]:
    """The ids up to and including the first EOS (all of them when there is none): the generated
    span a block-diffusion request returns."""
    return ids[:ids.index(eos_id) + 1] if eos_id in ids else ids
