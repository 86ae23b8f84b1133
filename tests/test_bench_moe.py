"""The MoE kernel benchmark keeps running (CPU: the per-expert loop and the floor only)."""

from bench import bench_moe


def test_moe_benchmark_smoke(capsys):
    assert bench_moe.main(["--device", "cpu", "--quick"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| tiny")]
    assert len(lines) == 3
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[3]) > 0 and float(cells[6]) > 0 and cells[4] == "None"


def test_engine_benchmark_moe_shapes(tmp_path):
    """bench_engine's MoE shapes keep running: block diffusion's table on a LLaDA2 shape, the LLaDA
    table on a LLaDA-MoE shape; the roofline counts the active parameters."""
    import json

    from bench import bench_engine

    out = tmp_path / "l2.json"
    assert bench_engine.main(["--device", "cpu", "--shape", "llada2-tiny", "--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["config"].startswith("baseline: reference_llada2")
    assert [r["config"].split(".")[0] for r in rows[1:]] == ["1", "2", "3", "4", "5", "6", "7"]
    assert rows[1]["forwards_per_token"] == 1.0 and rows[2]["forwards_per_token"] < 0.5
    # Drafting rows (depth 4): draft rows forwarded, never more forwards than the same row without.
    assert all(r["draft_rows_per_forward"] == 0 for r in rows[:5])
    assert rows[5]["draft_rows_per_forward"] > 0 and rows[5]["forwards_per_token"] <= rows[1]["forwards_per_token"]
    assert rows[6]["draft_rows_per_forward"] > 0 and rows[6]["forwards_per_token"] <= rows[3]["forwards_per_token"]
    assert rows[7]["forwards_per_token"] <= rows[2]["forwards_per_token"]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["vs_roofline"] > 0
    out = tmp_path / "moe.json"
    assert bench_engine.main(["--device", "cpu", "--shape", "llada-moe-tiny", "--quick", "--json", str(out)]) == 0
    moe_rows = json.loads(out.read_text())["rows"]
    assert len(moe_rows) == 12  # the LLaDA table, its five drafting rows included
    # its drafting rows run the server's batch: on a CPU the gate starts plain (rows 7 to 9), and
    # rows 10 and 11 (16 requests through one gate) meet its drafting probes
    assert moe_rows[7]["draft_rows_per_forward"] == 0 and moe_rows[7]["forwards_per_token"] <= 1.0
    assert moe_rows[10]["draft_rows_per_forward"] > 0 and moe_rows[10]["forwards_per_token"] <= 1.0
