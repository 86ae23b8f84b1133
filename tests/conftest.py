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

# The golden sets beside the checkout, or inside it (shared/golden: how they travel to a GPU machine).
GOLDEN = next((p for p in (ROOT / "shared" / "golden" / "tiny-llada",
                           (ROOT / ".." / "shared" / "golden" / "tiny-llada").resolve())
               if (p / "config.json").is_file()), (ROOT / ".." / "shared" / "golden" / "tiny-llada").resolve())

# Every model in the tests is tiny: one intra-op thread, as the entry points choose for small models
# (weights.checkpoint.pick_cpu_threads), keeps the suite fast when other processes hold a core.
if not os.environ.get("OMP_NUM_THREADS"):
    torch.set_num_threads(1)


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
