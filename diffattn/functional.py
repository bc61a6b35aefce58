"""``diff_attention``: the functional API (argument checks, autocast, backend choice).

    out = diff_attention(q, k, v, lambda_)            # (B, N, H, 2d)

Layouts, batch first like flash-attn:
    q (B, N, 2H, d)   q heads 2h and 2h+1 are the two maps of differential head h
    k (B, M, 2Hk, d)  key heads 2g and 2g+1 of key/value group g
    v (B, M, Hk, 2d)  one value head of width 2d per group; head h reads g = h // (H // Hk)
Any strides work as long as the last dimension is contiguous (views of a fused projection's
output are used without copies; other inputs are made contiguous).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from .backend import check_backend_name, resolve_backend, unsupported_features
from .reference import expand_lambda
from .torch_path import diff_attention_torch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_inputs(q, k, v, lambda_, key_padding_mask=None, norm_weight=None, scale=None) -> None:
    """Raise a ValueError/TypeError naming the first bad argument of diff_attention."""
    _check_tensor("q", q, 4, "(batch, seq_q, 2 * heads, head_dim)")
    _check_tensor("k", k, 4, "(batch, seq_k, 2 * kv_heads, head_dim)")
    _check_tensor("v", v, 4, "(batch, seq_k, kv_heads, 2 * head_dim)")
    B, N, H2, d = q.shape
    if H2 % 2:
        raise ValueError(f"q must have an even number of heads (two maps per differential "
                         f"head), got q.shape[2] = {H2}")
    if k.shape[2] % 2:
        raise ValueError(f"k must have an even number of heads, got k.shape[2] = {k.shape[2]}")
    H, Hk = H2 // 2, k.shape[2] // 2
    if k.shape[0] != B or k.shape[3] != d:
        raise ValueError(f"k must have shape ({B}, seq_k, 2 * kv_heads, {d}) to match q "
                         f"{tuple(q.shape)}, got {tuple(k.shape)}")
    if tuple(v.shape) != (B, k.shape[1], Hk, 2 * d):
        raise ValueError(f"v must have shape {(B, k.shape[1], Hk, 2 * d)} = (batch, seq_k, "
                         f"kv_heads, 2 * head_dim) to match q and k, got {tuple(v.shape)}")
    if H % Hk:
        raise ValueError(f"the number of differential heads ({H} = q.shape[2] // 2) must be a "
                         f"multiple of the number of key/value groups ({Hk} = k.shape[2] // 2)")
    if d < 1:
        raise ValueError(f"q must have head_dim >= 1, got q.shape[3] = {d}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if isinstance(lambda_, Tensor):
        if lambda_.dim() > 1 or (lambda_.dim() == 1 and lambda_.shape[0] != H):
            raise ValueError(f"lambda_ must be a float, a 0-dim tensor or a tensor of shape "
                             f"({H},) (one per differential head), got {tuple(lambda_.shape)}")
        if not lambda_.is_floating_point():
            raise TypeError(f"lambda_ must be a floating-point tensor, got {lambda_.dtype}")
        if lambda_.device != q.device:
            raise ValueError(f"lambda_ must be on q's device {q.device}, got {lambda_.device}")
    elif isinstance(lambda_, bool) or not isinstance(lambda_, (int, float)):
        raise TypeError(f"lambda_ must be a float or a tensor, got {type(lambda_).__name__}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            got = key_padding_mask.dtype if isinstance(key_padding_mask, Tensor) \
                else type(key_padding_mask).__name__
            raise TypeError(f"key_padding_mask must be a bool tensor (True = ignore the key), "
                            f"got {got}")
        if tuple(key_padding_mask.shape) != (B, k.shape[1]):
            raise ValueError(f"key_padding_mask must have shape (batch, seq_k) = "
                             f"{(B, k.shape[1])}, got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must be on q's device {q.device}, got "
                             f"{key_padding_mask.device}")
    if norm_weight is not None:
        if not isinstance(norm_weight, Tensor) or not norm_weight.is_floating_point():
            raise TypeError("norm_weight must be a floating-point tensor of shape (2 * head_dim,)")
        if tuple(norm_weight.shape) != (2 * d,):
            raise ValueError(f"norm_weight must have shape (2 * head_dim,) = ({2 * d},), got "
                             f"{tuple(norm_weight.shape)}")
        if norm_weight.device != q.device:
            raise ValueError(f"norm_weight must be on q's device {q.device}, got "
                             f"{norm_weight.device}")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0
                                  and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")


def _check_attn_mask(attn_mask, q, k) -> None:
    if attn_mask is None:
        return
    B, N, H2, _ = q.shape
    M = k.shape[1]
    if not isinstance(attn_mask, Tensor) or not (attn_mask.dtype == torch.bool
                                                 or attn_mask.is_floating_point()):
        raise TypeError("attn_mask must be a bool (True = masked out) or float (additive) tensor")
    shape = tuple(attn_mask.shape)
    ok = shape == (N, M) or (len(shape) == 4 and shape[0] in (1, B) and shape[1] in (1, H2)
                             and shape[2] in (1, N) and shape[3] == M)
    if not ok:
        raise ValueError(f"attn_mask must have shape (seq_q, seq_k) = {(N, M)} or broadcast "
                         f"to (batch, 2 * heads, seq_q, seq_k) = {(B, H2, N, M)}, got {shape}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask must be on q's device {q.device}, got {attn_mask.device}")


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def diff_attention(q: Tensor, k: Tensor, v: Tensor, lambda_: Union[float, Tensor], *,
                   causal: bool = False, key_padding_mask: Optional[Tensor] = None,
                   scale: Optional[float] = None, norm_weight: Optional[Tensor] = None,
                   eps: float = 1e-5, out_scale: float = 1.0, dropout_p: float = 0.0,
                   attn_mask: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """Differential attention, fused: softmax(s q1 k1^T) v - lambda softmax(s q2 k2^T) v.

    Args:
        q: (B, N, 2H, d). k: (B, M, 2Hk, d). v: (B, M, Hk, 2d). H % Hk == 0.
        lambda_: float, 0-dim tensor or (H,) tensor; differentiable when a tensor.
        causal: query i sees keys j <= i + (M - N): the diagonal is aligned to the bottom-right
            corner (FlashAttention's rule). For N == M this is j <= i; when N > M the first
            N - M queries see no key and give zeros.
        key_padding_mask: (B, M) bool, True = ignore that key (nn.MultiheadAttention's
            convention). A query that sees no key at all gives zeros (and zero gradients).
        scale: softmax scale, default d ** -0.5.
        norm_weight: (2d,) switches on the per-head RMSNorm epilogue of DiffCLIP:
            y = x * rsqrt(mean(x^2) + eps) * norm_weight * out_scale, computed in fp32.
            Without it, y = x * out_scale.
        dropout_p: attention dropout, applied to both maps before the difference (torch
            backend only: the fused kernels refuse it).
        attn_mask: bool (True = masked out) or additive float mask, (N, M) or 4-D
            broadcastable to (B, 2H, N, M), per q head (torch backend only).
        backend: "auto" | "triton" | "torch" (see diffattn.backend).
    Returns:
        (B, N, H, 2d) in q's dtype (the autocast dtype under autocast); fp32 accumulation.
    """
    check_backend_name(backend)
    check_inputs(q, k, v, lambda_, key_padding_mask, norm_weight, scale)
    _check_attn_mask(attn_mask, q, k)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type) and q.dtype == torch.float32:
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    B, N, H2, d = q.shape
    scale = d ** -0.5 if scale is None else float(scale)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lam = expand_lambda(lambda_, H2 // 2, acc_dtype, q.device)
    weight = norm_weight.to(acc_dtype) if norm_weight is not None else None
    chosen = resolve_backend(backend, q.device, q.dtype, d,
                             unsupported_features(dropout_p, attn_mask))
    with torch.autocast(device_type, enabled=False):
        if chosen == "triton":
            from .ops import fused_diff_attention
            return fused_diff_attention(q, k, v, lam.contiguous(), key_padding_mask, weight,
                                        scale, causal, eps, float(out_scale))
        return diff_attention_torch(q, k, v, lam, causal=causal,
                                    key_padding_mask=key_padding_mask, scale=scale,
                                    norm_weight=weight, eps=eps, out_scale=out_scale,
                                    dropout_p=dropout_p, attn_bias=attn_mask)
