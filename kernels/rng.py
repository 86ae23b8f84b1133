"""Counter-based random numbers shared by the PyTorch reference and the Triton kernels.

Every uniform draw is a pure function of (seed, nonce, position, token), so a request's noise
does not depend on which requests it is batched with, and a kernel can draw it in-register.
The hash is 32-bit integer mixing (the murmur3 finaliser), written so that int64 tensors
(here) and uint32 registers (in Triton) compute the same bits.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
# Token index used for the per-position stream of random remasking (outside any vocabulary).
REMASK_STREAM = 0x7FFFFFFF


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3 finaliser on int64 tensors holding values in [0, 2**32)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & MASK32
    return h ^ (h >> 16)


def row_key(seed: torch.Tensor, nonce: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Per-row 32-bit key from a 64-bit seed, a step nonce and a canvas position (int64 tensors)."""
    seed = seed.to(torch.int64)
    h = fmix32((seed & MASK32) ^ GOLDEN)
    h = fmix32(h ^ ((seed >> 32) & MASK32))
    h = fmix32(h ^ (nonce.to(torch.int64) & MASK32))
    return fmix32(h ^ (position.to(torch.int64) & MASK32))


def bits(key: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """32 random bits for (row key, token index); broadcasts."""
    return fmix32((key + ((token.to(torch.int64) * GOLDEN) & MASK32)) & MASK32)


def to_unit(b: torch.Tensor) -> torch.Tensor:
    """Map 32 random bits to a float64 uniform strictly inside (0, 1)."""
    return (b.to(torch.float64) + 0.5) * (1.0 / 4294967296.0)


def uniform(seed, nonce, position, token) -> torch.Tensor:
    """U(0,1) float64 for each (seed, nonce, position, token); all int64 tensors, broadcast."""
    return to_unit(bits(row_key(seed, nonce, position), token))
