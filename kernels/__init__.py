"""Triton kernels of diffattn (installed as ``diffattn.kernels``).

One kernel family serves every variant of differential attention (V1/DiffCLIP with a key pair
per group and value width 2d, V2 with one key per group and value width d; lambda per head or
per row; with or without the RMSNorm epilogue; causal or local-window masks), as compile-time
flags derived from one call description:

- ``call``: ``AttentionCall``, the non-tensor description of a call (scale, causal, window,
  lambda mode, epilogue, score options such as softcap), and ``variant_flags``, the one place
  the kernels' flags come from.
- ``score``: the score hook, one device function that turns each tile of q . k products into
  scores and their visibility (masks, window, softcap) for the forward, backward and decode
  kernels, with its derivative; ``score_arguments`` makes its kernel arguments from the call.
- ``diff_attn_fwd``: both softmax maps, the lambda difference and the optional per-head RMSNorm
  epilogue in one pass.
- ``diff_attn_bwd``: the matching backward (epilogue, dq, dk, dv, dlambda, d norm weight) in two
  launches.
- ``tuning``: which tile configuration runs (committed table, first-call timing, defaults).
- ``launch``: the launch shortcut (Triton's per-call argument work done once per
  specialisation) and ``launch_path()``, which says whether it is active and why.

Without triton installed only ``AttentionCall`` and the limits are importable
(``TRITON_IMPORT_ERROR`` says why). The launchers are raw, without validation or autograd:
use ``diffattn.diff_attention`` or ``diffattn.diff_attention_v2``.
"""
from .call import AttentionCall
from .config import INTERPRET, MAX_HEAD_DIM

try:  # the launchers need triton; the call description and the limits above do not
    import triton  # noqa: F401
    TRITON_IMPORT_ERROR = None
except ImportError as exc:  # e.g. torch wheels for macOS or Windows
    TRITON_IMPORT_ERROR = exc

__all__ = ["AttentionCall", "INTERPRET", "MAX_HEAD_DIM", "TRITON_IMPORT_ERROR"]
if TRITON_IMPORT_ERROR is None:
    from .diff_attn_bwd import diff_attn_bwd
    from .diff_attn_fwd import diff_attn_fwd
    __all__ += ["diff_attn_bwd", "diff_attn_fwd"]
