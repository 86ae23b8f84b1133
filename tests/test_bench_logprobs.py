"""The logprobs/filters step-cost benchmark keeps running (CPU, small), and its read-back check holds:
a step without logprobs requests reads back no more than it did before logprobs existed."""

from bench import bench_logprobs


def test_logprobs_benchmark_smoke(capsys):
    assert bench_logprobs.main(["--quick", "--rounds", "1", "--requests", "4"]) == 0
    out = capsys.readouterr().out
    for row in ("baseline", "neutral fields spelled out", "asks for logprobs", "samples with filters"):
        assert row in out
