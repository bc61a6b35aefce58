"""``DiffMultiheadAttention``: differential attention as a drop-in for nn.MultiheadAttention.

The layer of DiffCLIP (and of the Differential Transformer): q/k/v projections, two softmax
maps per differential head, their lambda-weighted difference, a per-head RMSNorm times
(1 - lambda_init), and the output projection. With the fused backend the whole attention core
(both maps, difference, norm, scale) is one kernel launch forward and two backward; the q, k
and v projections of a self-attention call are one matrix multiply (a packed parameter, see
diffattn/packed_projection.py).

State-dict names follow the DiffCLIP release, so its attention layers load with strict=True:
q_proj, k_proj, v_proj, out_proj, lambda_q1, lambda_k1, lambda_q2, lambda_k2,
diff_norm.weight (the four lambda vectors are one (4, d) parameter, ``lambda_vectors``, so the
fused kernels compute lambda and its gradient themselves, with no extra operations per step).
nn.MultiheadAttention's layouts (packed ``in_proj_weight``, or ``q_proj_weight`` /
``k_proj_weight`` / ``v_proj_weight`` with kdim/vdim) load too.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention_inputs import (attention_masks, attention_weights, check_module_inputs,
                               check_packed_inputs, restore_layout)
from .backend import check_backend_name, resolve_layer_backend, unsupported_features
from .checks import check_window_size
from .functional import diff_attention_varlen, run_diff_attention
from .kvcache import DiffKVCache, layer_decode_step
from .lambdas import LambdaVectors
from .packed_projection import load_packed, projection_slice, save_packed
from .torch_path import rms_norm_epilogue

_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
_SEPARATE = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
_LAMBDAS = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")


def check_lambda_init(lambda_init, name: str = "lambda_init") -> float:
    """``lambda_init`` as a float, or a TypeError/ValueError naming ``name`` and why.

    It must be a finite number strictly between 0 and 1. The layer's output is scaled by
    ``1 - lambda_init``: at 1 the output is 0 and the q/k/v projections and lambda vectors get
    no gradient, above 1 its sign flips; at 0 or below lambda starts at or below zero, so the
    second map is added instead of subtracted.
    """
    if isinstance(lambda_init, bool) or not isinstance(lambda_init, (int, float)):
        raise TypeError(f"{name} must be a float in (0, 1), got {lambda_init!r}")
    if not math.isfinite(lambda_init):
        raise ValueError(f"{name} must be finite (a float in (0, 1)), got {lambda_init!r}")
    if lambda_init >= 1:
        raise ValueError(
            f"{name} must lie in (0, 1), got {lambda_init!r}: the output is scaled by "
            f"1 - lambda_init, so at 1 it is zero and the projections get no gradient "
            f"(above 1 its sign flips)")
    if lambda_init <= 0:
        raise ValueError(
            f"{name} must lie in (0, 1), got {lambda_init!r}: lambda would start at or below "
            f"zero, adding the second softmax map instead of subtracting it")
    return float(lambda_init)


def lambda_init_for_depth(layer_index: int) -> float:
    """The Differential Transformer's schedule: 0.8 - 0.6 * exp(-0.3 * layer_index), index from 0
    (0.2 at the first layer, rising towards 0.8). (DiffCLIP uses a constant 0.8; the paper calls
    this depth schedule DiffCLIP*.)"""
    if isinstance(layer_index, bool) or not isinstance(layer_index, int):
        raise TypeError(f"layer_index must be an int, got {type(layer_index).__name__}")
    if layer_index < 0:
        raise ValueError(f"layer_index must be >= 0 (layers count from 0), got {layer_index}")
    return 0.8 - 0.6 * math.exp(-0.3 * layer_index)


class HeadRMSNorm(nn.Module):
    """RMSNorm over one head's 2d features, weight shared by all heads (DiffCLIP's diff_norm).

    The layers' fused path applies it inside the kernel, reading ``weight`` and ``eps`` from
    here; calling the module applies it in PyTorch: x (..., 2d) -> the same shape and dtype,
    ``x * rsqrt(mean(x^2) + eps) * weight``, computed in fp32 (fp64 for fp64 inputs)."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
            raise ValueError(f"eps must be a positive finite float, got {eps!r}")
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"x must have {self.weight.shape[0]} features in its last "
                             f"dimension, got shape {tuple(x.shape)}")
        return rms_norm_epilogue(x, self.weight, self.eps, 1.0)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def check_plain_for_v1(layer: nn.MultiheadAttention, name: Optional[str] = None) -> None:
    """Raise if ``layer`` cannot become a DiffMultiheadAttention (``from_plain``).

    Raises:
        TypeError: ``layer`` is not an nn.MultiheadAttention.
        ValueError (naming the layer when ``name`` is given): an odd num_heads (two softmax
            maps per differential head), add_bias_kv or add_zero_attn.
    """
    if not isinstance(layer, nn.MultiheadAttention):
        raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(layer).__name__}")
    what = "from_plain" if name is None else f"layer {name!r}"
    if layer.num_heads % 2:
        raise ValueError(f"{what} has num_heads={layer.num_heads}: differential attention "
                         f"needs an even number of heads (two softmax maps per differential "
                         f"head); variant=\"v2\" (DiffMultiheadAttentionV2) takes any head count")
    if layer.bias_k is not None or layer.add_zero_attn:
        raise ValueError(f"{what} uses add_bias_kv or add_zero_attn, which "
                         f"DiffMultiheadAttention does not have")


