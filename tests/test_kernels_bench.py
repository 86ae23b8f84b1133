"""The kernel benchmark keeps running: its tiny-shape smoke version on CPU (Triton interpreter)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def test_bench_kernels_smoke_runs_and_checks_out():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_kernels", "--smoke"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "SMOKE shapes" in proc.stdout, out[-4000:]
    for label in ("attn dense", "attn ragged", "attn block/cache", "select T=0", "select T=1",
                  "transfer mask", "one read of the logits", "select filters", "logprobs"):
        assert label in proc.stdout, f"missing row {label!r}:\n{proc.stdout}"
    assert "CHECK FAILED" not in out
