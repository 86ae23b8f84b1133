"""Bounded soak: mixed load, disconnects and bad input against one llada-serve on this machine.

    python bench/soak.py --minutes 10                      # starts its own server (embedded model)
    python bench/soak.py --minutes 2 --model tests/golden/tiny-llada --clients 8
    python bench/soak.py --url http://127.0.0.1:8000 --pid 1234 --minutes 5   # a running server

For N minutes (at most 60), C clients (at most 64) each pick a request kind at random (seeded): good
completions and chats, OpenAI streams, per-step streams, n=4, clients that hang up mid-stream or
while waiting, clients that hang up during the upload, and about twenty kinds of bad input (broken or
deeply nested JSON, wrong types, lone surrogates, huge values, wrong Content-Type, an oversized body,
numbers the engine cannot hold, wrong methods). Only loopback servers are accepted, and the request
count is bounded too (--max-requests).

Prints the server's memory (RSS) and the request counts every --report seconds, then requests by kind,
responses by status, the 5xx count, latency percentiles of the good requests and RSS at the start of
the load, its peak and after the load. Exits non-zero on any 5xx, on a good request answered with
anything but 200 or 429, on a bad one answered with anything but a 4xx, on a traceback in the server's
log (when it started the server), or when RSS after the load exceeds RSS after warm-up by more than
--max-rss-growth-mib.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.load import LOOPBACK, percentile  # noqa: E402


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Soak:
    def __init__(self, args, url: str, pid: int | None, chat: bool):
        self.args, self.url, self.pid, self.chat = args, url, pid, chat
        self.rng = random.Random(args.seed)
        self.kinds = collections.Counter()
        self.statuses = collections.Counter()
        self.unexpected: list[str] = []
        self.latency: list[float] = []
        self.sent = 0
        self.rss: list[tuple[float, float]] = []
        host = urlparse(url)
        self.host, self.port = host.hostname, host.port or 80
        self.prompt_ids = [5, 17, 42, 7]
        self.bad = self.bad_inputs()

    # ------------------------------------------------------------------ request kinds
    def good_body(self, **extra) -> tuple[str, dict]:
        if self.chat and self.rng.random() < 0.5:
            body = {"messages": [{"role": "user", "content": f"Copy: {self.rng.randint(0, 999)}"}]}
            path = "/v1/chat/completions"
        else:
            body = {"prompt": self.prompt_ids if not self.chat else f"a {self.rng.randint(0, 99)} b"}
            path = "/v1/completions"
        body.update({"max_tokens": self.rng.choice([8, 16, 32]), "block_length": 8}, **extra)
        return path, body

    def bad_inputs(self):
        """(name, method, path, content, content-type), built once: each must get a 4xx."""
        j = "application/json"
        ok = {"prompt": self.prompt_ids, "max_tokens": 4}

        def body(**kw):
            return json.dumps(dict(ok, **kw)).encode()
        return [
            ("broken json", "POST", "/v1/completions", b'{"prompt": [1, 2', j),
            ("not an object", "POST", "/v1/completions", b"[1, 2, 3]", j),
            ("nested 5000", "POST", "/v1/completions", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", j),
            ("string max_tokens", "POST", "/v1/completions", body(max_tokens="8"), j),
            ("boolean n", "POST", "/v1/completions", body(n=True), j),
            ("string stream", "POST", "/v1/completions", body(stream="no"), j),
            ("boolean ids", "POST", "/v1/completions", body(prompt=[[True], [False]]), j),
            ("lone surrogate model", "POST", "/v1/completions", body(model="ab\ud800"), j),
            ("huge model name", "POST", "/v1/completions", body(model="m" * 200_000), j),
            ("refused logit_bias", "POST", "/v1/completions", body(logit_bias={"5": 10}), j),
            ("tiny threshold", "POST", "/v1/completions", body(threshold=7e-46), j),
            ("huge temperature", "POST", "/v1/completions", body(temperature=3.5e38), j),
            ("huge cfg_scale", "POST", "/v1/completions", body(cfg_scale=1e38), j),
            ("many prompts", "POST", "/v1/completions", json.dumps({"prompt": [[1]] * 50_000}).encode(), j),
            ("id out of vocab", "POST", "/v1/completions", body(prompt=[10 ** 9]), j),
            ("text/plain", "POST", "/v1/completions", body(), "text/plain"),
            ("no content type", "POST", "/v1/completions", body(), None),
            ("GET on POST route", "GET", "/v1/completions", b"", None),
            ("unknown path", "GET", "/v1/nothing", b"", None),
            ("n over the limit", "POST", "/v1/completions", body(n=1000), j),
            ("empty messages", "POST", "/v1/chat/completions", json.dumps({"messages": []}).encode(), j),
        ]

    async def record(self, kind: str, status, good: bool, t0: float | None = None):
        self.kinds[kind] += 1
        self.statuses[str(status)] += 1
        if isinstance(status, int) and status >= 500:
            self.unexpected.append(f"{kind}: {status}")
        elif good and status not in (200, 429):
            self.unexpected.append(f"{kind}: {status}")
        elif not good and not (isinstance(status, int) and 400 <= status < 500):
            self.unexpected.append(f"{kind}: {status}")
        if good and status == 200 and t0 is not None:
            self.latency.append(time.perf_counter() - t0)

    async def one(self, client: httpx.AsyncClient):
        r = self.rng.random()
        kind, good = "good", True
        try:
            await self._one(client, r)
        except httpx.HTTPError as e:
            if r >= 0.76:
                kind, good = "bad input", False
            await self.record(f"{kind} ({type(e).__name__})", f"transport: {type(e).__name__}", good)

    async def _one(self, client: httpx.AsyncClient, r: float):
        t0 = time.perf_counter()
        if r < 0.30:
            path, body = self.good_body()
            resp = await client.post(path, json=body)
            await self.record("good", resp.status_code, True, t0)
        elif r < 0.42:
            await self.stream("stream", {"stream": True}, t0)
        elif r < 0.50:
            await self.stream("stream_steps", {"stream_steps": True}, t0)
        elif r < 0.56:
            path, body = self.good_body(n=4)
            resp = await client.post(path, json=body)
            await self.record("n=4", resp.status_code, True, t0)
        elif r < 0.64:
            await self.stream("disconnect mid-stream", {"stream_steps": True}, t0, hang_up_after=2)
        elif r < 0.68:
            path, body = self.good_body(max_tokens=64)
            try:
                resp = await client.post(path, json=body, timeout=0.2)
                await self.record("disconnect while waiting", resp.status_code, True)
            except httpx.TimeoutException:
                self.hung_up("disconnect while waiting")
        elif r < 0.72:
            await self.upload_disconnect()
        elif r < 0.74:
            await self.oversized()
        elif r < 0.76:
            path = self.rng.choice(["/health", "/metrics", "/ready"])
            resp = await client.request(self.rng.choice(["GET", "HEAD"]), path)
            await self.record("operator", resp.status_code, True)
        else:
            name, method, path, content, ctype = self.rng.choice(self.bad)
            headers = {"Content-Type": ctype} if ctype else {}
            try:
                resp = await client.request(method, path, content=content, headers=headers)
            except httpx.HTTPError as e:
                return await self.record(f"bad: {name}", f"transport: {type(e).__name__}", False)
            await self.record(f"bad: {name}", resp.status_code, False)

    async def stream(self, kind: str, extra: dict, t0: float, hang_up_after: int | None = None):
        path, body = self.good_body(**extra)
        async with httpx.AsyncClient(base_url=self.url, timeout=120) as c:
            async with c.stream("POST", path, json=body) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    return await self.record(kind, resp.status_code, True)
                events = 0
                last = None
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        events += 1
                        last = line
                        if hang_up_after is not None and events >= hang_up_after:
                            break
        if hang_up_after is not None:
            return self.hung_up(kind)
        ok = last == "data: [DONE]"
        await self.record(kind, 200 if ok else "stream cut", True, t0)

    async def upload_disconnect(self):
        reader, writer = await asyncio.open_connection(self.host, self.port)
        writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                     "Content-Length: 5000\r\n\r\n{\"prompt\": [1, 2".encode())
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()
        self.hung_up("disconnect during upload")

    async def oversized(self):
        """Headers announcing a body over the limit; the 413 comes before any of it is sent (as a
        client sending 'Expect: 100-continue' sees it; one that sends the body regardless may find the
        connection closed instead, since the server does not read what it will not accept)."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {self.args.body_limit + 1}\r\n\r\n".encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 30)
        writer.close()
        parts = line.split()
        await self.record("bad: oversized body", int(parts[1]) if len(parts) > 1 else "no answer", False)

    def hung_up(self, kind: str) -> None:
        """The client left on purpose: there is no answer to check."""
        self.kinds[kind] += 1
        self.statuses["(client hung up)"] += 1

    # ------------------------------------------------------------------ the run
    async def run(self):
        a = self.args
        deadline = time.monotonic() + a.minutes * 60
        t_start = time.monotonic()
        limits = httpx.Limits(max_connections=a.clients * 2, max_keepalive_connections=a.clients)
        async with httpx.AsyncClient(base_url=self.url, limits=limits, timeout=120) as client:
            async def worker():
                while time.monotonic() < deadline and self.sent < a.max_requests:
                    self.sent += 1
                    await self.one(client)

            async def reporter():
                while time.monotonic() < deadline and self.sent < a.max_requests:
                    await asyncio.sleep(a.report)
                    rss = rss_mib(self.pid) if self.pid else None
                    t = time.monotonic() - t_start
                    if rss is not None:
                        self.rss.append((t, rss))
                    fivexx = sum(v for k, v in self.statuses.items() if k.isdigit() and int(k) >= 500)
                    print(f"t={t:6.0f}s  requests {self.sent:7d}  5xx {fivexx}  rss "
                          f"{'n/a' if rss is None else f'{rss:.0f} MiB'}", flush=True)

            rep = asyncio.create_task(reporter())
            await asyncio.gather(*(worker() for _ in range(a.clients)))
            rep.cancel()
        await asyncio.sleep(3)  # let the server settle: cancelled requests leave, buffers go
        self.rss_after = rss_mib(self.pid) if self.pid else None
        self.wall = time.monotonic() - t_start

    def report(self, log_text: str | None) -> int:
        a = self.args
        fivexx = sum(v for k, v in self.statuses.items() if k.isdigit() and int(k) >= 500)
        lat = self.latency
        print(f"\nsoak: {a.minutes:g} min, {a.clients} clients, {self.sent} requests in {self.wall:.0f} s "
              f"({self.sent / self.wall:.1f}/s)\n")
        print("| requests by kind | count |\n|---|---:|")
        for k, v in sorted(self.kinds.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"| {k} | {v} |")
        print("\n| responses by status | count |\n|---|---:|")
        for k, v in sorted(self.statuses.items()):
            if v:
                print(f"| {k} | {v} |")
        print(f"\n| measure | value |\n|---|---:|\n| 5xx responses | {fivexx} |")
        print(f"| unexpected answers | {len(self.unexpected)} |")
        for q in (0.5, 0.9, 0.99):
            v = percentile(lat, q)
            print(f"| good requests p{int(q * 100)} latency | {'n/a' if v is None else f'{v:.2f} s'} |")
        growth = None
        if self.rss:
            warm = self.rss[0][1]
            peak = max(r for _, r in self.rss)
            print(f"| RSS after warm-up (t={self.rss[0][0]:.0f}s) | {warm:.0f} MiB |")
            print(f"| RSS peak under load | {peak:.0f} MiB |")
            if self.rss_after is not None:
                growth = self.rss_after - warm
                print(f"| RSS after the load | {self.rss_after:.0f} MiB ({growth:+.0f} MiB) |")
        tracebacks = None
        if log_text is not None:
            tracebacks = log_text.count("Traceback")
            print(f"| tracebacks in the server log | {tracebacks} |")
        failed = []
        if fivexx:
            failed.append(f"{fivexx} 5xx responses")
        if self.unexpected:
            failed.append(f"unexpected answers: {collections.Counter(self.unexpected).most_common(5)}")
        if tracebacks:
            failed.append(f"{tracebacks} tracebacks in the server log")
        if growth is not None and growth > a.max_rss_growth_mib:
            failed.append(f"RSS grew {growth:.0f} MiB (bound {a.max_rss_growth_mib} MiB)")
        print("\nresult: " + ("FAILED: " + "; ".join(failed) if failed else "passed"))
        return 1 if failed else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, log_path: Path):
    port = _free_port()
    cmd = [sys.executable, "-m", "server.cli", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
           "--max-queue", "64", "--shutdown-grace", "2", "--log-level", "info"]
    if args.model:
        cmd += ["--model", args.model]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLADA_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not become ready within 120 s")
        time.sleep(0.2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running server (loopback only); default: start one")
    p.add_argument("--pid", type=int, default=None, help="the running server's pid (for RSS) with --url")
    p.add_argument("--model", default=None, help="checkpoint for the server it starts (default: embedded)")
    p.add_argument("--minutes", type=float, default=10.0, help="duration (at most 60)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (1..64)")
    p.add_argument("--max-requests", type=int, default=200_000, help="requests in all (at most 1,000,000)")
    p.add_argument("--report", type=float, default=30.0, help="seconds between progress lines")
    p.add_argument("--max-rss-growth-mib", type=float, default=128.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 0 < args.minutes <= 60 or not 1 <= args.clients <= 64 or not 1 <= args.max_requests <= 1_000_000:
        p.error("--minutes (0, 60], --clients 1..64, --max-requests 1..1000000")
    proc = None
    log_path = None
    if args.url:
        host = urlparse(args.url).hostname or ""
        if host not in LOOPBACK:
            p.error(f"only loopback servers may be soaked (got host {host!r})")
        url, pid = args.url.rstrip("/"), args.pid
    else:
        log_path = Path(tempfile.mkdtemp(prefix="llada-soak-")) / "server.log"
        proc, url = start_server(args, log_path)
        pid = proc.pid
        print(f"server pid {pid} on {url}, log {log_path}", flush=True)
    try:
        card = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]
        from server.guards import default_max_body_bytes

        args.body_limit = default_max_body_bytes(card["max_model_len"])
        soak = Soak(args, url, pid, chat=bool(card.get("llada", {}).get("chat_template")))
        asyncio.run(soak.run())
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    return soak.report(log_path.read_text() if log_path else None)


if __name__ == "__main__":
    sys.exit(main())
