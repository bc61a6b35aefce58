"""``DiffMultiheadAttentionV2``: the Differential Transformer V2 layer as a drop-in for
nn.MultiheadAttention.

Against a plain layer of h heads of width d (E = h * d), V2 doubles the query heads only:
q_proj gives 2h heads, k_proj and v_proj keep num_kv_heads heads of width d, and
lambda_proj (E -> h) gives one lambda logit per token and head. Differential head i subtracts
its second map from its first, both reading key/value group i // (h // num_kv_heads):

    lambda = sigmoid(x W_lambda + b_lambda)                      (B, N, h)
    out_i  = softmax(s q_2i k_g^T) v_g - lambda_i softmax(s q_2i+1 k_g^T) v_g     (no norm)
    y      = out_proj(concat_i out_i)                            (h * d -> E)

So the output width, the key/value heads and out_proj are the baseline's: only q_proj grows
(and lambda_proj is added). The q, lambda, k and v projections are one packed parameter (one
GEMM for self-attention); checkpoints use the names q_proj, lambda_proj, k_proj, v_proj,
out_proj. ``from_plain`` builds the layer from an nn.MultiheadAttention so that it starts out
computing what the plain layer computes; ``plain_to_v2_state_dict`` is the same conversion on
one layer's state dict, and ``state_dict_from_plain`` the one whole-model warm starts use.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention_inputs import (attention_masks, attention_weights, check_module_inputs,
                               check_packed_inputs, restore_layout)
from .backend import check_backend_name, resolve_layer_backend, unsupported_features
from .checks import check_window_size
from .functional import diff_attention_v2_varlen, run_diff_attention_v2
from .kvcache import DiffKVCache, layer_decode_step
from .packed_projection import load_packed, projection_slice, save_packed

# lambda at the start of a layer converted from plain attention (from_plain): small enough that
# the layer computes what the plain one did, within about this much relative.
INITIAL_LAMBDA = 1e-5

# Packed rows, query side first (q, lambda) so that cross-attention slices stay contiguous.
_PROJECTIONS = ("q_proj", "lambda_proj", "k_proj", "v_proj")
# One nn.MultiheadAttention state dict with biases and kdim = vdim = embed_dim.
PLAIN_KEYS = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
# What a warm start from plain attention derives (q_proj) or initialises (lambda_proj).
_FROM_PLAIN_DERIVED = ("q_proj.weight", "q_proj.bias", "lambda_proj.weight", "lambda_proj.bias")


class DiffMultiheadAttentionV2(nn.Module):
    """Differential Transformer V2 attention with nn.MultiheadAttention's interface.

    Args:
        embed_dim: model width E.
        num_heads: the baseline's head count h (head_dim d = E // h); the layer has 2h query
            heads and h differential heads.
        dropout: attention dropout on both maps (training only; the fused kernels do not
            implement it: with dropout > 0 in training, backend "auto" uses the torch path and
            "triton" raises).
        bias: biases on the projections.
        batch_first: (B, N, E) inputs if True, else (N, B, E).
        num_kv_heads: key/value heads of width d (grouped-query attention; divides num_heads;
            default num_heads).
        backend: "auto" | "triton" | "torch".
    Attributes:
        in_proj_weight, in_proj_bias: the packed q (2E rows), lambda (h), k and v (each
            num_kv_heads * d) projections; ``q_proj``, ``lambda_proj``, ``k_proj``, ``v_proj``
            give each as a view.
        last_backend: "triton" or "torch", what the last forward ran.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, *, num_kv_heads: Optional[int] = None,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a multiple of num_heads "
                             f"({num_heads})")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or \
                num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads must be a positive divisor of num_heads "
                             f"({num_heads}), got {num_kv_heads!r}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        check_backend_name(backend)
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self.backend = backend
        self.last_backend: Optional[str] = None
        kv_dim = num_kv_heads * self.head_dim
        self._sizes = (2 * embed_dim, num_heads, kv_dim, kv_dim)
        self.in_proj_weight = nn.Parameter(torch.empty(sum(self._sizes), embed_dim, **factory))
        self.in_proj_bias = (nn.Parameter(torch.empty(sum(self._sizes), **factory)) if bias
                             else None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Projections as nn.Linear initialises them (uniform, bound 1/sqrt(E))."""
        nn.init.kaiming_uniform_(self.in_proj_weight, a=math.sqrt(5))
        if self.in_proj_bias is not None:
            bound = self.embed_dim ** -0.5
            nn.init.uniform_(self.in_proj_bias, -bound, bound)
        self.out_proj.reset_parameters()

    @classmethod
    def from_plain(cls, mha: nn.MultiheadAttention, *, initial_lambda: float = INITIAL_LAMBDA,
                   backend: str = "auto") -> "DiffMultiheadAttentionV2":
        """A V2 layer that starts out computing what ``mha`` computes, to fine-tune a
        pretrained model into Differential Transformer V2 without a jump in the loss.

        The first map of each pair takes the plain head's q projection; k, v and out_proj are
        the plain layer's. The second maps' q projection is zero and lambda starts at
        ``initial_lambda`` for every token (lambda_proj weight 0, bias logit(initial_lambda)),
        so the second maps contribute initial_lambda times the mean value: outputs equal the
        plain layer's within about initial_lambda relative. (Adam-style optimisers move the
        small lambda and the zero queries at their usual rate.) Needs a layer with biases
        and equal query/key/value widths. The weights are
        ``plain_to_v2_state_dict(mha.state_dict(), mha.num_heads)``; the new layer has mha's
        dropout, batch_first, device, dtype and training mode.
        """
        check_plain_for_v2(mha)
        weights = plain_to_v2_state_dict(mha.state_dict(), mha.num_heads,
                                         initial_lambda=initial_lambda)
        weight = mha.in_proj_weight
        layer = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=True,
                    batch_first=mha.batch_first, backend=backend, device=weight.device,
                    dtype=weight.dtype)
        layer.load_state_dict(weights, strict=True)
        return layer.train(mha.training)

    def plain_state_dict_shapes(self) -> dict:
        """{name: shape} of the nn.MultiheadAttention state dict this layer is warm-started
        from (``state_dict_from_plain``): ``in_proj_weight`` (E + 2 * kv rows, E), and
        ``in_proj_bias`` (rows,), ``out_proj.weight`` (E, E), ``out_proj.bias`` (E,)."""
        rows = self.embed_dim + 2 * self.num_kv_heads * self.head_dim
        shapes = {"in_proj_weight": torch.Size([rows, self.embed_dim]),
                  "out_proj.weight": self.out_proj.weight.shape}
        if self.in_proj_bias is not None:
            shapes["in_proj_bias"] = torch.Size([rows])
            shapes["out_proj.bias"] = self.out_proj.bias.shape
        return shapes

    def state_dict_from_plain(self, plain: dict) -> tuple:
        """(this layer's state dict, the names in it that are derived or new) for one plain
        layer's state dict (``PLAIN_KEYS``): ``plain_to_v2_state_dict``, as ``from_plain``
        converts a layer. Used for warm starts of whole models from plain checkpoints."""
        return plain_to_v2_state_dict(plain, self.num_heads), _FROM_PLAIN_DERIVED

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads} ({2 * self.num_heads} "
                f"query heads of width {self.head_dim}), num_kv_heads={self.num_kv_heads}, "
                f"dropout={self.dropout}, batch_first={self.batch_first}, "
                f"backend={self.backend!r}")

    # ---------------------------------------------------------------- projections
    def _projection(self, index: int):
        start = sum(self._sizes[:index])
        return projection_slice(self.in_proj_weight, self.in_proj_bias, start,
                                start + self._sizes[index])

    q_proj = property(lambda self: self._projection(0), doc="the q projection, as a view")
    lambda_proj = property(lambda self: self._projection(1),
                           doc="the lambda-logit projection, as a view")
    k_proj = property(lambda self: self._projection(2), doc="the k projection, as a view")
    v_proj = property(lambda self: self._projection(3), doc="the v projection, as a view")

    def _project(self, query: Tensor, key: Tensor, value: Tensor):
        """(q, lambda logits, k, v); one GEMM for self-attention."""
        sizes = self._sizes
        if key is query and value is query:
            return F.linear(query, self.in_proj_weight,
                            self.in_proj_bias).split_with_sizes(sizes, -1)
        query_side = projection_slice(self.in_proj_weight, self.in_proj_bias, 0,
                                      sizes[0] + sizes[1])
        q, logits = query_side(query).split_with_sizes(sizes[:2], -1)
        return q, logits, self.k_proj(key), self.v_proj(value)

    # ---------------------------------------------------------------- state dict
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "in_proj_weight", None)
        destination.pop(prefix + "in_proj_bias", None)
        save_packed(destination, prefix, self.in_proj_weight, self.in_proj_bias, _PROJECTIONS,
                    self._sizes, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Accept the per-projection names (q_proj.weight, lambda_proj.weight, ...) and the
        packed ones."""
        load_packed(state_dict, prefix, _PROJECTIONS, self._sizes, self.in_proj_bias is not None,
                    error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # ---------------------------------------------------------------- forward
    def kv_cache_shapes(self):
        """((key heads, head dim), (value heads, value dim)) of this layer's KV cache rows
        (see diffattn.DiffKVCache.empty)."""
        return ((self.num_kv_heads, self.head_dim), (self.num_kv_heads, self.head_dim))

    def forward(self, query: Tensor, key: Optional[Tensor] = None, value: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False, window_size: Optional[Tuple[int, int]] = None,
                kv_cache: Optional[DiffKVCache] = None, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None):
        """nn.MultiheadAttention's contract, as DiffMultiheadAttention.forward (attn_mask per
        query head: (L, S) or (B * 2 * num_heads, L, S)). With need_weights=True the weights
        are the differential maps A1 - lambda * A2, (B, N, S) averaged over the h differential
        heads, or (B, num_heads, N, S) with average_attn_weights=False. kv_cache (a
        diffattn.DiffKVCache): a decoding step, as in DiffMultiheadAttention.forward.
        cu_seqlens, max_seqlen: packed sequences, query (total, E) -> (output (total, E),
        None), as in DiffMultiheadAttention.forward."""
        if cu_seqlens is not None or max_seqlen is not None:  # packed sequences
            other = dict(key=key, value=value, key_padding_mask=key_padding_mask,
                         attn_mask=attn_mask, need_weights=need_weights, kv_cache=kv_cache)
            return self._forward_packed(query, cu_seqlens, max_seqlen, is_causal, window_size,
                                        other), None
        if kv_cache is not None:  # a decoding step: causal self-attention over the cache
            other = dict(key=key, value=value, key_padding_mask=key_padding_mask,
                         attn_mask=attn_mask, window_size=window_size, need_weights=need_weights)
            return layer_decode_step(self, query, kv_cache, v2=True, other_arguments=other), None
        E = self.embed_dim
        query, key, value, key_padding_mask, unbatched = check_module_inputs(
            query, key, value, key_padding_mask, E, E, E, self.batch_first)
        q, logits, k, v = self._project(query, key, value)
        if not self.batch_first:
            q, logits, k, v = (t.transpose(0, 1) for t in (q, logits, k, v))
        B, N, M = q.shape[0], q.shape[1], k.shape[1]
        d = self.head_dim
        q = q.view(B, N, 2 * self.num_heads, d)
        k = k.view(B, M, self.num_kv_heads, d)
        v = v.view(B, M, self.num_kv_heads, d)
        lam = torch.sigmoid(logits.float())                                  # (B, N, h)

        check_window_size(window_size)
        causal, bias, key_padding_mask = attention_masks(attn_mask, key_padding_mask, is_causal,
                                                         B, N, M, 2 * self.num_heads)
        dropout_p = self.dropout if self.training else 0.0
        backend = resolve_layer_backend(self, q.device, q.dtype, d,
                                        unsupported_features(dropout_p, bias))
        out = run_diff_attention_v2(q, k, v, lam, backend, causal=causal,
                                    key_padding_mask=key_padding_mask, dropout_p=dropout_p,
                                    attn_mask=bias, window_size=window_size)
        out = self.out_proj(out.flatten(2))

        weights = None
        if need_weights:
            weights = attention_weights(q, k.repeat_interleave(2, dim=2), lam.to(q.dtype),
                                        causal=causal, key_padding_mask=key_padding_mask,
                                        bias=bias, window_size=window_size,
                                        average=average_attn_weights, unbatched=unbatched)
        return restore_layout(out, self.batch_first, unbatched), weights

    def _forward_packed(self, query: Tensor, cu_seqlens, max_seqlen, is_causal, window_size,
                        other_arguments: dict) -> Tensor:
        """forward on packed sequences: query (total, E) -> (total, E)."""
        check_packed_inputs(self, query, cu_seqlens, max_seqlen, other_arguments)
        q, logits, k, v = self._project(query, query, query)
        total, d = query.shape[0], self.head_dim
        q = q.view(total, 2 * self.num_heads, d)
        k = k.view(total, self.num_kv_heads, d)
        v = v.view(total, self.num_kv_heads, d)
        lam = torch.sigmoid(logits.float())                                  # (total, h)
        backend = resolve_layer_backend(self, q.device, q.dtype, d)
        out = diff_attention_v2_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                       lambda_=lam, causal=bool(is_causal),
                                       window_size=window_size, backend=backend)
        return self.out_proj(out.flatten(1))


# --------------------------------------------------------------------------- from plain attention
def check_initial_lambda(initial_lambda) -> float:
    """``initial_lambda`` as a float in (0, 1), or a TypeError/ValueError naming it."""
    if isinstance(initial_lambda, bool) or not isinstance(initial_lambda, (int, float)):
        raise TypeError(f"initial_lambda must be a float in (0, 1), got {initial_lambda!r}")
    if not 0.0 < initial_lambda < 1.0:
        raise ValueError(f"initial_lambda must be in (0, 1), got {initial_lambda!r}")
    return float(initial_lambda)


def check_plain_for_v2(layer: nn.MultiheadAttention, name: Optional[str] = None) -> None:
    """Raise if ``layer`` cannot become a DiffMultiheadAttentionV2 that starts out equal to it.

    Raises:
        TypeError: ``layer`` is not an nn.MultiheadAttention.
        ValueError (naming the layer when ``name`` is given): no biases (lambda starts small
            through its bias), kdim or vdim other than embed_dim, add_bias_kv or add_zero_attn.
    """
    if not isinstance(layer, nn.MultiheadAttention):
        raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(layer).__name__}")
    what = "from_plain" if name is None else f"layer {name!r}: V2 conversion"
    if not layer._qkv_same_embed_dim or layer.in_proj_bias is None:
        raise ValueError(f"{what} needs an nn.MultiheadAttention with biases and "
                         "kdim = vdim = embed_dim (lambda starts small through its bias)")
    if layer.bias_k is not None or layer.add_zero_attn:
        raise ValueError(f"{what} does not support add_bias_kv or add_zero_attn")


