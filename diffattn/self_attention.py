"""Differential layers for models whose attention is a fused-qkv self-attention layer, as timm's
``Attention`` (``timm.layers.Attention``, in every plain timm ViT): ``qkv`` Linear(E, 3E) (q, k
and v rows stacked, head h at rows h*d..(h+1)*d of each), ``proj`` Linear(E, E), ``num_heads``
h, and ``forward(x (B, N, E), attn_mask=None, is_causal=False) -> (B, N, E)``.

``DiffSelfAttention`` (V1, DiffCLIP's layer) and ``DiffSelfAttentionV2`` are
``DiffMultiheadAttention`` / ``DiffMultiheadAttentionV2`` (batch first) with that call, so they
take the place of such a layer in its model; their state dicts are the layers' own.
``from_qkv_attention(layer)`` converts one layer (``replace_attention`` does it for every layer of
a model):

- V2 (``DiffSelfAttentionV2.from_qkv_attention``): the plain layer's weights as
  ``plain_to_v2_state_dict`` maps them, so it starts out computing what the plain layer computes
  (within about ``initial_lambda`` relative).
- V1 (``DiffSelfAttention.from_qkv_attention``): a warm start. Each plain head h of width d
  becomes differential head h (as timm's ``DiffAttention(num_heads)`` counts heads): its q and k
  rows split into the two maps of width d / 2 (``DiffMultiheadAttention(E, 2h)``), its v rows
  are the head's value of width d, unchanged; the weights load as they are. The lambda vectors
  and norm weight are new. Needs an even head width.

The conversion needs the plain case: no q/k norm (``qk_norm``), no norm before ``proj``
(``scale_norm``), no gate, and ``proj`` of width E in and out; anything else is a ValueError
naming the layer. Attention masks of timm's convention (SDPA's: bool True = attend, or
additive float; (N, N), or (B, 1 or h, N, N)) are translated to the layers' own.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .module import DiffMultiheadAttention, check_lambda_init
from .module_v2 import INITIAL_LAMBDA, DiffMultiheadAttentionV2, plain_to_v2_state_dict

__all__ = ["DiffSelfAttention", "DiffSelfAttentionV2", "check_qkv_attention",
           "is_qkv_attention", "qkv_attention_state_dict"]

# The child modules a plain fused-qkv attention layer may have (timm's Attention).
_QKV_CHILDREN = {"qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop"}


def is_qkv_attention(module: nn.Module) -> bool:
    """Whether ``module`` has the structure of a plain fused-qkv self-attention layer (timm's
    ``Attention``): a ``qkv`` Linear(E, 3 * E'), a ``proj`` Linear, an int ``num_heads``, no
    parameters of its own and no children beyond timm's Attention's. Differential layers
    (which have lambda parameters or ``lambda_init``) are not."""
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    return (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)
            and qkv.out_features % 3 == 0
            and isinstance(getattr(module, "num_heads", None), int)
            and not hasattr(module, "lambda_init")
            and not any(True for _ in module.named_parameters(recurse=False))
            and {name for name, _ in module.named_children()} <= _QKV_CHILDREN)


def check_qkv_attention(layer: nn.Module, name: Optional[str] = None, *,
                        variant: str = "v2") -> None:
    """Raise a ValueError (naming the layer when ``name`` is given) if ``layer`` is not a plain
    fused-qkv attention layer that ``variant`` ("v1" or "v2") can convert."""
    what = "from_qkv_attention" if name is None else f"layer {name!r}"
    if not is_qkv_attention(layer):
        raise TypeError(f"{what}: expected a fused-qkv self-attention layer (timm's Attention: "
                        f"qkv, proj, num_heads), got {type(layer).__name__}")
    embed_dim, heads = layer.qkv.in_features, layer.num_heads
    for part in ("q_norm", "k_norm", "norm"):
        child = getattr(layer, part, None)
        if child is not None and not isinstance(child, nn.Identity):
            raise ValueError(f"{what} has a {part} ({type(child).__name__}; timm's qk_norm or "
                             f"scale_norm), which the differential layers do not have")
    if getattr(layer, "gate", None) is not None:
        raise ValueError(f"{what} has an output gate, which the differential layers do not have")
    if layer.qkv.out_features != 3 * embed_dim or layer.proj.in_features != embed_dim \
            or layer.proj.out_features != embed_dim:
        raise ValueError(f"{what}: qkv must be Linear({embed_dim}, {3 * embed_dim}) and proj "
                         f"Linear({embed_dim}, {embed_dim}), got qkv with {layer.qkv.out_features} "
                         f"outputs and proj {layer.proj.in_features} -> {layer.proj.out_features}")
    head_dim = embed_dim // heads if heads > 0 and embed_dim % heads == 0 else None
    if head_dim is None:
        raise ValueError(f"{what}: num_heads ({heads}) must divide the width ({embed_dim})")
    scale = getattr(layer, "scale", head_dim ** -0.5)
    if abs(scale - head_dim ** -0.5) > 1e-12 * head_dim ** -0.5:
        raise ValueError(f"{what} uses the softmax scale {scale}, not head_dim ** -0.5")
    if variant == "v1" and head_dim % 2:
        raise ValueError(f"{what} has heads of odd width {head_dim}: variant \"v1\" splits each "
                         f"head into two maps of half its width; variant \"v2\" takes any width")


def qkv_attention_state_dict(layer: nn.Module) -> dict:
    """One fused-qkv layer's weights as an nn.MultiheadAttention state dict (``PLAIN_KEYS``):
    ``in_proj_weight`` = qkv.weight, ``in_proj_bias`` = qkv.bias, ``out_proj.*`` = proj.*;
    a missing bias is zeros (which computes what no bias computes)."""
    def bias(linear: nn.Linear) -> Tensor:
        if linear.bias is not None:
            return linear.bias.detach()
        return torch.zeros(linear.out_features, device=linear.weight.device,
                           dtype=linear.weight.dtype)

    return {"in_proj_weight": layer.qkv.weight.detach(), "in_proj_bias": bias(layer.qkv),
            "out_proj.weight": layer.proj.weight.detach(), "out_proj.bias": bias(layer.proj)}


def _layer_mask(attn_mask: Tensor, batch: int, maps: int) -> Tensor:
    """timm's (SDPA's) attn_mask as the layers take it: bool True = masked out, (N, S) or
    (B * maps, N, S). Plain head h's mask goes to maps 2h and 2h + 1."""
    if attn_mask.dtype == torch.bool:
        attn_mask = ~attn_mask
    if attn_mask.dim() == 2:
        return attn_mask
    if attn_mask.dim() != 4 or attn_mask.shape[1] not in (1, maps // 2):
        raise ValueError(f"attn_mask must have shape (N, S) or (B, 1 or {maps // 2}, N, S), got "
                         f"{tuple(attn_mask.shape)}")
    attn_mask = attn_mask.repeat_interleave(2, dim=1) if attn_mask.shape[1] > 1 else attn_mask
    attn_mask = attn_mask.expand(batch, maps, *attn_mask.shape[-2:])
    return attn_mask.reshape(batch * maps, *attn_mask.shape[-2:])


class _SelfAttentionCall:
    """timm Attention's call on a diffattn layer (batch first)."""

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        """x (B, N, E) -> (B, N, E). attn_mask: SDPA's convention (bool True = attend, or
        additive float), (N, N) or (B, 1 or plain heads, N, N); is_causal: query i sees keys
        j <= i."""
        if attn_mask is not None:
            attn_mask = _layer_mask(attn_mask, x.shape[0], self._maps)
        out, _ = super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj_drop(out)


class DiffSelfAttention(_SelfAttentionCall, DiffMultiheadAttention):
    """DiffMultiheadAttention (batch first) with timm Attention's call: forward(x, attn_mask=None,
    is_causal=False) -> (B, N, E), then ``proj_drop``.

    Args: as DiffMultiheadAttention (``num_heads`` counts softmax maps), plus
        proj_drop: dropout after the output projection (timm's ``proj_drop``).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 *, proj_drop: float = 0.0, **kwargs):
        super().__init__(embed_dim, num_heads, dropout, bias, batch_first=True, **kwargs)
        self.proj_drop = nn.Dropout(proj_drop)
        self._maps = num_heads

    @classmethod
    def from_qkv_attention(cls, layer: nn.Module, *, lambda_init: float = 0.8,
                           backend: str = "auto") -> "DiffSelfAttention":
        """A warm start from a plain fused-qkv layer (see the module docstring): differential
        head h is plain head h, its maps the two halves of the head's q and k rows."""
        check_qkv_attention(layer, variant="v1")
        check_lambda_init(lambda_init)
        weight = layer.qkv.weight
        new = cls(layer.qkv.in_features, 2 * layer.num_heads, _dropout(layer), True,
                  proj_drop=_dropout(layer, "proj_drop"), lambda_init=lambda_init,
                  backend=backend, device=weight.device, dtype=weight.dtype)
        new.load_state_dict(qkv_attention_state_dict(layer), strict=True)
        return new.train(layer.training)


class DiffSelfAttentionV2(_SelfAttentionCall, DiffMultiheadAttentionV2):
    """DiffMultiheadAttentionV2 (batch first) with timm Attention's call: forward(x,
    attn_mask=None, is_causal=False) -> (B, N, E), then ``proj_drop``.

    Args: as DiffMultiheadAttentionV2 (``num_heads`` = the plain layer's h), plus
        proj_drop: dropout after the output projection (timm's ``proj_drop``).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 *, proj_drop: float = 0.0, **kwargs):
        super().__init__(embed_dim, num_heads, dropout, bias, batch_first=True, **kwargs)
        self.proj_drop = nn.Dropout(proj_drop)
        self._maps = 2 * num_heads

    @classmethod
    def from_qkv_attention(cls, layer: nn.Module, *, initial_lambda: float = INITIAL_LAMBDA,
                           backend: str = "auto") -> "DiffSelfAttentionV2":
        """A V2 layer that starts out computing what the plain fused-qkv ``layer`` computes
        (within about ``initial_lambda`` relative), as ``DiffMultiheadAttentionV2.from_plain``."""
        check_qkv_attention(layer, variant="v2")
        weights = plain_to_v2_state_dict(qkv_attention_state_dict(layer), layer.num_heads,
                                         initial_lambda=initial_lambda)
        weight = layer.qkv.weight
        new = cls(layer.qkv.in_features, layer.num_heads, _dropout(layer), True,
                  proj_drop=_dropout(layer, "proj_drop"), backend=backend,
                  device=weight.device, dtype=weight.dtype)
        new.load_state_dict(weights, strict=True)
        return new.train(layer.training)


def _dropout(layer: nn.Module, name: str = "attn_drop") -> float:
    module = getattr(layer, name, None)
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0
