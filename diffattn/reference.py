"""Plain-math differential attention: the readable references every fused path is tested against.

They materialise both (N x M) softmax maps, so they are slow and memory hungry, but they are
written straight from the formulas (docs/kernel-math.md) and run in any dtype, float64
included, which makes them the ground truth of the test suite. They import nothing from the
runtime they check: their masks, lambda and norm are re-derived here from the formulas. The
runtime may import from here: ``differential_maps`` is also the torch path's materialised
scores and the layers' attention weights.

Layouts (flash-attn style, batch first); differential head h reads key/value group
g = h // (H // Hk), and q heads 2h and 2h+1 are its two maps:

    Differential Transformer V1 / DiffCLIP (``diff_attention_ref``)
        q (B, N, 2H, d), k (B, M, 2Hk, d) (key heads 2g, 2g+1 of group g), v (B, M, Hk, 2d),
        lambda a float, () or (H,); out (B, N, H, 2d), optionally RMS-normalised per head.
    Differential Transformer V2 (``diff_attention_v2_ref``)
        q (B, N, 2H, d), k (B, M, Hk, d) (one key head per group, shared by both maps),
        v (B, M, Hk, d), lambda a float, (), (H,) or (B, N, H) (per token); out (B, N, H, d).
"""
from __future__ import annotations

import math

import torch


def _causal_keep(seq_q: int, seq_k: int, device) -> torch.Tensor:
    """(N, M) bool, True where query i sees key j: j <= i + (M - N) (bottom-right diagonal)."""
    i = torch.arange(seq_q, device=device)[:, None]
    j = torch.arange(seq_k, device=device)[None, :]
    return j - i <= seq_k - seq_q


def _lambda_for_maps(lambda_, num_heads: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A float, (), (H,) or (B, N, H) lambda as a tensor broadcastable to (B, H, N, M)."""
    lam = torch.as_tensor(lambda_, dtype=dtype, device=device)
    if lam.dim() == 3:                                   # per token (B, N, H)
        return lam.permute(0, 2, 1)[..., None]
    return lam.reshape(-1).expand(num_heads)[None, :, None, None]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_scale: float):
    """Per-head RMSNorm over the last dim times weight and out_scale, in float32 (float64 for
    float64 inputs), cast back to x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    rms = torch.sqrt((xf * xf).mean(-1, keepdim=True) + eps)
    return (xf / rms * weight.to(compute) * out_scale).to(x.dtype)


def masked_scores(scores, keep, *, softcap=0.0, key_padding_mask=None, attn_bias=None):
    """(scores, keep) of scaled scores (B, 2H, N, M) and their keep mask (True where a score
    counts, broadcastable to the scores): softcap > 0 caps the scores (softcap * tanh(s /
    softcap)); key_padding_mask (B, M) bool (True = ignore) and a bool attn_bias (True =
    masked out) narrow keep; a float attn_bias is added to the scores, its -inf entries
    leaving keep."""
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if key_padding_mask is not None:
        keep = keep & ~key_padding_mask[:, None, None, :]
    if attn_bias is not None:
        if attn_bias.dtype == torch.bool:
            keep = keep & ~attn_bias
        else:
            scores = scores + attn_bias
            keep = keep & ~torch.isneginf(attn_bias)
    return scores, keep


def differential_maps(q, k, *, lambda_, causal=False, key_padding_mask=None, scale=None,
                      attn_bias=None, softcap=0.0):
    """Both softmax maps and their difference, each (B, H, N, M), in q's dtype: the one
    materialised form of the attention scores, used by the references below, by the torch
    path where SDPA cannot express the scores, and by the layers' need_weights.

    q (B, N, 2H, d), k (B, M, 2Hk, d) (key heads 2g, 2g+1 of group g; V2 passes its keys
    repeated as pairs); lambda_ a float, (), (H,) or (B, N, H). key_padding_mask (B, M) bool,
    True = ignore: padding keys get probability exactly 0 whatever their values (their rows
    are read as 0). attn_bias, if given, is an additive float (or bool, True = masked out)
    bias broadcastable to (B, 2H, N, M), applied to the scores of every q/k head before the
    softmax (the layers fold a local window into it). softcap > 0 caps the scaled scores s
    first: s becomes softcap * tanh(s / softcap). Rows with no visible key are all zeros.
    """
    B, N, H2, d = q.shape
    M, Hk2 = k.shape[1], k.shape[2]
    H, Hk = H2 // 2, Hk2 // 2
    scale = d ** -0.5 if scale is None else scale
    if key_padding_mask is not None:
        k = k.masked_fill(key_padding_mask[:, :, None, None], 0.0)
    # Repeat each key group's pair of heads for the H // Hk differential heads that read it.
    k_heads = k.reshape(B, M, Hk, 2, d).repeat_interleave(H // Hk, dim=2).reshape(B, M, H2, d)
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k_heads) * scale
    keep = torch.ones(N, M, dtype=torch.bool, device=q.device)
    if causal:
        keep = _causal_keep(N, M, q.device)
    scores, keep = masked_scores(scores, keep.expand(B, H2, N, M), softcap=softcap,
                                 key_padding_mask=key_padding_mask, attn_bias=attn_bias)
    scores = scores.masked_fill(~keep, -math.inf)
    row_has_key = keep.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~row_has_key, 0.0), dim=-1) * row_has_key
    a1, a2 = probs[:, 0::2], probs[:, 1::2]
    return a1, a2, a1 - _lambda_for_maps(lambda_, H, q.dtype, q.device) * a2


