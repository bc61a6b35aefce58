"""``diff_attention`` and ``diff_attention_v2``: the functional API (argument checks, autocast,
backend choice).

    out = diff_attention(q, k, v, lambda_=0.8)    # Differential Transformer V1 / DiffCLIP
    out = diff_attention_v2(q, k, v, lambda_=lam)  # Differential Transformer V2

``lambda_`` and everything after q, k, v are keyword-only: where flash-attn's functions take
``dropout_p`` (or, in the KV-cache op, ``k``), a positional value is a TypeError, never a
silent run with that value as lambda.

Layouts, batch first like flash-attn; q heads 2h and 2h+1 are the two maps of differential
head h, which reads key/value group g = h // (H // Hk):

    V1  q (B, N, 2H, d), k (B, M, 2Hk, d) (key heads 2g, 2g+1), v (B, M, Hk, 2d) -> (B, N, H, 2d)
    V2  q (B, N, 2H, d), k (B, M, Hk, d) (one key head per group), v (B, M, Hk, d) -> (B, N, H, d)

Any strides work as long as the last dimension is contiguous (views of a fused projection's
output are used without copies; other inputs are made contiguous). Nothing here reads tensor
values, so no call waits for the device.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .backend import check_backend_name, resolve_backend, unsupported_features
from .checks import (check_attn_mask, check_diff_attention_args, check_diff_attention_v2_args,
                     check_dropout, check_packed, check_return_lse, check_softcap,
                     check_varlen_args, resolve_lambda_vectors, resolve_rms_norm)
from .kernel_inputs import kernel_lambda, last_dim_contiguous
from .lambdas import expand_lambda
from .softmax_lse import (fused_lse, fused_lse_varlen, lse_dtype, softmax_lse_torch,
                          softmax_lse_varlen_torch)
from .torch_path import (diff_attention_torch, diff_attention_v2_torch,
                         diff_attention_v2_varlen_torch, diff_attention_varlen_torch)

from .kernels import AttentionCall

try:
    from .autograd import fused_attention
except ImportError:  # no triton: resolve_backend never picks "triton"
    fused_attention = None


# ------------------------------------------------------------------ running
def _autocast(q: Tensor, k: Tensor, v: Tensor):
    """Under autocast, float32 inputs run in the autocast dtype (as SDPA does); each with a
    contiguous last dimension."""
    if q.dtype == torch.float32 and _autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1:
        return q, k, v
    return last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)


def _autocast_enabled(device_type: str) -> bool:
    return _autocast_available(device_type) and torch.is_autocast_enabled(device_type)


_AUTOCAST_AVAILABLE: dict = {}


def _autocast_available(device_type: str) -> bool:
    available = _AUTOCAST_AVAILABLE.get(device_type)
    if available is None:
        available = _AUTOCAST_AVAILABLE[device_type] = \
            torch.amp.is_autocast_available(device_type)
    return available


def _autocast_off(device_type: str):
    """A context without autocast for the torch path's own dtype handling (nothing to switch
    off, and no autocast context to enter, where autocast is not on)."""
    if _autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _mask_for_kernels(key_padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    return None if key_padding_mask is None else last_dim_contiguous(key_padding_mask)


def run_diff_attention(q, k, v, lambda_, backend, *, causal=False, key_padding_mask=None,
                       scale=None, norm_weight=None, eps=1e-5, out_scale=1.0, dropout_p=0.0,
                       attn_mask=None, window_size=None, return_lse=False, **score_options):
    """diff_attention without the argument checks: for callers whose inputs are already known
    to be right (DiffMultiheadAttention). ``backend`` is "triton" or "torch" (resolved);
    ``lambda_`` may also be LambdaVectors (a layer's lambda vectors, fp32 contiguous).
    return_lse: (out, lse (B, 2H, N)) as diff_attention's return_softmax_lse.
    ``score_options``: the call's score options by name (AttentionCall fields), for both
    paths."""
    return _run_dense(q, k, v, lambda_, backend, v2=False, causal=causal,
                      key_padding_mask=key_padding_mask, scale=scale, norm_weight=norm_weight,
                      eps=eps, out_scale=out_scale, dropout_p=dropout_p, attn_mask=attn_mask,
                      window_size=window_size, return_lse=return_lse, **score_options)


def run_diff_attention_v2(q, k, v, lambda_, backend, *, causal=False, key_padding_mask=None,
                          scale=None, dropout_p=0.0, attn_mask=None, window_size=None,
                          return_lse=False, **score_options):
    """diff_attention_v2 without the argument checks; ``backend`` "triton" or "torch";
    return_lse and ``score_options`` as in run_diff_attention."""
    return _run_dense(q, k, v, lambda_, backend, v2=True, causal=causal,
                      key_padding_mask=key_padding_mask, scale=scale, norm_weight=None,
                      eps=1e-5, out_scale=1.0, dropout_p=dropout_p, attn_mask=attn_mask,
                      window_size=window_size, return_lse=return_lse, **score_options)


def _run_dense(q, k, v, lambda_, backend, *, v2: bool, causal, key_padding_mask, scale,
               norm_weight, eps, out_scale, dropout_p, attn_mask, window_size, return_lse,
               **score_options):
    """run_diff_attention, or run_diff_attention_v2 with ``v2``: autocast, then the fused
    kernels or the torch path."""
    q, k, v = _autocast(q, k, v)
    d = q.shape[3]
    scale = d ** -0.5 if scale is None else float(scale)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if backend == "triton":
        lam, lam_value, vectors = kernel_lambda(lambda_, acc_dtype, q.device)
        call = AttentionCall.create(scale, causal=causal, window_size=window_size,
                                    lam_value=lam_value, lam_vectors=vectors, eps=eps,
                                    out_scale=out_scale, **score_options)
        result = fused_attention(q, k, v, lam, _mask_for_kernels(key_padding_mask), norm_weight,
                                 call, return_lse=return_lse)
        return (result[0], fused_lse(result[1], lse_dtype(q))) if return_lse else result
    if _autocast_enabled(q.device.type):  # the torch path handles its dtypes: autocast off
        with torch.autocast(q.device.type, enabled=False):
            return _run_dense(q, k, v, lambda_, backend, v2=v2, causal=causal,
                              key_padding_mask=key_padding_mask, scale=scale,
                              norm_weight=norm_weight, eps=eps, out_scale=out_scale,
                              dropout_p=dropout_p, attn_mask=attn_mask,
                              window_size=window_size, return_lse=return_lse, **score_options)
    if v2:
        out = diff_attention_v2_torch(q, k, v, lambda_, causal=causal,
                                      key_padding_mask=key_padding_mask, scale=scale,
                                      dropout_p=dropout_p, attn_bias=attn_mask,
                                      window_size=window_size, **score_options)
    else:
        lam = expand_lambda(lambda_, q.shape[2] // 2, acc_dtype, q.device)
        out = diff_attention_torch(q, k, v, lam, causal=causal,
                                   key_padding_mask=key_padding_mask, scale=scale,
                                   norm_weight=norm_weight, eps=eps, out_scale=out_scale,
                                   dropout_p=dropout_p, attn_bias=attn_mask,
                                   window_size=window_size, **score_options)
    if not return_lse:
        return out
    return out, softmax_lse_torch(q, k, key_pair=not v2, scale=scale, causal=causal,
                                  key_padding_mask=key_padding_mask, attn_bias=attn_mask,
                                  window_size=window_size, **score_options)


# ------------------------------------------------------------------ public API
def _check_options_and_backend(q, k, backend, return_softmax_lse, attn_mask, dropout_p,
                               softcap) -> str:
    """The checks diff_attention and diff_attention_v2 share after their tensors' checks, and
    the backend that runs the call."""
    check_return_lse(return_softmax_lse)
    check_attn_mask(attn_mask, q, k)
    check_dropout(dropout_p)
    check_softcap(softcap)
    return resolve_backend(backend, q.device, q.dtype, q.shape[3],
                           unsupported_features(dropout_p, attn_mask))


def _check_packed_options(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          return_softmax_lse, softcap) -> Tuple[Tensor, Tensor]:
    """The checks diff_attention_varlen and diff_attention_v2_varlen share after their tensors'
    checks; returns the offsets as check_varlen_args does."""
    check_return_lse(return_softmax_lse)
    check_softcap(softcap)
    return check_varlen_args(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


def diff_attention(q: Tensor, k: Tensor, v: Tensor, *,
                   lambda_: Optional[Union[float, Tensor]] = None, causal: bool = False,
                   key_padding_mask: Optional[Tensor] = None,
                   scale: Optional[float] = None, norm_weight: Optional[Tensor] = None,
                   eps: float = 1e-5, out_scale: float = 1.0, dropout_p: float = 0.0,
                   attn_mask: Optional[Tensor] = None,
                   window_size: Optional[Tuple[int, int]] = None, softcap: float = 0.0,
                   lambda_vectors: Optional[Tensor] = None, lambda_init: Optional[float] = None,
                   rms_norm: Optional[bool] = None, return_softmax_lse: bool = False,
                   backend: str = "auto"):
    """Differential attention (V1 / DiffCLIP), fused:
    softmax(s q1 k1^T) v - lambda softmax(s q2 k2^T) v, then the optional per-head RMSNorm.

    Args:
        q: (B, N, 2H, d). k: (B, M, 2Hk, d). v: (B, M, Hk, 2d). H % Hk == 0.
        lambda_: float, 0-dim tensor or (H,) tensor; differentiable when a tensor; finite.
            Required unless lambda_vectors is given (the two are mutually exclusive).
        causal: query i sees keys j <= i + (M - N): the diagonal is aligned to the bottom-right
            corner (FlashAttention's rule). For N == M this is j <= i; when N > M the first
            N - M queries see no key and give zeros.
        key_padding_mask: (B, M) bool, True = ignore that key (nn.MultiheadAttention's
            convention). A query that sees no key at all gives zeros (and zero gradients).
        scale: softmax scale, default d ** -0.5.
        norm_weight: (2d,) switches on the per-head RMSNorm epilogue of DiffCLIP:
            y = x * rsqrt(mean(x^2) + eps) * norm_weight * out_scale, computed in fp32.
            Without it, y = x * out_scale. eps > 0 and out_scale must be finite.
        dropout_p: attention dropout, applied to both maps before the difference (torch
            backend only: the fused kernels refuse it).
        attn_mask: bool (True = masked out) or additive float mask, (N, M) or 4-D
            broadcastable to (B, 2H, N, M), per q head (torch backend only).
        window_size: (left, right), local attention: query i sees keys j with
            i + (M - N) - left <= j <= i + (M - N) + right (FlashAttention's rule); -1 leaves
            that side unbounded; with causal, right is 0. None or (-1, -1): no window. The
            fused kernels skip the key tiles outside the window.
        softcap: logit soft-capping (flash-attn's softcap): the scaled scores s = scale * q . k
            become softcap * tanh(s / softcap) before the softmax; 0 (default) is off. The
            torch backend computes a capped call from the materialised maps (SDPA cannot cap).
        lambda_vectors: (4, d) floating tensor, the rows lq1, lk1, lq2, lk2 of the
            Differential Transformer's lambda, exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init,
            shared by all heads; computed by the kernels (as DiffMultiheadAttention does),
            differentiable into lambda_vectors. Needs lambda_init (a finite float).
        rms_norm: None (default): the RMSNorm epilogue runs when norm_weight is given.
            True: it runs, weightless (weight 1) unless norm_weight is given. False: no norm
            (a norm_weight is then refused).
        return_softmax_lse: also return each softmax map's log-sum-exp (see Returns).
        backend: "auto" | "triton" | "torch" (see diffattn.backend).
    Returns:
        (B, N, H, 2d) in q's dtype (the autocast dtype under autocast); fp32 accumulation.
        With return_softmax_lse, (out, lse): lse (B, 2H, N) float32 (float64 for float64
        inputs), row 2h + a the natural log-sum-exp of map a of head h's scaled scores over
        the keys its query sees (flash-attn's layout and convention: +inf where a query sees
        no key); not differentiable. attn_mask, where given, is part of the scores.
    """
    check_backend_name(backend)
    lam_check = 0.0 if lambda_ is None or lambda_vectors is not None else lambda_
    check_diff_attention_args(q, k, v, lam_check, key_padding_mask, norm_weight, scale, causal,
                              eps, out_scale, window_size)
    lambda_ = resolve_lambda_vectors(lambda_, lambda_vectors, lambda_init, q)
    norm_weight = resolve_rms_norm(norm_weight, rms_norm, v.shape[3], q)
    chosen = _check_options_and_backend(q, k, backend, return_softmax_lse, attn_mask, dropout_p,
                                        softcap)
    return _run_dense(q, k, v, lambda_, chosen, v2=False, causal=causal,
                      key_padding_mask=key_padding_mask, scale=scale, norm_weight=norm_weight,
                      eps=eps, out_scale=out_scale, dropout_p=dropout_p, attn_mask=attn_mask,
                      window_size=window_size, return_lse=return_softmax_lse, softcap=softcap)


def diff_attention_v2(q: Tensor, k: Tensor, v: Tensor, *, lambda_: Union[float, Tensor],
                      causal: bool = False, key_padding_mask: Optional[Tensor] = None,
                      scale: Optional[float] = None, dropout_p: float = 0.0,
                      attn_mask: Optional[Tensor] = None,
                      window_size: Optional[Tuple[int, int]] = None, softcap: float = 0.0,
                      return_softmax_lse: bool = False, backend: str = "auto"):
    """Differential attention V2 (Differential Transformer V2), fused:
    out[:, :, h] = softmax(s q_2h k_g^T) v_g - lambda softmax(s q_2h+1 k_g^T) v_g.

    The two maps of differential head h are q heads 2h and 2h+1, which share the key head and
    value head g = h // (H // Hk) of their group; each key and value tile is read once for both
    maps and the pair's two outputs are never materialised.

    Args:
        q: (B, N, 2H, d). k: (B, M, Hk, d). v: (B, M, Hk, d). H % Hk == 0.
        lambda_: float, 0-dim tensor, (H,) or per token (B, N, H); differentiable when a
            tensor. It multiplies directly (DiffMultiheadAttentionV2 applies the sigmoid).
        causal, key_padding_mask, scale, window_size, softcap, backend: as in
            diff_attention.
        dropout_p, attn_mask: as in diff_attention (torch backend only); attn_mask per q head,
            broadcastable to (B, 2H, N, M).
        return_softmax_lse: also return each softmax map's log-sum-exp, as in diff_attention.
    Returns:
        (B, N, H, d) in q's dtype (the autocast dtype under autocast); fp32 accumulation.
        With return_softmax_lse, (out, lse (B, 2H, N)) as in diff_attention.
    """
    check_backend_name(backend)
    check_diff_attention_v2_args(q, k, v, lambda_, key_padding_mask, scale, causal, window_size)
    chosen = _check_options_and_backend(q, k, backend, return_softmax_lse, attn_mask, dropout_p,
                                        softcap)
    return _run_dense(q, k, v, lambda_, chosen, v2=True, causal=causal,
                      key_padding_mask=key_padding_mask, scale=scale, norm_weight=None,
                      eps=1e-5, out_scale=1.0, dropout_p=dropout_p, attn_mask=attn_mask,
                      window_size=window_size, return_lse=return_softmax_lse, softcap=softcap)


def diff_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                          cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                          lambda_: Optional[Union[float, Tensor]] = None, causal: bool = False,
                          window_size: Optional[Tuple[int, int]] = None,
                          scale: Optional[float] = None, norm_weight: Optional[Tensor] = None,
                          eps: float = 1e-5, out_scale: float = 1.0, softcap: float = 0.0,
                          lambda_vectors: Optional[Tensor] = None,
                          lambda_init: Optional[float] = None, rms_norm: Optional[bool] = None,
                          return_softmax_lse: bool = False, backend: str = "auto"):
    """diff_attention (V1 / DiffCLIP) over packed variable-length sequences, as flash-attn's
    varlen functions take them: sequence b is rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1
    of q and rows cu_seqlens_k[b] .. cu_seqlens_k[b + 1] - 1 of k and v.

    Everything after max_seqlen_k is keyword-only (where flash_attn_varlen_func takes
    dropout_p, a positional argument is a TypeError).

    Args:
        q: (total_q, 2H, d). k: (total_k, 2Hk, d). v: (total_k, Hk, 2d). H % Hk == 0.
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) cumulative offsets, from 0 to total_q /
            total_k, non-decreasing; zero-length sequences are allowed. Any layout (a strided
            or expanded view is copied to a contiguous one before it is checked and read).
        max_seqlen_q, max_seqlen_k: ints, the longest query / key sequence (or more): the fused
            grid is sized from them, so the offsets are never read on the host.
        lambda_: float, 0-dim tensor or (H,) tensor; differentiable when a tensor. Required
            unless lambda_vectors is given.
        causal, window_size: per sequence, as in diff_attention: query i of a sequence of Nq
            queries and Nk keys sees keys j <= i + Nk - Nq (bottom-right). A query that sees
            no key gives zeros.
        scale, norm_weight, eps, out_scale, softcap, lambda_vectors, lambda_init, rms_norm,
            backend: as in diff_attention.
        return_softmax_lse: also return each softmax map's log-sum-exp (see Returns).
    Returns:
        (total_q, H, 2d) in q's dtype. With return_softmax_lse, (out, lse): lse (2H, total_q)
        float32 (float64 for float64 inputs), as flash-attn's varlen functions lay it out, with
        diff_attention's convention (+inf where a query sees no key); not differentiable.
    """
    check_backend_name(backend)
    check_packed("q", q, "2 * heads", "head_dim")
    check_packed("k", k, "2 * kv_heads", "head_dim")
    check_packed("v", v, "kv_heads", "2 * head_dim")
    if isinstance(lambda_, Tensor) and lambda_.dim() > 1:
        raise ValueError(f"lambda_ must be a float, a 0-dim tensor or (H,) tensor, got "
                         f"{tuple(lambda_.shape)}")
    lam_check = 0.0 if lambda_ is None or lambda_vectors is not None else lambda_
    check_diff_attention_args(q[None], k[None], v[None], lam_check, None, norm_weight, scale,
                              causal, eps, out_scale, window_size)
    lambda_ = resolve_lambda_vectors(lambda_, lambda_vectors, lambda_init, q)
    norm_weight = resolve_rms_norm(norm_weight, rms_norm, v.shape[2], q)
    cu_seqlens_q, cu_seqlens_k = _check_packed_options(q, k, cu_seqlens_q, cu_seqlens_k,
                                                       max_seqlen_q, max_seqlen_k,
                                                       return_softmax_lse, softcap)
    return _run_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       lambda_, backend, causal=causal, window_size=window_size, scale=scale,
                       norm_weight=norm_weight, eps=eps, out_scale=out_scale, v2=False,
                       return_lse=return_softmax_lse, softcap=softcap)


def _run_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, lambda_,
                backend, *, causal, window_size, scale, norm_weight, eps, out_scale,
                v2: bool, return_lse: bool = False, **score_options):
    """The packed call after its checks: the backend, autocast, then the fused kernels (one
    launch over every sequence) or the torch path (V1 or V2 by ``v2``); with return_lse,
    (out, lse (2H, total_q)); ``score_options`` as in run_diff_attention."""
    chosen = resolve_backend(backend, q.device, q.dtype, q.shape[2], unsupported_features(0.0,
                                                                                         None))
    q, k, v = _autocast(q, k, v)
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if chosen == "triton":
        lam, lam_value, vectors = kernel_lambda(lambda_, acc_dtype, q.device)
        call = AttentionCall.create(scale, causal=causal, window_size=window_size,
                                    lam_value=lam_value, lam_vectors=vectors, eps=eps,
                                    out_scale=out_scale, max_seqlens=(max_seqlen_q, max_seqlen_k),
                                    **score_options)
        result = fused_attention(q, k, v, lam, None, norm_weight, call, cu_seqlens_q,
                                 cu_seqlens_k, return_lse=return_lse)
        if not return_lse:
            return result
        return result[0], fused_lse_varlen(result[1], cu_seqlens_q, q.shape[0], lse_dtype(q))
    with _autocast_off(q.device.type):
        if v2:
            out = diff_attention_v2_varlen_torch(q, k, v, lambda_, cu_seqlens_q, cu_seqlens_k,
                                                 max_seqlen_q, max_seqlen_k, causal=causal,
                                                 scale=scale, window_size=window_size,
                                                 **score_options)
        else:
            lam = expand_lambda(lambda_, q.shape[1] // 2, acc_dtype, q.device)
            out = diff_attention_varlen_torch(q, k, v, lam, cu_seqlens_q, cu_seqlens_k,
                                              max_seqlen_q, max_seqlen_k, causal=causal,
                                              scale=scale, norm_weight=norm_weight, eps=eps,
                                              out_scale=out_scale, window_size=window_size,
                                              **score_options)
        if not return_lse:
            return out
        return out, softmax_lse_varlen_torch(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                             max_seqlen_k, key_pair=not v2, scale=scale,
                                             causal=causal, window_size=window_size,
                                             **score_options)


def diff_attention_v2_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                             cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                             lambda_: Union[float, Tensor], causal: bool = False,
                             window_size: Optional[Tuple[int, int]] = None,
                             scale: Optional[float] = None, softcap: float = 0.0,
                             return_softmax_lse: bool = False, backend: str = "auto"):
    """diff_attention_v2 over packed variable-length sequences (see diff_attention_varlen;
    everything after max_seqlen_k is keyword-only).

    Args:
        q: (total_q, 2H, d). k, v: (total_k, Hk, d). H % Hk == 0.
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k: as in diff_attention_varlen.
        lambda_: float, 0-dim tensor, (H,) or per token (total_q, H); differentiable when a
            tensor. Keyword-only, required.
        causal, window_size, scale, softcap, return_softmax_lse, backend: as in
            diff_attention_varlen.
    Returns:
        (total_q, H, d) in q's dtype; with return_softmax_lse, (out, lse (2H, total_q)) as in
        diff_attention_varlen.
    """
    check_backend_name(backend)
    check_packed("q", q, "2 * heads", "head_dim")
    check_packed("k", k, "kv_heads", "head_dim")
    check_packed("v", v, "kv_heads", "head_dim")
    lam_check = lambda_
    if isinstance(lambda_, Tensor) and lambda_.dim() > 2:
        raise ValueError(f"lambda_ must be a float, a 0-dim tensor, (H,) or per token "
                         f"(total_q, H), got shape {tuple(lambda_.shape)}")
    if isinstance(lambda_, Tensor) and lambda_.dim() == 2:
        if isinstance(q, Tensor) and tuple(lambda_.shape) != (q.shape[0], q.shape[1] // 2):
            raise ValueError(f"lambda_ per token must have shape (total_q, H) = "
                             f"{(q.shape[0], q.shape[1] // 2)}, got {tuple(lambda_.shape)}")
        lam_check = lambda_[None]
    check_diff_attention_v2_args(q[None], k[None], v[None], lam_check, None, scale, causal,
                                 window_size)
    cu_seqlens_q, cu_seqlens_k = _check_packed_options(q, k, cu_seqlens_q, cu_seqlens_k,
                                                       max_seqlen_q, max_seqlen_k,
                                                       return_softmax_lse, softcap)
    return _run_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       lambda_, backend, causal=causal, window_size=window_size, scale=scale,
                       norm_weight=None, eps=1e-5, out_scale=1.0, v2=True,
                       return_lse=return_softmax_lse, softcap=softcap)
