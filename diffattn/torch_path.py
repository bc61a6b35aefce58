"""Differential attention from stock PyTorch ops: two ``scaled_dot_product_attention`` calls,
the lambda difference and, optionally, the per-head RMSNorm, the way timm and Microsoft's
"flashdiff" code compose it. This is the ``backend="torch"`` path: it runs anywhere PyTorch
runs, supports what the fused kernels do not (dropout, arbitrary additive masks), and is the
baseline the fused kernels are measured against.

Layouts as in diffattn.reference: q (B, N, 2H, d), k (B, M, 2Hk, d), v (B, M, Hk, 2d),
out (B, N, H, 2d).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange

from .reference import causal_keep_mask, rms_norm_epilogue


def _sdpa_masks(B, H2, N, M, device, dtype, causal, key_padding_mask, attn_bias):
    """Build what SDPA needs for one call per map.

    Returns (bias1, bias2, use_is_causal, row_valid): biases are bool keep-masks or additive
    float masks broadcastable to (B, H, N, M) (None when nothing is masked); row_valid is a
    (B, H or 1, N, 1) keep indicator for rows that see at least one key (None when all do).
    Rows that see no key are unmasked for SDPA (which would return NaN there) and zeroed
    afterwards through row_valid, so their output and gradients are exactly 0.
    """
    if attn_bias is None and key_padding_mask is None:
        if not causal:
            return None, None, False, None
        if N == M:
            return None, None, True, None
    keep = torch.ones(1, 1, N, M, dtype=torch.bool, device=device)
    if causal:
        keep = causal_keep_mask(N, M, device)[None, None]
    if key_padding_mask is not None:
        keep = keep & ~key_padding_mask[:, None, None, :]
    float_bias = None
    if attn_bias is not None:
        if attn_bias.dtype == torch.bool:
            keep = keep & ~attn_bias
        else:
            float_bias = attn_bias.to(dtype)
            keep = keep & ~torch.isneginf(attn_bias)
    row_any = keep.any(-1, keepdim=True)
    row_valid = None if bool(row_any.all()) else row_any
    if float_bias is None:
        bias = keep | ~row_any
    else:
        bias = float_bias.masked_fill(~keep, float("-inf")).masked_fill(~row_any, 0.0)
    if bias.dim() == 4 and bias.shape[1] == H2:
        return bias[:, 0::2], bias[:, 1::2], False, _pairs(row_valid, H2)
    return bias, bias, False, _pairs(row_valid, H2)


def _pairs(row_valid, H2):
    """Reduce a per-q-head row indicator (B, 2H, N, 1) to per-differential-head (B, H, N, 1)."""
    if row_valid is None or row_valid.shape[1] != H2:
        return row_valid
    return row_valid[:, 0::2] & row_valid[:, 1::2]


def diff_attention_torch(q, k, v, lam: torch.Tensor, *, causal=False,
                         key_padding_mask: Optional[torch.Tensor] = None, scale=None,
                         norm_weight: Optional[torch.Tensor] = None, eps=1e-5, out_scale=1.0,
                         dropout_p=0.0, attn_bias: Optional[torch.Tensor] = None):
    """Two SDPA calls and the difference. lam is (H,) (fp32, fp64 for fp64 inputs).

    attn_bias: bool (True = masked out) or additive float, broadcastable to (B, 2H, N, M).
    dropout_p is applied to each map separately, before the difference (as in DiffCLIP).
    """
    B, N, H2, d = q.shape
    M, Hk = v.shape[1], v.shape[2]
    H = H2 // 2
    q1, q2 = rearrange(q, "b n (h two) d -> two b h n d", two=2)
    k1, k2 = rearrange(k, "b m (g two) d -> two b g m d", two=2)
    vh = rearrange(v, "b m g e -> b g m e")
    if Hk != H:  # grouped-query attention: group g serves heads g*(H//Hk) ... (g+1)*(H//Hk)-1
        k1, k2, vh = (t.repeat_interleave(H // Hk, dim=1) for t in (k1, k2, vh))
    bias1, bias2, is_causal, row_valid = _sdpa_masks(
        B, H2, N, M, q.device, q.dtype, causal, key_padding_mask, attn_bias)
    o1 = F.scaled_dot_product_attention(q1, k1, vh, attn_mask=bias1, dropout_p=dropout_p,
                                        is_causal=is_causal, scale=scale)
    o2 = F.scaled_dot_product_attention(q2, k2, vh, attn_mask=bias2, dropout_p=dropout_p,
                                        is_causal=is_causal, scale=scale)
    compute = lam.dtype
    x = o1.to(compute) - lam[:, None, None].to(compute) * o2.to(compute)
    if row_valid is not None:
        x = x * row_valid
    x = rearrange(x, "b h n e -> b n h e")
    if norm_weight is None:
        return (x * out_scale).to(q.dtype)
    return rms_norm_epilogue(x, norm_weight, eps, out_scale).to(q.dtype)
