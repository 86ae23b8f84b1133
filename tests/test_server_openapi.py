"""The published API: /openapi.json is a valid OpenAPI 3 document describing every route, field and
error body, /docs serves it, and a bounded schemathesis run finds no 5xx and no response off the schema."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from server.schemas import ChatCompletionRequest, CompletionRequest


@pytest.fixture(scope="module")
def server(bundle, serve):
    return serve(bundle, max_batch_tokens=4096)


@pytest.fixture(scope="module")
def spec(server):
    r = httpx.get(server.url + "/openapi.json", timeout=10)
    assert r.status_code == 200
    return r.json()


def test_openapi_document_is_valid_and_complete(spec):
    from openapi_spec_validator import validate

    validate(spec)
    assert spec["openapi"].startswith("3.")
    paths = spec["paths"]
    for path, method in [("/v1/completions", "post"), ("/v1/chat/completions", "post"), ("/v1/models", "get"),
                         ("/health", "get"), ("/ready", "get"), ("/metrics", "get")]:
        assert method in paths[path], path
    schemas = spec["components"]["schemas"]
    for model in (CompletionRequest, ChatCompletionRequest):
        documented = set(schemas[model.__name__]["properties"])
        assert set(model.model_fields) <= documented, set(model.model_fields) - documented
    post = paths["/v1/completions"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/CompletionRequest")
    for status in ("400", "401", "404", "429", "503"):
        ref = post["responses"][status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorResponse")
    assert not any("422" in op["responses"] for p in paths.values() for op in p.values()), \
        "validation errors are answered as 400, so no route may document a 422"
    assert set(schemas["ErrorDetail"]["properties"]) == {"message", "type", "param", "code"}
    # strict types: integers and booleans are declared as such (a string "8" is not a max_tokens)
    props = schemas["CompletionRequest"]["properties"]
    assert {"type": "integer"} in props["max_tokens"]["anyOf"]
    assert {"type": "boolean"} in props["stream"]["anyOf"]
    scheme_types = {s["type"] for s in spec["components"]["securitySchemes"].values()}
    assert scheme_types == {"http", "apiKey"}


def test_docs_page_serves_the_document(server):
    r = httpx.get(server.url + "/docs", timeout=10)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "/openapi.json" in r.text


def test_wrong_types_are_400_naming_the_field(server):
    for field, value in [("max_tokens", "8"), ("n", True), ("stream", "no"), ("seed", 1.5), ("max_tokens", 8.0)]:
        r = httpx.post(server.url + "/v1/completions", json={"prompt": [1, 2], field: value}, timeout=30)
        assert r.status_code == 400, (field, value, r.text)
        assert r.json()["error"]["param"] == field, r.text


def test_schemathesis_finds_no_server_error_and_no_schema_violation(server, tmp_path):
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json",
           "--max-examples", "15", "--seed", "7", "--workers", "1", "--phases", "coverage,fuzzing",
           "--checks", "not_a_server_error,response_schema_conformance,status_code_conformance,"
           "content_type_conformance", "--request-timeout", "30"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "passed" in r.stdout
