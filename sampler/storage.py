"""Where every running request's canvas and keys/values live: one token buffer, per-layer K/V
buffers of the same rows, and a first-fit allocator of contiguous row ranges in them.

A request owns one contiguous region [off, off + rows). Both buffers have one row more than the
regions use: row `capacity` is scratch, read and written by the padded rows of a step and never by
a real request. With a draft pool (exact parallel decoding) the K/V buffers have `draft_rows` more
rows after the scratch row: each step lends regions of them to its draft rows (their keys/values
live for that step only), and `guess` holds per canvas row the drafting stage's guess (step, token).
"""

from __future__ import annotations

import torch

from weights.layers import KVBuffers


class RegionAllocator:
    """First-fit allocation of contiguous row ranges in [0, capacity), coalescing on free."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.free_ranges = [(0, capacity)]  # sorted (start, length)

    def alloc(self, n: int) -> int | None:
        for i, (start, length) in enumerate(self.free_ranges):
            if length >= n:
                if length == n:
                    self.free_ranges.pop(i)
                else:
                    self.free_ranges[i] = (start + n, length - n)
                return start
        return None

    def fits(self, n: int) -> bool:
        return any(length >= n for _, length in self.free_ranges)

    def free(self, start: int, n: int) -> None:
        self.free_ranges.append((start, n))
        self.free_ranges.sort()
        merged = []
        for s, l in self.free_ranges:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + l)
            else:
                merged.append((s, l))
        self.free_ranges = merged

    @property
    def used(self) -> int:
        return self.capacity - sum(l for _, l in self.free_ranges)


class CanvasStore:
    """The token buffer (mask ids where nothing is written), the K/V buffers and their regions."""

    def __init__(self, model, capacity: int, mask_id: int, draft_rows: int = 0):
        self.capacity = capacity
        self.draft_rows = draft_rows
        self.draft_base = capacity + 1  # first row of the draft pool
        dev = model.device
        self.kv = KVBuffers(model.config, capacity + 1 + draft_rows, dev, model.dtype,
                            getattr(model, "n_kv_heads", None))
        self.tokens = torch.full((capacity + 1,), mask_id, dtype=torch.int64, device=dev)
        self.guess = torch.zeros((capacity + 1, 2), dtype=torch.int64, device=dev) if draft_rows else None
        self.regions = RegionAllocator(capacity)
