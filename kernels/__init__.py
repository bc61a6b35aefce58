"""Triton kernels of diffattn (installed as ``diffattn.kernels``).

One kernel family serves every variant of differential attention (V1/DiffCLIP with a key pair
per group and value width 2d, V2 with one key per group and value width d; lambda per head or
per row; with or without the RMSNorm epilogue), as compile-time flags:

- ``diff_attn_fwd``: both softmax maps, the lambda difference and the optional per-head RMSNorm
  epilogue in one pass.
- ``diff_attn_bwd``: the matching backward (epilogue, dq, dk, dv, dlambda, d norm weight) in two
  launches.
- ``tuning``: which tile configuration runs (committed table, first-call timing, defaults).
- ``launch``: the launch shortcut (Triton's per-call argument work done once per
  specialisation).

These are the raw launchers, without validation or autograd: use ``diffattn.diff_attention``
or ``diffattn.diff_attention_v2``.
"""
from .config import INTERPRET, MAX_HEAD_DIM
from .diff_attn_bwd import diff_attn_bwd
from .diff_attn_fwd import diff_attn_fwd

__all__ = ["INTERPRET", "MAX_HEAD_DIM", "diff_attn_bwd", "diff_attn_fwd"]
