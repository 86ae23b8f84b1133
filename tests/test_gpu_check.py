"""bench/gpu_check.sh: each mode's plan fits one device command, and a dry run runs nothing."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMAND_LIMIT = 600  # the most one device command may run
TARGETS = {"headline": 420, "checks": 300, "extra": 600}

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _dry(mode, tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    return subprocess.run(["bash", "bench/gpu_check.sh", mode, "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("mode", sorted(TARGETS))
def test_dry_run_plan_fits_the_lease(mode, tmp_path):
    proc = _dry(mode, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    steps = re.findall(r"^\s*(\d+)\. (.+?)\s+(\d+) s$", out, re.M)
    assert steps and steps[0][1].strip() == "versions", out  # versions first
    assert [int(n) for n, _, _ in steps] == list(range(1, len(steps) + 1))
    limits = [int(s) for _, _, s in steps]
    m = re.search(r"sum of limits: (\d+) s; with (\d+) s kill grace per step: (\d+) s; "
                  r"target (\d+) s, one device command (\d+) s: fits", out)
    assert m, out
    total, grace, worst, target, command = (int(g) for g in m.groups())
    assert total == sum(limits) and worst == total + grace * len(limits)
    assert target == TARGETS[mode] and command == COMMAND_LIMIT
    assert worst <= TARGETS[mode] <= COMMAND_LIMIT
    assert not (tmp_path / "out").exists(), "a dry run must not create anything"
    # Failure details stay in the log: no stop-at-first-failure, no output thrown away.
    assert " -x " not in out and "| tail" not in out
    json_files = re.findall(r"--json (\S+)", out)
    assert all(f.startswith(str(tmp_path / "out")) for f in json_files)



def test_modes_hold_what_the_plan_promises(tmp_path):
    headline = _dry("headline", tmp_path).stdout
    assert "bench.bench_engine --json" in headline and "bench.profile_step --cases 1:dual,64:dual" in headline
    checks = _dry("checks", tmp_path).stdout
    for what in ("-k cuda_graph_replay", "tests/test_kernels_attention.py", "tests/test_kernels_launch.py",
                 "bench.conformance_sets --device cuda --dtype float32", "bench.bench_kernels"):
        assert what in checks, what
    assert "golden sets:" in checks and "LLADA_TEST_DEVICE=cuda" in checks
    extra = _dry("extra", tmp_path).stdout
    for what in ("--dtype bfloat16", "bench.bench_logprobs --device cuda", "bench.bench_moe",
                 "--shape llada2-mini", "--shape llada-moe", "--no-cuda-graphs"):
        assert what in extra, what
    # At most three JSON files over all modes, and the log: within the 8 files that come back.
    jsons = set(re.findall(r"--json (\S+)", headline + checks + extra))
    assert len(jsons) <= 3


def test_unknown_mode_or_option_is_refused(tmp_path):
    for args in (["bogus"], [], ["headline", "--fast"]):
        proc = subprocess.run(["bash", "bench/gpu_check.sh", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=30, env=dict(os.environ, OUT=str(tmp_path / "o")))
        assert proc.returncode == 2 and "usage" in proc.stderr
        assert not (tmp_path / "o").exists()
