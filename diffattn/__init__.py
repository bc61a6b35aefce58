"""diffattn: differential attention (Differential Transformer, DiffCLIP) at FlashAttention speed.

    from diffattn import DiffMultiheadAttention, diff_attention

- ``diff_attention``: the functional op on (batch, seq, heads, dim) tensors, fused Triton
  kernels or a PyTorch path (``backend="auto" | "triton" | "torch"``).
- ``diff_attention_ref``: the plain-math reference (materialises the maps, any dtype).
- ``DiffMultiheadAttention``: the nn.MultiheadAttention-style module, DiffCLIP's layer.
"""
from .backend import BACKENDS, BackendFallbackWarning, resolve_backend
from .functional import diff_attention
from .module import DiffMultiheadAttention, HeadRMSNorm, lambda_init_for_depth
from .reference import causal_keep_mask, diff_attention_ref

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendFallbackWarning",
    "DiffMultiheadAttention",
    "HeadRMSNorm",
    "causal_keep_mask",
    "diff_attention",
    "diff_attention_ref",
    "lambda_init_for_depth",
    "resolve_backend",
]
