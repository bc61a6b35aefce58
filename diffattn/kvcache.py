"""Differential attention against a KV cache, for decoding: ``diff_attention_with_kvcache``
(V1 / DiffCLIP) and ``diff_attention_v2_with_kvcache`` (Differential Transformer V2), forward
only, plus ``DiffKVCache``, the small cache object the layers take.

    out = diff_attention_with_kvcache(q, k_cache, v_cache, k_new, v_new,
                                      cache_seqlens=lengths, lambda_=lam, causal=True)

Layouts (batch first, as in diff_attention; flash-attn's ``flash_attn_with_kvcache``):

    q        (B, Nq, 2H, d)           the step's queries: the last Nq positions of each sequence
    k_cache  (B, Mmax, 2Hk, d)        V1 (key pair per group); V2: (B, Mmax, Hk, d)
    v_cache  (B, Mmax, Hk, 2d)        V1; V2: (B, Mmax, Hk, d)
    k, v     (B, Nnew, <cache's heads and width>) or None: appended in place at cache_seqlens[b]
    paged    block_table (B, max_blocks) int32; caches (num_blocks, page_size, heads, dim);
             logical position p of sequence b is row p % page_size of page
             block_table[b, p // page_size]
    out      (B, Nq, H, 2d) V1, (B, Nq, H, d) V2

``cache_seqlens`` is each cache's valid length before the call; attention runs over
``L = cache_seqlens[b] + Nnew`` keys; with ``causal`` (default False, as in flash-attn),
bottom-right: query i sees keys ``j <= L - Nq + i``. flash-attn's options follow its
documented semantics: ``rotary_cos``/``rotary_sin``/``rotary_interleaved`` (the new keys
rotated at ``cache_seqlens[b] + i`` before the append, q likewise when causal or windowed,
else at ``cache_seqlens[b]``), ``cache_batch_idx``, ``cache_leftpad``, ``window_size``,
``softcap`` and ``return_softmax_lse``. ``lambda_`` is keyword-only (V1 may instead take
``lambda_vectors`` and ``lambda_init``, as diff_attention does). Nothing reads a length or a
block table entry on the host (the checks on GPU values are asynchronous device assertions),
and every shape that sizes a launch is static, so a decode step can be compiled and captured
in a CUDA graph.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .backend import check_backend_name, resolve_backend, resolve_layer_backend
from .checks import (check_epilogue_args, check_lambda, check_scalars, check_softcap,
                     check_tensor, check_values, check_window_size, is_float_tensor,
                     resolve_lambda_vectors, resolve_rms_norm)
from .kernel_inputs import kernel_lambda, last_dim_contiguous
from .lambdas import LambdaVectors, expand_lambda
from .torch_path import diff_attention_torch, diff_attention_v2_torch, zero_padding_keys

try:
    from .kernels import INTERPRET, AttentionCall
    from .kernels.diff_attn_decode import diff_attn_decode
    from .autograd import register_call_op
except ImportError:  # no triton: resolve_backend never picks "triton"
    INTERPRET, AttentionCall, diff_attn_decode = False, None, None


# ------------------------------------------------------------------ argument checks
def _capacity(k_cache: Tensor, block_table: Optional[Tensor]) -> int:
    return k_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)


def _check_kvcache(q, k_cache, v_cache, lambda_, k, v, cache_seqlens, block_table, norm_weight,
                   scale, causal, eps, out_scale, num_splits, v2: bool, *, cache_batch_idx=None,
                   cache_leftpad=None, rotary_cos=None, rotary_sin=None,
                   rotary_interleaved=True, window_size=None,
                   return_softmax_lse=False) -> None:
    """Raise a ValueError/TypeError naming the first bad argument (shapes, dtypes, devices,
    and the values of host-side integers; tensor values are checked in _check_values).
    Written for a decoding loop: each check is one cheap branch, its message built only
    when it fails."""
    if k is not None or v is not None:
        for name, t in (("k", k), ("v", v)):
            if t is not None and not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__} "
                                f"(lambda_ is keyword-only: lambda_=...)")
    check_tensor("q", q, 4, "(batch, seq_q, 2 * heads, head_dim)")
    B, Nq, H2, d = q.shape
    if H2 % 2 or H2 == 0:
        raise ValueError(f"q must have an even number of heads (two maps per differential "
                         f"head), got {H2}")
    dv = d if v2 else 2 * d
    paged = block_table is not None
    if not is_float_tensor(k_cache, 4):
        check_tensor("k_cache", k_cache, 4, f"{_cache_rows(paged)}, kv_heads, head_dim)")
    if not is_float_tensor(v_cache, 4):
        check_tensor("v_cache", v_cache, 4, f"{_cache_rows(paged)}, kv_heads, "
                     f"{'head_dim' if v2 else '2 * head_dim'})")
    k_shape, v_shape = k_cache.shape, v_cache.shape
    Hk = v_shape[2]
    key_heads = Hk if v2 else 2 * Hk
    if k_shape[2] != key_heads or k_shape[3] != d or Hk < 1:
        raise ValueError(f"k_cache must have shape {_cache_rows(paged)}, "
                         f"{'kv_heads' if v2 else '2 * kv_heads'}, head_dim) = (..., "
                         f"{key_heads}, {d}) to match q {tuple(q.shape)} and v_cache "
                         f"{tuple(v_shape)}, got {tuple(k_shape)}")
    if v_shape[0] != k_shape[0] or v_shape[1] != k_shape[1] or v_shape[3] != dv:
        raise ValueError(f"v_cache must have shape {(*k_shape[:2], Hk, dv)} to match "
                         f"k_cache and q, got {tuple(v_shape)}")
    if (H2 // 2) % Hk:
        raise ValueError(f"the number of differential heads ({H2 // 2}) must be a multiple of "
                         f"the caches' kv_heads ({Hk})")
    if not (k_cache.dtype == v_cache.dtype == q.dtype and k_cache.device == q.device and
            v_cache.device == q.device and k_cache.stride(3) == 1 and v_cache.stride(3) == 1):
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            if t.dtype != q.dtype:
                raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
            if t.device != q.device:
                raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
            if t.stride(-1) != 1:
                raise ValueError(f"{name} must have a contiguous last dimension (it is written "
                                 f"in place), got strides {t.stride()}")
    if paged:
        if not isinstance(block_table, Tensor) or block_table.dtype != torch.int32:
            got = block_table.dtype if isinstance(block_table, Tensor) else type(block_table)
            raise TypeError(f"block_table must be an int32 tensor (batch, max_blocks), got {got}")
        if block_table.dim() != 2 or block_table.shape[0] != B or block_table.shape[1] < 1:
            raise ValueError(f"block_table must have shape (batch, max_blocks >= 1) with batch "
                             f"{B}, got {tuple(block_table.shape)}")
        if block_table.device != q.device:
            raise ValueError(f"block_table must be on q's device {q.device}, got "
                             f"{block_table.device}")
        page = k_shape[1]
        if page < 16 or page & (page - 1):
            raise ValueError(f"page_size (k_cache.shape[1] with a block_table) must be a power "
                             f"of two >= 16, got {page}")
    elif k_shape[0] != B and cache_batch_idx is None:
        raise ValueError(f"k_cache must have q's batch {B} in its first dimension (or pass a "
                         f"block_table for a paged cache, or cache_batch_idx), got "
                         f"{tuple(k_shape)}")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (the new keys and values) or both None")
    if k is not None:
        for name, t, cache in (("k", k, k_cache), ("v", v, v_cache)):
            check_tensor(name, t, 4, f"(batch, seq_new, {cache.shape[2]}, {cache.shape[3]})")
            if t.shape[0] != B or t.shape[2:] != cache.shape[2:]:
                raise ValueError(f"{name} must have shape ({B}, seq_new, {cache.shape[2]}, "
                                 f"{cache.shape[3]}) to match q and {name}_cache, got "
                                 f"{tuple(t.shape)}")
            if t.dtype != q.dtype:
                raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
            if t.device != q.device:
                raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
        if v.shape[1] != k.shape[1]:
            raise ValueError(f"k and v must have the same seq_new, got {k.shape[1]} and "
                             f"{v.shape[1]}")
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens is needed to append k and v (where each cache ends)")
    elif isinstance(cache_seqlens, Tensor):
        if cache_seqlens.dtype != torch.int32:
            raise TypeError(f"cache_seqlens must be an int or an int32 tensor (batch,), got "
                            f"{cache_seqlens.dtype}")
        if cache_seqlens.dim() != 1 or cache_seqlens.shape[0] != B:
            raise ValueError(f"cache_seqlens must have shape (batch,) = ({B},), got "
                             f"{tuple(cache_seqlens.shape)}")
        if cache_seqlens.device != q.device:
            raise ValueError(f"cache_seqlens must be on q's device {q.device}, got "
                             f"{cache_seqlens.device}")
    elif isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        n_new = 0 if k is None else k.shape[1]
        capacity = _capacity(k_cache, block_table)
        if cache_seqlens < 0 or cache_seqlens + n_new > capacity:
            raise ValueError(f"cache_seqlens + seq_new ({cache_seqlens} + {n_new}) must be "
                             f"between 0 and the cache capacity {capacity}")
    else:
        raise TypeError(f"cache_seqlens must be an int or an int32 tensor (batch,), got "
                        f"{type(cache_seqlens).__name__}")
    _check_step_options(q, k, block_table, cache_batch_idx, cache_leftpad, rotary_cos,
                        rotary_sin, rotary_interleaved, window_size, return_softmax_lse)
    check_lambda(lambda_, q, per_token=v2)
    check_epilogue_args(norm_weight, eps, out_scale, dv, q.device)
    check_scalars(causal, scale)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0: chosen from the shapes), got "
                         f"{num_splits!r}")


def _cache_rows(paged: bool) -> str:
    """The leading dims of a cache's layout, for messages."""
    return "(num_blocks, page_size" if paged else "(batch, capacity"