def diff_attention_ref(q, k, v, lambda_, *, causal=False, key_padding_mask=None, scale=None,
                       norm_weight=None, eps=1e-5, out_scale=1.0, attn_bias=None, softcap=0.0):
    """Differential attention by explicit matmuls and softmax (materialises the maps).

    Returns (B, N, H, 2d) in q's dtype. Same arguments and semantics as
    :func:`diffattn.diff_attention`; ``norm_weight`` switches on the per-head RMSNorm epilogue
    (y = rmsnorm(x) * norm_weight * out_scale); without it the output is x * out_scale.
    """
    B, N, H2, d = q.shape
    Hk = v.shape[2]
    H = H2 // 2
    *_, diff = differential_maps(q, k, lambda_=lambda_, causal=causal,
                                 key_padding_mask=key_padding_mask, scale=scale,
                                 attn_bias=attn_bias, softcap=softcap)
    v_heads = v.repeat_interleave(H // Hk, dim=2)  # (B, M, H, 2d)
    x = torch.einsum("bhnm,bmhe->bnhe", diff, v_heads)
    if norm_weight is None:
        return x * out_scale
    return _rms_norm(x, norm_weight, eps, out_scale)


def diff_attention_v2_ref(q, k, v, lambda_, *, causal=False, key_padding_mask=None, scale=None,
                          softcap=0.0):
    """Differential Transformer V2 by explicit matmuls and softmax (materialises the maps).

    q (B, N, 2H, d), k (B, M, Hk, d), v (B, M, Hk, d), H % Hk == 0; lambda_ a float, (), (H,)
    or (B, N, H). out[:, :, h] = softmax(s q_2h k_g^T) v_g - lambda softmax(s q_2h+1 k_g^T) v_g
    with g = h // (H // Hk): (B, N, H, d) in q's dtype. No norm, no output scale. softcap as
    in differential_maps.
    """
    H, Hk = q.shape[2] // 2, k.shape[2]
    # Both maps of a pair read their group's single key head: as a V1 key pair, it is repeated.
    *_, diff = differential_maps(q, k.repeat_interleave(2, dim=2), lambda_=lambda_,
                                 causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                                 softcap=softcap)
    return torch.einsum("bhnm,bmhe->bnhe", diff, v.repeat_interleave(H // Hk, dim=2))
