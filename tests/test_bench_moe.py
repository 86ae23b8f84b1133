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