def _check_index_tensor(name: str, t, q: Tensor, meaning: str) -> None:
    B = q.shape[0]
    if not isinstance(t, Tensor) or t.dtype != torch.int32:
        got = t.dtype if isinstance(t, Tensor) else type(t).__name__
        raise TypeError(f"{name} must be an int32 tensor (batch,) ({meaning}), got {got}")
    if tuple(t.shape) != (B,):
        raise ValueError(f"{name} must have shape (batch,) = ({B},), got {tuple(t.shape)}")
    if t.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")


def _check_step_options(q, k, block_table, cache_batch_idx, cache_leftpad, rotary_cos,
                        rotary_sin, rotary_interleaved, window_size, return_softmax_lse) -> None:
    """The options of flash_attn_with_kvcache: cache rows, left padding, rotary embedding,
    local window, the log-sum-exp (types and shapes; values in _check_values)."""
    if cache_batch_idx is None and cache_leftpad is None and rotary_cos is None and \
            rotary_sin is None and window_size is None and rotary_interleaved is True and \
            return_softmax_lse is False:  # every option at its default
        return
    if cache_batch_idx is not None:
        _check_index_tensor("cache_batch_idx", cache_batch_idx, q, "the cache row of each "
                            "sequence")
        if block_table is not None:
            raise ValueError("cache_batch_idx applies to contiguous caches: with a block_table "
                             "the table's rows choose each sequence's pages")
    if cache_leftpad is not None:
        _check_index_tensor("cache_leftpad", cache_leftpad, q, "the first cached key of each "
                            "sequence")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together or both None")
    if rotary_cos is not None:
        d = q.shape[3]
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            if not isinstance(t, Tensor) or not t.is_floating_point():
                got = t.dtype if isinstance(t, Tensor) else type(t).__name__
                raise TypeError(f"{name} must be a floating tensor (seqlen_ro, rotary_dim / 2), "
                                f"got {got}")
            if t.dim() != 2 or not 1 <= t.shape[1] <= d // 2 or t.shape[0] < 1:
                raise ValueError(f"{name} must have shape (seqlen_ro, rotary_dim / 2) with "
                                 f"2 <= rotary_dim <= head_dim {d}, got {tuple(t.shape)}")
            if t.device != q.device:
                raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
        if rotary_sin.shape != rotary_cos.shape:
            raise ValueError(f"rotary_sin must have rotary_cos's shape "
                             f"{tuple(rotary_cos.shape)}, got {tuple(rotary_sin.shape)}")
        if k is None:
            raise ValueError("rotary_cos and rotary_sin need the new keys k and v (the rotary "
                             "embedding is applied to the keys as they are appended)")
    for name, flag in (("rotary_interleaved", rotary_interleaved),
                       ("return_softmax_lse", return_softmax_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    check_window_size(window_size)


def _check_values(seqlens: Tensor, n_new: int, capacity: int, block_table: Optional[Tensor],
                  num_blocks: int, page: int, *, cache_batch_idx: Optional[Tensor] = None,
                  cache_rows: int = 0, cache_leftpad: Optional[Tensor] = None,
                  rotary_cos: Optional[Tensor] = None, rotary_rows: int = 0,
                  known: Optional[list] = None) -> None:
    """The checks that need tensor values: plain errors for CPU tensors, asynchronous device
    assertions elsewhere (and while torch.compile traces), so nothing waits for the device.
    ``known``: seqlens as Python ints when they are on the host (host_lengths)."""
    fit_msg = (f"cache_seqlens + seq_new ({n_new}) must be between 0 and the cache capacity "
               f"{capacity} for every sequence")
    plain = block_table is None and cache_batch_idx is None and cache_leftpad is None and \
        rotary_cos is None
    if plain and known is not None:  # the values are on the host: checked as ints
        if min(known, default=0) < 0 or max(known, default=0) + n_new > capacity:
            bad = [b for b, n in enumerate(known) if n < 0 or n + n_new > capacity]
            raise ValueError(f"{fit_msg}; got {[known[b] for b in bad]} at batch index {bad}")
        return
    fits = (seqlens >= 0) & (seqlens + n_new <= capacity)
    bad_pages = None
    if block_table is not None:
        used_blocks = (seqlens + n_new + page - 1) // page                      # (B,)
        used = torch.arange(block_table.shape[1], device=block_table.device) < used_blocks[:, None]
        if cache_leftpad is not None:  # pages wholly before the left pad are never read
            used = used & (torch.arange(block_table.shape[1], device=block_table.device)
                           >= (cache_leftpad // page)[:, None])
        bad_pages = used & ((block_table < 0) | (block_table >= num_blocks))
    on_host = seqlens.device.type == "cpu" and not torch.compiler.is_compiling()
    page_msg = (f"block_table must point into the pool of {num_blocks} pages for every page a "
                f"sequence uses")
    if seqlens.device.type == "meta":
        return
    _check_option_values(seqlens, n_new, cache_batch_idx, cache_rows, cache_leftpad,
                         rotary_cos, rotary_rows)
    if on_host:
        if not bool(fits.all()):
            bad = (~fits).nonzero().flatten().tolist()
            raise ValueError(f"{fit_msg}; got {seqlens[bad].tolist()} at batch index {bad}")
        if bad_pages is not None and bool(bad_pages.any()):
            raise ValueError(f"{page_msg}; got entries {block_table[bad_pages].tolist()}")
        return
    torch._assert_async(fits.all(), fit_msg)
    if bad_pages is not None:
        torch._assert_async(~bad_pages.any(), page_msg)


def _check_option_values(seqlens: Tensor, n_new: int, cache_batch_idx: Optional[Tensor],
                         cache_rows: int, cache_leftpad: Optional[Tensor],
                         rotary_cos: Optional[Tensor], rotary_rows: int) -> None:
    """Value ranges of the step's options (check_values: a ValueError on CPU, an asynchronous
    device assertion elsewhere). rotary_rows: the positions past cache_seqlens[b] that are
    rotated (the new keys, or the queries when they sit at their own positions)."""
    if cache_batch_idx is not None:
        check_values(((cache_batch_idx >= 0) & (cache_batch_idx < cache_rows)).all(),
                     f"cache_batch_idx must hold cache rows between 0 and {cache_rows - 1}")
    if cache_leftpad is not None:
        check_values(((cache_leftpad >= 0) & (cache_leftpad <= seqlens + n_new)).all(),
                     "cache_leftpad must be between 0 and cache_seqlens + seq_new for every "
                     "sequence")
    if rotary_cos is not None:
        check_values((seqlens + rotary_rows <= rotary_cos.shape[0]).all(),
                     f"rotary_cos and rotary_sin must have a row for every rotated position: "
                     f"cache_seqlens + {rotary_rows} must not exceed seqlen_ro "
                     f"{rotary_cos.shape[0]}")


# ------------------------------------------------------------------ pieces
def append_to_cache(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor,
                    seqlens: Optional[Tensor], block_table: Optional[Tensor] = None,
                    cache_batch_idx: Optional[Tensor] = None, *,
                    start: Optional[int] = None) -> None:
    """Write k, v (B, Nnew, ...) into the caches in place at positions seqlens[b] + i
    (through the block table when paged; into cache row cache_batch_idx[b] when given). Index
    writes, no host synchronisation. ``start``: seqlens' common value when the caller knows
    it on the host (every sequence equally long): a contiguous cache is then written as one
    slice per tensor, and seqlens is not read (it may be None)."""
    B, n_new = k.shape[0], k.shape[1]
    if start is not None and block_table is None and cache_batch_idx is None:
        k_cache[:, start:start + n_new] = k
        v_cache[:, start:start + n_new] = v
        return
    pos = seqlens.long()[:, None] + torch.arange(n_new, device=k.device)    # (B, Nnew)
    if block_table is None:
        rows = torch.arange(B, device=k.device) if cache_batch_idx is None \
            else cache_batch_idx.long()
        batch = rows[:, None].expand(B, n_new)
        k_cache[batch, pos] = k
        v_cache[batch, pos] = v
    else:
        page = k_cache.shape[1]
        pages = block_table.long().gather(1, pos // page)
        rows = pos % page
        k_cache[pages, rows] = k
        v_cache[pages, rows] = v


def logical_cache(cache: Tensor, block_table: Optional[Tensor]) -> Tensor:
    """The cache as (B, capacity, heads, dim) in logical order (a gather when paged; entries
    outside the pool, in unused table slots, read page 0 and are masked anyway)."""
    if block_table is None:
        return cache
    pages = block_table.long().clamp(0, cache.shape[0] - 1)
    return cache[pages].flatten(1, 2)


def kvcache_masked(lengths: Tensor, n_q: int, capacity: int, causal: bool) -> Tensor:
    """(B, 1, Nq, capacity) bool, True where query i must not see key j: j >= lengths[b] or,
    with causal, j > lengths[b] - Nq + i."""
    cols = torch.arange(capacity, device=lengths.device)
    lengths = lengths.long()[:, None, None, None]
    masked = cols >= lengths
    if causal:
        rows = torch.arange(n_q, device=lengths.device)[:, None]
        masked = masked | (cols > lengths - n_q + rows)
    return masked


def host_lengths(lengths: Tensor) -> Optional[list]:
    """The valid lengths as Python ints when they already live on the host (a CPU tensor,
    eager): reading them waits for no device. None on an accelerator, for meta tensors and
    while torch.compile traces (where the lengths stay tensor values)."""
    if not lengths.is_cpu or torch.compiler.is_compiling() or \
            torch._C._functorch.is_functorch_wrapped_tensor(lengths):
        return None
    return lengths.tolist()


def _attend(q, keys, values, lambda_, causal, scale, norm_weight, eps, out_scale, v2,
            attn_bias=None, **score_options):
    """diff_attention's torch path on (B, M, heads, dim) keys and values (any strides)."""
    if v2:
        return diff_attention_v2_torch(q, keys, values, lambda_, causal=causal, scale=scale,
                                       attn_bias=attn_bias, **score_options)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    lam = expand_lambda(lambda_, q.shape[2] // 2, acc, q.device)
    return diff_attention_torch(q, keys, values, lam, causal=causal, scale=scale,
                                norm_weight=norm_weight, eps=eps, out_scale=out_scale,
                                attn_bias=attn_bias, **score_options)


def _torch_attention(q, k_cache, v_cache, lengths, block_table, lambda_, causal, scale,
                     norm_weight, eps, out_scale, v2, *, known_lengths=None, cache_leftpad=None,
                     cache_batch_idx=None, window_size=None, return_lse=False, **score_options):
    """The readable path: each sequence's keys in logical order (a gather when paged or with
    cache_batch_idx), masked outside its keys (past its length, before its left pad, the
    causal diagonal, the window), and diff_attention's torch path.

    A plain step (none of the options) whose lengths are on the host (``known_lengths``, the
    lengths as Python ints, see host_lengths) reads the keys as views of the cache up to the
    longest sequence: with every sequence of the same length nothing is masked or copied, and
    the rows past the end are never read. Otherwise the rows outside a sequence's keys, which
    hold whatever the cache had (stale or never written), are read as 0, so that a NaN there
    meets no zero probability.
    ``score_options``: the call's score options by name (AttentionCall fields)."""
    keys, values = logical_cache(k_cache, block_table), logical_cache(v_cache, block_table)
    n_q = q.shape[1]
    plain = cache_leftpad is None and cache_batch_idx is None and window_size is None and \
        not return_lse
    known = known_lengths if plain else None
    if known is not None and min(known, default=0) > 0:
        longest = max(known)
        if min(known) == longest:
            return _attend_first_rows(q, keys, values, longest, lambda_, causal, scale,
                                      norm_weight, eps, out_scale, v2, score_options)
        if longest < keys.shape[1]:
            keys, values = keys[:, :longest], values[:, :longest]
    if cache_batch_idx is not None:
        keys, values = keys[cache_batch_idx.long()], values[cache_batch_idx.long()]
    masked = kvcache_masked(lengths, n_q, keys.shape[1], causal)
    masked = mask_step_options(masked, lengths, n_q, causal, cache_leftpad, window_size)
    unused = kvcache_unused_rows(lengths, keys.shape[1], cache_leftpad)
    keys, values = zero_padding_keys(keys, unused), zero_padding_keys(values, unused)
    out = _attend(q, keys, values, lambda_, False, scale, norm_weight, eps, out_scale, v2,
                  attn_bias=masked, **score_options)
    if return_lse:
        return out, kvcache_lse(q, keys, masked, scale, v2, **score_options)
    return out


# ------------------------------------------------------------------ the step's options (torch)
def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor,
                 interleaved: bool) -> Tensor:
    """x (B, N, heads, d) with its first rotary_dim = 2 * cos.shape[1] dims rotated at
    positions (B, N) (rows of cos, sin (seqlen_ro, rotary_dim / 2)): GPT-J interleaved pairs
    (2i, 2i + 1) with interleaved, else GPT-NeoX halves (i, i + rotary_dim / 2); each pair
    (a, b) at frequency i becomes (a cos - b sin, b cos + a sin). Computed in float32
    (float64 for float64 x), returned in x's dtype."""
    half = cos.shape[1]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = positions.long().clamp(0, cos.shape[0] - 1)   # out-of-range rows fail check_values
    c = cos.to(compute)[rows][:, :, None, :]             # (B, N, 1, rotary_dim / 2)
    s = sin.to(compute)[rows][:, :, None, :]
    xr = x[..., :2 * half].to(compute)
    if interleaved:
        a, b = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
    else:
        a, b = xr[..., :half], xr[..., half:]
        rotated = torch.cat((a * c - b * s, b * c + a * s), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., 2 * half:]), dim=-1)


def rotary_positions(seqlens: Tensor, n: int, each_position: bool) -> Tensor:
    """(B, n) positions of n new tokens: seqlens[b] + i, or seqlens[b] for all of them."""
    offsets = torch.arange(n, device=seqlens.device) if each_position else \
        torch.zeros(n, dtype=torch.long, device=seqlens.device)
    return seqlens.long()[:, None] + offsets


def mask_step_options(masked: Tensor, lengths: Tensor, n_q: int, causal: bool,
                      cache_leftpad: Optional[Tensor], window_size) -> Tensor:
    """kvcache_masked's (B, 1, Nq, capacity) mask with the keys before cache_leftpad[b] and
    outside the local window (left, right) masked too: query i sees keys
    L - Nq + i - left <= j <= L - Nq + i + right (L = lengths[b]; -1 unbounded; right is 0
    with causal)."""
    cols = torch.arange(masked.shape[-1], device=lengths.device)
    if cache_leftpad is not None:
        masked = masked | (cols < cache_leftpad.long()[:, None, None, None])
    left, right = (-1, -1) if window_size is None else window_size
    if left >= 0 or (right >= 0 and not causal):
        diagonal = lengths.long()[:, None, None, None] - n_q + \
            torch.arange(n_q, device=lengths.device)[:, None]
        if left >= 0:
            masked = masked | (cols < diagonal - left)
        if right >= 0 and not causal:
            masked = masked | (cols > diagonal + right)
    return masked


def kvcache_unused_rows(lengths: Tensor, capacity: int,
                        cache_leftpad: Optional[Tensor]) -> Tensor:
    """(B, capacity) bool, True for the cache rows that hold none of sequence b's keys: past
    lengths[b], or before cache_leftpad[b]."""
    cols = torch.arange(capacity, device=lengths.device)
    unused = cols >= lengths.long()[:, None]
    if cache_leftpad is not None:
        unused = unused | (cols < cache_leftpad.long()[:, None])
    return unused


def kvcache_lse(q: Tensor, keys: Tensor, masked: Tensor, scale: float, v2: bool,
                softcap: float = 0.0) -> Tensor:
    """(B, 2H, Nq) float32: each map's natural-log log-sum-exp of its scores s = scale * q k^T
    (softcap > 0: softcap * tanh(s / softcap), the softmax's input) over the keys it sees
    (q head 2h: map 1 of head h, 2h + 1: map 2), +inf for a row that sees none.
    keys (B, M, 2Hk or Hk, d) in logical order; masked (B, 1, Nq, M), True = unseen."""
    H2 = q.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    heads = torch.arange(H2, device=q.device)
    if v2:      # q head j reads key head j // (2H / Hk)
        key_head = heads // (H2 // keys.shape[2])
    else:       # map m of head h reads key 2g + m of its group g = h // (H / Hk)
        key_head = 2 * ((heads // 2) // ((H2 // 2) // (keys.shape[2] // 2))) + heads % 2
    scores = torch.einsum("bnjd,bmjd->bjnm", q.to(compute),
                          keys[:, :, key_head].to(compute)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    lse = torch.logsumexp(scores.masked_fill(masked, float("-inf")), dim=-1)
    return lse.masked_fill(lse == float("-inf"), float("inf")).float()


# ------------------------------------------------------------------ the registered operator
# A custom operator, so that torch.compile keeps the kernel launch in the graph and CUDA
# graphs capture it. It reads the caches; the in-place append is plain torch indexing outside
# it, which torch.compile functionalises. On a GPU it is a triton_op (Inductor sees the
# kernels); under the interpreter an opaque custom op with a shape-only fake.
if diff_attn_decode is not None:
    _WRAP = None if INTERPRET else torch.library.wrap_triton

    @register_call_op("diffattn::kvcache_fwd")
    def _kvcache_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor,
                    block_table: Optional[Tensor], lam: Optional[Tensor],
                    norm_weight: Optional[Tensor], num_splits: int, rotary_cos: Optional[Tensor],
                    rotary_sin: Optional[Tensor], rotary_interleaved: bool, rotary_per_row: bool,
                    n_new: int, cache_leftpad: Optional[Tensor],
                    cache_batch_idx: Optional[Tensor], return_lse: bool,
                    *call) -> Tuple[Tensor, Tensor]:
        """The decode kernels over caches that already hold the new keys (lengths: valid
        keys per sequence); ``call``: AttentionCall.as_schema_args(). Returns (out, lse); lse
        is empty without return_lse."""
        result = diff_attn_decode(
            q, k_cache, v_cache, lengths, block_table, lam, norm_weight,
            AttentionCall.from_schema_args(*call), num_splits, _WRAP, rotary_cos=rotary_cos,
            rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved,
            rotary_per_row=rotary_per_row, n_new=n_new, cache_leftpad=cache_leftpad,
            cache_batch_idx=cache_batch_idx, return_lse=return_lse)
        return result if return_lse else (result, q.new_empty(0, dtype=torch.float32))

    @_kvcache_op.register_fake
    def _(q, k_cache, v_cache, lengths, block_table, lam, norm_weight, num_splits, rotary_cos,
          rotary_sin, rotary_interleaved, rotary_per_row, n_new, cache_leftpad, cache_batch_idx,
          return_lse, *call):
        B, Nq, H2, _ = q.shape
        lse_shape = (B, H2, Nq) if return_lse else (0,)
        return (q.new_empty(B, Nq, H2 // 2, v_cache.shape[3]),
                q.new_empty(lse_shape, dtype=torch.float32))


def _fused_attention(q, k_cache, v_cache, lengths, block_table, lambda_, norm_weight, num_splits,
                     *, rotary_cos=None, rotary_sin=None, rotary_interleaved=True,
                     rotary_per_row=False, n_new=0, cache_leftpad=None, cache_batch_idx=None,
                     return_lse=False, **options):
    """The decode kernels; ``options``: the AttentionCall's (scale, causal, window_size, the
    epilogue, score options)."""
    q = last_dim_contiguous(q)  # the decode kernel reads q's rows as contiguous vectors
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    lam, lam_value, vectors = kernel_lambda(lambda_, acc, q.device)
    call = AttentionCall.create(lam_value=lam_value, lam_vectors=vectors, **options)
    up = q.dtype == torch.bfloat16 and INTERPRET  # the interpreter's bf16 math is wrong
    if up:
        q, k_cache, v_cache = q.float(), k_cache.float(), v_cache.float()
    if rotary_cos is not None:  # the kernel reads cos/sin rows as contiguous vectors
        rotary_cos, rotary_sin = last_dim_contiguous(rotary_cos), last_dim_contiguous(rotary_sin)
    if torch.compiler.is_compiling():
        out, lse = _kvcache_op(q, k_cache, v_cache, lengths, block_table, lam, norm_weight,
                               num_splits, rotary_cos, rotary_sin, rotary_interleaved,
                               rotary_per_row, n_new, cache_leftpad, cache_batch_idx, return_lse,
                               *call.as_schema_args())
    else:
        result = diff_attn_decode(q, k_cache, v_cache, lengths, block_table, lam, norm_weight,
                                  call, num_splits, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                                  rotary_interleaved=rotary_interleaved,
                                  rotary_per_row=rotary_per_row, n_new=n_new,
                                  cache_leftpad=cache_leftpad, cache_batch_idx=cache_batch_idx,
                                  return_lse=return_lse)
        out, lse = result if return_lse else (result, None)
    out = out.to(torch.bfloat16) if up else out
    return (out, lse) if return_lse else out


_NO_WINDOW = (None, (-1, -1), [-1, -1])


def _equal_host_length(cache_seqlens, capacity: int) -> Optional[int]:
    """Every sequence's cache length as one Python int when that is known without reading a
    device: an int, None (full caches), or a CPU tensor (eager) whose values are all equal.
    None otherwise."""
    if cache_seqlens is None or isinstance(cache_seqlens, int):
        return capacity if cache_seqlens is None else cache_seqlens
    known = host_lengths(cache_seqlens)
    if not known or min(known) != max(known):
        return None
    return known[0]


def _attend_first_rows(q, keys, values, end: int, lambda_, causal, scale, norm_weight, eps,
                       out_scale, v2, score_options):
    """The attention when every sequence's keys are exactly the first ``end`` > 0 rows of
    keys and values (B, M, heads, dim, logical order): over views of those rows, nothing
    masked or copied, the rows past them never read; causal bottom-right (one query sees
    every key)."""
    if end < keys.shape[1]:
        keys, values = keys.narrow(1, 0, end), values.narrow(1, 0, end)
    return _attend(q, keys, values, lambda_, causal and q.shape[1] > 1, scale, norm_weight,
                   eps, out_scale, v2, **score_options)


def _scale(q: Tensor, scale) -> float:
    return q.shape[3] ** -0.5 if scale is None else float(scale)


# ------------------------------------------------------------------ public API
def run_with_kvcache(q, k_cache, v_cache, lambda_, backend, *, k=None, v=None,
                     rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                     cache_batch_idx=None, cache_leftpad=None, block_table=None, causal=False,
                     window_size=None, rotary_interleaved=True, scale=None, norm_weight=None,
                     eps=1e-5, out_scale=1.0, num_splits=0, return_softmax_lse=False,
                     v2=False, **score_options):
    """The two public functions without the shape checks (``backend`` resolved): checks the
    index tensors' values, rotates and appends the new keys, attends. ``lambda_`` may be
    LambdaVectors (V1); ``score_options``: the call's score options by name (AttentionCall
    fields)."""
    B = q.shape[0]
    n_new = 0 if k is None else k.shape[1]
    capacity = _capacity(k_cache, block_table)
    if backend == "torch" and block_table is None and cache_batch_idx is None and \
            cache_leftpad is None and rotary_cos is None and window_size in _NO_WINDOW and \
            not return_softmax_lse:  # a plain step: equal lengths known on the host?
        start = _equal_host_length(cache_seqlens, capacity)
        if start is not None and B and 0 <= start and 0 < start + n_new <= capacity:
            if n_new:
                append_to_cache(k_cache, v_cache, k, v, None, start=start)
            return _attend_first_rows(q, k_cache, v_cache, start + n_new, lambda_, causal,
                                      _scale(q, scale), norm_weight, eps, out_scale, v2,
                                      score_options)
    if cache_seqlens is None or isinstance(cache_seqlens, int):
        start = capacity if cache_seqlens is None else cache_seqlens
        seqlens = torch.full((B,), start, dtype=torch.int32, device=q.device)
        known = [start] * B  # the lengths as Python ints (host_lengths)
    else:  # the kernels read the lengths and a block table's rows at stride 1, and so do
        seqlens = cache_seqlens.contiguous()  # the value checks (strided views are copied)
        known = host_lengths(seqlens)
    if block_table is not None:
        block_table = block_table.contiguous()
    # index tensors are read as laid out: one int per sequence, contiguous
    cache_batch_idx = None if cache_batch_idx is None else cache_batch_idx.contiguous()
    cache_leftpad = None if cache_leftpad is None else cache_leftpad.contiguous()
    if window_size is not None and tuple(window_size) == (-1, -1):
        window_size = None
    window_size = None if window_size is None else tuple(window_size)
    # flash-attn's rule: q sits at its own positions when causal or windowed, else every
    # query at cache_seqlens
    rotary_per_row = causal or window_size is not None
    has_options = rotary_cos is not None or cache_batch_idx is not None or \
        cache_leftpad is not None
    if isinstance(cache_seqlens, Tensor) or block_table is not None or has_options:
        _check_values(seqlens, n_new, capacity, block_table, k_cache.shape[0], k_cache.shape[1],
                      cache_batch_idx=cache_batch_idx, cache_rows=k_cache.shape[0],
                      cache_leftpad=cache_leftpad, rotary_cos=rotary_cos,
                      rotary_rows=max(n_new, q.shape[1] if rotary_per_row else 1),
                      known=known)
    if backend == "triton" and torch.is_grad_enabled() and any(
            isinstance(t, Tensor) and t.requires_grad for t in (
                q, k, v, k_cache, v_cache, norm_weight, rotary_cos, rotary_sin,
                lambda_.vectors if isinstance(lambda_, LambdaVectors) else lambda_)):
        # refused before anything is written into the caches
        raise RuntimeError("diff_attention_with_kvcache is forward only on the fused path: "
                           "call it under torch.no_grad() (or torch.inference_mode()), or "
                           "use backend='torch' to differentiate through it")
    if k is not None and n_new > 0:
        if rotary_cos is not None:
            k = apply_rotary(k, rotary_cos, rotary_sin, rotary_positions(seqlens, n_new, True),
                             rotary_interleaved)
        same = known is not None and min(known, default=0) == max(known, default=0)
        append_to_cache(k_cache, v_cache, k, v, seqlens, block_table, cache_batch_idx,
                        start=known[0] if same and B else None)
    lengths = seqlens + n_new if n_new else seqlens
    scale = _scale(q, scale)
    if backend == "triton":
        return _fused_attention(q, k_cache, v_cache, lengths, block_table, lambda_, norm_weight,
                                num_splits, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                                rotary_interleaved=rotary_interleaved,
                                rotary_per_row=rotary_per_row, n_new=n_new,
                                cache_leftpad=cache_leftpad, cache_batch_idx=cache_batch_idx,
                                return_lse=return_softmax_lse, scale=scale, causal=causal,
                                window_size=window_size, eps=eps, out_scale=out_scale,
                                **score_options)
    if rotary_cos is not None:
        q = apply_rotary(q, rotary_cos, rotary_sin,
                         rotary_positions(seqlens, q.shape[1], rotary_per_row),
                         rotary_interleaved)
    return _torch_attention(q, k_cache, v_cache, lengths, block_table, lambda_, causal, scale,
                            norm_weight, eps, out_scale, v2,
                            known_lengths=None if known is None else [n + n_new for n in known],
                            cache_leftpad=cache_leftpad,
                            cache_batch_idx=cache_batch_idx, window_size=window_size,
                            return_lse=return_softmax_lse, **score_options)


_SIGNATURE_DOC = """
    Signature (flash-attn's ``flash_attn_with_kvcache`` order up to block_table; everything
    after it, lambda_ included, is keyword-only, so that a flash-style positional call is a
    TypeError, never a silently different one)::

        {name}(
            q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None, *,
            {lam}, scale=None, causal=False, window_size=None, rotary_interleaved=True,
            {extra}num_splits=0, softcap=0.0, return_softmax_lse=False, backend="auto")
"""

_COMMON_ARGS_DOC = """
        cache_seqlens: int or int32 (B,) tensor: where each sequence's cached keys end before
            the call (None: every cache is full, and k, v must be None). With cache_leftpad
            the keys are rows cache_leftpad[b] .. cache_seqlens[b] - 1. cache_seqlens + Nnew
            must not exceed the capacity (Mmax, or max_blocks * page_size).
        cache_batch_idx: int32 (B,) or None: sequence b reads and appends cache row
            cache_batch_idx[b] (contiguous caches, whose first dimension may then exceed B;
            not with block_table). With repeated rows and new keys, which append wins is
            unspecified.
        cache_leftpad: int32 (B,) or None: sequence b's keys start at logical position
            cache_leftpad[b] (0 <= cache_leftpad[b] <= cache_seqlens[b] + Nnew); the rows
            before it are never read (a left-padded batch: prefill the padded prompts with
            cache_seqlens = 0 and cache_leftpad = the pad lengths, then decode).
        block_table: int32 (B, max_blocks): logical position p of sequence b lives in row
            p % page_size of page block_table[b, p // page_size]; page_size a power of two
            >= 16. Only the entries of pages a sequence uses are read. cache_seqlens and
            block_table may have any layout (strided or expanded views are copied to
            contiguous ones before they are checked and read).
        rotary_cos, rotary_sin: (seqlen_ro, rotary_dim / 2) or None (needs k, v): the rotary
            embedding of the first rotary_dim dims of each head (2 <= rotary_dim <= d; the
            rest are left as they are). New key i is rotated at position
            cache_seqlens[b] + i before it is appended (both keys of a V1 key pair); query i
            at cache_seqlens[b] + i when causal or windowed, else every query at
            cache_seqlens[b] (flash-attn's rule; both q maps of a differential head).
            Positions are logical cache positions, so with cache_leftpad the first real
            token of a sequence sits at position cache_leftpad[b], as in flash-attn.
            cache_seqlens + max(Nnew, Nq if causal or windowed else 1) must not exceed
            seqlen_ro. On the fused path q is rotated inside the decode kernel.
        rotary_interleaved: True: GPT-J pairs (dims 2i, 2i + 1); False: GPT-NeoX halves
            (dims i, i + rotary_dim / 2). Each pair (a, b) becomes (a cos - b sin,
            b cos + a sin).
        causal: default False, as in flash-attn: every query sees all L = cache_seqlens[b]
            + Nnew keys. True: query i sees keys j <= L - Nq + i (bottom-right aligned). A
            query that sees no key gives zeros.
        window_size: (left, right) or None, -1 = unbounded: local attention, query i sees
            keys L - Nq + i - left <= j <= L - Nq + i + right (right is 0 with causal;
            FlashAttention's rule, as in diff_attention). None or (-1, -1): no window.
        num_splits: key splits of the fused path (flash-decoding): 0 chooses from the shapes,
            1 runs one pass; the partial results are merged with their log-sum-exp.
        softcap: logit soft-capping, as in diff_attention (0: off).
        return_softmax_lse: also return lse (B, 2H, Nq) float32, each softmax map's
            natural-log log-sum-exp of its scores (scale * q k^T, soft-capped with softcap)
            over the keys it sees, in q-head order
            (q head 2h: map 1 of differential head h, 2h + 1: map 2); +inf for a row that
            sees no key (flash-attn's value).
        backend: "auto" | "triton" | "torch" (see diffattn.backend). The fused path is
            forward only (call it under torch.no_grad()); differentiating through the torch
            path makes the in-place append part of the autograd graph, so the caches then
            carry the graph of every step until they are detached.
"""


def _with_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                  cache_batch_idx, cache_leftpad, block_table, *, lambda_, scale, causal,
                  window_size, rotary_interleaved, num_splits, softcap, return_softmax_lse,
                  backend, v2: bool, norm_weight=None, eps=1e-5, out_scale=1.0,
                  lambda_vectors=None, lambda_init=None, rms_norm=None):
    """diff_attention_with_kvcache, or diff_attention_v2_with_kvcache with ``v2``: the checks,
    the backend, then run_with_kvcache."""
    check_backend_name(backend)
    lam_check = 0.0 if not v2 and (lambda_ is None or lambda_vectors is not None) else lambda_
    _check_kvcache(q, k_cache, v_cache, lam_check, k, v, cache_seqlens, block_table,
                   norm_weight, scale, causal, eps, out_scale, num_splits, v2=v2,
                   cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad,
                   rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                   rotary_interleaved=rotary_interleaved, window_size=window_size,
                   return_softmax_lse=return_softmax_lse)
    check_softcap(softcap)
    lambda_ = resolve_lambda_vectors(lambda_, lambda_vectors, lambda_init, q)
    norm_weight = resolve_rms_norm(norm_weight, rms_norm, v_cache.shape[3], q)
    chosen = resolve_backend(backend, q.device, q.dtype, q.shape[3])
    return run_with_kvcache(q, k_cache, v_cache, lambda_, chosen, k=k, v=v,
                            rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                            cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx,
                            cache_leftpad=cache_leftpad, block_table=block_table,
                            causal=causal, window_size=window_size,
                            rotary_interleaved=rotary_interleaved, scale=scale,
                            norm_weight=norm_weight, eps=eps, out_scale=out_scale,
                            num_splits=num_splits, return_softmax_lse=return_softmax_lse,
                            v2=v2, softcap=softcap)


def diff_attention_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor,
                                k: Optional[Tensor] = None, v: Optional[Tensor] = None,
                                rotary_cos: Optional[Tensor] = None,
                                rotary_sin: Optional[Tensor] = None,
                                cache_seqlens: Union[int, Tensor, None] = None,
                                cache_batch_idx: Optional[Tensor] = None,
                                cache_leftpad: Optional[Tensor] = None,
                                block_table: Optional[Tensor] = None, *,
                                lambda_: Optional[Union[float, Tensor]] = None,
                                scale: Optional[float] = None, causal: bool = False,
                                window_size: Optional[Tuple[int, int]] = None,
                                rotary_interleaved: bool = True,
                                norm_weight: Optional[Tensor] = None, eps: float = 1e-5,
                                out_scale: float = 1.0,
                                lambda_vectors: Optional[Tensor] = None,
                                lambda_init: Optional[float] = None,
                                rms_norm: Optional[bool] = None, num_splits: int = 0,
                                softcap: float = 0.0, return_softmax_lse: bool = False,
                                backend: str = "auto"):
    """Differential attention (V1 / DiffCLIP) of a decoding step against a KV cache, forward
    only; k and v, when given, are first appended to the caches in place.
{signature}
    Args:
        q: (B, Nq, 2H, d), the queries of the last Nq positions of each sequence.
        k_cache: (B, Mmax, 2Hk, d), or (num_blocks, page_size, 2Hk, d) with block_table.
        v_cache: (B, Mmax, Hk, 2d), or (num_blocks, page_size, Hk, 2d) with block_table.
        k, v: (B, Nnew, 2Hk, d) and (B, Nnew, Hk, 2d), or None: written into the caches at
            positions cache_seqlens[b] .. cache_seqlens[b] + Nnew - 1 (in place).
        lambda_: float, 0-dim or (H,) tensor (keyword-only); or None with lambda_vectors.
        scale: softmax scale (flash-attn's softmax_scale), default d ** -0.5.
        norm_weight, eps, out_scale: as in diff_attention (the RMSNorm epilogue).
        lambda_vectors, lambda_init: instead of lambda_, the Differential Transformer's
            lambda exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init from the (4, d) rows lq1,
            lk1, lq2, lk2, computed by the kernels (as in diff_attention).
        rms_norm: as in diff_attention: None follows norm_weight; True runs the RMSNorm
            (weightless without norm_weight); False runs none.{common}
    Returns:
        (B, Nq, H, 2d) in q's dtype; (out, lse) with return_softmax_lse.
    """
    return _with_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                         cache_batch_idx, cache_leftpad, block_table, lambda_=lambda_,
                         scale=scale, causal=causal, window_size=window_size,
                         rotary_interleaved=rotary_interleaved, norm_weight=norm_weight, eps=eps,
                         out_scale=out_scale, lambda_vectors=lambda_vectors,
                         lambda_init=lambda_init, rms_norm=rms_norm, num_splits=num_splits,
                         softcap=softcap, return_softmax_lse=return_softmax_lse,
                         backend=backend, v2=False)


def diff_attention_v2_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor,
                                   k: Optional[Tensor] = None, v: Optional[Tensor] = None,
                                   rotary_cos: Optional[Tensor] = None,
                                   rotary_sin: Optional[Tensor] = None,
                                   cache_seqlens: Union[int, Tensor, None] = None,
                                   cache_batch_idx: Optional[Tensor] = None,
                                   cache_leftpad: Optional[Tensor] = None,
                                   block_table: Optional[Tensor] = None, *,
                                   lambda_: Union[float, Tensor],
                                   scale: Optional[float] = None, causal: bool = False,
                                   window_size: Optional[Tuple[int, int]] = None,
                                   rotary_interleaved: bool = True, num_splits: int = 0,
                                   softcap: float = 0.0, return_softmax_lse: bool = False,
                                   backend: str = "auto"):
    """Differential attention V2 of a decoding step against a KV cache, forward only; k and v,
    when given, are first appended to the caches in place.
{signature}
    Args:
        q: (B, Nq, 2H, d), the queries of the last Nq positions of each sequence.
        k_cache, v_cache: (B, Mmax, Hk, d), or (num_blocks, page_size, Hk, d) with
            block_table (the 2H q heads share Hk key/value heads: q head j reads head
            j // (2H / Hk)).
        k, v: (B, Nnew, Hk, d) or None: written into the caches at positions
            cache_seqlens[b] .. cache_seqlens[b] + Nnew - 1 (in place).
        lambda_: float, (), (H,) or per token (B, Nq, H) tensor (keyword-only).
        scale: softmax scale (flash-attn's softmax_scale), default d ** -0.5.{common}
    Returns:
        (B, Nq, H, d) in q's dtype; (out, lse) with return_softmax_lse.
    """
    return _with_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                         cache_batch_idx, cache_leftpad, block_table, lambda_=lambda_,
                         scale=scale, causal=causal, window_size=window_size,
                         rotary_interleaved=rotary_interleaved, num_splits=num_splits,
                         softcap=softcap, return_softmax_lse=return_softmax_lse,
                         backend=backend, v2=True)


for _fn, _lam, _extra in (
        (diff_attention_with_kvcache, "lambda_=None",
         "norm_weight=None, eps=1e-5, out_scale=1.0, lambda_vectors=None, lambda_init=None,"
         "\n            rms_norm=None, "),
        (diff_attention_v2_with_kvcache, "lambda_", "")):
    if _fn.__doc__:  # None under python -OO
        _fn.__doc__ = _fn.__doc__.format(
            signature=_SIGNATURE_DOC.format(name=_fn.__name__, lam=_lam, extra=_extra),
            common=_COMMON_ARGS_DOC.rstrip())
del _fn, _lam, _extra


# ------------------------------------------------------------------ the layers' cache
class DiffKVCache:
    """One layer's key/value cache for decoding with DiffMultiheadAttention or
    DiffMultiheadAttentionV2: ``layer(x, kv_cache=cache)`` appends the step's keys and values
    and attends over everything cached so far (causal).

    Attributes:
        k_cache: (B, capacity, key_heads, head_dim): V1 2 * num_kv_heads // 2 key heads (a
            pair per group), V2 num_kv_heads.
        v_cache: (B, capacity, kv_groups, value_dim): V1 num_kv_heads // 2 groups of width
            2 * head_dim, V2 num_kv_heads of width head_dim.
        seqlens: (B,) int32, the tokens cached per sequence; the layer advances it after each
            call (in place, on the device: no host synchronisation).

    ``DiffKVCache.empty(batch, capacity, layer)`` allocates one for a layer (its device and
    dtype unless given). Sequences may start at different lengths (``seqlens`` set by hand),
    e.g. after prompts of different lengths; ``reset()`` empties the cache.
    """

    def __init__(self, k_cache: Tensor, v_cache: Tensor, seqlens: Tensor):
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("seqlens", seqlens)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if seqlens.dtype != torch.int32:
            raise TypeError(f"seqlens must be an int32 tensor, got {seqlens.dtype}")
        if tuple(seqlens.shape) != (k_cache.shape[0],):
            raise ValueError(f"seqlens must have shape ({k_cache.shape[0]},), got "
                             f"{tuple(seqlens.shape)}")
        self.k_cache, self.v_cache, self.seqlens = k_cache, v_cache, seqlens
        if not torch.compiler.is_compiling():
            # fixed addresses: a compiled step (mode="reduce-overhead") updates them in place
            # inside its CUDA graph instead of copying them in and out
            for t in (k_cache, v_cache, seqlens):
                torch._dynamo.mark_static_address(t)

    @classmethod
    def empty(cls, batch: int, capacity: int, layer, *, device=None,
              dtype=None) -> "DiffKVCache":
        """A cache of ``capacity`` tokens per sequence for ``layer`` (a
        DiffMultiheadAttention or DiffMultiheadAttentionV2), zero tokens cached."""
        for name, value in (("batch", batch), ("capacity", capacity)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        shapes = getattr(layer, "kv_cache_shapes", None)
        if shapes is None:
            raise TypeError(f"layer must be a DiffMultiheadAttention or DiffMultiheadAttentionV2,"
                            f" got {type(layer).__name__}")
        weight = layer.in_proj_weight if hasattr(layer, "in_proj_weight") else \
            layer.q_proj_weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        (key_heads, head_dim), (groups, value_dim) = shapes()
        return cls(torch.zeros(batch, capacity, key_heads, head_dim, device=device, dtype=dtype),
                   torch.zeros(batch, capacity, groups, value_dim, device=device, dtype=dtype),
                   torch.zeros(batch, dtype=torch.int32, device=device))

    @property
    def capacity(self) -> int:
        return self.k_cache.shape[1]

    def reset(self) -> None:
        """Forget every cached token (the tensors are kept)."""
        self.seqlens.zero_()

    def __repr__(self) -> str:
        return (f"DiffKVCache(batch={self.k_cache.shape[0]}, capacity={self.capacity}, "
                f"k_cache={tuple(self.k_cache.shape)}, v_cache={tuple(self.v_cache.shape)}, "
                f"dtype={self.k_cache.dtype}, device={self.k_cache.device})")


def layer_decode_step(layer, query: Tensor, cache: DiffKVCache, v2: bool, *,
                      other_arguments: dict) -> Tensor:
    """``layer(query, kv_cache=cache)`` of DiffMultiheadAttention (v2=False) or
    DiffMultiheadAttentionV2 (v2=True): causal self-attention of the new tokens ``query``
    ((B, N, E) with batch_first, else (N, B, E)) over the cached ones and themselves; their
    keys and values are appended to the cache and ``cache.seqlens`` advances by N (in place).
    ``other_arguments``: the forward's key, value, key_padding_mask, attn_mask, window_size
    and need_weights, which a decoding step does not take (key and value may be query itself).
    Returns the layer's output in query's layout."""
    given = [name for name, value in other_arguments.items()
             if value is not None and value is not False
             and not (name in ("key", "value") and value is query)]
    if given:
        raise ValueError("kv_cache takes self-attention only: no key, value, key_padding_mask, "
                         f"attn_mask, window_size or need_weights (got {', '.join(given)})")
    if not isinstance(cache, DiffKVCache):
        raise TypeError(f"kv_cache must be a diffattn.DiffKVCache, got {type(cache).__name__}")
    if not isinstance(query, Tensor) or query.dim() != 3 or query.shape[2] != layer.embed_dim:
        got = tuple(query.shape) if isinstance(query, Tensor) else type(query).__name__
        raise ValueError(f"query must have shape (batch, seq, {layer.embed_dim}) with "
                         f"batch_first (else (seq, batch, {layer.embed_dim})) with a kv_cache, "
                         f"got {got}")
    if getattr(layer, "kdim", layer.embed_dim) != layer.embed_dim or \
            getattr(layer, "vdim", layer.embed_dim) != layer.embed_dim:
        raise ValueError("kv_cache needs a self-attention layer (kdim = vdim = embed_dim)")
    x = query if layer.batch_first else query.transpose(0, 1)
    B, N, _ = x.shape
    d = layer.head_dim
    projected = layer._project(x, x, x)
    if v2:
        q, logits, k, v = projected
        lam = torch.sigmoid(logits.float())                                     # (B, N, h)
        q = q.reshape(B, N, 2 * layer.num_heads, d)
        k = k.reshape(B, N, layer.num_kv_heads, d)
        v = v.reshape(B, N, layer.num_kv_heads, d)
        extra = {}
        check_lam = lam
    else:
        q, k, v = projected
        lam = LambdaVectors(layer.lambda_vectors, layer.lambda_init)
        q = q.reshape(B, N, layer.num_heads, d)
        k = k.reshape(B, N, layer.num_kv_heads, d)
        v = v.reshape(B, N, layer.num_kv_heads // 2, 2 * d)
        extra = dict(norm_weight=layer.diff_norm.weight, eps=layer.diff_norm.eps,
                     out_scale=1.0 - layer.lambda_init)
        check_lam = 0.0
    _check_kvcache(q, cache.k_cache, cache.v_cache, check_lam, k, v, cache.seqlens, None,
                   extra.get("norm_weight"), None, True, extra.get("eps", 1e-5),
                   extra.get("out_scale", 1.0), 0, v2=v2)
    backend = resolve_layer_backend(layer, q.device, q.dtype, d)
    out = run_with_kvcache(q, cache.k_cache, cache.v_cache, lam, backend, k=k, v=v,
                           cache_seqlens=cache.seqlens, causal=True, v2=v2, **extra)
    cache.seqlens.add_(N)
    out = layer.out_proj(out.flatten(2))
    return out if layer.batch_first else out.transpose(0, 1)
