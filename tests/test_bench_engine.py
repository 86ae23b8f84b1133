"""The engine benchmark keeps running (CPU, tiny shape): its table has every configuration."""

import json

from bench import bench_engine


def test_engine_benchmark_smoke(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bench_engine.main(["--device", "cpu", "--shape", "tiny", "--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    names = [r["config"] for r in rows]
    assert names[0].startswith("baseline")
    assert [n.split(".")[0] for n in names[1:]] == ["1", "2", "3", "4", "5", "6", "7", "8", "9"]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["ms_per_forward"] > 0 and r["vs_roofline"] > 0
    # One token per forward for a single request on the s/t schedule; batching shares forwards.
    assert rows[1]["forwards_per_token"] == 1.0
    assert rows[3]["forwards_per_token"] < 0.5
    # Drafting rows: draft rows forwarded, never more forwards than without drafting.
    assert rows[7]["draft_rows_per_forward"] > 0 and rows[7]["forwards_per_token"] <= 1.0
    assert rows[8]["draft_rows_per_forward"] > 0 and rows[8]["forwards_per_token"] <= rows[2]["forwards_per_token"]
    assert all(r["draft_rows_per_forward"] == 0 for r in rows[:7])
    assert "| config" in capsys.readouterr().out
