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

from .lambdas import lambda_for_maps
from .masks import causal_keep_mask
from .reference import differential_maps  # noqa: F401  (the materialised scores)


def rms_norm_epilogue(x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                      out_scale: float) -> torch.Tensor:
    """Per-head RMSNorm over the last dim, times the weight, times out_scale.

    Computed in float32 (float64 for float64 inputs) and cast back to x's dtype, as the
    DiffCLIP release does: the mean square from one norm reduction, then two passes over x
    (written in place when nothing needs a gradient).
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = _cast(x, compute)
    weight = _cast(norm_weight, compute) * out_scale
    norm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)
    inv_rms = torch.rsqrt(norm.square() / x.shape[-1] + eps)
    if torch.is_grad_enabled() and (xf.requires_grad or weight.requires_grad):
        return _cast(xf * inv_rms * weight, x.dtype)
    out = torch.empty(x.shape, dtype=compute, device=x.device)  # (..., D) row-major
    return _cast(torch.mul(xf, inv_rms, out=out).mul_(weight), x.dtype)


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


def _value_halves(v: torch.Tensor, q: torch.Tensor, dropout_p: float) -> bool:
    """Whether to run each map as two SDPA calls over the value halves (B, Hk, M, d) instead
    of one over the full 2d width: PyTorch's fused CPU attention needs the value width equal
    to the query/key width and otherwise takes the unfused math kernel, which materialises
    the (N, M) scores. Only where nothing needs a gradient (inference, evaluation): the math
    kernel's backward is the one with second derivatives (gradient penalties) and the one
    that is right on rows masked by large finite values (transformers' additive masks), and
    not with dropout, whose mask must be the same for both halves."""
    return q.device.type == "cpu" and dropout_p == 0.0 and v.shape[3] == 2 * q.shape[3] \
        and not torch.is_grad_enabled()


def _heads(t: torch.Tensor, width: int):
    """t (B, S, heads, 2 * width) read as two strided views (B, heads, S, width) of its
    halves; q (B, N, 2H, d) read as (B, N, H, 2d) gives the maps' q heads 2h and 2h+1."""
    B, S, heads = t.shape[0], t.shape[1], t.shape[2] * t.shape[3] // (2 * width)
    return t.view(B, S, heads, 2, width).permute(3, 0, 2, 1, 4).unbind(0)


_MAP_DTYPES = (torch.float32, torch.float64)


def _materialise_maps(q, k, v, lam, dropout_p: float) -> bool:
    """Whether V1 runs as _maps_difference (V2: one query of one sequence as
    _one_query_difference_v2): on CPU, in float32 or float64, without dropout or anything
    that needs a gradient (eager), and either for more than one query without grouping
    where both maps together are no bigger than twice q, k and v (short sequences: the CLIP
    towers), or for one query of one sequence (a decoding step, grouped keys too).
    Then both maps cost one score GEMM and one softmax over the 2H heads, as plain
    attention's do, and one value GEMM over the difference (SDPA would need four calls: two
    maps, two value halves). ``lam``: a tensor in q's dtype, or (V2) a float."""
    B, N, H2, d = q.shape
    M = k.shape[1]
    shapes = N == 1 and B == 1 or N > 1 and k.shape[2] == H2 and N * M <= 2 * (N + 2 * M) * d
    is_tensor = isinstance(lam, torch.Tensor)
    return (q.is_cpu and q.dtype in _MAP_DTYPES and (not is_tensor or lam.dtype == q.dtype)
            and dropout_p == 0.0 and M > 0 and shapes and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (
                q.requires_grad or k.requires_grad or v.requires_grad
                or is_tensor and lam.requires_grad)))


def _maps_difference(q, k, v, lam: torch.Tensor, causal: bool, scale) -> torch.Tensor:
    """(A1 - lam A2) V with both softmax maps materialised: q (B, N, 2H, d), k (B, M, 2H, d),
    v (B, M, H, 2d), lam (1, H, 1, 1); causal only with N == M (every row sees a key).
    One (B, 2H, N, M) buffer holds the scores, the maps (softmax in place) and the
    difference (written over the first maps). Returns (B, N, H, 2d), a transposed view.
    One query of one sequence goes to _one_query_difference (grouped keys too)."""
    B, N, H2, d = q.shape
    M = k.shape[1]
    if N == 1 and B == 1:  # one key at most under causal: it sees every key
        return _one_query_difference(q, k, v, lam, scale)
    qs = q.transpose(1, 2).contiguous().mul_(d ** -0.5 if scale is None else scale)
    maps = torch.matmul(qs, k.transpose(1, 2).transpose(2, 3))           # (B, 2H, N, M)
    if causal:
        maps.masked_fill_(~causal_keep_mask(N, M, q.device), float("-inf"))
    torch.softmax(maps, -1, out=maps)
    diff = maps[:, 0::2].addcmul_(lam, maps[:, 1::2], value=-1.0)        # (B, H, N, M)
    return torch.matmul(diff, v.transpose(1, 2)).transpose(1, 2)


