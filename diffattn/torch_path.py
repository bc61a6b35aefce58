"""Differential attention from stock PyTorch ops: ``scaled_dot_product_attention`` and the
lambda difference, the way timm, Microsoft's "flashdiff" code and the Differential Transformer
V2 reference compose it. This is the ``backend="torch"`` path: it runs anywhere PyTorch runs,
supports what the fused kernels do not (dropout, arbitrary additive masks), and no step of it
waits for the device (no host synchronisation).

Layouts as in diffattn.functional:
    V1  q (B, N, 2H, d), k (B, M, 2Hk, d), v (B, M, Hk, 2d) -> (B, N, H, 2d): two SDPA calls
        (one per map), the difference and optionally the per-head RMSNorm.
    V2  q (B, N, 2H, d), k (B, M, Hk, d), v (B, M, Hk, d) -> (B, N, H, d): one SDPA call over
        the 2H q heads with grouped keys/values, then the difference of each head pair.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange

from .lambdas import lambda_for_maps
from .masks import causal_keep_mask
from .reference import differential_maps  # noqa: F401  (the materialised scores)


def rms_norm_epilogue(x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                      out_scale: float) -> torch.Tensor:
    """Per-head RMSNorm over the last dim, times the weight, times out_scale.

    Computed in float32 (float64 for float64 inputs) and cast back to x's dtype, as the
    DiffCLIP release does.
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.to(compute)
    return (y * out_scale).to(x.dtype)


def zero_padding_keys(t: torch.Tensor, key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """t (B, M, heads, dim) with the rows of padding keys (key_padding_mask (B, M), True =
    ignore) set to 0, so that a NaN or inf there reaches no output or gradient (a masked
    probability is 0, and 0 times NaN is NaN). Their gradient is 0."""
    if key_padding_mask is None:
        return t
    return t.masked_fill(key_padding_mask[:, :, None, None], 0.0)


def window_keep_mask(seq_q: int, seq_k: int, window_size, causal: bool = False,
                     device=None) -> Optional[torch.Tensor]:
    """Bool (N, M) mask, True where query i sees key j under a local window (left, right):
    i + (M - N) - left <= j <= i + (M - N) + right, -1 unbounded, right = 0 with causal.
    None when the window bounds nothing (no window, or (-1, -1) without causal)."""
    left, right = (-1, -1) if window_size is None else window_size
    if causal:
        right = 0
    if left < 0 and right < 0:
        return None
    diagonal = torch.arange(seq_q, device=device)[:, None] + (seq_k - seq_q)
    cols = torch.arange(seq_k, device=device)[None, :]
    keep = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device)
    if left >= 0:
        keep = keep & (cols >= diagonal - left)
    if right >= 0:
        keep = keep & (cols <= diagonal + right)
    return keep


def with_window(attn_bias: Optional[torch.Tensor], window_size, causal: bool, N: int, M: int,
                device) -> Optional[torch.Tensor]:
    """``attn_bias`` (None, bool True = masked out, or additive float) with the keys outside a
    local window (see diffattn.diff_attention's window_size) masked out too: for the paths
    that take a mask rather than a window (the materialised scores)."""
    keep = window_keep_mask(N, M, window_size, causal, device)
    if keep is None:
        return attn_bias
    if attn_bias is None:
        return ~keep
    if attn_bias.dtype == torch.bool:
        return attn_bias | ~keep
    return attn_bias.masked_fill(~keep, float("-inf"))


