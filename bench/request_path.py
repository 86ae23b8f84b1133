"""The request path of one chat request, measured: every call from the chat route to `Engine.submit` that
crosses from one project module to another (server/, sampler/, weights/, kernels/), traced with a
profile hook in the threads that serve the request (the event loop's and the tokenizing worker's; the
engine thread is left out). A coroutine counts once (not at every resumption); a function a worker
thread runs counts as one hop from the route that handed it over.

    python -m bench.request_path

prints the hops in call order (caller -> callee), then the counts: hops (cross-module calls), distinct
edges, and the modules touched (every project module one of whose functions ran on the path).
"""

from __future__ import annotations

import sys
import tempfile
import threading
from pathlib import Path

PROJECT = ("server", "sampler", "weights", "kernels")


def _module(frame) -> str | None:
    name = frame.f_globals.get("__name__", "")
    return name if name.split(".")[0] in PROJECT else None


def trace_chat_request() -> tuple[list[tuple[str, str]], set[str]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from ckpt_factory import add_tokenizer, make_checkpoint
    from fastapi.testclient import TestClient

    from sampler.scheduler import EngineConfig
    from server.app import create_app
    from weights.checkpoint import load_checkpoint

    path = Path(tempfile.mkdtemp()) / "tiny-chat"
    make_checkpoint(path, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=80,
                    vocab_size=320, max_sequence_length=256, seed=3)
    add_tokenizer(path)
    bundle = load_checkpoint(path, device="cpu", dtype="float32")
    app = create_app(bundle, EngineConfig(max_batch_tokens=2048), served_model_name="tiny")
    hops: list[tuple[str, str]] = []
    touched: set[str] = set()
    state = {"on": False, "done": False}
    seen: list = []  # frames already entered: a coroutine's resumption is not a new call


    def profile(frame, event, arg):
        if event != "call" or state["done"] or threading.current_thread().name.startswith("llada-engine"):
            return
        code = frame.f_code
        callee = _module(frame)
        if callee is None or any(f is frame for f in seen):
            return
        seen.append(frame)
        if not state["on"]:
            if callee == "server.routes" and code.co_name == "chat_completions":
                state["on"] = True
                touched.add(callee)
            return
        touched.add(callee)
        caller = frame.f_back
        while caller is not None and _module(caller) is None:  # through library frames (asyncio, FastAPI)
            caller = caller.f_back
        if caller is None:  # a worker thread's entry: the route handed it over (asyncio.to_thread)
            hops.append(("(to_thread from the route)", f"{callee}.{code.co_name}"))
        elif _module(caller) != callee:
            hops.append((f"{_module(caller)}.{caller.f_code.co_name}", f"{callee}.{code.co_name}"))
        if callee == "sampler.scheduler" and code.co_name == "submit":
            state["done"] = True

    threading.setprofile(profile)  # before the client starts the app's thread and its workers
    try:
        with TestClient(app) as client:
            r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                           "max_tokens": 4})
    finally:
        threading.setprofile(None)
    assert r.status_code == 200, r.text
    return hops, touched


def main() -> None:
    hops, touched = trace_chat_request()
    for a, b in hops:
        print(f"{a} -> {b}")
    print(f"hops (cross-module calls): {len(hops)}; distinct edges: {len(set(hops))}; "
          f"modules touched: {len(touched)}")
    print("modules:", ", ".join(sorted(touched)))


if __name__ == "__main__":
    main()
