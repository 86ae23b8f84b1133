"""The engine benchmark keeps running (CPU, tiny shape): its table has every configuration."""

import json

from bench import bench_engine


def test_engine_benchmark_smoke(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bench_engine.main(["--device", "cpu", "--shape", "tiny", "--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    names = [r["config"] for r in rows]
    assert names[0].startswith("baseline")
    assert [n.split(".")[0] for n in names[1:]] == ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11"]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["ms_per_forward"] > 0 and r["vs_roofline"] > 0
    # One token per forward for a single request on the s/t schedule; batching shares forwards.
    assert rows[1]["forwards_per_token"] == 1.0
    assert rows[3]["forwards_per_token"] < 0.5
    # Drafting rows run the server's batch: on a CPU its draft gate starts plain, so a fresh
    # 32-step request (rows 7 to 9) runs no draft rows; rows 10 and 11 run 16 requests one after
    # another through one gate, whose probes of drafting (after 32 plain steps, then spaced so a
    # losing probe costs little) forward draft rows. The gate column counts timed steps
    # drafting/plain, one per forward at batch 1.
    assert all(r["draft_rows_per_forward"] == 0 and r["gate"] == "off" for r in rows[:7])
    for r in rows[7:10]:
        assert r["draft_rows_per_forward"] == 0 and r["gate"].startswith("0/")
    for r in rows[10:12]:
        drafting, plain = map(int, r["gate"].split("/"))
        assert drafting >= 1 and r["draft_rows_per_forward"] > 0
        assert drafting + plain == round(r["forwards_per_token"] * 32 * 16)
        assert r["forwards_per_token"] <= 1.0
    assert "| config" in capsys.readouterr().out


def test_engine_benchmark_runs_on_two_ranks(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bench_engine.main(["--device", "cpu", "--shape", "tiny", "--quick", "--json", str(out),
                              "--tensor-parallel-size", "2"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [n["config"].split(".")[0] for n in rows[1:]] == ["1", "2", "3", "4", "5", "6"]
    assert rows[1]["forwards_per_token"] == 1.0 and all(r["tokens_per_s"] > 0 for r in rows)
    assert "tensor parallel 2" in capsys.readouterr().out


def test_rows_are_printed_and_saved_as_soon_as_measured(tmp_path, capsys, monkeypatch):
    """A run stopped part-way (a time limit) keeps every row it finished: each row is printed and
    the JSON rewritten when it is measured, marked incomplete until the end."""
    out = tmp_path / "rows.json"
    real = bench_engine.run_batch
    calls = []

    def stopping(*a, **kw):
        calls.append(1)
        if len(calls) == 4:  # warm-up, rows 1 and 2, then row 3 is "killed"
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(bench_engine, "run_batch", stopping)
    try:
        bench_engine.main(["--device", "cpu", "--shape", "tiny", "--quick", "--json", str(out)])
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the run should have been stopped")
    data = json.loads(out.read_text())
    assert data["complete"] is False
    assert [r["config"].split(".")[0] for r in data["rows"]] == ["baseline: reference, batch 1, exact", "1", "2"]
    printed = capsys.readouterr().out
    assert printed.index("copy bandwidth") < printed.index("| baseline")  # the machine first
    for r in data["rows"]:
        assert f"| {r['config']} |" in printed
    assert "| 3. 8 requests" not in printed
    assert not (tmp_path / "rows.json.tmp").exists()


def test_graphs_column_counts_replayed_eager_and_refused_steps(tmp_path, capsys, monkeypatch):
    """The graphs column: timed steps replayed from a graph, run eagerly (bucket too large to
    capture) and run eagerly after a refused capture. On the CPU a stand-in capture replays the
    step for one-request buckets and refuses the others, as a capturing stream refuses a module
    load; `max_tokens` 64 leaves the 8-request full canvases (8 x 48 tokens) uncaptured."""
    import torch

    from sampler.llada_batch import LLaDABatch
    from sampler.cuda_graphs import StepGraphs

    class Replay:
        def __init__(self, graphs, bucket, plan, outputs):
            self.graphs, self.bucket, self.plan, self.outputs = graphs, bucket, plan, outputs

        def replay(self):
            self.outputs.copy_(self.graphs.step_fn(self.plan, self.bucket))

    def capture(self, bucket):
        if bucket.requests > 1:
            raise RuntimeError("operation not permitted when stream is capturing")
        plan = self._idle_plan(bucket)
        outputs = self.step_fn(plan, bucket).clone()
        self.graphs[bucket] = (Replay(self, bucket, plan, outputs), plan, outputs)
        return self.graphs[bucket]

    class GraphBatch(LLaDABatch):
        def __init__(self, *a, cuda_graphs=None, **kw):
            super().__init__(*a, cuda_graphs=cuda_graphs, **kw)
            if cuda_graphs is not False:
                self.graphs = StepGraphs(self._device_step, self.dummy_slot, self.device, max_tokens=64)

    monkeypatch.setattr(StepGraphs, "capture", capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(bench_engine, "make_batch", lambda model, special, **kw: GraphBatch(model, special, **kw))
    out = tmp_path / "rows.json"
    assert bench_engine.main(["--device", "cpu", "--shape", "tiny", "--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["complete"] is True
    rows = {r["config"].split(".")[0]: r for r in data["rows"]}
    assert rows["baseline: reference, batch 1, exact"]["graphs"] == "off"
    # Batch 1: 32 steps (gen 32, one token per step), every one replayed (the 48-token full
    # canvases too); 8 requests: the 4 block starts (384 tokens) eager by design, the 28 block
    # steps (64 tokens) refused capture, so eager.
    assert rows["1"]["graphs"] == rows["2"]["graphs"] == "32/0/0"
    assert rows["3"]["graphs"] == "0/4/28"
    printed = capsys.readouterr().out
    assert "WARNING: 3. 8 requests, dual cache:" in printed and "not a CUDA graph figure" in printed
    assert "WARNING: 2." not in printed
    assert "capture refused in: 3. 8 requests, dual cache" in printed


def test_random_model_is_fused_as_the_loader_serves_it():
    """The benchmark measures what the server runs: one q/k/v and one gate/up product per block."""
    import torch

    bundle = bench_engine.build_random("tiny", torch.device("cpu"), torch.float32)
    cfg = bundle.config
    for layer in bundle.model.layers:
        assert not hasattr(layer.attn, "q_proj") and not hasattr(layer.mlp, "ff_proj")
        assert layer.attn.qkv.shape == ((cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, cfg.d_model)
        assert layer.mlp.gate_up.shape == (2 * cfg.mlp_hidden_size, cfg.d_model)
