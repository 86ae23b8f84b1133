"""Does one large request stall the server? /health latency while large requests are answered.

    python bench/stall.py                      # starts its own server (embedded model) on loopback
    python bench/stall.py --model tests/golden/tiny-llada

For each large request (sent alone, one after the other) a prober GETs /health every 10 ms; the
table gives the request's status and time, the slowest /health answer while it was in flight, and the
server's RSS before and after. Baseline row: /health alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.soak import percentile, rss_mib, start_server  # noqa: E402


def cases(ctx: int, limit: int) -> list[tuple[str, str, bytes]]:
    text = "hello world, " * (limit // 16)
    return [
        ("/health alone", "", b""),
        (f"{limit // 1024} KiB body of 1-id prompts", "/v1/completions",
         json.dumps({"prompt": [[1]] * ((limit - 64) // 6)}).encode()),
        (f"text prompt just under {limit // 1024} KiB", "/v1/completions",
         json.dumps({"prompt": text, "max_tokens": 4}).encode()),
        (f"chat of {ctx} messages", "/v1/chat/completions",
         json.dumps({"messages": [{"role": "user", "content": "hi " * 20}] * ctx, "max_tokens": 4}).encode()),
        ("10 MB text prompt (over the body limit; headers only)", "/v1/completions",
         json.dumps({"prompt": "x" * 10_000_000}).encode()),
    ]


async def announce(url: str, path: str, length: int):
    """Send only the headers of an oversized body (as a client sending 'Expect: 100-continue' does):
    the status line that comes back."""
    u = httpx.URL(url)
    reader, writer = await asyncio.open_connection(u.host, u.port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {u.host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {length}\r\n\r\n".encode())
    await writer.drain()
    line = await reader.readline()
    writer.close()
    return int(line.split()[1])


async def measure(url: str, path: str, body: bytes, limit: int) -> tuple:
    lat, stop = [], asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        async def probe():
            while not stop.is_set():
                t0 = time.perf_counter()
                await c.get("/health")
                lat.append(time.perf_counter() - t0)
                await asyncio.sleep(0.01)
        task = asyncio.create_task(probe())
        await asyncio.sleep(0.2)
        t0 = time.perf_counter()
        if path and len(body) > limit:
            status = await announce(url, path, len(body))
        elif path:
            try:
                r = await c.post(path, content=body, headers={"Content-Type": "application/json"})
                status = r.status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
        else:
            await asyncio.sleep(1.0)
            status = "-"
        took = time.perf_counter() - t0
        await asyncio.sleep(0.1)
        stop.set()
        await task
    return status, took, max(lat), percentile(lat, 0.5)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    args = p.parse_args(argv)
    log = Path(tempfile.mkdtemp(prefix="llada-stall-")) / "server.log"
    proc, url = start_server(args, log)
    try:
        card = httpx.get(url + "/v1/models").json()["data"][0]
        from server.guards import default_max_body_bytes

        ctx = card["max_model_len"]
        limit = default_max_body_bytes(ctx)
        print(f"server on {url}: context {ctx} tokens, body limit {limit} bytes\n")
        print("| request | status | its time | slowest /health meanwhile | median /health | RSS before -> after |")
        print("|---|---|---:|---:|---:|---|")
        for name, path, body in cases(ctx, limit):
            before = rss_mib(proc.pid)
            status, took, worst, med = asyncio.run(measure(url, path, body, limit))
            time.sleep(0.5)
            after = rss_mib(proc.pid)
            print(f"| {name} | {status} | {took:.2f} s | {worst * 1000:.0f} ms | {med * 1000:.0f} ms | "
                  f"{before:.0f} -> {after:.0f} MiB |", flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