def check_head_counts(embed_dim, num_heads, num_kv_heads, dropout) -> int:
    """Validate nn.MultiheadAttention-style head arguments of a differential layer (heads
    counted as softmax maps: even) and return num_kv_heads with its default filled in."""
    for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if num_heads <= 0 or num_heads % 2:
        raise ValueError(f"num_heads must be a positive even number (two softmax maps per "
                         f"differential head), got {num_heads}")
    if embed_dim <= 0 or embed_dim % num_heads:
        raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads "
                         f"({num_heads})")
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_kv_heads <= 0 or num_kv_heads % 2 or num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads must be even and divide num_heads ({num_heads}), "
                         f"got {num_kv_heads}")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    return num_kv_heads


class DiffMultiheadAttention(nn.Module):
    """Differential multi-head attention with nn.MultiheadAttention's interface.

    Args:
        embed_dim: model width E.
        num_heads: softmax maps, counted as nn.MultiheadAttention counts heads (must be even).
            head_dim d = E // num_heads; there are num_heads // 2 differential heads, each with
            value width 2d. The projections have nn.MultiheadAttention(E, num_heads)'s shapes.
        dropout: attention dropout on both maps before the difference (training only). The
            fused kernels do not implement it: with dropout > 0 in training, backend "auto" uses
            the torch path and "triton" raises.
        bias: biases on the four projections (DiffCLIP: True; Microsoft's code: False).
        batch_first: (B, N, E) inputs if True, else (N, B, E).
        kdim, vdim: widths of key and value inputs (default embed_dim), as in
            nn.MultiheadAttention; with other widths the three projections are separate.
        lambda_init: constant added to lambda, in (0, 1); the output is scaled by
            (1 - lambda_init), so 1 would zero it (ValueError). See lambda_init_for_depth for
            the depth schedule.
        num_kv_heads: key maps for grouped-query attention, counted like num_heads (even, divides
            num_heads); k and v projections have num_kv_heads * d outputs.
        backend: "auto" | "triton" | "torch".
    Attributes:
        in_proj_weight, in_proj_bias: the packed q, k, v projections ((E + 2 Ekv, E) and
            (E + 2 Ekv,)); with kdim/vdim other than E, q_proj_weight, k_proj_weight and
            v_proj_weight instead of in_proj_weight. ``q_proj``, ``k_proj``, ``v_proj`` give
            each projection as a view (``.weight``, ``.bias``, callable).
        lambda_vectors: (4, d) fp32, the rows lq1, lk1, lq2, lk2 (``lambda_q1`` ... give them
            as views); lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init.
        last_backend: "triton" or "torch", what the last forward ran.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, *, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, lambda_init: float = 0.8,
                 num_kv_heads: Optional[int] = None, backend: str = "auto", device=None,
                 dtype=None):
        super().__init__()
        num_kv_heads = check_head_counts(embed_dim, num_heads, num_kv_heads, dropout)
        lambda_init = check_lambda_init(lambda_init)
        check_backend_name(backend)
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self.lambda_init = float(lambda_init)
        self.backend = backend
        self.last_backend: Optional[str] = None
        kv_dim = num_kv_heads * self.head_dim
        self._sizes = (embed_dim, kv_dim, kv_dim)
        self._packed = self.kdim == embed_dim and self.vdim == embed_dim
        if self._packed:
            self.in_proj_weight = nn.Parameter(torch.empty(sum(self._sizes), embed_dim,
                                                           **factory))
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(kv_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(kv_dim, self.vdim, **factory))
        self.in_proj_bias = (nn.Parameter(torch.empty(sum(self._sizes), **factory)) if bias
                             else None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.lambda_vectors = nn.Parameter(torch.empty(4, self.head_dim, device=device,
                                                       dtype=torch.float32))
        self.diff_norm = HeadRMSNorm(2 * self.head_dim, eps=1e-5, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Projections as nn.Linear initialises them (uniform, bound 1/sqrt(fan_in)), lambda
        vectors ~ N(0, 0.1), norm weight 1."""
        for weight in self._projection_weights():
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if self.in_proj_bias is not None:
            for (start, stop), fan_in in zip(self._row_ranges(),
                                             (self.embed_dim, self.kdim, self.vdim)):
                bound = fan_in ** -0.5
                nn.init.uniform_(self.in_proj_bias[start:stop], -bound, bound)
        self.out_proj.reset_parameters()
        self.reset_lambda_parameters()
        nn.init.ones_(self.diff_norm.weight)

    def reset_lambda_parameters(self) -> None:
        """lambda vectors ~ N(0, 0.1), as in the Differential Transformer and DiffCLIP."""
        nn.init.normal_(self.lambda_vectors, mean=0.0, std=0.1)

    lambda_q1 = property(lambda self: self.lambda_vectors[0], doc="lq1, a view (d,)")
    lambda_k1 = property(lambda self: self.lambda_vectors[1], doc="lk1, a view (d,)")
    lambda_q2 = property(lambda self: self.lambda_vectors[2], doc="lq2, a view (d,)")
    lambda_k2 = property(lambda self: self.lambda_vectors[3], doc="lk2, a view (d,)")

    def compute_lambda(self) -> Tensor:
        """0-dim fp32: exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init, shared by all heads."""
        return LambdaVectors(self.lambda_vectors.float(), self.lambda_init).value()

    # ---------------------------------------------------------------- from plain attention
    @classmethod
    def from_plain(cls, mha: nn.MultiheadAttention, *, lambda_init: float = 0.8,
                   backend: str = "auto") -> "DiffMultiheadAttention":
        """A differential layer warm-started from ``mha``: the same arguments (embed_dim,
        num_heads as softmax maps, dropout, bias, batch_first, kdim, vdim), device, dtype and
        training mode, and its q/k/v/out projection weights. Plain heads 2h and 2h+1 become the
        two maps of differential head h; the lambda vectors and norm weight are newly
        initialised (see ``reset_parameters``). A starting point for fine-tuning, not an
        equivalent layer.

        Raises:
            TypeError: ``mha`` is not an nn.MultiheadAttention.
            ValueError: an odd num_heads, add_bias_kv or add_zero_attn; lambda_init outside
                (0, 1).
        """
        check_plain_for_v1(mha)
        weight = mha.out_proj.weight
        layer = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout,
                    bias=mha.in_proj_bias is not None, batch_first=mha.batch_first,
                    kdim=mha.kdim, vdim=mha.vdim, lambda_init=lambda_init, backend=backend,
                    device=weight.device, dtype=weight.dtype)
        layer.load_state_dict(mha.state_dict(), strict=True)
        return layer.train(mha.training)

    def plain_state_dict_shapes(self) -> dict:
        """{name: shape} of the nn.MultiheadAttention state dict this layer is warm-started
        from (``state_dict_from_plain``): its packed ``in_proj_weight`` (or
        ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` with kdim/vdim), and
        ``in_proj_bias``, ``out_proj.*``."""
        rows = sum(self._sizes)
        if self._packed:
            shapes = {"in_proj_weight": torch.Size([rows, self.embed_dim])}
        else:
            shapes = {name: torch.Size([size, width]) for name, size, width in
                      zip(_SEPARATE, self._sizes, (self.embed_dim, self.kdim, self.vdim))}
        shapes["out_proj.weight"] = self.out_proj.weight.shape
        if self.in_proj_bias is not None:
            shapes["in_proj_bias"] = torch.Size([rows])
            shapes["out_proj.bias"] = self.out_proj.bias.shape
        return shapes

    def state_dict_from_plain(self, plain: dict) -> tuple:
        """(the state dict to load, the names of the tensors it leaves new) for one plain
        layer's state dict. The layer loads nn.MultiheadAttention's layouts itself, keeping
        its lambda vectors and norm weight as initialised, so the plain tensors pass as they
        are. Used for warm starts of whole models from plain checkpoints."""
        return dict(plain), _LAMBDAS + ("diff_norm.weight",)

    def extra_repr(self) -> str:
        dims = "" if self._packed else f", kdim={self.kdim}, vdim={self.vdim}"
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads} "
                f"({self.num_heads // 2} differential heads of width {2 * self.head_dim}), "
                f"num_kv_heads={self.num_kv_heads}{dims}, lambda_init={self.lambda_init:.4g}, "
                f"dropout={self.dropout}, batch_first={self.batch_first}, "
                f"backend={self.backend!r}")

    # ---------------------------------------------------------------- projections
    def _row_ranges(self):
        q, kv, _ = self._sizes
        return ((0, q), (q, q + kv), (q + kv, q + 2 * kv))

    def _projection_weights(self):
        if self._packed:
            return (self.in_proj_weight,)
        return (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)

    def _projection(self, index: int):
        start, stop = self._row_ranges()[index]
        if self._packed:
            return projection_slice(self.in_proj_weight, self.in_proj_bias, start, stop)
        bias = None if self.in_proj_bias is None else self.in_proj_bias[start:stop]
        return projection_slice(getattr(self, _SEPARATE[index]), bias, 0,
                                self._sizes[index])

    q_proj = property(lambda self: self._projection(0), doc="the q projection, as a view")
    k_proj = property(lambda self: self._projection(1), doc="the k projection, as a view")
    v_proj = property(lambda self: self._projection(2), doc="the v projection, as a view")

    def _project(self, query: Tensor, key: Tensor, value: Tensor):
        """q, k, v projections; one GEMM when key and value are the query (self-attention),
        two when key is value."""
        if self._packed and key is query and value is query:
            return F.linear(query, self.in_proj_weight,
                            self.in_proj_bias).split_with_sizes(self._sizes, -1)
        q_proj = self.q_proj
        if self._packed and value is key:
            kv = projection_slice(self.in_proj_weight, self.in_proj_bias, self._sizes[0],
                                  sum(self._sizes))
            return (q_proj(query), *kv(key).split_with_sizes(self._sizes[1:], -1))
        return q_proj(query), self.k_proj(key), self.v_proj(value)

    # ---------------------------------------------------------------- state dict
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        names = ("in_proj_weight",) if self._packed else _SEPARATE
        for name in names + ("in_proj_bias", "lambda_vectors"):
            destination.pop(prefix + name, None)
        for name, vector in zip(_LAMBDAS, self.lambda_vectors):
            destination[prefix + name] = vector if keep_vars else vector.detach().clone()
        save_packed(destination, prefix, self._projection_weights() if not self._packed
                    else self.in_proj_weight, self.in_proj_bias, _PROJECTIONS, self._sizes,
                    keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Accept the DiffCLIP names (q_proj.weight, ...), the packed names, and
        nn.MultiheadAttention's layouts. Plain attention has no lambda vectors or norm
        weight: loading its weights keeps this layer's current values for those, so plain
        weights load with strict=True."""
        plain = any(prefix + name in state_dict for name in ("in_proj_weight",) + _SEPARATE)
        has_bias = self.in_proj_bias is not None
        if self._packed:
            separate = [prefix + name for name in _SEPARATE]
            if all(key in state_dict for key in separate):  # nn.MultiheadAttention, kdim = E
                state_dict[prefix + "in_proj_weight"] = torch.cat(
                    [state_dict.pop(key) for key in separate])
            load_packed(state_dict, prefix, _PROJECTIONS, self._sizes, has_bias, error_msgs)
        else:
            for proj, name in zip(_PROJECTIONS, _SEPARATE):
                if f"{prefix}{proj}.weight" in state_dict:
                    state_dict[prefix + name] = state_dict.pop(f"{prefix}{proj}.weight")
            biases = [f"{prefix}{proj}.bias" for proj in _PROJECTIONS]
            if has_bias and all(key in state_dict for key in biases):
                state_dict[prefix + "in_proj_bias"] = torch.cat(
                    [state_dict.pop(key) for key in biases])
        if plain:
            for name in _LAMBDAS:
                state_dict.setdefault(prefix + name, getattr(self, name).detach().clone())
            state_dict.setdefault(prefix + "diff_norm.weight",
                                  self.diff_norm.weight.detach().clone())
        lambdas = [prefix + name for name in _LAMBDAS]
        if any(key in state_dict for key in lambdas):
            missing = [key for key in lambdas if key not in state_dict]
            if missing:
                error_msgs.append(f"{prefix}lambda_vectors: missing {missing}")
                for key in lambdas:
                    state_dict.pop(key, None)
            else:
                state_dict[prefix + "lambda_vectors"] = torch.stack(
                    [state_dict.pop(key) for key in lambdas])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # ---------------------------------------------------------------- forward
    def kv_cache_shapes(self):
        """((key heads, head dim), (value heads, value dim)) of this layer's KV cache rows
        (see diffattn.DiffKVCache.empty)."""
        return ((self.num_kv_heads, self.head_dim), (self.num_kv_heads // 2, 2 * self.head_dim))

    def forward(self, query: Tensor, key: Optional[Tensor] = None, value: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False, window_size: Optional[Tuple[int, int]] = None,
                kv_cache: Optional[DiffKVCache] = None, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None):
        """nn.MultiheadAttention's contract.

        query (N, B, E) or (B, N, E) with batch_first, or unbatched (N, E); key/value default to
        query (self-attention). key_padding_mask (B, S): bool True = ignore, or float additive.
        attn_mask: bool (True = masked out) or float additive, (L, S) or (B * num_heads, L, S).
        is_causal=True, or an attn_mask that is exactly the causal mask, takes the fused causal
        path (is_causal is a hint, as in nn.MultiheadAttention: with it the mask is not read);
        any other mask takes the torch path. Returns (output like query, weights or None);
        with need_weights=True the weights are the differential maps A1 - lambda * A2,
        (B, N, S) averaged over the differential heads, or (B, num_heads // 2, N, S) with
        average_attn_weights=False (a slow path that materialises the maps).
        kv_cache (a diffattn.DiffKVCache): a decoding step, forward only: query (B, N, E)
        (batch_first; else (N, B, E)) holds the N new tokens; their keys and values are
        appended to the cache, they attend causally over everything cached, and
        kv_cache.seqlens advances by N. Self-attention only (no key, value, masks or weights).
        cu_seqlens, max_seqlen: packed sequences (diffattn.diff_attention_varlen's layout):
        query (total, E) holds the sequences one after another, sequence b being rows
        cu_seqlens[b] .. cu_seqlens[b + 1] - 1 (int32 (batch + 1,) offsets, zero-length
        sequences allowed), max_seqlen (an int) bounds their lengths. Each sequence attends
        to itself only, causally with is_causal=True, within window_size if given; the result
        equals one call per sequence. Returns (output (total, E), None). Self-attention only
        (no key, value, masks, weights or kv_cache), and no attention dropout in training.
        """
        if cu_seqlens is not None or max_seqlen is not None:  # packed sequences
            other = dict(key=key, value=value, key_padding_mask=key_padding_mask,
                         attn_mask=attn_mask, need_weights=need_weights, kv_cache=kv_cache)
            return self._forward_packed(query, cu_seqlens, max_seqlen, is_causal, window_size,
                                        other), None
        if kv_cache is not None:  # a decoding step: causal self-attention over the cache
            other = dict(key=key, value=value, key_padding_mask=key_padding_mask,
                         attn_mask=attn_mask, window_size=window_size, need_weights=need_weights)
            return layer_decode_step(self, query, kv_cache, v2=False, other_arguments=other), None
        query, key, value, key_padding_mask, unbatched = check_module_inputs(
            query, key, value, key_padding_mask, self.embed_dim, self.kdim, self.vdim,
            self.batch_first)
        q, k, v = self._project(query, key, value)
        if not self.batch_first:  # views: the kernels take any strides
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        B, N = q.shape[0], q.shape[1]
        M = k.shape[1]
        d = self.head_dim
        q = q.view(B, N, self.num_heads, d)
        k = k.view(B, M, self.num_kv_heads, d)
        v = v.view(B, M, self.num_kv_heads // 2, 2 * d)
        lam = LambdaVectors(self.lambda_vectors, self.lambda_init)

        check_window_size(window_size)
        causal, bias, key_padding_mask = attention_masks(attn_mask, key_padding_mask, is_causal,
                                                         B, N, M, self.num_heads)
        dropout_p = self.dropout if self.training else 0.0
        backend = resolve_layer_backend(self, q.device, q.dtype, d,
                                        unsupported_features(dropout_p, bias))
        out = run_diff_attention(q, k, v, lam, backend, causal=causal,
                                 key_padding_mask=key_padding_mask,
                                 norm_weight=self.diff_norm.weight, eps=self.diff_norm.eps,
                                 out_scale=1.0 - self.lambda_init, dropout_p=dropout_p,
                                 attn_mask=bias, window_size=window_size)
        out = self.out_proj(out.flatten(2))

        weights = None
        if need_weights:
            weights = attention_weights(q, k, lam.value().to(q.dtype), causal=causal,
                                        key_padding_mask=key_padding_mask, bias=bias,
                                        window_size=window_size,
                                        average=average_attn_weights, unbatched=unbatched)
        return restore_layout(out, self.batch_first, unbatched), weights

    def _forward_packed(self, query: Tensor, cu_seqlens, max_seqlen, is_causal, window_size,
                        other_arguments: dict) -> Tensor:
        """forward on packed sequences: query (total, E) -> (total, E)."""
        check_packed_inputs(self, query, cu_seqlens, max_seqlen, other_arguments)
        q, k, v = self._project(query, query, query)
        total, d = query.shape[0], self.head_dim
        q = q.view(total, self.num_heads, d)
        k = k.view(total, self.num_kv_heads, d)
        v = v.view(total, self.num_kv_heads // 2, 2 * d)
        backend = resolve_layer_backend(self, q.device, q.dtype, d)
        out = diff_attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                    lambda_vectors=self.lambda_vectors,
                                    lambda_init=self.lambda_init, causal=bool(is_causal),
                                    window_size=window_size, norm_weight=self.diff_norm.weight,
                                    eps=self.diff_norm.eps, out_scale=1.0 - self.lambda_init,
                                    backend=backend)
        return self.out_proj(out.flatten(1))
