"""The engine benchmark keeps running (CPU, tiny shape): its table has every configuration."""

import json

from bench import bench_engine


def test_engine_benchmark_smoke(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bench_engine.main(["--device", "cpu", "--shape", "tiny", "--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    names = [r["config"] for r in rows]
    assert names[0].startswith("baseline")
    assert [n.split(".")[0] for n in names[1:]] == ["1", "2", "3", "4", "5", "6"]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["ms_per_forward"] > 0 and r["vs_roofline"] > 0
    # One token per forward for a single request on the s/t schedule; batching shares forwards.
    assert rows[1]["forwards_per_token"] == 1.0
    assert rows[3]["forwards_per_token"] < 0.5
    assert "| config" in capsys.readouterr().out


def test_engine_benchmark_runs_on_two_ranks(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bench_engine.main(["--device", "cpu", "--shape", "tiny", "--quick", "--json", str(out),
                              "--tensor-parallel-size", "2"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [n["config"].split(".")[0] for n in rows[1:]] == ["1", "2", "3", "4", "5", "6"]
    assert rows[1]["forwards_per_token"] == 1.0 and all(r["tokens_per_s"] > 0 for r in rows)
    assert "tensor parallel 2" in capsys.readouterr().out
