"""A CUDA graph capture finds the kernel the warm-up loaded: Triton's own cache lookup, on the CPU.

Inside a capture the autotuned kernels launch with the tuner's stored choice (no tuning). Triton
keys its compiled-kernel cache on the specialisation of the arguments and on the launch options as
passed; a capture launch whose key differs from the warm-up's compiles or loads a module, which a
capturing stream refuses, and the bucket silently runs eagerly. Here Triton's own `JITFunction.run`
computes the keys for sm_90 (a stand-in driver answers the device queries, and Triton's
`jit_cache_hook`, called on every cache miss, records the miss and stores a stand-in kernel under
its key instead of compiling): after the warm-up the capture launch must miss nothing and launch
the kernel stored under the tuned launch's key, for the attention and the sampling kernels, with
the tuner's choice and with the fixed default. The script runs in a subprocess so that the kernels
are fresh compiled-mode JIT functions (the other kernel tests load them interpreted).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import torch
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    import kernels.attention_triton as at
    import kernels.selection_triton as st
    from kernels.launch import capture_launches

    misses, launches = [], []

    class StandInKernel:
        # What JITFunction.run touches on a cache hit.
        function = packed_metadata = None

        def __init__(self, key):
            self.key = key

        def launch_metadata(self, *a):
            return None

        def run(self, *a):
            launches.append(self.key)

    timings = iter([5.0, 3.0, 4.0, 1.0, 2.0, 6.0, 7.0] * 10)

    class StandInDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_benchmarker(self):
            def bench(kernel_call, quantiles=None, **kw):
                kernel_call()
                t = next(timings)
                return [t, t, t]
            return bench

    def on_miss(key, fn, compile, **kw):
        misses.append(key)
        fn.jit_function.device_caches[0][0][key] = StandInKernel(key)
        return True  # do not compile: the stand-in is the "loaded module"

    driver.set_active(StandInDriver())
    knobs.runtime.jit_cache_hook = on_miss
    at._compiled = st._compiled = lambda t: True  # CPU tensors take the compiled (CUDA) path

    def capturing(flag):
        # What a capturing stream does to the launch path (torch.cuda.is_current_stream_capturing).
        at.autotune_allowed = st.autotune_allowed = (lambda t: False) if flag else __import__(
            "kernels.launch", fromlist=["x"]).autotune_allowed

    def attention(dtype, n_seg):
        torch.manual_seed(0)
        q = torch.randn(64 * n_seg, 4, 64, dtype=dtype)
        k = torch.randn(96 * n_seg, 2, 64, dtype=dtype)
        v = torch.randn_like(k)
        cu = torch.arange(n_seg + 1, dtype=torch.int32) * 64
        ks = torch.arange(n_seg, dtype=torch.int32) * 96
        kl = torch.full((n_seg,), 96, dtype=torch.int32)
        return lambda: at.attention_triton(q, k, v, cu, ks, kl, max_q=64)

    def sampling(n):
        logits = torch.randn(n, 1024, dtype=torch.bfloat16)
        z = torch.zeros(n, dtype=torch.int64)
        return lambda: st.sample_candidates_triton(logits, torch.zeros(n), z, z, z, ban_ids=[3])

    def check(name, call, tuned):
        misses.clear(); launches.clear()
        capturing(False)
        call()  # warm-up: autotunes (tuned) and launches the choice
        if tuned:
            # Several configs timed (each a miss, or a hit where an earlier key compiled it), then the choice.
            assert len(misses) + len(launches) > 2, (name, "the autotuner tried one config", misses)
            tuned_key = launches[-1]
        m0, l0 = len(misses), len(launches)
        with capture_launches():  # the last warm-up: the capture's own path, outside a capture
            call()
        pinned_key = launches[-1] if len(launches) > l0 else misses[-1]
        if tuned:  # the stored choice is the tuned launch's kernel, not a new one
            assert len(misses) == m0 and pinned_key == tuned_key, (
                name, "the stored choice launched under another key", tuned_key, misses[m0:])
        n_miss = len(misses)
        capturing(True)
        call()  # the launch made while the stream captures
        assert len(misses) == n_miss, (name, "the capture launch missed the cache", misses[n_miss:])
        assert launches[-1] == pinned_key
        capturing(False)
        print(f"{name}: {n_miss} compiles and {len(launches) - 2} launches in the warm-up, none in the capture; key {pinned_key[-160:]}")

    check("attention bf16, 2 segments", attention(torch.bfloat16, 2), tuned=True)
    check("attention fp32, 5 segments", attention(torch.float32, 5), tuned=True)
    check("sampling, 8 rows", sampling(8), tuned=True)
    check("sampling, 300 rows", sampling(300), tuned=True)

    # Autotuning off (LLADA_KERNEL_AUTOTUNE=0) or never run for this key: the fixed default config,
    # compiled by the last warm-up, found by the capture.
    at.autotune_allowed = st.autotune_allowed = lambda t: False
    misses.clear(); launches.clear()
    call = attention(torch.float16, 3)
    with capture_launches():
        call()
    assert len(misses) == 1, misses
    call()
    assert len(misses) == 1 and launches == [misses[0]], (misses, launches)
    assert "'num_ctas': 1" in misses[0]
    print("attention fp16, default config: compiled once in the warm-up, found by the capture")
    print("OK")
    """
)


def test_capture_launch_finds_the_warm_up_kernel():
    env = dict(os.environ, TRITON_INTERPRET="0", LLADA_KERNEL_AUTOTUNE="1", TRITON_DEFAULT_FP_FUSION="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    out = proc.stdout + proc.stderr
    print(proc.stdout)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), out[-6000:]


def test_capture_launches_switches_autotuning_off(monkeypatch):
    from kernels import launch

    t = torch.zeros(1)
    monkeypatch.delenv("LLADA_KERNEL_AUTOTUNE", raising=False)
    assert launch.autotune_allowed(t)
    with launch.capture_launches():
        assert not launch.autotune_allowed(t)
        with launch.capture_launches():
            assert not launch.autotune_allowed(t)
        assert not launch.autotune_allowed(t)
    assert launch.autotune_allowed(t)
    monkeypatch.setenv("LLADA_KERNEL_AUTOTUNE", "0")
    assert not launch.autotune_allowed(t)


def test_launch_options_are_the_autotuners():
    from kernels import launch

    cfg = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3)
    opts = launch.launch_options(cfg)
    assert opts == cfg.all_kwargs() and list(opts) == list(cfg.all_kwargs())
    assert opts["num_ctas"] == 1  # the option the capture launch used to leave out
    assert [launch.size_class(n) for n in (1, 2, 4, 5, 16, 17, 64, 65)] == [1, 4, 4, 16, 16, 64, 64, 256]
