"""Where the golden reference sets live: `tests/golden/` in the repository (see its README).

`LLADA_GOLDEN_DIR` points the tests at another folder of sets in the same format (for example a
held-back set next to the public ones)."""

from __future__ import annotations

import os
from pathlib import Path

GOLDEN_ROOT = Path(os.environ.get("LLADA_GOLDEN_DIR") or Path(__file__).resolve().parent / "golden").resolve()
TINY_LLADA = GOLDEN_ROOT / "tiny-llada"
TINY_LLADA_MOE = GOLDEN_ROOT / "tiny-llada-moe"
TINY_LLADA2 = GOLDEN_ROOT / "tiny-llada2"
