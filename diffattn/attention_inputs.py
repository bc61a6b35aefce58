"""nn.MultiheadAttention's calling convention, shared by the differential attention modules:
layouts (batch first or not, unbatched), key/value defaults, and the two kinds of mask.

Nothing here waits for the device. The one data-dependent question, whether an ``attn_mask``
is exactly the causal mask (CLIP text towers pass it that way), is answered without a host
synchronisation on every step: from the mask's values on the host when it lives on the CPU,
and otherwise once per mask tensor, the answer remembered for as long as that tensor is alive
and unmodified (a model's mask buffer is checked on its first forward only). Pass
``is_causal=True`` with the mask to skip the check; while torch.compile traces or a CUDA graph
is captured an unchecked mask is treated as a general mask (the torch path).
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor

from .masks import causal_keep_mask
from .torch_path import differential_maps, with_window


def check_module_inputs(query, key, value, key_padding_mask, embed_dim: int, kdim: int,
                        vdim: int, batch_first: bool):
    """Check the inputs of a forward and fill in the defaults, keeping the caller's layout
    ((B, L, E) with batch_first, else (L, B, E)), so projections run on them as they are.

    Returns (query, key, value, key_padding_mask, unbatched): key and value default to the
    query (self-attention; the same tensor object, so one projection GEMM can serve all
    three), and an unbatched (L, E) call gets a batch of one.
    """
    if not isinstance(query, Tensor):
        raise TypeError(f"query must be a tensor, got {type(query).__name__}")
    key = query if key is None else key
    value = key if value is None else value
    unbatched = query.dim() == 2
    if unbatched:
        batch_dim = 0 if batch_first else 1
        q1 = query.unsqueeze(batch_dim)
        k1 = q1 if key is query else key.unsqueeze(batch_dim)
        v1 = k1 if value is key else value.unsqueeze(batch_dim)
        query, key, value = q1, k1, v1
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    layout = "(B, L, E)" if batch_first else "(L, B, E)"
    for name, t, width in (("query", query, embed_dim), ("key", key, kdim),
                           ("value", value, vdim)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 3 or t.shape[-1] != width:
            raise ValueError(f"{name} must have shape {layout} or (L, E) with last dim "
                             f"{width}, got {tuple(t.shape)}")
    b = 0 if batch_first else 1
    if key.shape[b] != query.shape[b]:
        raise ValueError(f"key must have query's batch size {query.shape[b]}, got key "
                         f"{tuple(key.shape)} for query {tuple(query.shape)} (layout {layout})")
    if tuple(value.shape[:2]) != tuple(key.shape[:2]):
        raise ValueError(f"value must have key's batch size and length, got value "
                         f"{tuple(value.shape)} for key {tuple(key.shape)} (layout {layout})")
    return query, key, value, key_padding_mask, unbatched


def restore_layout(out: Tensor, batch_first: bool, unbatched: bool) -> Tensor:
    """(B, N, E) output back to the caller's layout."""
    if not batch_first:
        out = out.transpose(0, 1)
    return out.squeeze(0 if batch_first else 1) if unbatched else out


def attention_masks(attn_mask, key_padding_mask, is_causal, B: int, N: int, M: int,
                    num_heads: int):
    """Normalise nn.MultiheadAttention's masks to (causal, attn_mask for the functional op,
    bool key_padding_mask or None).

    is_causal=True, or an attn_mask that is exactly the causal mask (see is_causal_mask), makes
    the call causal and drops the mask (is_causal is a hint, as in nn.MultiheadAttention: the
    mask is then not read). attn_mask: bool (True = masked out) or float additive, (L, S) or
    (B * num_heads, L, S); returned as (L, S) or (B, num_heads, L, S). key_padding_mask:
    (B, S) bool (True = ignore) or float additive; a float one joins the attention mask (which
    then needs the torch path).
    """
    causal = bool(is_causal)
    if attn_mask is not None and (causal or is_causal_mask(attn_mask, N, M)):
        causal, attn_mask = True, None
    bias = None
    if attn_mask is not None:
        shapes = f"(L, S) = {(N, M)} or (batch * num_heads, L, S) = {(B * num_heads, N, M)}"
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a tensor, got {type(attn_mask).__name__}")
        if attn_mask.dim() == 2:
            if tuple(attn_mask.shape) != (N, M):
                raise ValueError(f"attn_mask must have shape {shapes}, got "
                                 f"{tuple(attn_mask.shape)}")
            bias = attn_mask
        elif attn_mask.dim() == 3:
            if tuple(attn_mask.shape) != (B * num_heads, N, M):
                raise ValueError(f"attn_mask must have shape {shapes}, got "
                                 f"{tuple(attn_mask.shape)}")
            bias = attn_mask.view(B, num_heads, N, M)
        else:
            raise ValueError(f"attn_mask must be 2-D or 3-D, got {attn_mask.dim()}-D")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor):
            raise TypeError(f"key_padding_mask must be a tensor, got "
                            f"{type(key_padding_mask).__name__}")
        if tuple(key_padding_mask.shape) != (B, M):
            raise ValueError(f"key_padding_mask must have shape (batch, S) = {(B, M)}, got "
                             f"{tuple(key_padding_mask.shape)}")
        if key_padding_mask.dtype != torch.bool:
            if not key_padding_mask.is_floating_point():
                raise TypeError("key_padding_mask must be bool (True = ignore) or float "
                                f"(additive), got {key_padding_mask.dtype}")
            extra = key_padding_mask[:, None, None, :]
            if bias is not None and bias.dtype == torch.bool:
                bias = torch.zeros(bias.shape, dtype=extra.dtype,
                                   device=bias.device).masked_fill(bias, float("-inf"))
            bias = extra if bias is None else bias + extra
            key_padding_mask = None
    return causal, bias, key_padding_mask


