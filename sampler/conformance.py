"""Replay a cases file in the golden format against a checkpoint.

    python -m sampler.conformance --model DIR --cases FILE [--dtype float32|float64] [--device cpu|cuda]
        [--batched] [--tensor-parallel-size N] [--draft-depth N]

One line per case (name, match or the first differing position, NFE against expected), the
forward-logits check when the directory holds forward_logits.safetensors, then `N passed, M failed`.
Exits non-zero on any failure.

Samplers: `reference` and `fast_dllm` (LLaDA's generate.py and Fast-dLLM, on LLaDA-8B or
LLaDA-MoE checkpoints), `llada2.0` and `llada2.1` (LLaDA2.x `generate`, block diffusion, on LLaDA2.x
checkpoints; `expected_ids` are cut after the first EOS). `--draft-depth N` runs every case (the
LLaDA step's and block diffusion's) with exact parallel decoding: the ids must still match, each
line adds the forwards run against the reference's NFE, and a case that took more forwards than the
reference fails. Forward logits: `logits` (with the
block-causal mask when the file's metadata names a `block_length`), `logits_no_mask` (fully
bidirectional) when present; the tolerance comes from the file's metadata (`atol_float32`), else 1e-4.

`--tensor-parallel-size N` runs the same cases on N local ranks (gloo on the CPU, NCCL on N GPUs),
each holding its shard of the model (`weights.parallel`); every rank runs the same steps and rank 0
prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from sampler.generate import generate
from sampler.params import ParamError, SamplingParams
from weights.checkpoint import CheckpointError, load_checkpoint, pick_cpu_threads


LLADA_SAMPLERS = ("reference", "fast_dllm")
BLOCK_SAMPLERS = ("llada2.0", "llada2.1")


def case_params(case: dict) -> SamplingParams:
    sampler = case.get("sampler", "reference")
    if sampler not in LLADA_SAMPLERS + BLOCK_SAMPLERS:
        raise KeyError(f"unknown sampler {sampler!r}")
    extra = {}
    if sampler in BLOCK_SAMPLERS:
        extra = dict(minimal_topk=case.get("minimal_topk", 1), eos_early_stop=case.get("eos_early_stop", False))
        if sampler == "llada2.1":
            extra.update(editing_threshold=case["editing_threshold"],
                         max_post_steps=case.get("max_post_steps", 16),
                         num_to_transfer=case.get("num_to_transfer", 1))
    return SamplingParams(
        gen_length=case["gen_length"], block_length=case.get("block_length"), steps=case.get("steps"),
        temperature=case.get("temperature", 0.0), remasking=case.get("remasking", "low_confidence"),
        cfg_scale=case.get("cfg_scale", 0.0), threshold=case.get("threshold"),
        cache=case.get("cache", "none"), seed=case.get("seed"), **extra)


def check_logits(bundle, path: Path, dtype: str) -> list[tuple[str, bool, str]]:
    """(name, ok, message) for each logits tensor of a forward_logits.safetensors file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    ref = load_file(str(path))
    with safe_open(str(path), framework="pt") as h:
        info = json.loads((h.metadata() or {}).get("info", "{}"))
    tol = info.get("atol_float32", 1e-4) if dtype in ("float32", "float64") else 5e-2
    ids = ref["input_ids"].to(bundle.device)
    runs = [("forward_logits", "logits", info.get("block_length"))]
    if "logits_no_mask" in ref:
        runs.append(("forward_logits_no_mask", "logits_no_mask", None))
    out = []
    for name, key, block in runs:
        with torch.no_grad():
            got = bundle.model.full_logits(ids, block_length=block).float().cpu()
        err = (got - ref[key].float()).abs().max().item()
        out.append((name, err <= tol, f"max abs error {err:.2e} (tolerance {tol:.0e})"))
    return out


