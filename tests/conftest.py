"""Shared fixtures: checkpoints for tests, free loopback ports, live uvicorn servers."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from golden_sets import TINY_LLADA as GOLDEN  # noqa: E402

# Every model in the tests is tiny: one intra-op thread, as the entry points choose for small models
# (weights.checkpoint.pick_cpu_threads), keeps the suite fast when other processes hold a core.
# The servers and tools the tests start (in this process or as children) get the same count instead
# of measuring one at start-up; tests of the measurement clear this.
if not os.environ.get("OMP_NUM_THREADS"):
    torch.set_num_threads(1)
    os.environ.setdefault("LLADA_CPU_THREADS", "1")


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """The golden tiny checkpoint (no tokenizer: token-id prompts only)."""
    if not (GOLDEN / "config.json").is_file():
        pytest.skip(f"golden checkpoint missing at {GOLDEN}")
    return GOLDEN


@pytest.fixture(scope="session")
def tiny_tokenizer_model(tmp_path_factory) -> Path:
    """A random-weight LLaDA checkpoint with a small BPE tokenizer.json and a chat template."""
    from ckpt_factory import add_tokenizer, make_checkpoint

    path = tmp_path_factory.mktemp("tiny-tok") / "tiny-chat"
    make_checkpoint(path, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=80,
                    vocab_size=320, max_sequence_length=256, seed=3)
    add_tokenizer(path)
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    return _free_port()


class LiveServer:
    """A uvicorn server running an app in a background thread on a free loopback port."""

    def __init__(self, app, port: int | None = None):
        import uvicorn

        self.app = app
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                access_log=False, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    def start(self, timeout: float = 30.0) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"uvicorn did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=timeout)


@pytest.fixture(scope="session")
def live_server():
    """Factory: `live_server(app)` starts it and returns a LiveServer; all stop at session end."""
    started: list[LiveServer] = []

    def start(app, port: int | None = None) -> LiveServer:
        srv = LiveServer(app, port).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


# ---------------------------------------------------------------- models and live servers, shared by the test files
@pytest.fixture(scope="module")
def bundle(golden_dir):
    """The golden tiny checkpoint loaded in float32 (token-id prompts only), one per test module."""
    from weights.checkpoint import load_checkpoint

    return load_checkpoint(golden_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def chat_bundle(tiny_tokenizer_model):
    """The tiny checkpoint with a tokenizer and a chat template, loaded in float32."""
    from weights.checkpoint import load_checkpoint

    return load_checkpoint(tiny_tokenizer_model, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def serve(live_server):
    """Factory: `serve(bundle, name="tiny", max_batch_tokens=2048, **options)` builds the app around
    `bundle` (options that are EngineConfig fields configure the engine, the rest go to create_app)
    and starts it; returns the LiveServer (its `.app`, `.url`)."""
    from dataclasses import fields

    from sampler.scheduler import EngineConfig
    from server.app import create_app

    engine_fields = {f.name for f in fields(EngineConfig)}

    def start(bundle, name: str | None = "tiny", max_batch_tokens: int = 2048, **options) -> LiveServer:
        engine = {k: options.pop(k) for k in list(options) if k in engine_fields}
        app = create_app(bundle, EngineConfig(max_batch_tokens=max_batch_tokens, **engine),
                         served_model_name=name, **options)
        return live_server(app)
    return start
