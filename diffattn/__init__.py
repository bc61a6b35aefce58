"""diffattn: differential attention (Differential Transformer, DiffCLIP) at FlashAttention speed.

    from diffattn import DiffMultiheadAttention, diff_attention

- ``diff_attention``: the functional op on (batch, seq, heads, dim) tensors, fused Triton
  kernels or a PyTorch path (``backend="auto" | "triton" | "torch"``).
- ``diff_attention_v2``: the Differential Transformer V2 op (one key per group, per-token
  lambda, no norm) on the same kernels.
- ``diff_attention_varlen`` / ``diff_attention_v2_varlen``: the same over packed
  variable-length sequences ((total, heads, dim) with int32 cumulative offsets, as
  flash-attn's varlen functions), one launch for every sequence, forward and backward.
- ``diff_attention_with_kvcache`` / ``diff_attention_v2_with_kvcache``: a decoding step
  against a KV cache (in-place append, split-K, paged caches); ``DiffKVCache`` holds a layer's
  cache for ``forward(x, kv_cache=cache)``.
- ``diff_attention_ref`` / ``diff_attention_v2_ref``: the plain-math references (materialise
  the maps, any dtype).
- ``DiffMultiheadAttention``: the nn.MultiheadAttention-style module, DiffCLIP's layer.
- ``DiffMultiheadAttentionV2``: the Differential Transformer V2 layer, same interface;
  ``DiffMultiheadAttentionV2.from_plain`` starts it from a plain layer.
- ``replace_attention``: turn a model's nn.MultiheadAttention layers into
  DiffMultiheadAttention layers (``variant="v1"``) or DiffMultiheadAttentionV2 layers
  (``variant="v2"``, starting equal to the plain model) that carry their weights, and its
  fused-qkv layers of timm's ``Attention`` form into ``DiffSelfAttention`` /
  ``DiffSelfAttentionV2`` (timm's call kept); each layer's ``from_plain`` converts one layer
  and ``plain_to_v2_state_dict`` maps one plain layer's weights onto V2's.
- ``diffattn.integrations.timm``: timm's DiffAttention on the fused kernels (optional extra).
"""
from .backend import BACKENDS, BackendFallbackWarning, resolve_backend
from .convert import plain_to_v2_state_dict, replace_attention
from .functional import (diff_attention, diff_attention_v2, diff_attention_v2_varlen,
                         diff_attention_varlen)
from .kvcache import DiffKVCache, diff_attention_v2_with_kvcache, diff_attention_with_kvcache
from .masks import causal_keep_mask
from .module import DiffMultiheadAttention, HeadRMSNorm, check_lambda_init, lambda_init_for_depth
from .module_v2 import DiffMultiheadAttentionV2
from .reference import diff_attention_ref, diff_attention_v2_ref
from .self_attention import DiffSelfAttention, DiffSelfAttentionV2

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendFallbackWarning",
    "DiffKVCache",
    "DiffMultiheadAttention",
    "DiffMultiheadAttentionV2",
    "DiffSelfAttention",
    "DiffSelfAttentionV2",
    "HeadRMSNorm",
    "causal_keep_mask",
    "check_lambda_init",
    "diff_attention",
    "diff_attention_ref",
    "diff_attention_varlen",
    "diff_attention_v2",
    "diff_attention_v2_ref",
    "diff_attention_v2_varlen",
    "diff_attention_v2_with_kvcache",
    "diff_attention_with_kvcache",
    "lambda_init_for_depth",
    "plain_to_v2_state_dict",
    "replace_attention",
    "resolve_backend",
]
