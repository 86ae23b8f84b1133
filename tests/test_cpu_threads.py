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