class _CausalMaskAnswers:
    """Remembered answers of ``is_causal_mask`` per live, unmodified mask tensor."""

    def __init__(self):
        self._answers = {}

    def get(self, mask: Tensor) -> Optional[bool]:
        entry = self._answers.get(id(mask))
        if entry is None or entry[0]() is not mask or entry[1] != mask._version:
            return None
        return entry[2]

    def put(self, mask: Tensor, answer: bool) -> None:
        key = id(mask)
        self._answers[key] = (weakref.ref(mask, lambda _, key=key: self._answers.pop(key, None)),
                              mask._version, answer)


_CAUSAL_ANSWERS = _CausalMaskAnswers()


def _values_are_causal(mask: Tensor) -> bool:
    N, M = mask.shape
    above = ~causal_keep_mask(N, M, mask.device)
    if mask.dtype == torch.bool:
        return torch.equal(mask, above)
    return bool(torch.isneginf(mask[above]).all() and (mask[~above] == 0).all())


def is_causal_mask(mask: Tensor, N: int, M: int) -> bool:
    """True when ``mask`` (N, M) is exactly the causal mask (bool True / float -inf above the
    diagonal, False / 0 elsewhere). See the module docstring for when values are read."""
    if N != M or mask.dim() != 2 or tuple(mask.shape) != (N, M) or \
            torch.compiler.is_compiling():
        return False
    if mask.device.type == "cpu":
        return _values_are_causal(mask)
    answer = _CAUSAL_ANSWERS.get(mask)
    if answer is None:
        if mask.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False
        answer = _values_are_causal(mask)
        _CAUSAL_ANSWERS.put(mask, answer)
    return answer


def check_packed_inputs(layer, query, cu_seqlens, max_seqlen, other_arguments: dict) -> None:
    """Check a packed-sequence forward ``layer(x, cu_seqlens=..., max_seqlen=...)``: causal or
    bidirectional self-attention within each of the sequences packed one after another in
    query (total, E). cu_seqlens: int32 (batch + 1,) cumulative offsets (their values are
    checked by the packed op); max_seqlen: an int >= the longest sequence. other_arguments:
    the forward's key, value, key_padding_mask, attn_mask, need_weights and kv_cache, which a
    packed call does not take (key and value may be query itself). Attention dropout is not
    available on packed sequences: a training layer with dropout > 0 is refused."""
    given = [name for name, value in other_arguments.items()
             if value is not None and value is not False
             and not (name in ("key", "value") and value is query)]
    if given:
        raise ValueError(f"cu_seqlens takes packed self-attention only: no key, value, "
                         f"key_padding_mask, attn_mask, need_weights or kv_cache (got "
                         f"{', '.join(given)})")
    if cu_seqlens is None or max_seqlen is None:
        missing = "cu_seqlens" if cu_seqlens is None else "max_seqlen"
        raise ValueError(f"packed sequences need both cu_seqlens (int32 (batch + 1,) offsets) "
                         f"and max_seqlen (the longest sequence, an int); {missing} is missing")
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32 or \
            cu_seqlens.dim() != 1:
        got = (f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, Tensor)
               else type(cu_seqlens).__name__)
        raise TypeError(f"cu_seqlens must be an int32 tensor of shape (batch + 1,), got {got}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"max_seqlen must be an int (the longest sequence), got "
                        f"{max_seqlen!r}")
    if max_seqlen < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
    if not isinstance(query, Tensor):
        raise TypeError(f"query must be a tensor, got {type(query).__name__}")
    if query.dim() != 2 or query.shape[1] != layer.embed_dim:
        raise ValueError(f"query must be packed as (total, embed_dim) = (total, "
                         f"{layer.embed_dim}) with cu_seqlens, got {tuple(query.shape)}")
    if getattr(layer, "kdim", layer.embed_dim) != layer.embed_dim or \
            getattr(layer, "vdim", layer.embed_dim) != layer.embed_dim:
        raise ValueError("cu_seqlens needs a self-attention layer (kdim = vdim = embed_dim)")
    if layer.training and layer.dropout > 0:
        raise ValueError(f"attention dropout (dropout={layer.dropout}) is not available on "
                         f"packed sequences (cu_seqlens): build the layer with dropout=0, or "
                         f"call it in eval mode")


def attention_weights(q: Tensor, k: Tensor, lambda_, *, causal: bool, key_padding_mask, bias,
                      window_size, average: bool, unbatched: bool) -> Tensor:
    """The layers' need_weights output: the difference of the two softmax maps, (B, H, N, M),
    or (B, N, M) averaged over the heads with ``average``, without the batch dimension when
    ``unbatched``. q (B, N, 2H, d), k (B, M, 2H, d) (V2 passes its keys repeated as pairs);
    ``bias`` the layer's attention bias, ``window_size`` folded into it."""
    N, M = q.shape[1], k.shape[1]
    *_, diff = differential_maps(q, k, lambda_=lambda_, causal=causal,
                                 key_padding_mask=key_padding_mask,
                                 attn_bias=with_window(bias, window_size, causal, N, M, q.device))
    weights = diff.mean(1) if average else diff
    return weights.squeeze(0) if unbatched else weights
