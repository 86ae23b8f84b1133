"""Batch 1, one token per forward: our engine against the public LLaDA and Fast-dLLM loops, one process.

    python -m bench.bench_public --llada-repo ~/src/LLaDA --fast-dllm-repo ~/src/Fast-dLLM
    python -m bench.bench_public --tiny       # the CI run: no checkouts, the reference stands in

The public code is not part of this project: the benchmark imports it from checkouts given on the
command line (`--llada-repo`: github.com/ML-GSAI/LLaDA, its `generate.py`; `--fast-dllm-repo`:
github.com/NVlabs/Fast-dLLM, its `llada/generate.py`). Their loops call a Hugging Face model object
(`model(x).logits`; Fast-dLLM's dual cache also `use_cache=True`, `past_key_values` and
`replace_position`); `HFAdapter` gives our network (`weights/`) that interface, so every row runs
the same forward and the table compares the decoding loops around it. Their model code is not used
(neither is `transformers`: where it is not installed, the names their modules import at the top
and use only in their `main()` are placeholders).

Rows per model and thread count: the public `generate` (without `--llada-repo`, `sampler.reference`
stands in for it), Fast-dLLM's `generate_with_dual_cache` with its schedule and with threshold 0.9
(skipped without `--fast-dllm-repo`), and our batch (`sampler.strategies.make_batch`, what the
server steps) with one request: exact, dual cache, dual cache with threshold 0.9. Each row's ids are
compared with its counterpart's (ours exact with the public generate, ours dual cache with
Fast-dLLM's, with and without threshold). Rounds alternate the rows; the median is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import random
import statistics
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace

import torch

from bench.bench_engine import SHAPES, Bundle, build_random
from sampler.params import SamplingParams
from sampler.reference import reference_generate
from sampler.strategies import make_batch, rows_needed
from weights.checkpoint import SpecialIds, build_network, load_checkpoint
from weights.config_llada import LLaDAConfig
from weights.layers import AttnLayout, KVBuffers

# The 26M shape (d 512, 8 layers): 25.7M parameters with the tiny shape's 512-token vocabulary.
SHAPE_26M = dict(SHAPES["tiny"], d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, mlp_hidden_size=1408)
MODELS = ("default", "tiny", "26m")
PUBLIC = {"llada": "generate.py", "fast_dllm": "llada/generate.py"}


class HFAdapter:
    """Our network behind the interface the public loops call: `model(x).logits` ([1, L, V]); with
    `use_cache=True` also `past_key_values` (the canvas's keys/values, a `KVBuffers`); with
    `past_key_values` and `replace_position` (a [1, L] mask of the block) a forward of the block
    only, its keys/values written over the block's rows, attending to every cached row."""

    def __init__(self, model):
        self.model = model

    @property
    def device(self) -> torch.device:
        return self.model.device

    def __call__(self, x, attention_mask=None, past_key_values=None, use_cache=False, replace_position=None):
        if attention_mask is not None or x.shape[0] != 1:
            raise ValueError("the adapter runs batch 1 without padding")
        m, dev = self.model, self.model.device
        ids = x[0]
        if past_key_values is None and not use_cache:
            return SimpleNamespace(logits=m.full_logits(x), past_key_values=None)
        if past_key_values is None:
            n = ids.numel()
            kv = KVBuffers(m.config, n, dev, m.dtype, n_kv_heads=m.n_kv_heads)
            rows = torch.arange(n, device=dev)
            layout = AttnLayout.build([n], [0], [n], rows, dev)
            return SimpleNamespace(logits=m.forward(ids, rows, layout, kv).unsqueeze(0), past_key_values=kv)
        if replace_position is None:
            raise ValueError("the adapter serves the dual cache only (replace_position)")
        kv = past_key_values
        rows = replace_position[0].nonzero().squeeze(1)
        layout = AttnLayout.build([rows.numel()], [0], [kv.capacity], rows, dev)
        return SimpleNamespace(logits=m.forward(ids, rows, layout, kv).unsqueeze(0), past_key_values=kv)


@contextlib.contextmanager
def _placeholders(names):
    """Empty modules for those of `names` not importable here, for the time of the import: the
    public files import `transformers` and their own model code at the top, for their `main()`."""
    added = []
    for name in names:
        parts = name.split(".")
        top = parts[0]
        if top in sys.modules or importlib.util.find_spec(top) is not None and top == "transformers":
            continue
        for i in range(len(parts)):
            mod = types.ModuleType(".".join(parts[:i + 1]))
            mod.__path__ = []
            mod.AutoTokenizer = mod.AutoModel = mod.LLaDAModelLM = None
            sys.modules[mod.__name__] = mod
            added.append(mod.__name__)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def load_public(repo: str | None, which: str):
    """The public module `which` ("llada" or "fast_dllm") from the checkout `repo`, or None."""
    if not repo:
        return None
    path = Path(repo).expanduser() / PUBLIC[which]
    if not path.is_file():
        raise SystemExit(f"{path}: not found (is {repo} a checkout of the right repository?)")
    spec = importlib.util.spec_from_file_location(f"_public_{which}", path)
    mod = importlib.util.module_from_spec(spec)
    with _placeholders(["transformers", "model.modeling_llada"]):
        spec.loader.exec_module(mod)
    return mod


def build_model(name: str) -> tuple[str, Bundle]:
    if name == "default":
        from weights import default_model_path

        b = load_checkpoint(str(default_model_path()), device="cpu", dtype="float32")
        return "default model", Bundle(b.model, b.config, b.special)
    if name == "26m":
        cfg = LLaDAConfig(**SHAPE_26M)
        model = build_network(cfg, "cpu", torch.float32)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(1.0) if p.ndim == 1 else p.normal_(0.0, 0.02, generator=gen)
        model.eval().requires_grad_(False)
        return "26M shape", Bundle(model, cfg, SpecialIds(mask=cfg.mask_token_id, eos=cfg.eos_token_id))
    return "tiny shape", build_random(name, torch.device("cpu"), torch.float32)


def random_prompt(bundle, n: int) -> list[int]:
    """`n` ids of the model's vocabulary, special ids left out."""
    special = {bundle.special.mask, bundle.special.eos, bundle.special.eot, bundle.special.bos}
    vocab = [t for t in range(min(bundle.config.vocab_size, 4096)) if t not in special]
    rnd = random.Random(0)
    return [rnd.choice(vocab) for _ in range(n)]


def model_label(label: str, bundle: Bundle) -> str:
    c = bundle.config
    return f"{label} ({c.num_parameters / 1e6:.2f}M, d {c.hidden_size}, {c.n_layers} layers)"


def ours(bundle, prompt, sp: SamplingParams):
    """A run of our batch with one request: () -> generated ids (the batch is built once, as the
    server builds its batch once)."""
    batch = make_batch(bundle.model, bundle.special, capacity_tokens=rows_needed(len(prompt), sp),
                       max_requests=1)

    def run():
        batch.add(0, prompt, sp)
        while True:
            for ev in batch.step():
                if ev.finished:
                    batch.remove(0)
                    return list(ev.gen_ids)
    return run


def rows_for(bundle, prompt, P, G, B, llada, fast):
    """[(name, source, run or None, counterpart name)]: run() -> generated ids."""
    mask = bundle.special.mask
    hf = HFAdapter(bundle.model)
    x = torch.tensor([prompt], dtype=torch.int64)
    sp = lambda **kw: SamplingParams(gen_length=G, block_length=B, **kw)
    if llada is not None:
        pub = ("public generate", "LLaDA generate.py",
               lambda: llada.generate(hf, x, steps=G, gen_length=G, block_length=B, mask_id=mask)[0, P:].tolist())
    else:
        pub = ("public generate", "sampler.reference (stand-in: no --llada-repo)",
               lambda: reference_generate(bundle.model, prompt, sp(), mask)[0])
    rows = [pub + (None,)]
    for thr in (None, 0.9):
        name = "Fast-dLLM dual cache" + (", threshold 0.9" if thr else "")
        run = None if fast is None else (
            lambda thr=thr: fast.generate_with_dual_cache(hf, x, steps=G, gen_length=G, block_length=B,
                                                          mask_id=mask, threshold=thr)[0][0, P:].tolist())
        rows.append((name, "Fast-dLLM llada/generate.py" if fast else "skipped: no --fast-dllm-repo", run, None))
    rows.append(("ours exact", "make_batch", ours(bundle, prompt, sp()), "public generate"))
    rows.append(("ours dual cache", "make_batch", ours(bundle, prompt, sp(cache="dual")), "Fast-dLLM dual cache"))
    rows.append(("ours dual cache, threshold 0.9", "make_batch", ours(bundle, prompt, sp(cache="dual", threshold=0.9)),
                 "Fast-dLLM dual cache, threshold 0.9"))
    return rows


def measure(rows, rounds: int) -> dict:
    """name -> (median seconds, ids); one warm-up run each, then `rounds` rounds, the row order
    rotated each round so no row always runs after the same one."""
    runnable = [r for r in rows if r[2] is not None]
    ids = {name: run() for name, _, run, _ in runnable}
    times = {name: [] for name, *_ in runnable}
    with torch.inference_mode():
        for r in range(rounds):
            k = r % len(runnable)
            for name, _, run, _ in runnable[k:] + runnable[:k]:
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(times[name]), ids[name]) for name in times}


