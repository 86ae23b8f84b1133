"""The shape of the code base, enforced: imports go one way (no circle among the project's modules),
no production module imports a test oracle (sampler/reference*.py), and no function in the core
packages is over 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("server", "sampler", "weights", "kernels")
MAX_FUNCTION_LINES = 80


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, ast.Module]:
    return {_module(p): ast.parse(p.read_text(), str(p))
            for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """Project modules `name` imports anywhere in its body (lazy imports inside functions included)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{name}: relative import"  # the project imports absolutely
            targets = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    trees = _sources()
    known = set(trees)
    return {name: _imports(name, tree, known) for name, tree in trees.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the list of modules around it, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_in_the_project():
    graph = _graph()
    assert len(graph) > 40 and graph["server.routes"]  # the walk sees the modules and their imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_no_production_module_imports_an_oracle():
    graph = _graph()
    oracles = {m for m in graph if m.startswith("sampler.reference")}
    assert oracles == {"sampler.reference", "sampler.reference_llada2"}
    # conformance compares the engine against the oracles: it is a test tool shipped with the sampler
    tools = {"sampler.conformance"} | oracles
    offenders = {m: sorted(graph[m] & oracles) for m in graph if m not in tools and graph[m] & oracles}
    assert not offenders, offenders


def test_no_function_over_80_lines():
    long = []
    for pkg in ("server", "sampler", "weights", "kernels"):
        for p in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        long.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


# The refusal each request rule answers with, written once: in server/checks.py.
RULE_TEXTS = ("does not exist; this server serves", "seed must be an integer", "is outside the vocabulary",
              "is the mask id", "holds the mask token", "n must be between", "prompt(s) x n=",
              "exceeds the model's context", "tokens; the model's context is", "needs a tokenizer",
              "characters per token", "pairs per request", "stop strings, got")


@pytest.mark.parametrize("text", RULE_TEXTS)
def test_each_request_rule_is_written_once_in_checks(text):
    where = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "server").rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if text in line]
    assert len(where) == 1 and where[0].startswith("server/checks.py"), where