def plain_to_v2_state_dict(state_dict: Mapping[str, Tensor], num_heads: int, *,
                           initial_lambda: float = INITIAL_LAMBDA) -> dict:
    """The DiffMultiheadAttentionV2 weights that start out computing what a plain layer does.

    Args:
        state_dict: one nn.MultiheadAttention's state dict, exactly ``in_proj_weight`` (3E, E)
            (q, k, v rows stacked), ``in_proj_bias`` (3E,), ``out_proj.weight`` (E, E) and
            ``out_proj.bias`` (E,): a layer with biases and kdim = vdim = E.
        num_heads: the plain layer's head count h (head width d = E // h): the V2 layer's
            ``num_heads``, with 2h query heads and num_kv_heads = h.
        initial_lambda: every token's lambda at the start, in (0, 1).
    Returns:
        A new dict in DiffMultiheadAttentionV2's names, in the input's dtype and device:
        ``q_proj.weight`` (2E, E) and ``q_proj.bias`` (2E,) (query heads 2i: plain head i,
        query heads 2i + 1: zeros), ``lambda_proj.weight`` (h, E) zeros and
        ``lambda_proj.bias`` (h,) = logit(initial_lambda), ``k_proj.*`` / ``v_proj.*`` (E, E) /
        (E,) and ``out_proj.*``: copies of the plain layer's. The second maps then attend
        uniformly and contribute initial_lambda times the mean value row: outputs equal the
        plain layer's within about initial_lambda relative.
    Raises:
        TypeError: num_heads not an int, initial_lambda not a float, a value not a tensor.
        ValueError: missing or unexpected keys (named), shapes that do not fit (named),
            num_heads not dividing E, initial_lambda outside (0, 1).
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int):
        raise TypeError(f"num_heads must be an int, got {type(num_heads).__name__}")
    initial_lambda = check_initial_lambda(initial_lambda)
    missing = [key for key in PLAIN_KEYS if key not in state_dict]
    unexpected = sorted(set(state_dict) - set(PLAIN_KEYS))
    if missing or unexpected:
        raise ValueError(f"state_dict must hold exactly {list(PLAIN_KEYS)} (an "
                         f"nn.MultiheadAttention with biases and kdim = vdim = embed_dim); "
                         f"missing {missing}, unexpected {unexpected}")
    for key in PLAIN_KEYS:
        if not isinstance(state_dict[key], Tensor):
            raise TypeError(f"state_dict[{key!r}] must be a tensor, got "
                            f"{type(state_dict[key]).__name__}")
    weight, bias = state_dict["in_proj_weight"], state_dict["in_proj_bias"]
    if weight.dim() != 2:
        raise ValueError(f"state_dict['in_proj_weight'] must be 2-D (3E, E), got shape "
                         f"{tuple(weight.shape)}")
    E = weight.shape[1]
    shapes = {"in_proj_weight": (3 * E, E), "in_proj_bias": (3 * E,),
              "out_proj.weight": (E, E), "out_proj.bias": (E,)}
    wrong = [f"{key}: expected {shape}, got {tuple(state_dict[key].shape)}"
             for key, shape in shapes.items() if tuple(state_dict[key].shape) != shape]
    if wrong:
        raise ValueError("state_dict has shapes that do not fit an nn.MultiheadAttention of "
                         f"embed_dim {E}: " + "; ".join(wrong))
    if num_heads <= 0 or E % num_heads:
        raise ValueError(f"num_heads must be a positive divisor of embed_dim ({E}), got "
                         f"{num_heads}")
    h, d = num_heads, E // num_heads
    factory = {"dtype": weight.dtype, "device": weight.device}
    wq, wk, wv = weight.split(E)
    bq, bk, bv = bias.split(E)
    with torch.no_grad():
        q_weight = torch.zeros(h, 2, d, E, **factory)
        q_bias = torch.zeros(h, 2, d, **factory)
        q_weight[:, 0] = wq.reshape(h, d, E)  # the first map of pair i is plain head i
        q_bias[:, 0] = bq.reshape(h, d)
        logit = math.log(initial_lambda / (1.0 - initial_lambda))
        return {
            "q_proj.weight": q_weight.reshape(2 * E, E),
            "q_proj.bias": q_bias.reshape(2 * E),
            "lambda_proj.weight": torch.zeros(h, E, **factory),
            "lambda_proj.bias": torch.full((h,), logit, **factory),
            "k_proj.weight": wk.clone(), "k_proj.bias": bk.clone(),
            "v_proj.weight": wv.clone(), "v_proj.bias": bv.clone(),
            "out_proj.weight": state_dict["out_proj.weight"].clone(),
            "out_proj.bias": state_dict["out_proj.bias"].clone(),
        }
