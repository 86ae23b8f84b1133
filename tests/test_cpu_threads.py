"""The CPU thread policy (weights.checkpoint.pick_cpu_threads): an explicit count wins, and the
measured choice is one of the two counts timed, logged with its timings."""

import logging

import pytest
import torch

from weights.checkpoint import SMALL_MODEL_PARAMS, load_checkpoint, measure_cpu_threads, pick_cpu_threads


@pytest.fixture()
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bundle(golden_dir):
    return load_checkpoint(str(golden_dir), device="cpu", dtype="float32")


def test_override_wins_over_the_environment(bundle, monkeypatch, restore_threads):
    monkeypatch.setenv("LLADA_CPU_THREADS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert pick_cpu_threads(bundle.config, bundle.device, model=bundle.model, override=2) == 2
    assert torch.get_num_threads() == 2
    monkeypatch.setenv("LLADA_CPU_THREADS", "3")
    assert pick_cpu_threads(bundle.config, bundle.device, model=bundle.model) == 3
    assert torch.get_num_threads() == 3


def test_omp_num_threads_keeps_torchs_count(bundle, monkeypatch, restore_threads):
    monkeypatch.delenv("LLADA_CPU_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    assert pick_cpu_threads(bundle.config, bundle.device, model=bundle.model) == 2


def test_measured_choice_is_a_candidate(bundle, monkeypatch, caplog, restore_threads):
    monkeypatch.delenv("LLADA_CPU_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("weights.checkpoint.available_cores", lambda: 2)
    assert bundle.config.num_parameters < SMALL_MODEL_PARAMS
    with caplog.at_level(logging.INFO, logger="llada.weights"):
        n = pick_cpu_threads(bundle.config, bundle.device, model=bundle.model)
    assert n in (1, 2) and torch.get_num_threads() == n
    line = [r.getMessage() for r in caplog.records if "CPU threads" in r.getMessage()]
    assert len(line) == 1 and f"using {n}" in line[0] and "1 thread" in line[0]


def test_measure_prefers_one_thread_unless_more_win_clearly(bundle, monkeypatch, restore_threads):
    """A model whose forward is as fast on either count stays on one thread (the 10% margin)."""
    import weights.checkpoint as ck

    ticks = iter(range(100))
    monkeypatch.setattr("time.perf_counter", lambda: next(ticks))  # every forward "takes" one tick
    assert ck.measure_cpu_threads(bundle.model, 4, rounds=2) == 1


def test_without_a_model_small_models_get_one_thread(bundle, monkeypatch, restore_threads):
    monkeypatch.delenv("LLADA_CPU_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    assert pick_cpu_threads(bundle.config, bundle.device) == 1 and torch.get_num_threads() == 1



def _fake_times(monkeypatch, table):
    """`_time_forwards` answering from `table`: (count, canvases) -> seconds, one sample each."""
    def fake(model, shapes, counts, rounds, budget_s):
        return {(n, s): [table[(n, s[0])]] for n in counts for s in shapes}
    monkeypatch.setattr("weights.checkpoint._time_forwards", fake)


@pytest.mark.parametrize("single, batched, want", [
    (1.00, 0.60, 2),   # the batched forward 40% faster, the single canvas as fast: both cores
    (1.04, 0.60, 2),   # the single canvas 4% slower is within the 5% allowed
    (1.20, 0.60, 1),   # the single canvas 20% slower: a request alone would lose
    (0.80, 0.95, 1),   # the batched forward only 5% faster: not worth the collapse risk
])
def test_measure_decides_on_the_single_and_the_batched_forward(bundle, monkeypatch, caplog, single,
                                                               batched, want):
    _fake_times(monkeypatch, {(1, 1): 1.0, (2, 1): single, (1, 8): 1.0, (2, 8): batched})
    with caplog.at_level(logging.INFO, logger="llada.weights"):
        assert measure_cpu_threads(bundle.model, 2, batch=32) == want
    line = [r.getMessage() for r in caplog.records if "CPU threads" in r.getMessage()][-1]
    assert "8 such canvases in one forward" in line and f"using {want}" in line


def test_measure_at_batch_one_times_the_single_canvas_only(bundle, monkeypatch):
    seen = []

    def fake(model, shapes, counts, rounds, budget_s):
        seen.append(list(shapes))
        return {(n, s): [0.5 if n == 2 else 1.0] for n in counts for s in shapes}
    monkeypatch.setattr("weights.checkpoint._time_forwards", fake)
    assert measure_cpu_threads(bundle.model, 2, batch=1) == 2
    assert seen == [[(1, 64)]]


def test_real_timing_runs_both_shapes_within_its_rounds(bundle):
    import weights.checkpoint as ck

    times = ck._time_forwards(bundle.model, [(1, 16), (4, 16)], (1, 2), rounds=2, budget_s=60.0)
    assert set(times) == {(n, s) for n in (1, 2) for s in [(1, 16), (4, 16)]}
    assert all(len(v) == 2 and min(v) > 0 for v in times.values())


def test_server_measures_at_its_batch(bundle, monkeypatch, restore_threads):
    """`llada-serve` times the batch its engine runs: min(--max-batch-size, --max-batch-tokens / 64)."""
    from server import cli

    got = {}

    def fake_pick(config, device, model=None, override=None, batch=1):
        got.update(batch=batch, model=model, override=override)
        return 1
    monkeypatch.setattr("weights.checkpoint.pick_cpu_threads", fake_pick)
    args = cli.build_parser().parse_args(["--device", "cpu", "--dtype", "float32", "--max-batch-size", "16",
                                          "--max-batch-tokens", "512", "--cpu-threads", "0"])
    cli._load(args, str(bundle.path))
    assert got["batch"] == 8 and got["model"] is not None and got["override"] is None
    args = cli.build_parser().parse_args(["--device", "cpu", "--max-batch-size", "4", "--cpu-threads", "2"])
    cli._load(args, str(bundle.path))
    assert got["batch"] == 4 and got["override"] == 2