def _one_query_difference(q, k, v, lam: torch.Tensor, scale) -> torch.Tensor:
    """_maps_difference for one query of one sequence (a decoding step): q (1, 1, 2H, d),
    k (1, M, 2Hk, d), v (1, M, Hk, 2d), lam (1, H, 1, 1). Group g's r = H / Hk heads are the
    rows of one GEMV batch per map against the group's key (views of k, never repeated):
    scores (2Hk, r, M) from one batched GEMM, the maps in place, the difference over the
    first maps, one batched value GEMM. Returns (1, 1, H, 2d)."""
    B, N, H2, d = q.shape
    M, Hk = k.shape[1], v.shape[2]
    r = H2 // 2 // Hk
    qs = q.reshape(Hk, r, 2, d).transpose(1, 2).reshape(2 * Hk, r, d)     # (Hk * 2, r, d)
    maps = torch.bmm(qs, k[0].view(M, Hk, 2, d).permute(1, 2, 3, 0).reshape(2 * Hk, d, M))
    _softmax_scaled_(maps, d ** -0.5 if scale is None else scale)
    pairs = maps.view(Hk, 2, r, M)
    diff = pairs[:, 0].addcmul_(lam.view(Hk, r, 1), pairs[:, 1], value=-1.0)  # (Hk, r, M)
    return torch.bmm(diff, v[0].transpose(0, 1)).view(B, N, H2 // 2, v.shape[3])


def _one_query_difference_v2(q, k, v, lam, scale) -> torch.Tensor:
    """V2's _one_query_difference: q (1, 1, 2H, d), k (1, M, Hk, d), v (1, M, Hk, d), lam a
    float or a (), (H,) or (1, 1, H) tensor. Group g's 2r q heads (maps 1 and 2 of its
    r = H / Hk heads, in order) are the rows of one GEMV batch against the group's key head
    (a view of k): scores (Hk, 2r, M) from one batched GEMM, the maps in place, the
    difference over the first maps, one batched value GEMM. Returns (1, 1, H, d)."""
    B, N, H2, d = q.shape
    M, Hk = k.shape[1], k.shape[2]
    maps = torch.bmm(q.reshape(Hk, H2 // Hk, d), k[0].permute(1, 2, 0))     # (Hk, 2r, M)
    _softmax_scaled_(maps, d ** -0.5 if scale is None else scale)
    first, second = maps.view(Hk, H2 // Hk // 2, 2, M).unbind(2)           # (Hk, r, M) each
    if isinstance(lam, torch.Tensor):
        first.addcmul_(lam.reshape(Hk, -1, 1) if lam.numel() > 1 else lam.reshape(1, 1, 1),
                       second, value=-1.0)
    else:
        first.sub_(second, alpha=lam)
    return torch.bmm(first, v[0].transpose(0, 1)).view(B, N, H2 // 2, v.shape[3])


def _softmax_scaled_(scores: torch.Tensor, scale: float) -> None:
    """softmax(scale * scores) over the last dim, in place."""
    torch.softmax(scores.mul_(scale), -1, out=scores)


def _map_outputs(q, k, v, bias1, bias2, *, halves, dropout_p, is_causal, scale, gqa):
    """The two maps' SDPA outputs, from q (B, N, 2H, d), k (B, M, 2Hk, d), v (B, M, Hk, 2d)
    read through strided views (heads 2h, 2h+1 / 2g, 2g+1 are the maps), grouped keys
    through enable_gqa (no repeated copy). Returns one (o1, o2) pair per value part: the
    whole value width (B, H, N, 2d), or with ``halves`` the two halves (B, H, N, d)."""
    d = q.shape[3]
    q1, q2 = _heads(q, d)
    k1, k2 = _heads(k, d)
    values = _heads(v, d) if halves else (v.transpose(1, 2),)
    return [tuple(F.scaled_dot_product_attention(qm, km, part, attn_mask=bias,
                                                 dropout_p=dropout_p, is_causal=is_causal,
                                                 scale=scale, enable_gqa=gqa)
                  for qm, km, bias in ((q1, k1, bias1), (q2, k2, bias2)))
            for part in values]


def diff_attention_torch(q, k, v, lam: torch.Tensor, *, causal=False,
                         key_padding_mask: Optional[torch.Tensor] = None, scale=None,
                         norm_weight: Optional[torch.Tensor] = None, eps=1e-5, out_scale=1.0,
                         dropout_p=0.0, attn_bias: Optional[torch.Tensor] = None,
                         window_size=None, **score_options):
    """V1: two SDPA calls and the difference. lam is (H,) (fp32, fp64 for fp64 inputs).

    attn_bias: bool (True = masked out) or additive float, broadcastable to (B, 2H, N, M).
    window_size: (left, right) local attention (see window_keep_mask).
    dropout_p is applied to each map separately, before the difference (as in DiffCLIP).
    On CPU each map is two calls over the value halves (see _value_halves); the inputs are
    read through strided views, grouped keys without repeating them.
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
        return _cast(_epilogue(x, norm_weight, eps, out_scale), q.dtype)
    k, v = zero_padding_keys(k, key_padding_mask), zero_padding_keys(v, key_padding_mask)
    bias, is_causal, row_valid = _sdpa_masks(B, H2, N, M, q.device, q.dtype, causal,
                                             key_padding_mask, attn_bias, window_size)
    if bias is None and row_valid is None and _materialise_maps(q, k, v, lam, dropout_p):
        x = _maps_difference(q, k, v, lam.view(1, H, 1, 1), is_causal, scale)
    else:
        bias1, bias2 = _pair_maps(bias, H2)
        parts = _map_outputs(q, k, v, bias1, bias2, halves=_value_halves(v, q, dropout_p),
                             dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                             gqa=Hk != H)
        x = _difference(parts, lam.view(1, H, 1, 1))                        # (B, N, H, 2d)
    if row_valid is not None:
        valid1, valid2 = _pair_maps(row_valid, H2)
        x = x * (valid1 & valid2).transpose(1, 2)
    return _cast(_epilogue(x, norm_weight, eps, out_scale), q.dtype)


def _difference(parts, lam: torch.Tensor) -> torch.Tensor:
    """o1 - lam * o2 in lam's dtype as (B, N, H, 2d), from the value parts' SDPA outputs
    (B, H, N, width), whose memory is (B, N, H, width) order. Written straight into one
    output when nothing needs a gradient (eager); otherwise each part's difference,
    concatenated."""
    compute = lam.dtype
    pairs = [(_cast(o1, compute), _cast(o2, compute)) for o1, o2 in parts]
    if len(pairs) == 1:
        o1, o2 = pairs[0]
        return torch.addcmul(o1, lam, o2, value=-1.0).transpose(1, 2)
    if torch.compiler.is_compiling() or torch.is_grad_enabled() and (lam.requires_grad or any(
            t.requires_grad for pair in pairs for t in pair)):
        return torch.cat([torch.addcmul(o1, lam, o2, value=-1.0).transpose(1, 2)
                          for o1, o2 in pairs], dim=-1)
    B, H, N, width = pairs[0][0].shape
    x = pairs[0][0].new_empty(B, N, H, width * len(pairs))
    for i, (o1, o2) in enumerate(pairs):
        part = x[..., i * width:(i + 1) * width].transpose(1, 2)           # (B, H, N, width)
        torch.addcmul(o1, lam, o2, value=-1.0, out=part)
    return x


def _epilogue(x, norm_weight, eps, out_scale):
    """x * out_scale, or the RMSNorm epilogue with a norm weight."""
    if norm_weight is None:
        return x if out_scale == 1.0 else x * out_scale
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
    if score_options and any(score_options.values()):  # scores SDPA cannot express
        return _materialised_attention(q, k.repeat_interleave(2, dim=2), v, lambda_,
                                       causal=causal, key_padding_mask=key_padding_mask,
                                       scale=scale, dropout_p=dropout_p, attn_bias=attn_bias,
                                       window_size=window_size,
                                       score_options=score_options).to(q.dtype)
    if N == 1 and B == 1 and key_padding_mask is None and attn_bias is None and \
            window_size is None:  # a decoding step: causal or not, the query sees every key
        lam = _cast(lambda_, q.dtype) if isinstance(lambda_, torch.Tensor) else lambda_
        if _materialise_maps(q, k, v, lam, dropout_p):
            return _one_query_difference_v2(q, k, v, lam, scale)
    k, v = zero_padding_keys(k, key_padding_mask), zero_padding_keys(v, key_padding_mask)
    bias, is_causal, row_valid = _sdpa_masks(B, H2, N, M, q.device, q.dtype, causal,
                                             key_padding_mask, attn_bias, window_size)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=bias, dropout_p=dropout_p, is_causal=is_causal,
                                       scale=scale, enable_gqa=k.shape[2] != H2)  # (B, 2H, N, d)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    o = _cast(o.transpose(1, 2), compute)                                 # (B, N, 2H, d)
    pairs = o.view(B, N, H2 // 2, 2, d) if o.is_contiguous() else o.unflatten(2, (H2 // 2, 2))
    o1, o2 = pairs.unbind(3)                                              # (B, N, H, d) views
    if isinstance(lambda_, torch.Tensor):
        x = torch.addcmul(o1, _lambda_rows(lambda_, compute), o2, value=-1.0)
    else:
        x = torch.sub(o1, o2, alpha=float(lambda_))
    if row_valid is not None:
        valid1, valid2 = _pair_maps(row_valid, H2)
        x = x * (valid1 & valid2).transpose(1, 2)
    return _cast(x, q.dtype)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _lambda_rows(lambda_: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (), (H,) or per-token (B, N, H) lambda broadcastable against (B, N, H, d)."""
    lam = _cast(lambda_, dtype)
    return lam.unsqueeze(-1) if lam.dim() == 3 else lam.reshape(1, 1, -1, 1)


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
