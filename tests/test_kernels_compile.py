"""The Triton kernels compile for NVIDIA GPUs (sm_90, sm_80) on a machine without one.

The interpreter tests check what the kernels compute; this checks that the compiled path (the one
the GPU runs: no interpreter, hardware log2, pipelined loads) still lowers all the way to a cubin
through ptxas, so a GPU session does not find a compile error first. It runs in a subprocess so
that the kernels are fresh JIT functions (the other kernel tests load them interpreted).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import time
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import kernels.attention_triton as at
    import kernels.selection_triton as st
    import kernels.moe_triton as mt

    def compile_for(arch, fn, sig, const, **opts):
        names = list(sig)
        # What the launcher infers for 16-aligned pointers and multiple-of-16 integers.
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
                 if sig[n].startswith("*") or n.startswith("stride") or n in ("vocab", "dim", "width")}
        src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
        t0 = time.time()
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
        ttgir = k.asm["ttgir"]
        print(f"sm_{arch} {fn.__name__} {const} smem={k.metadata.shared} "
              f"wgmma={'warp_group_dot' in ttgir} async_copy={'async_copy' in ttgir} "
              f"{time.time() - t0:.1f}s")
        assert k.asm["cubin"], "no cubin"
        return k

    def attn_sig(dt):
        p = "*" + dt
        sig = {"q_ptr": p, "k_ptr": p, "v_ptr": p, "o_ptr": p, "cu_q_ptr": "*i32",
               "k_start_ptr": "*i32", "k_len_ptr": "*i32"}
        for n in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                  "stride_ot", "stride_oh"):
            sig[n] = "i32"
        sig.update(qk_scale="fp32", q_bucket="i32", b_bucket="i32", GROUP="constexpr", HEAD_DIM="constexpr",
                   BLOCK_D="constexpr", BLOCK_M="constexpr", BLOCK_N="constexpr", IEEE="constexpr")
        return sig

    def sample_sig(dt):
        return {"logits_ptr": "*" + dt, "stride_row": "i32", "vocab": "i32", "temp_ptr": "*fp32",
                "seed_ptr": "*i64", "nonce_ptr": "*i64", "pos_ptr": "*i64", "ban_ptr": "*i32",
                "ban_rows_ptr": "*i8", "x0_ptr": "*i64", "conf_ptr": "*fp32", "n_class": "i32",
                "N_BAN": "constexpr",
                "BAN_ROWS": "constexpr", "BLOCK_V": "constexpr", "FAST": "constexpr"}

    transfer_sig = {"conf_ptr": "*fp32", "cu_ptr": "*i32", "k_ptr": "*i64", "thr_ptr": "*fp32",
                    "out_ptr": "*u8", "BLOCK_I": "constexpr", "BLOCK_J": "constexpr"}
    bits_sig = {"seed_ptr": "*i64", "nonce_ptr": "*i64", "pos_ptr": "*i64", "tok_ptr": "*i32",
                "raw_ptr": "*i64", "out_ptr": "*i64", "e_ptr": "*fp32", "n": "i32",
                "BLOCK": "constexpr", "FAST": "constexpr"}

    # The LLaDA-8B case on Hopper must use wgmma with pipelined (async) K/V loads.
    k = compile_for(90, at._attn_fwd, attn_sig("bf16"),
                    dict(GROUP=1, HEAD_DIM=128, BLOCK_D=128, BLOCK_M=128, BLOCK_N=64, IEEE=False),
                    num_warps=8, num_stages=3)
    assert "warp_group_dot" in k.asm["ttgir"] and "async_copy" in k.asm["ttgir"]
    compile_for(90, at._attn_fwd, attn_sig("fp16"),
                dict(GROUP=4, HEAD_DIM=64, BLOCK_D=64, BLOCK_M=32, BLOCK_N=64, IEEE=False),
                num_warps=4, num_stages=3)
    bm, bn, warps, stages = at._default_config(128, 16)  # the fixed launch for short blocks
    compile_for(90, at._attn_fwd, attn_sig("bf16"),
                dict(GROUP=1, HEAD_DIM=128, BLOCK_D=128, BLOCK_M=bm, BLOCK_N=bn, IEEE=False),
                num_warps=warps, num_stages=stages)
    compile_for(90, at._attn_fwd, attn_sig("fp32"),
                dict(GROUP=2, HEAD_DIM=12, BLOCK_D=16, BLOCK_M=32, BLOCK_N=32, IEEE=True),
                num_warps=4, num_stages=2)
    compile_for(80, at._attn_fwd, attn_sig("bf16"),
                dict(GROUP=1, HEAD_DIM=128, BLOCK_D=128, BLOCK_M=128, BLOCK_N=64, IEEE=False),
                num_warps=8, num_stages=3)
    for arch in (90, 80):
        compile_for(arch, st._sample_kernel, sample_sig("bf16"),
                    dict(N_BAN=2, BAN_ROWS=True, BLOCK_V=4096, FAST=True), num_warps=8, num_stages=2)
    compile_for(90, st._sample_kernel, sample_sig("fp16"), dict(N_BAN=0, BAN_ROWS=False, BLOCK_V=1024, FAST=True),
                num_warps=4, num_stages=2)
    compile_for(90, st._sample_kernel, sample_sig("fp32"), dict(N_BAN=1, BAN_ROWS=False, BLOCK_V=8, FAST=False),
                num_warps=4, num_stages=2)
    compile_for(90, st._transfer_kernel, transfer_sig, dict(BLOCK_I=64, BLOCK_J=64), num_warps=4)
    compile_for(90, st._bits_kernel, bits_sig, dict(BLOCK=64, FAST=True), num_warps=4)

    def moe_sig(kernel, dt):
        p = "*" + dt
        if kernel == "up":
            sig = {"x_ptr": p, "w_ptr": p, "rows_ptr": "*i32", "tile_e_ptr": "*i32", "h_ptr": p}
            strides = ("stride_xt", "stride_we", "stride_wn", "stride_ht")
        else:
            sig = {"h_ptr": p, "w_ptr": p, "rows_ptr": "*i32", "tile_e_ptr": "*i32", "wt_ptr": "*fp32",
                   "out_ptr": "*fp32"}
            strides = ("stride_ht", "stride_we", "stride_wn", "stride_ot")
        sig.update(n_pairs="i32", dim="i32", width="i32")
        sig.update({n: "i32" for n in strides})
        if kernel == "up":
            sig["TOPK"] = "constexpr"
        sig.update(BLOCK_M="constexpr", BLOCK_N="constexpr", BLOCK_K="constexpr", IEEE="constexpr")
        return sig

    # The grouped MoE feed-forward (LLaDA2-mini: top-8, D 2048, f 512) in bf16, and fp32.
    for bm in (16, 64):
        compile_for(90, mt._moe_up, moe_sig("up", "bf16"),
                    dict(TOPK=8, BLOCK_M=bm, BLOCK_N=64, BLOCK_K=64, IEEE=False), num_warps=4, num_stages=2)
        compile_for(90, mt._moe_down, moe_sig("down", "bf16"),
                    dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=64, IEEE=False), num_warps=4, num_stages=2)
    compile_for(90, mt._moe_up, moe_sig("up", "fp32"),
                dict(TOPK=2, BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, IEEE=True), num_warps=4, num_stages=2)
    print("OK")
    """
)


def test_kernels_compile_for_nvidia_targets():
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists() and not os.environ.get("TRITON_PTXAS_PATH"):
        pytest.skip("no ptxas bundled with this Triton")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    out = proc.stdout + proc.stderr
    print(proc.stdout)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), out[-6000:]
