"""`llada-serve --tensor-parallel-size 2` as processes on the CPU (gloo): answers identical to one
rank, a lost rank fails cleanly, SIGTERM drains and stops every rank, /metrics shows the ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.test_server_cli import ROOT, env, run_cli, wait_ready
from weights import default_model_path

MODEL = default_model_path()  # has a tokenizer: chat works
pytestmark = pytest.mark.skipif(not (MODEL / "config.json").is_file(), reason="no embedded default model")


def start(port, tmp_path, name, *flags, model=MODEL):
    log = open(tmp_path / f"{name}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "--model", str(model), "--device", "cpu",
                             "--port", str(port), "--max-batch-tokens", "2048", *flags], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, env=env(), start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, base, tmp_path / f"{name}.log", limit=120)
    return proc, base, log


def stop(proc, log):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    log.close()


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


REQUESTS = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 16,
                              "temperature": 0.7, "seed": 3, "logprobs": True, "top_logprobs": 2}),
    ("/v1/completions", {"prompt": "The sky is", "max_tokens": 16, "temperature": 1.0, "seed": 5,
                         "top_k": 8, "top_p": 0.9}),
    ("/v1/completions", {"prompt": "Once", "max_tokens": 16, "logprobs": 3}),
    ("/v1/loglikelihood", {"pairs": [{"context": "The sky is", "continuation": " blue"}], "mc_samples": 4,
                           "seed": 1}),
]
STREAMS = [
    {"prompt": "Hello", "max_tokens": 16, "temperature": 0.8, "seed": 2, "stream": True},
    {"prompt": "Hello", "max_tokens": 16, "stream": True, "stream_steps": True},
]
VOLATILE = ("id", "created", "usage", "duration", "timing")


def scrub(x):
    if isinstance(x, dict):
        return {k: scrub(v) for k, v in x.items() if k not in VOLATILE and not k.endswith("_s")}
    if isinstance(x, list):
        return [scrub(v) for v in x]
    return x


def same(a, b, path="") -> list[str]:
    """Where `a` and `b` differ: exactly, except floats (log-probabilities, scores) to 1e-4: the
    ranks' partial sums are added in another order than one rank's products."""
    if isinstance(a, float) and isinstance(b, float):
        return [] if abs(a - b) <= 1e-4 else [f"{path}: {a} != {b}"]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(a)} != {sorted(b)}"]
        return [d for k in a for d in same(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in same(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def answers(base):
    out = []
    for path, body in REQUESTS:
        r = httpx.post(base + path, json=body, timeout=120)
        out.append((r.status_code, scrub(r.json())))
    for body in STREAMS:
        lines = []
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    lines.append(scrub(json.loads(line[6:])))
        out.append((r.status_code, lines))
    return out


def test_two_ranks_answer_as_one(free_port, tmp_path):
    one, base1, log1 = start(free_port, tmp_path, "tp1")
    try:
        want = answers(base1)
    finally:
        stop(one, log1)
    two, base2, log2 = start(free_port, tmp_path, "tp2", "--tensor-parallel-size", "2")
    try:
        got = answers(base2)
        metrics = httpx.get(base2 + "/metrics", timeout=10).text
        constrained = httpx.post(base2 + "/v1/completions", timeout=60, json={
            "prompt": "Hi", "max_tokens": 16, "response_format": {"type": "json_object"}})
        after = httpx.post(base2 + REQUESTS[2][0], json=REQUESTS[2][1], timeout=120)
    finally:
        stop(two, log2)
    assert all(code == 200 for code, _ in want), want
    assert same(got, want) == []
    assert got[0][1]["choices"][0]["message"]["content"] == want[0][1]["choices"][0]["message"]["content"]
    assert 'llada_tensor_parallel_size{model_name="default"} 2.0' in metrics
    # Structured output keeps host state the other ranks do not have: refused by name, ranks intact.
    assert constrained.status_code == 400, constrained.text
    assert constrained.json()["error"]["param"] == "response_format"
    assert "tensor-parallel" in constrained.json()["error"]["message"]
    assert after.status_code == 200 and same(scrub(after.json()), want[2][1]) == []
    for rank in (0, 1):
        assert f'llada_rank_memory_bytes{{model_name="default",rank="{rank}"}}' in metrics


def _one_running(proc, base, length: int):
    """The follower's pid, and a request of `length` steps in flight (its thread and result dict),
    once the engine has admitted it."""
    (follower,) = children(proc.pid)
    result = {}
    body = {"prompt": [1, 2, 3], "max_tokens": length, "block_length": length, "steps": length}
    t = threading.Thread(target=lambda: result.update(
        r=httpx.post(base + "/v1/completions", json=body, timeout=60)))
    t.start()
    deadline = time.monotonic() + 15
    while 'llada_running_requests{model_name="tiny-llada"} 1.0' not in httpx.get(base + "/metrics", timeout=5).text:
        assert time.monotonic() < deadline and "r" not in result, ("never admitted", result)
        time.sleep(0.01)
    return follower, t, result


def test_a_lost_rank_fails_requests_with_503_and_the_server_exits(golden_dir, free_port, tmp_path):
    proc, base, log = start(free_port, tmp_path, "fault", "--tensor-parallel-size", "2", model=golden_dir)
    try:
        follower, t, result = _one_running(proc, base, 256)
        os.kill(follower, signal.SIGKILL)
        t.join(30)
        assert result["r"].status_code == 503, result["r"].text
        assert result["r"].json()["error"]["code"] == "rank_failed"
        try:
            assert httpx.get(base + "/ready", timeout=2).status_code == 503
        except httpx.TransportError:
            pass  # already gone
        rc = proc.wait(timeout=10)
        assert rc != 0
    finally:
        stop(proc, log)


def test_sigterm_drains_and_stops_every_rank(golden_dir, free_port, tmp_path):
    proc, base, log = start(free_port, tmp_path, "term", "--tensor-parallel-size", "2", model=golden_dir)
    try:
        follower, t, result = _one_running(proc, base, 128)
        os.killpg(proc.pid, signal.SIGTERM)  # the whole group, followers included
        t.join(60)
        assert result["r"].status_code == 200, result["r"].text
        assert proc.wait(timeout=30) == 0
        deadline = time.monotonic() + 10
        while alive(follower):
            assert time.monotonic() < deadline, "the follower rank did not stop"
            time.sleep(0.05)
    finally:
        stop(proc, log)


def test_a_size_that_does_not_divide_is_refused_in_one_line(free_port):
    r = run_cli(["--model", str(MODEL), "--device", "cpu", "--port", str(free_port),
                 "--tensor-parallel-size", "3"])
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert "num_attention_heads=4" in line and "1, 2, 4" in line


def test_a_rank_that_fails_at_start_stops_the_server(tmp_path, free_port):
    """Weights that cannot be loaded (config.json passes the size check, the shards are gone): every
    rank fails, the server exits non-zero with a message, and nothing waits on the rendezvous."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(ROOT / "tests" / "golden" / "tiny-llada", ckpt)
    for f in ckpt.glob("*.safetensors"):
        f.unlink()
    t0 = time.monotonic()
    r = run_cli(["--model", str(ckpt), "--device", "cpu", "--port", str(free_port),
                 "--tensor-parallel-size", "2"], timeout=60)
    assert r.returncode != 0 and "cannot load the model" in r.stderr
    assert time.monotonic() - t0 < 45