def draft_summary(forwards: int, reference_nfe: int, depth: int) -> str:
    return (f"forwards {forwards}, reference {reference_nfe} "
            f"({forwards / max(reference_nfe, 1):.3f} of the reference) at draft depth {depth}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sampler.conformance", description=__doc__.split("\n")[1])
    ap.add_argument("--model", required=True, help="checkpoint directory (Hugging Face layout)")
    ap.add_argument("--cases", required=True, help="cases file in the golden format")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--batched", action="store_true",
                    help="run all cases in one batch (checks batch invariance too)")
    ap.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                    help="shard the model over N local ranks (default 1)")
    ap.add_argument("--draft-depth", type=int, default=0,
                    help="exact parallel decoding: guessed steps verified per forward (0: off)")
    args = ap.parse_args(argv)
    if args.tensor_parallel_size > 1:
        from weights.parallel import run_ranks

        lines, rc = run_ranks(args.tensor_parallel_size, _run, args)
    else:
        lines, rc = _run(None, args)
    for stream, line in lines:
        print(line, file=sys.stderr if stream == "err" else sys.stdout)
    return rc


def _run(tp, args) -> tuple[list[tuple[str, str]], int]:
    """(printed lines, exit status) of the conformance run on this rank."""
    lines = []

    def say(line, stream="out"):
        lines.append((stream, line))

    if tp is not None:
        torch.set_num_threads(1)
    try:
        bundle = load_checkpoint(args.model, device=args.device, dtype=args.dtype, tp=tp)
        pick_cpu_threads(bundle.config, bundle.device)
        data = json.loads(Path(args.cases).read_text())
    except (CheckpointError, OSError, json.JSONDecodeError) as e:
        say(f"error: {e}", "err")
        return lines, 2
    cases = data["cases"] if isinstance(data, dict) else data
    passed = failed = 0

    logits_file = Path(args.model) / "forward_logits.safetensors"
    if logits_file.exists():
        for name, ok, msg in check_logits(bundle, logits_file, args.dtype):
            say(f"{'PASS' if ok else 'FAIL'} {name}: {msg}")
            failed += not ok  # the summary counts cases; a failing logits check still fails the run

    blocks = bool(bundle.config.block_diffusion)
    try:
        params = [case_params(c) for c in cases]
        for c, p in zip(cases, params):
            if (c.get("sampler", "reference") in BLOCK_SAMPLERS) != blocks:
                raise ParamError("sampler", f"case {c.get('name', '?')}: sampler {c.get('sampler')!r} "
                                 f"does not run on a {bundle.config.family} checkpoint")
            p = p.for_block_diffusion() if blocks else p
            p.validate(len(c["prompt_ids"]), bundle.config.max_sequence_length, blocks)
        if args.draft_depth:
            params = [replace(p, draft_depth=args.draft_depth) for p in params]
            for c, p in zip(cases, params):
                p = p.for_block_diffusion() if blocks else p
                p.validate(len(c["prompt_ids"]), bundle.config.max_sequence_length, blocks)
    except (ParamError, KeyError) as e:
        say(f"error: bad case: {e}", "err")
        return lines, 2
    if args.batched:
        results = generate(bundle, [c["prompt_ids"] for c in cases], params)
    else:
        results = [generate(bundle, [c["prompt_ids"]], p)[0] for c, p in zip(cases, params)]
    forwards = reference_nfe = 0
    for c, res in zip(cases, results):
        want = c["expected_ids"]
        got = res.gen_ids
        problems = []
        if got != want:
            diff = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            problems.append(f"first difference at position {diff}: got {got[diff:diff + 1]}, "
                            f"expected {want[diff:diff + 1]}")
        nfe_note = ""
        if "expected_nfe" in c:
            nfe_note = f", nfe {res.nfe} (expected {c['expected_nfe']})"
            if res.nfe != c["expected_nfe"]:
                problems.append(f"nfe {res.nfe} != expected {c['expected_nfe']}")
        else:
            nfe_note = f", nfe {res.nfe}"
        if args.draft_depth:
            nfe_note += f", forwards {res.forwards} (reference {res.nfe})"
            forwards += res.forwards
            reference_nfe += res.nfe
            if res.forwards > res.nfe:
                problems.append(f"{res.forwards} forwards, more than the reference's {res.nfe}")
        name = c.get("name", "?")
        if problems:
            failed += 1
            say(f"FAIL {name}: " + "; ".join(problems) + nfe_note)
        else:
            passed += 1
            say(f"PASS {name}: {len(got)} ids match{nfe_note}")
    if args.draft_depth:
        say(draft_summary(forwards, reference_nfe, args.draft_depth))
    say(f"{passed} passed, {failed} failed")
    return lines, 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
