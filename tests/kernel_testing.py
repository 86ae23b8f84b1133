"""Shared set-up of the Triton kernel tests.

Importing this module first switches Triton to its interpreter when there is no GPU (unless the
caller exported TRITON_INTERPRET), so the kernels run on CPU tensors in CI and compiled on CUDA
elsewhere. Inputs are fresh random draws every run; the seed is printed and named in every failure
(KERNEL_TEST_SEED=<n> replays one).
"""

import importlib
import os
import random
import time
import zlib

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

SEED = int(os.environ.get("KERNEL_TEST_SEED", time.time_ns() % (2**31)))
print(f"kernel tests seed: KERNEL_TEST_SEED={SEED}")


def kernel_module(name: str, kernel: str):
    """(module, device): the kernel module with `kernel` interpreted on "cpu", or compiled on
    "cuda"; skips the calling test module when neither is possible."""
    pytest.importorskip("triton")
    mod = importlib.import_module(name)
    if mod._interpreting():
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(getattr(mod, kernel), InterpretedFunction):
            # Imported earlier without the interpreter: rebuild the kernels under it.
            mod = importlib.reload(mod)
        assert isinstance(getattr(mod, kernel), InterpretedFunction)
        return mod, "cpu"
    if torch.cuda.is_available():
        return mod, "cuda"
    pytest.skip("TRITON_INTERPRET=0 and no CUDA device", allow_module_level=True)


def case_random(request) -> random.Random:
    """A per-test generator (and torch seed) derived from the run's seed and the test's name."""
    seed = (SEED + zlib.crc32(request.node.name.encode())) % (2**31)
    print(f"KERNEL_TEST_SEED={SEED} (case seed {seed})")
    torch.manual_seed(seed)
    return random.Random(seed)


def dtypes(interpreting: bool):
    """(parameters, runnable): the dtypes a kernel test covers, bf16 (the serving dtype) included
    and skipped under the interpreter (which cannot run bf16: it is compiled on CUDA only), and
    the list of those that run here, for tests that loop over dtypes."""
    bf16 = pytest.param(torch.bfloat16, id="bfloat16", marks=pytest.mark.skipif(
        interpreting, reason="bf16 runs compiled on CUDA only (the Triton interpreter cannot run it)"))
    params = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float16, id="float16"), bf16]
    runnable = [torch.float32, torch.float16] + ([] if interpreting else [torch.bfloat16])
    return params, runnable
