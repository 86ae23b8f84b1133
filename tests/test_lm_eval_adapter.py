"""lm-evaluation-harness end to end: the adapter runs a multiple-choice task (through
/v1/loglikelihood) and a generation task (through /v1/completions) against a live server on the
default model. The tasks and their documents are in tests/lm_eval_tasks/ (nothing is downloaded)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is the optional [eval] extra (.ci/run installs it)")

from evaluation import lm_eval_adapter  # noqa: E402
from weights import default_model_path  # noqa: E402
from weights.checkpoint import load_checkpoint  # noqa: E402

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"


@pytest.fixture(scope="module")
def server(serve):
    bundle = load_checkpoint(default_model_path(), device="cpu", dtype="float32")
    return serve(bundle, None, max_batch_size=32, max_batch_tokens=8192)


def test_adapter_runs_choice_and_generation_tasks(server, tmp_path, capsys):
    out = tmp_path / "results.json"
    rc = lm_eval_adapter.main(["--base-url", server.url, "--tasks", "llada_toy_choice,llada_toy_generate",
                               "--include-path", str(TASKS), "--mc-samples", "4", "--concurrency", "4",
                               "--output", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    res = json.loads(out.read_text())["results"]
    acc = res["llada_toy_choice"]["acc,none"]
    em = res["llada_toy_generate"]["exact_match,none"]
    print(f"default model: llada_toy_choice acc {acc:.3f} (chance 0.25), llada_toy_generate exact match {em:.3f}")
    assert 0.25 < acc <= 1.0   # better than chance among four orderings; the value is reported
    assert 0.0 < em <= 1.0
    assert "llada_toy_choice" in printed and "llada_toy_generate" in printed
    m = server.app.state.metrics.render().decode()
    assert re.search(r'^llada_requests_total\{(?=[^}]*endpoint="/v1/loglikelihood")(?=[^}]*status="200")[^}]*\} [1-9]', m, re.M), m


def test_adapter_reports_a_missing_server(free_port, capsys):
    rc = lm_eval_adapter.main(["--base-url", f"http://127.0.0.1:{free_port}", "--tasks", "llada_toy_choice",
                               "--include-path", str(TASKS)])
    assert rc == 2 and "no llada-serve server" in capsys.readouterr().err
