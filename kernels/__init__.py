"""Triton kernels of diffattn (installed as ``diffattn.kernels``).

- ``diff_attn_fwd``: both softmax maps, the lambda difference and the optional per-head RMSNorm
  epilogue in one pass.
- ``diff_attn_bwd``: the matching backward (epilogue, dq, dk, dv, dlambda, d norm weight).

These are the raw launchers, without validation or autograd: use ``diffattn.diff_attention``.
"""
from .config import INTERPRET, MAX_HEAD_DIM
from .diff_attn_bwd import diff_attn_bwd
from .diff_attn_fwd import diff_attn_fwd

__all__ = ["INTERPRET", "MAX_HEAD_DIM", "diff_attn_bwd", "diff_attn_fwd"]
