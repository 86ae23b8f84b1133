"""Bounded load against a running llada-serve on this machine.

    python bench/load.py --url http://127.0.0.1:8000 --clients 16 --requests 200 --time-limit 60 \
        --prompt-ids 1,2,3,4 --max-tokens 32

N concurrent clients send at most M requests in all, and stop at the time limit (requests still in
flight then are cancelled and counted as such). Only loopback URLs are accepted. Prints throughput
(requests/s, generated tokens/s), latency percentiles (and time to first chunk with --stream) and
errors by status; --json prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
from urllib.parse import urlparse

import httpx

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def percentile(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def build_body(args, i: int) -> tuple[str, dict]:
    body = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.model:
        body["model"] = args.model
    if args.seed is not None:
        body["seed"] = args.seed + i
    body.update(json.loads(args.extra) if args.extra else {})
    if args.prompt_ids:
        body["prompt"] = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        return "/v1/completions", body
    if args.chat:
        body["messages"] = [{"role": "user", "content": args.prompt}]
        return "/v1/chat/completions", body
    body["prompt"] = args.prompt
    return "/v1/completions", body


async def one(client: httpx.AsyncClient, args, i: int, stats) -> None:
    path, body = build_body(args, i)
    t0 = time.perf_counter()
    try:
        if args.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
            first = None
            tokens = 0
            async with client.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    stats["errors"][str(r.status_code)] += 1
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    obj = json.loads(line[6:])
                    if "error" in obj:
                        stats["errors"][f"stream:{obj['error'].get('code')}"] += 1
                        return
                    if first is None and obj.get("choices"):
                        first = time.perf_counter() - t0
                    if obj.get("usage"):
                        tokens = obj["usage"]["completion_tokens"]
            stats["first_chunk"].append(first if first is not None else time.perf_counter() - t0)
        else:
            r = await client.post(path, json=body)
            if r.status_code != 200:
                stats["errors"][str(r.status_code)] += 1
                return
            tokens = r.json()["usage"]["completion_tokens"]
        stats["latency"].append(time.perf_counter() - t0)
        stats["tokens"] += tokens
        stats["ok"] += 1
    except httpx.HTTPError as e:
        stats["errors"][type(e).__name__] += 1


async def run(args) -> dict:
    stats = {"ok": 0, "tokens": 0, "latency": [], "first_chunk": [], "errors": collections.Counter(),
             "cancelled": 0}
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    counter = iter(range(args.requests))
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(args.time_limit + 5)) as client:
        async def worker():
            for i in counter:
                await one(client, args, i, stats)

        t0 = time.perf_counter()
        tasks = [asyncio.create_task(worker()) for _ in range(args.clients)]
        done, pending = await asyncio.wait(tasks, timeout=args.time_limit)
        for t in pending:
            t.cancel()
        stats["cancelled"] = len(pending)
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - t0
    lat = stats["latency"]
    out = {
        "url": args.url, "clients": args.clients, "requests_limit": args.requests, "wall_s": round(wall, 3),
        "ok": stats["ok"], "errors": dict(stats["errors"]), "cancelled_at_time_limit": stats["cancelled"],
        "requests_per_s": round(stats["ok"] / wall, 3) if wall else None,
        "generated_tokens": stats["tokens"],
        "generated_tokens_per_s": round(stats["tokens"] / wall, 2) if wall else None,
        "latency_s": {f"p{int(q * 100)}": (round(percentile(lat, q), 4) if lat else None)
                      for q in (0.5, 0.9, 0.99)} | {"max": round(max(lat), 4) if lat else None},
    }
    if args.stream:
        fc = stats["first_chunk"]
        out["first_chunk_s"] = {f"p{int(q * 100)}": (round(percentile(fc, q), 4) if fc else None)
                                for q in (0.5, 0.9, 0.99)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (1..256)")
    p.add_argument("--requests", type=int, default=64, help="requests in all (1..100000)")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds (at most 3600)")
    p.add_argument("--model", default=None)
    p.add_argument("--prompt", default="Write one sentence about the sea.")
    p.add_argument("--prompt-ids", default=None, help="comma-separated ids (tokenizer-less checkpoints)")
    p.add_argument("--chat", action="store_true")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="request i gets seed + i")
    p.add_argument("--extra", default=None, help='extra body fields as JSON, e.g. \'{"threshold": 0.9}\'')
    p.add_argument("--stream", action="store_true", help="stream and measure time to first chunk")
    p.add_argument("--api-key", default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    host = urlparse(args.url).hostname or ""
    if host not in LOOPBACK and f"[{host}]" not in LOOPBACK:
        p.error(f"only loopback servers may be loaded (got host {host!r})")
    if not 1 <= args.clients <= 256 or not 1 <= args.requests <= 100_000 or not 0 < args.time_limit <= 3600:
        p.error("--clients 1..256, --requests 1..100000, --time-limit (0, 3600]")
    out = asyncio.run(run(args))
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{out['ok']} ok, errors {out['errors'] or 'none'}, {out['cancelled_at_time_limit']} clients cut "
              f"at the time limit, in {out['wall_s']} s with {args.clients} clients")
        print(f"throughput: {out['requests_per_s']} requests/s, {out['generated_tokens_per_s']} generated tokens/s")
        print("latency (s): " + ", ".join(f"{k} {v}" for k, v in out["latency_s"].items()))
        if args.stream:
            print("first chunk (s): " + ", ".join(f"{k} {v}" for k, v in out["first_chunk_s"].items()))
    return 0 if not out["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
