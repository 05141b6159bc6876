"""Triton kernels for DyT and Derf (imported as `megatron_dyt.kernels`).

Empty until the fused-kernel work lands; the norm factory's `backend: torch` is the reference
implementation meanwhile.
"""