COLUMNS = ["model", "threads", "row", "source", "tokens_per_s", "vs_public_generate", "vs_counterpart",
           "ids_identical"]


def table_rows(label, threads, rows, got, G) -> list[dict]:
    """The printed rows: tokens/s, ratio to the public generate (or its stand-in) and to the row's
    counterpart, and whether the ids equal the counterpart's."""
    out = []
    base = got["public generate"][0]
    for name, source, run, other in rows:
        row = dict(model=label, threads=threads, row=name, source=source, tokens_per_s="skipped",
                   vs_public_generate="-", vs_counterpart="-", ids_identical="-")
        if run is not None:
            secs, ids = got[name]
            row.update(tokens_per_s=round(G / secs, 1), vs_public_generate=round(base / secs, 2))
            if other is not None and other in got:
                row.update(vs_counterpart=round(got[other][0] / secs, 2),
                           ids_identical="yes" if ids == got[other][1] else "NO")
            elif other is not None:
                row.update(ids_identical=f"n/a (no {other})")
        out.append(row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llada-repo", default=None, help="a checkout of github.com/ML-GSAI/LLaDA")
    ap.add_argument("--fast-dllm-repo", default=None, help="a checkout of github.com/NVlabs/Fast-dLLM")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--threads", default="1,2", help="intra-op thread counts, comma-separated")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="the CI run: 0.13M shape, 1 thread, gen 16, 1 round")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.tiny:
        args.models, args.threads, args.prompt, args.gen, args.block, args.rounds = "tiny", "1", 8, 16, 8, 1
    llada, fast = load_public(args.llada_repo, "llada"), load_public(args.fast_dllm_repo, "fast_dllm")
    print(f"batch 1, one token per forward: prompt {args.prompt}, gen {args.gen}, block {args.block}, "
          f"greedy; median of {args.rounds} alternating rounds; float32, CPU", flush=True)
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS), flush=True)
    before, out = torch.get_num_threads(), []
    try:
        for name in args.models.split(","):
            label, bundle = build_model(name.strip())
            label = model_label(label, bundle)
            prompt = random_prompt(bundle, args.prompt)
            rows = rows_for(bundle, prompt, args.prompt, args.gen, args.block, llada, fast)
            for threads in (int(t) for t in args.threads.split(",")):
                torch.set_num_threads(threads)
                for row in table_rows(label, threads, rows, measure(rows, args.rounds), args.gen):
                    out.append(row)
                    print("| " + " | ".join(str(row[c]) for c in COLUMNS) + " |", flush=True)
    finally:
        torch.set_num_threads(before)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), rows=out), indent=2))
    return 1 if any(r["ids_identical"] == "NO" for r in out) else 0


if __name__ == "__main__":
    sys.exit(main())
