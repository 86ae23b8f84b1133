"""bench/soak.py runs (briefly) against a server it starts, passes on a healthy server, and refuses
anything but loopback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_short_soak_passes(golden_dir):
    r = subprocess.run([sys.executable, "bench/soak.py", "--model", str(golden_dir), "--minutes", "0.1",
                        "--clients", "4", "--report", "2"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    out = r.stdout
    for needle in ("| 5xx responses | 0 |", "| unexpected answers | 0 |", "| tracebacks in the server log | 0 |",
                   "| RSS after the load |", "bad: ", "result: passed"):
        assert needle in out, needle


def test_only_loopback_is_soaked():
    r = subprocess.run([sys.executable, "bench/soak.py", "--url", "http://10.1.2.3:8000", "--minutes", "0.1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "loopback" in r.stderr
