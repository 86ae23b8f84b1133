"""How the autotuned Triton kernels are launched, in and out of a CUDA graph capture.

Autotuning times every candidate configuration (and synchronises), which a stream that is being
captured cannot do, so inside a capture a kernel is launched with the tuner's stored choice
instead. That launch must resolve to the very compiled kernel the tuned launch loaded: Triton keys
its compiled-kernel cache on the launch options as passed (names, values and their order), and a
cache miss loads a module (`cuModuleLoadData`), which the driver refuses while the stream is
capturing. So both paths pass the options the autotuner passes (`launch_options`: the config's
`all_kwargs()`, `num_ctas` included), and `StepGraphs` runs its last warm-up inside
`capture_launches()`, which takes exactly the capture's path (stored choice, no tuning) outside a
capture, so whatever that path needs is compiled and loaded before capture begins.

Autotune keys carry a size class of the launch (`size_class`): a tile chosen on a one-request
warm-up does not serve a 64-request bucket.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

_state = threading.local()


@contextlib.contextmanager
def capture_launches():
    """Launch every autotuned kernel as a CUDA graph capture does (the tuner's stored choice, or
    the fixed default; no tuning) while inside this block."""
    depth = getattr(_state, "depth", 0)
    _state.depth = depth + 1
    try:
        yield
    finally:
        _state.depth = depth


def autotune_allowed(t: torch.Tensor) -> bool:
    """Autotuning benchmarks (and synchronises), so it is off inside a CUDA graph capture, inside
    `capture_launches()` and when LLADA_KERNEL_AUTOTUNE=0; the kernels then use the tuner's
    earlier choice for the same key, or a fixed default."""
    if os.environ.get("LLADA_KERNEL_AUTOTUNE", "1") == "0":
        return False
    if getattr(_state, "depth", 0):
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def cached_config(tuner, args, kwargs):
    """The autotuner's stored choice for this call's key, or None (mirrors Triton's key: the key
    arguments, then the dtypes of the tensor arguments)."""
    try:
        named = {**dict(zip(tuner.arg_names, args)), **kwargs}
        named = {k: v for k, v in named.items() if k in tuner.arg_names}
        key = [named[k] for k in tuner.keys if k in named]
        key += [str(a.dtype) for a in named.values() if hasattr(a, "dtype")]
        return tuner.cache.get(tuple(key))
    except Exception:  # a Triton without these internals: fall back to the default
        return None


def launch_options(cfg) -> dict:
    """The keyword arguments of a launch with config `cfg`, exactly as the autotuner passes them
    (the config's meta-parameters, then num_warps, num_ctas, num_stages and any other option it
    sets, in its order), so the launch finds the kernel the tuned launch compiled and loaded."""
    return dict(cfg.all_kwargs())


def size_class(n: int) -> int:
    """Coarse class of a launch size for autotune keys: 1, 4, 16, 64, 256, ... (the smallest power
    of 4 at least n), so one tuning serves a range of batch sizes but not all of them."""
    c = 1
    while c < n:
        c *= 4
    return c
