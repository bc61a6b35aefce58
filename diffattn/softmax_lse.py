"""The softmax log-sum-exp of every map, the second result of ``return_softmax_lse=True``.

One row per softmax map in q-head order, flash-attn's layouts: (B, 2H, N) for the padded
layout, (2H, total_q) for packed sequences; natural log of the sum of exp(s) over the keys the
query sees, s the scores the softmax sees (scale * q.k, soft-capped with softcap, plus an
additive mask); +inf for a row that sees no key (flash-attn's convention: exp(s - lse) is then
0 for every score s). Not differentiable.

The fused kernels compute it in their forward (base 2, (B, H, 2, N), see
diffattn/kernels/diff_attn_fwd.py); ``fused_lse`` and ``fused_lse_varlen`` put it in these
layouts. The torch path materialises the scores instead (``softmax_lse_torch``,
``softmax_lse_varlen_torch``). Nothing here reads tensor values on the host.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .reference import masked_scores
from .torch_path import pad_packed, unpad_packed, window_keep_mask

LN2 = math.log(2.0)


def lse_dtype(q: Tensor) -> torch.dtype:
    """float32 for every input dtype, as flash-attn returns it (and the KV-cache ops)."""
    return torch.float32


def fused_lse(lse2: Tensor, dtype: torch.dtype) -> Tensor:
    """The fused forward's base-2 row statistics (B, H, 2, N) as (B, 2H, N) natural logs:
    map a of differential head h is q head 2h + a."""
    B, H, _, N = lse2.shape
    return (lse2.reshape(B, 2 * H, N) * LN2).to(dtype)


def fused_lse_varlen(lse2: Tensor, cu_seqlens_q: Tensor, total_q: int,
                     dtype: torch.dtype) -> Tensor:
    """The fused forward's packed row statistics (B, H, 2, max_seqlen_q), row i of sequence b
    at index i, as (2H, total_q) natural logs, column t for packed query row t."""
    B, H, _, N = lse2.shape
    offsets = cu_seqlens_q.long()
    token = torch.arange(total_q, device=lse2.device)
    seq = torch.searchsorted(offsets[1:], token, right=True).clamp_max(max(B - 1, 0))
    row = (token - offsets[seq]).clamp(0, max(N - 1, 0))
    rows = lse2.reshape(B, 2 * H, N).transpose(1, 2).reshape(B * N, 2 * H)[seq * N + row]
    return (rows.t() * LN2).to(dtype).contiguous()


@torch.no_grad()
def softmax_lse_torch(q: Tensor, k: Tensor, *, key_pair: bool, scale: float,
                      causal: bool = False, key_padding_mask: Optional[Tensor] = None,
                      attn_bias: Optional[Tensor] = None, window_size=None,
                      softcap: float = 0.0) -> Tensor:
    """(B, 2H, N) log-sum-exp of each map's scores, from the materialised (B, 2H, N, M) scores
    in float32 (computed in float64 for float64 inputs).

    q (B, N, 2H, d). k (B, M, 2Hk, d) with key_pair (V1: q head 2h + a reads key head
    2g + a) or (B, M, Hk, d) (V2: both maps read key head g), g = h // (H // Hk).
    causal, window_size, key_padding_mask (B, M) True = ignore: as in diff_attention.
    attn_bias: bool (True = masked out) or additive float, broadcastable to (B, 2H, N, M).
    softcap > 0: the scores are the soft-capped ones, softcap * tanh(s / softcap) (the
    softmax's own input, as flash-attn's lse).
    """
    B, N, H2, d = q.shape
    M = k.shape[1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    if key_pair:
        Hk = k.shape[2] // 2
        k_heads = k.reshape(B, M, Hk, 2, d).repeat_interleave(H2 // 2 // Hk, dim=2)
        k_heads = k_heads.reshape(B, M, H2, d)
    else:
        k_heads = k.repeat_interleave(H2 // k.shape[2], dim=2)
    scores = torch.einsum("bnhd,bmhd->bhnm", q.to(compute), k_heads.to(compute)) * scale
    keep = window_keep_mask(N, M, window_size, causal, q.device)
    keep = torch.ones(N, M, dtype=torch.bool, device=q.device) if keep is None else keep
    if attn_bias is not None and attn_bias.is_floating_point():
        attn_bias = attn_bias.to(compute)
    scores, keep = masked_scores(scores, keep[None, None], softcap=softcap,
                                 key_padding_mask=key_padding_mask, attn_bias=attn_bias)
    lse = torch.logsumexp(scores.masked_fill(~keep, -math.inf), dim=-1)
    return lse.masked_fill(torch.isneginf(lse), math.inf).to(lse_dtype(q))


def softmax_lse_varlen_torch(q: Tensor, k: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                             max_seqlen_q: int, max_seqlen_k: int, *, key_pair: bool,
                             scale: float, causal: bool = False, window_size=None,
                             softcap: float = 0.0) -> Tensor:
    """(2H, total_q) log-sum-exp over packed sequences: q (total_q, 2H, d), k (total_k, 2Hk,
    d) with key_pair, else (total_k, Hk, d); each sequence padded right-aligned (its causal
    diagonal and window are then the padded layout's), softmax_lse_torch (softcap as there),
    then unpadded."""
    N, M = max(max_seqlen_q, 1), max(max_seqlen_k, 1)
    qp, _ = pad_packed(q, cu_seqlens_q, N)
    kp, k_valid = pad_packed(k, cu_seqlens_k, M)
    lse = softmax_lse_torch(qp, kp, key_pair=key_pair, scale=scale, causal=causal,
                            key_padding_mask=~k_valid, window_size=window_size,
                            softcap=softcap)
    return unpad_packed(lse.transpose(1, 2), cu_seqlens_q, q.shape[0]).t().contiguous()
