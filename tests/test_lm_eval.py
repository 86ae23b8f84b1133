"""lm-eval's local-completions and local-chat-completions run a generate_until task (local data, its
default max_gen_toks of 256) against a server on a checkpoint whose context allows it, and what they
record is exactly what the server answers the same request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_server_helpers import metric, metrics, post
from weights.checkpoint import load_checkpoint

TASK = Path(__file__).resolve().parent / "lm_eval_tasks"


@pytest.fixture(scope="module")
def server(tmp_path_factory, serve):
    from ckpt_factory import add_tokenizer, make_checkpoint

    path = tmp_path_factory.mktemp("ctx512") / "tiny-512"
    make_checkpoint(path, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=80,
                    vocab_size=320, max_sequence_length=512, seed=3)
    add_tokenizer(path)
    bundle = load_checkpoint(path, device="cpu", dtype="float32")
    return serve(bundle, "tiny-512")


def test_lm_eval_generate_until_on_both_endpoints(server, tmp_path):
    before = metrics(server.url)
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, str(TASK / "run_lm_eval.py"), server.url, "tiny-512"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    docs = [json.loads(line) for line in (TASK / "tiny_gen.jsonl").read_text().splitlines()]
    after = metrics(server.url)
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert metric(after, "llada_requests_total", endpoint=path, status=200) - \
            metric(before, "llada_requests_total", endpoint=path, status=200) == len(docs)
    assert metric(after, "llada_requests_total", endpoint="/v1/completions", status=400) == \
        metric(before, "llada_requests_total", endpoint="/v1/completions", status=400)

    # What lm-eval recorded is the server's answer to the request it sends (max_gen_toks 256).
    same = {"model": "tiny-512", "max_tokens": 256, "temperature": 0, "stop": ["\n\n"], "seed": 1234}
    for doc, got in zip(docs, out["local-completions"]):
        assert got["question"] == doc["question"]
        want = post(server.url, "/v1/completions", dict(same, prompt=doc["question"])).json()
        assert got["response"] == want["choices"][0]["text"]
        assert want["usage"]["completion_tokens"] <= 256
    for doc, got in zip(docs, out["local-chat-completions"]):
        msgs = [{"role": "user", "content": doc["question"]}]
        want = post(server.url, "/v1/chat/completions", dict(same, messages=msgs)).json()
        assert got["response"] == want["choices"][0]["message"]["content"]
    assert 0.0 <= out["local-completions:exact_match"] <= 1.0
