"""bench/bench_public.py: the CI run (no public checkouts: their rows skipped, the reference stands
in and its ids are compared with ours), the Hugging Face adapter's cached forward, and importing a
checkout's module whose top-level imports are not installed here."""

import json

import torch

from bench import bench_public as bp


def test_tiny_run_without_checkouts(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bp.main(["--tiny", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["row"] for r in rows] == ["public generate", "Fast-dLLM dual cache",
                                        "Fast-dLLM dual cache, threshold 0.9", "ours exact",
                                        "ours dual cache", "ours dual cache, threshold 0.9"]
    by = {r["row"]: r for r in rows}
    assert "stand-in" in by["public generate"]["source"] and by["public generate"]["vs_public_generate"] == 1.0
    for name in ("Fast-dLLM dual cache", "Fast-dLLM dual cache, threshold 0.9"):
        assert by[name]["tokens_per_s"] == "skipped" and "no --fast-dllm-repo" in by[name]["source"]
    assert by["ours exact"]["ids_identical"] == "yes"
    for name in ("ours exact", "ours dual cache", "ours dual cache, threshold 0.9"):
        assert by[name]["tokens_per_s"] > 0 and by[name]["vs_public_generate"] > 0
    printed = capsys.readouterr().out
    assert printed.count("| tiny shape") == 6 and "| model | threads |" in printed


def test_adapter_cached_block_forward_matches_the_full_forward():
    _, bundle = bp.build_model("tiny")
    hf = bp.HFAdapter(bundle.model)
    x = torch.tensor([bp.random_prompt(bundle, 24)])
    full = hf(x)
    first = hf(x, use_cache=True)
    assert torch.allclose(first.logits, full.logits, atol=1e-5)
    block = torch.zeros_like(x, dtype=torch.bool)
    block[:, 8:16] = True
    step = hf(x[:, 8:16], past_key_values=first.past_key_values, use_cache=True, replace_position=block)
    assert step.logits.shape == (1, 8, full.logits.shape[-1])
    assert torch.allclose(step.logits, full.logits[:, 8:16], atol=1e-5)


def test_public_module_imports_with_placeholders(tmp_path):
    (tmp_path / "llada").mkdir()
    (tmp_path / "llada" / "generate.py").write_text(
        "from transformers import AutoModel\nfrom model.modeling_llada import LLaDAModelLM\n"
        "def generate_with_dual_cache(model, prompt, **kw):\n    return prompt, 0\n")
    mod = bp.load_public(str(tmp_path), "fast_dllm")
    assert mod.generate_with_dual_cache(None, 5) == (5, 0)
    import sys

    assert "model.modeling_llada" not in sys.modules
    assert bp.load_public(None, "llada") is None


def test_http_bench_configurations_are_valid_server_flags():
    """bench/bench_http_cpu.py: every preset (and a `--config NAME='ENV=V FLAGS'`) parses as
    `llada-serve` flags once its leading environment assignments are taken off."""
    import argparse
    import re

    from bench import bench_http_cpu as bh
    from server.cli import build_parser

    args = argparse.Namespace(configs="default,threads-1,threads-2,threads-2-passive",
                              config=["mine=OMP_WAIT_POLICY=PASSIVE --cpu-threads 2 --max-batch-size 8"])
    configs = bh.parse_configs(args)
    assert [n for n, _ in configs][-1] == "mine" and len(configs) == 5
    for name, flags in configs:
        flags = [f for f in flags if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", f)]
        parsed = build_parser().parse_args(flags)
        assert parsed.cpu_threads in (0, 1, 2)
    assert dict(configs)["mine"][0] == "OMP_WAIT_POLICY=PASSIVE"
