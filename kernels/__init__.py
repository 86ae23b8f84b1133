"""Compute kernels: each Triton kernel beside a plain PyTorch reference, behind one dispatcher."""
