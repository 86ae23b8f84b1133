"""Helpers shared by the server tests (SSE parsing, metric reading); this module holds no tests."""

from __future__ import annotations

import json

import httpx
from prometheus_client.parser import text_string_to_metric_families


def sse_events(url: str, body: dict, headers: dict | None = None, timeout: float = 60.0) -> list:
    """POST a streaming request; the parsed `data:` payloads ('[DONE]' kept as the string)."""
    out = []
    with httpx.stream("POST", url, json=body, headers=headers, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                assert line == "" or line.startswith(":"), line
                continue
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def metrics(base: str) -> dict:
    """{(sample name, frozenset(labels)): value} from GET /metrics. The `model_name` label every
    llada_ series carries (one value per server) is left out of the keys."""
    text = httpx.get(base + "/metrics", timeout=10).text
    values = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            values[(s.name, frozenset((k, v) for k, v in s.labels.items() if k != "model_name"))] = s.value
    return values


def metric(values: dict, name: str, **labels) -> float:
    return values.get((name, frozenset((k, str(v)) for k, v in labels.items())), 0.0)


def post(base: str, path: str, body, headers=None, timeout=60.0) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return httpx.post(base + path, content=body, headers={"Content-Type": "application/json",
                                                              **(headers or {})}, timeout=timeout)
    return httpx.post(base + path, json=body, headers=headers, timeout=timeout)
