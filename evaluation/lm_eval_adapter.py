"""lm-evaluation-harness against a running llada-serve: the model class and a command line.

    pip install 'llada-serve[eval]'            # lm-eval is an optional extra
    python -m evaluation.lm_eval_adapter --base-url http://127.0.0.1:8000 --tasks arc_easy,hellaswag

`LLaDAServerLM` (registered in lm-eval's model registry as `llada-serve` when this module is imported;
the `lm_eval` command does not import it) answers

- `loglikelihood` requests through `POST /v1/loglikelihood` (the Monte Carlo estimate of
  log p(continuation | context) and `is_greedy`), many pairs per HTTP request;
- `loglikelihood_rolling` the same way, with an empty context (the whole text is the
  continuation: a Monte Carlo estimate, not a left-to-right chain-rule sum);
- `generate_until` through `POST /v1/completions` (stop strings = the task's `until`).

HTTP requests run `concurrency` at a time, so the server's engine batches them together. Nothing
here imports the server: it is a plain HTTP client (httpx).
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # the adapter's class needs lm-eval; the error is raised where it is used
    LM = object

    def register_model(*names):
        return lambda cls: cls

    HAVE_LM_EVAL = False
else:
    HAVE_LM_EVAL = True

INSTALL_HINT = "lm-eval is not installed: pip install 'llada-serve[eval]' (or pip install lm-eval)"


class ServerError(RuntimeError):
    """The server answered with an error body (its message is kept)."""


@register_model("llada-serve")
class LLaDAServerLM(LM):
    """An lm-eval model backed by a llada-serve endpoint.

    Model arguments (`--model_args` in lm-eval's own CLI): base_url, api_key, mc_samples,
    cfg_scale, seed, batch_pairs (pairs per scoring request), concurrency (HTTP requests in
    flight), max_gen_toks (default answer length), block_length, steps, threshold, cache,
    timeout (seconds per HTTP request)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 mc_samples: int = 32, cfg_scale: float = 0.0, seed: int = 0, batch_pairs: int = 32,
                 concurrency: int = 8, max_gen_toks: int = 128, block_length: int | None = None,
                 steps: int | None = None, threshold: float | None = None, cache: str | None = None,
                 timeout: float = 600.0, **_ignored):
        if not HAVE_LM_EVAL:
            raise RuntimeError(INSTALL_HINT)
        super().__init__()
        self.base_url = str(base_url).rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=float(timeout))
        self.mc_samples, self.cfg_scale, self.seed = int(mc_samples), float(cfg_scale), int(seed)
        self.batch_pairs, self.concurrency = max(1, int(batch_pairs)), max(1, int(concurrency))
        self.max_gen_toks = int(max_gen_toks)
        self.diffusion = {k: v for k, v in (("block_length", block_length), ("steps", steps),
                                            ("threshold", threshold), ("cache", cache)) if v is not None}
        for k in ("block_length", "steps"):
            if k in self.diffusion:
                self.diffusion[k] = int(self.diffusion[k])
        if "threshold" in self.diffusion:
            self.diffusion["threshold"] = float(self.diffusion["threshold"])

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        args.update({k: v for k, v in (additional_config or {}).items() if v is not None})
        return cls(**args)

    # ------------------------------------------------------------------ HTTP
    def _post(self, path: str, body: dict) -> dict:
        r = self.client.post(path, json=body)
        try:
            data = r.json()
        except ValueError:
            data = None
        if r.status_code != 200:
            msg = (data or {}).get("error", {}).get("message") if isinstance(data, dict) else None
            raise ServerError(f"{path} answered {r.status_code}: {msg or r.text[:200]}")
        return data

    def _map(self, fn, items):
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(fn, items))

    # ------------------------------------------------------------------ lm-eval API
    def _score(self, pairs: list[tuple[str, str]]) -> list[dict]:
        chunks = [pairs[i:i + self.batch_pairs] for i in range(0, len(pairs), self.batch_pairs)]

        def one(chunk):
            body = {"pairs": [{"context": c, "continuation": y} for c, y in chunk],
                    "mc_samples": self.mc_samples, "seed": self.seed}
            if self.cfg_scale:
                body["cfg_scale"] = self.cfg_scale
            return self._post("/v1/loglikelihood", body)["data"]

        return [d for rows in self._map(one, chunks) for d in rows]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(req.args) for req in requests]
        out = [(d["logprob"], bool(d["is_greedy"])) for d in self._score(pairs)]
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = [d["logprob"] for d in self._score([("", req.args[0]) for req in requests])]
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, res)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        def one(req):
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.get("until") or []
            if isinstance(until, str):
                until = [until]
            body = {"prompt": context, "max_tokens": int(kw.get("max_gen_toks", self.max_gen_toks)),
                    "temperature": float(kw.get("temperature", 0.0)) if kw.get("do_sample", True) else 0.0,
                    "seed": self.seed, **self.diffusion}
            if until:
                body["stop"] = list(until)[:16]
            text = self._post("/v1/completions", body)["choices"][0]["text"]
            for s in until:  # the server cuts at stop strings; a task's own cut never hurts
                if s and s in text:
                    text = text[:text.index(s)]
            return text

        out = self._map(one, list(requests))
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("generate_until", req.args, res)
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evaluation.lm_eval_adapter",
                                 description="run lm-evaluation-harness tasks against a llada-serve server")
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    ap.add_argument("--include-path", default=None, help="a folder of extra task definitions (YAML)")
    ap.add_argument("--num-fewshot", type=int, default=None)
    ap.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    ap.add_argument("--mc-samples", type=int, default=32, help="Monte Carlo samples per likelihood")
    ap.add_argument("--cfg-scale", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-pairs", type=int, default=32, help="pairs per /v1/loglikelihood request")
    ap.add_argument("--concurrency", type=int, default=8, help="HTTP requests in flight")
    ap.add_argument("--max-gen-toks", type=int, default=128)
    ap.add_argument("--block-length", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threshold", type=float, default=None)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if not HAVE_LM_EVAL:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    try:
        httpx.get(args.base_url.rstrip("/") + "/health", timeout=10).raise_for_status()
    except httpx.HTTPError as e:
        print(f"no llada-serve server answers at {args.base_url}: {e}", file=sys.stderr)
        return 2
    lm = LLaDAServerLM(base_url=args.base_url, api_key=args.api_key, mc_samples=args.mc_samples,
                       cfg_scale=args.cfg_scale, seed=args.seed, batch_pairs=args.batch_pairs,
                       concurrency=args.concurrency, max_gen_toks=args.max_gen_toks,
                       block_length=args.block_length, steps=args.steps, threshold=args.threshold,
                       timeout=args.timeout)
    tasks = [t for t in args.tasks.split(",") if t]
    tm = None
    if args.include_path:  # indexing lm-eval's thousands of built-in tasks takes a while: skip it
        own = TaskManager(include_path=args.include_path, include_defaults=False)  # when not needed
        if all(t in own.all_tasks for t in tasks):
            tm = own
    tm = tm or TaskManager(include_path=args.include_path)
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot,
                                          limit=args.limit, task_manager=tm, log_samples=False,
                                          random_seed=args.seed)
    except ServerError as e:
        print(f"the server refused a request: {e}", file=sys.stderr)
        return 1
    print(make_table(results))
    if args.output is not None:
        args.output.write_text(json.dumps({"results": results["results"], "config": {
            "base_url": args.base_url, "mc_samples": args.mc_samples, "seed": args.seed,
            "tasks": tasks, "limit": args.limit}}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