def _materialised_attention(q, k, v, lambda_, *, causal, key_padding_mask, scale, dropout_p,
                            attn_bias, window_size, score_options):
    """x = (A1 - lambda A2) v from the materialised maps (reference.differential_maps), for
    score options SDPA cannot express. q (B, N, 2H, d), k (B, M, 2Hk, d) (key pairs),
    v (B, M, Hk, DV); computed in float32 (float64 for float64 inputs); dropout_p applies to
    each map. Returns x (B, N, H, DV) in the compute dtype."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    N, M, H = q.shape[1], k.shape[1], q.shape[2] // 2
    bias = with_window(attn_bias, window_size, causal, N, M, q.device)
    a1, a2, diff = differential_maps(q.to(compute), k.to(compute), lambda_=lambda_,
                                     causal=causal, key_padding_mask=key_padding_mask,
                                     scale=scale, attn_bias=bias, **score_options)
    if dropout_p > 0.0:
        lam = lambda_for_maps(lambda_, H, compute, q.device)
        diff = F.dropout(a1, dropout_p) - lam * F.dropout(a2, dropout_p)
    v_heads = zero_padding_keys(v, key_padding_mask).to(compute)
    return torch.einsum("bhnm,bmhe->bnhe", diff, v_heads.repeat_interleave(H // v.shape[2], 2))


def _sdpa_masks(B, H2, N, M, device, dtype, causal, key_padding_mask, attn_bias,
                window_size=None):
    """Build what SDPA needs.

    Returns (bias, use_is_causal, row_valid): bias is a bool keep-mask or an additive float
    mask broadcastable to (B, 2H or 1, N, M) (None when nothing is masked); row_valid is a
    (B or 1, 2H or 1, N, 1) keep indicator for rows that see at least one key, or None when
    every row does by construction. Rows that see no key are unmasked for SDPA (which would
    return NaN there) and zeroed afterwards through row_valid, so their output and gradients
    are exactly 0. Nothing here reads tensor values on the host.
    """
    left, right = (-1, -1) if window_size is None else window_size
    window = None
    if left >= 0 or (right >= 0 and not causal):  # a band beyond causal's own bound
        window = window_keep_mask(N, M, window_size, causal, device)
        causal = False  # the band holds the causal bound too
    if attn_bias is None and key_padding_mask is None and window is None:
        if not causal:
            return None, False, None
        if N == M:
            return None, True, None
    keep = torch.ones(1, 1, N, M, dtype=torch.bool, device=device)
    if causal:
        keep = causal_keep_mask(N, M, device)[None, None]
    if window is not None:
        keep = window[None, None]
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
    # Causal masking alone with N <= M leaves every row at least key 0.
    alone = attn_bias is None and key_padding_mask is None and window is None and N <= M
    row_valid = None if alone else row_any
    if float_bias is None:
        bias = keep | ~row_any
    else:
        bias = float_bias.masked_fill(~keep, float("-inf")).masked_fill(~row_any, 0.0)
    return bias, False, row_valid


def _pair_maps(t, H2):
    """Split a per-q-head tensor (B, 2H or 1, ...) into the two maps' (B, H or 1, ...)."""
    if t is None or t.shape[1] != H2:
        return t, t
    return t[:, 0::2], t[:, 1::2]


