"""`python -m server.cli` as a process: flags from the environment, clear failures, SIGTERM drain."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from test_server_helpers import metric, metrics
from weights import default_model_path

ROOT = Path(__file__).resolve().parents[1]


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("LLADA_")}
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e["PYTHONUNBUFFERED"] = "1"
    e["LLADA_DRAIN_DELAY"] = "0"  # SIGTERM closes the listener at once (tests of the delay set it)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def run_cli(args, timeout=60, **envs):
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, env=env(**envs),
                          capture_output=True, text=True, timeout=timeout)


def test_without_a_model_and_no_default_it_says_so_and_exits_non_zero(monkeypatch, tmp_path, capsys, free_port):
    import weights
    from server.cli import main

    monkeypatch.setattr(weights, "default_model_path", lambda: tmp_path / "absent")
    with pytest.raises(SystemExit) as e:
        main(["--port", str(free_port)])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "default model" in err and "--model" in err



def wait_ready(proc, base, log_path, limit=60.0):
    """Poll /ready until 200; fail with the server's log if it dies or takes over `limit` seconds."""
    deadline = time.monotonic() + limit
    while True:
        assert proc.poll() is None, log_path.read_text()
        try:
            if httpx.get(base + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.1)


@pytest.mark.skipif(not (default_model_path() / "config.json").is_file(), reason="no embedded default model yet")
def test_without_a_model_it_serves_the_default(free_port, tmp_path):
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "--port", str(free_port)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, env=env(), start_new_session=True)
    base = f"http://127.0.0.1:{free_port}"
    try:
        wait_ready(proc, base, tmp_path / "server.log")
        name = httpx.get(base + "/v1/models", timeout=5).json()["data"][0]["id"]
        r = httpx.post(base + "/v1/chat/completions", timeout=60, json={
            "model": name, "messages": [{"role": "user", "content": "Copy: a b c"}], "max_tokens": 16})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
    # no thread count given: a small model's count is measured at start-up and the timings logged
    text = (tmp_path / "server.log").read_text()
    if (os.cpu_count() or 1) > 1:
        assert "CPU threads: a 64-token forward takes" in text, text


def test_an_unloadable_model_exits_non_zero(tmp_path, free_port):
    r = run_cli(["--port", str(free_port)], LLADA_MODEL=str(tmp_path / "nothing-here"))
    assert r.returncode == 1 and "cannot load the model" in r.stderr
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    r = run_cli(["--model", str(tmp_path / "broken"), "--port", str(free_port)])
    assert r.returncode == 1 and "cannot load the model" in r.stderr and "Traceback" not in r.stderr


def test_a_busy_port_is_refused_before_the_model_is_loaded(tmp_path, free_port):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", free_port))
        busy.listen()
        t0 = time.monotonic()
        # the model path does not exist: the port is checked first, so the message is about the port
        r = run_cli(["--port", str(free_port), "--model", str(tmp_path / "not-loaded")])
    assert r.returncode == 1 and f"127.0.0.1:{free_port}" in r.stderr and "another --port" in r.stderr, r.stderr
    assert "cannot load the model" not in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 30


def test_every_flag_has_help_with_its_default():
    from sampler.generate_cli import build_parser as generate_parser
    from server.cli import build_parser as serve_parser

    for parser in (serve_parser(), generate_parser()):
        for action in parser._actions:
            if action.dest == "help":
                continue
            assert action.help, (parser.prog, action.option_strings)
            if not action.required and action.dest not in ("prompt", "prompt_ids"):
                assert "default" in action.help.lower(), (parser.prog, action.option_strings, action.help)


def test_bad_flag_values_are_refused():
    r = run_cli(["--max-batch-size", "0", "--model", "x"])
    assert r.returncode == 2 and "--max-batch-size" in r.stderr
    r = run_cli(["--device", "tpu"])
    assert r.returncode == 2
    r = run_cli(["--cpu-threads", "-1", "--model", "x"])
    assert r.returncode == 2 and "--cpu-threads" in r.stderr
    r = run_cli(["--adaptive-drafting", "sometimes", "--model", "x"])
    assert r.returncode == 2 and "--adaptive-drafting" in r.stderr
    r = run_cli(["--model", "x"], LLADA_ADAPTIVE_DRAFTING="sometimes")  # argparse checks no env default
    assert r.returncode == 2 and "--adaptive-drafting must be auto, on or off" in r.stderr


def test_env_configuration_and_sigterm_drain(golden_dir, free_port, tmp_path):
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env=env(LLADA_MODEL=golden_dir, LLADA_PORT=free_port, LLADA_API_KEY="k1",
                LLADA_SERVED_MODEL_NAME="from-env", LLADA_DEVICE="cpu", LLADA_SHUTDOWN_GRACE=10,
                LLADA_MAX_BATCH_TOKENS=2048, LLADA_CPU_THREADS=1),
        start_new_session=True)
    base = f"http://127.0.0.1:{free_port}"
    auth = {"Authorization": "Bearer k1"}
    try:
        wait_ready(proc, base, tmp_path / "server.log")
        models = httpx.get(base + "/v1/models", headers=auth, timeout=5).json()
        assert models["data"][0]["id"] == "from-env"
        assert httpx.get(base + "/v1/models", timeout=5).status_code == 401

        # A long request is in flight when SIGTERM arrives: it still completes, then the process exits 0.
        result = {}
        body = {"prompt": [1, 2, 3], "max_tokens": 256, "block_length": 256, "steps": 256}
        t = threading.Thread(target=lambda: result.update(
            r=httpx.post(base + "/v1/completions", json=body, headers=auth, timeout=60)))
        t.start()
        deadline = time.monotonic() + 15
        while metric(metrics(base), "llada_running_requests") != 1:
            assert time.monotonic() < deadline and "r" not in result, "the request was never admitted"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGTERM)
        t.join(60)
        rc = proc.wait(timeout=30)
        assert result["r"].status_code == 200, result["r"].text
        assert len(result["r"].json()["choices"][0]["token_ids"]) <= 256
        assert rc == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
    text = (tmp_path / "server.log").read_text()
    for needle in ("parameters", "device cpu", "dtype float32", "KV buffers", "listening on http://127.0.0.1",
                   "draining", "2048 canvas tokens, 1 CPU thread"):
        assert needle in text, needle
    assert "CPU threads: a" not in text  # the count came from LLADA_CPU_THREADS: nothing measured