def diff_attention_torch(q, k, v, lam: torch.Tensor, *, causal=False,
                         key_padding_mask: Optional[torch.Tensor] = None, scale=None,
                         norm_weight: Optional[torch.Tensor] = None, eps=1e-5, out_scale=1.0,
                         dropout_p=0.0, attn_bias: Optional[torch.Tensor] = None,
                         window_size=None, **score_options):
    """V1: two SDPA calls and the difference. lam is (H,) (fp32, fp64 for fp64 inputs).

    attn_bias: bool (True = masked out) or additive float, broadcastable to (B, 2H, N, M).
    window_size: (left, right) local attention (see window_keep_mask).
    dropout_p is applied to each map separately, before the difference (as in DiffCLIP).
    score_options: the call's score options (keywords of reference.differential_maps beyond
    its masks); any that is set (non-zero) is computed from the materialised maps instead of
    SDPA.
    """
    B, N, H2, d = q.shape
    M, Hk = v.shape[1], v.shape[2]
    H = H2 // 2
    if any(score_options.values()):  # scores SDPA cannot express: materialised
        x = _materialised_attention(q, k, v, lam, causal=causal,
                                    key_padding_mask=key_padding_mask, scale=scale,
                                    dropout_p=dropout_p, attn_bias=attn_bias,
                                    window_size=window_size, score_options=score_options)
        return _epilogue(x, norm_weight, eps, out_scale).to(q.dtype)
    k, v = zero_padding_keys(k, key_padding_mask), zero_padding_keys(v, key_padding_mask)
    q1, q2 = rearrange(q, "b n (h two) d -> two b h n d", two=2)
    k1, k2 = rearrange(k, "b m (g two) d -> two b g m d", two=2)
    vh = rearrange(v, "b m g e -> b g m e")
    if Hk != H:  # grouped-query attention: group g serves heads g*(H//Hk) ... (g+1)*(H//Hk)-1
        k1, k2, vh = (t.repeat_interleave(H // Hk, dim=1) for t in (k1, k2, vh))
    bias, is_causal, row_valid = _sdpa_masks(B, H2, N, M, q.device, q.dtype, causal,
                                             key_padding_mask, attn_bias, window_size)
    bias1, bias2 = _pair_maps(bias, H2)
    o1 = F.scaled_dot_product_attention(q1, k1, vh, attn_mask=bias1, dropout_p=dropout_p,
                                        is_causal=is_causal, scale=scale)
    o2 = F.scaled_dot_product_attention(q2, k2, vh, attn_mask=bias2, dropout_p=dropout_p,
                                        is_causal=is_causal, scale=scale)
    compute = lam.dtype
    x = o1.to(compute) - lam[:, None, None].to(compute) * o2.to(compute)
    if row_valid is not None:
        valid1, valid2 = _pair_maps(row_valid, H2)
        x = x * (valid1 & valid2)
    x = rearrange(x, "b h n e -> b n h e")
    return _epilogue(x, norm_weight, eps, out_scale).to(q.dtype)


def _epilogue(x, norm_weight, eps, out_scale):
    """x * out_scale, or the RMSNorm epilogue with a norm weight."""
    if norm_weight is None:
        return x * out_scale
    return rms_norm_epilogue(x, norm_weight, eps, out_scale)


def diff_attention_v2_torch(q, k, v, lambda_, *, causal=False,
                            key_padding_mask: Optional[torch.Tensor] = None, scale=None,
                            dropout_p=0.0, attn_bias: Optional[torch.Tensor] = None,
                            window_size=None, **score_options):
    """V2: one SDPA call over the 2H q heads (keys/values grouped), then map 2h minus lambda
    times map 2h+1. lambda_: a float, () or (H,) or (B, N, H) tensor. attn_bias: bool
    (True = masked out) or additive float, broadcastable to (B, 2H, N, M); dropout_p applies
    to every map. window_size: (left, right) local attention (see window_keep_mask).
    score_options: as in diff_attention_torch."""
    B, N, H2, d = q.shape
    M = k.shape[1]
    if any(score_options.values()):  # scores SDPA cannot express: materialised
        return _materialised_attention(q, k.repeat_interleave(2, dim=2), v, lambda_,
                                       causal=causal, key_padding_mask=key_padding_mask,
                                       scale=scale, dropout_p=dropout_p, attn_bias=attn_bias,
                                       window_size=window_size,
                                       score_options=score_options).to(q.dtype)
    k, v = zero_padding_keys(k, key_padding_mask), zero_padding_keys(v, key_padding_mask)
    bias, is_causal, row_valid = _sdpa_masks(B, H2, N, M, q.device, q.dtype, causal,
                                             key_padding_mask, attn_bias, window_size)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=bias, dropout_p=dropout_p, is_causal=is_causal,
                                       scale=scale, enable_gqa=k.shape[2] != H2)  # (B, 2H, N, d)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    lam = lambda_for_maps(lambda_, H2 // 2, compute, q.device)          # (B|1, H, N|1, 1)
    x = o[:, 0::2].to(compute) - lam * o[:, 1::2].to(compute)
    if row_valid is not None:
        valid1, valid2 = _pair_maps(row_valid, H2)
        x = x * (valid1 & valid2)
    return x.transpose(1, 2).to(q.dtype)


# ------------------------------------------------------------------ packed sequences
def pad_packed(t: torch.Tensor, cu_seqlens: torch.Tensor, length: int):
    """Packed rows t (total, ...) as a right-aligned padded batch (batch, length, ...):
    sequence b (rows cu_seqlens[b] .. cu_seqlens[b + 1] - 1) fills the LAST rows of its entry,
    so that the padded layout's bottom-right causal diagonal and window are each sequence's
    own. Returns (padded, valid (batch, length) bool); padding rows are 0. Nothing is read on
    the host."""
    total = t.shape[0]
    offsets = cu_seqlens.long()
    idx = offsets[1:, None] - length + torch.arange(length, device=t.device)[None, :]
    valid = idx >= offsets[:-1, None]
    extended = torch.cat([t, t.new_zeros((1, *t.shape[1:]))])  # row `total` reads as 0
    return extended[torch.where(valid, idx, total)], valid


def unpad_packed(padded: torch.Tensor, cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """The inverse of pad_packed: (batch, length, ...) right-aligned rows back to (total, ...)."""
    B, length = padded.shape[0], padded.shape[1]
    offsets = cu_seqlens.long()
    token = torch.arange(total, device=padded.device)
    seq = torch.searchsorted(offsets[1:], token, right=True).clamp_max(max(B - 1, 0))
    row = token - offsets[seq + 1] + length
    return padded.reshape(B * length, *padded.shape[2:])[seq * length + row]


def diff_attention_varlen_torch(q, k, v, lam: torch.Tensor, cu_seqlens_q, cu_seqlens_k,
                                max_seqlen_q: int, max_seqlen_k: int, *, causal=False,
                                scale=None, norm_weight=None, eps=1e-5, out_scale=1.0,
                                window_size=None, **score_options):
    """V1 over packed sequences: q (total_q, 2H, d), k (total_k, 2Hk, d), v (total_k, Hk, 2d)
    padded right-aligned (pad_packed), padding keys excluded through a key padding mask, then
    diff_attention_torch and the rows unpadded. lam (H,). -> (total_q, H, 2d)."""
    N, M = max(max_seqlen_q, 1), max(max_seqlen_k, 1)
    qp, _ = pad_packed(q, cu_seqlens_q, N)
    kp, k_valid = pad_packed(k, cu_seqlens_k, M)
    vp, _ = pad_packed(v, cu_seqlens_k, M)
    out = diff_attention_torch(qp, kp, vp, lam, causal=causal, key_padding_mask=~k_valid,
                               scale=scale, norm_weight=norm_weight, eps=eps,
                               out_scale=out_scale, window_size=window_size, **score_options)
    return unpad_packed(out, cu_seqlens_q, q.shape[0])


def diff_attention_v2_varlen_torch(q, k, v, lambda_, cu_seqlens_q, cu_seqlens_k,
                                   max_seqlen_q: int, max_seqlen_k: int, *, causal=False,
                                   scale=None, window_size=None, **score_options):
    """V2 over packed sequences (see diff_attention_varlen_torch): k, v (total_k, Hk, d);
    lambda_ a float, (), (H,) or per token (total_q, H). -> (total_q, H, d)."""
    N, M = max(max_seqlen_q, 1), max(max_seqlen_k, 1)
    qp, _ = pad_packed(q, cu_seqlens_q, N)
    kp, k_valid = pad_packed(k, cu_seqlens_k, M)
    vp, _ = pad_packed(v, cu_seqlens_k, M)
    if isinstance(lambda_, torch.Tensor) and lambda_.dim() == 2:
        lambda_ = pad_packed(lambda_, cu_seqlens_q, N)[0]
    out = diff_attention_v2_torch(qp, kp, vp, lambda_, causal=causal,
                                  key_padding_mask=~k_valid, scale=scale,
                                  window_size=window_size, **score_options)
    return unpad_packed(out, cu_seqlens_q, q.shape[0])
