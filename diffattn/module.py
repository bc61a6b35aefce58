"""``DiffMultiheadAttention``: differential attention as a drop-in for nn.MultiheadAttention.

The layer of DiffCLIP (and of the Differential Transformer): q/k/v projections, two softmax
maps per differential head, their lambda-weighted difference, a per-head RMSNorm times
(1 - lambda_init), and the output projection. With the fused backend the whole attention core
(both maps, difference, norm, scale) is one kernel launch forward and the backward kernels
backward; the projections are ordinary nn.Linear layers.

Parameter names follow the DiffCLIP release, so its attention layers load with strict=True:
q_proj, k_proj, v_proj, out_proj, lambda_q1, lambda_k1, lambda_q2, lambda_k2,
diff_norm.weight.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .backend import check_backend_name, resolve_backend, unsupported_features
from .functional import diff_attention
from .reference import causal_keep_mask, differential_maps


def lambda_init_for_depth(layer_index: int) -> float:
    """The Differential Transformer's schedule: 0.8 - 0.6 * exp(-0.3 * layer_index), index from 0.
    (DiffCLIP uses a constant 0.8; the paper calls this depth schedule DiffCLIP*.)"""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_index)


class HeadRMSNorm(nn.Module):
    """RMSNorm over one head's 2d features, weight shared by all heads (DiffCLIP's diff_norm).
    The fused path applies it inside the kernel; this module holds the weight and eps."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _is_causal_mask(mask: Tensor, N: int, M: int) -> bool:
    """True when ``mask`` (N, M) is exactly the causal mask (bool True / float -inf above the
    diagonal, False / 0 elsewhere), as CLIP text towers pass it."""
    if N != M or mask.dim() != 2 or tuple(mask.shape) != (N, M):
        return False
    above = ~causal_keep_mask(N, M, mask.device)
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, above))
    return bool(torch.isneginf(mask[above]).all() and (mask[~above] == 0).all())


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
        lambda_init: constant added to lambda; the output is scaled by (1 - lambda_init).
            See lambda_init_for_depth for the depth schedule.
        num_kv_heads: key maps for grouped-query attention, counted like num_heads (even, divides
            num_heads); k_proj has num_kv_heads * d outputs and v_proj the same.
        backend: "auto" | "triton" | "torch".
    Attributes:
        last_backend: "triton" or "torch", what the last forward ran.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, *, lambda_init: float = 0.8,
                 num_kv_heads: Optional[int] = None, backend: str = "auto", device=None,
                 dtype=None):
        super().__init__()
        if num_heads <= 0 or num_heads % 2:
            raise ValueError(f"num_heads must be a positive even number (two softmax maps per "
                             f"differential head), got {num_heads}")
        if embed_dim <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads "
                             f"({num_heads})")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads <= 0 or num_kv_heads % 2 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads must be even and divide num_heads ({num_heads}), "
                             f"got {num_kv_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        check_backend_name(backend)
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.lambda_init = float(lambda_init)
        self.backend = backend
        self.last_backend: Optional[str] = None
        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        lam = {"device": device, "dtype": torch.float32}
        self.lambda_q1 = nn.Parameter(torch.empty(self.head_dim, **lam))
        self.lambda_k1 = nn.Parameter(torch.empty(self.head_dim, **lam))
        self.lambda_q2 = nn.Parameter(torch.empty(self.head_dim, **lam))
        self.lambda_k2 = nn.Parameter(torch.empty(self.head_dim, **lam))
        self.diff_norm = HeadRMSNorm(2 * self.head_dim, eps=1e-5, **factory)
        self.reset_lambda_parameters()

    def reset_lambda_parameters(self) -> None:
        """lambda vectors ~ N(0, 0.1), as in the Differential Transformer and DiffCLIP."""
        for p in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
            nn.init.normal_(p, mean=0.0, std=0.1)

    def compute_lambda(self) -> Tensor:
        """0-dim fp32: exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init, shared by all heads."""
        lam1 = torch.exp(torch.sum(self.lambda_q1.float() * self.lambda_k1.float()))
        lam2 = torch.exp(torch.sum(self.lambda_q2.float() * self.lambda_k2.float()))
        return lam1 - lam2 + self.lambda_init

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads} "
                f"({self.num_heads // 2} differential heads of width {2 * self.head_dim}), "
                f"num_kv_heads={self.num_kv_heads}, lambda_init={self.lambda_init:.4g}, "
                f"dropout={self.dropout}, batch_first={self.batch_first}, "
                f"backend={self.backend!r}")

    # ---------------------------------------------------------------- loading
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Also accept nn.MultiheadAttention's packed layout (in_proj_weight, in_proj_bias,
        out_proj.*). Plain attention has no lambda vectors or norm weight: those keep their
        current values, so plain weights load with strict=True."""
        packed = prefix + "in_proj_weight"
        if packed in state_dict:
            weight = state_dict.pop(packed)
            q_rows, kv_rows = self.embed_dim, self.num_kv_heads * self.head_dim
            if weight.shape[0] != q_rows + 2 * kv_rows:
                error_msgs.append(f"{packed}: expected {q_rows + 2 * kv_rows} rows "
                                  f"(q, k, v stacked), got {tuple(weight.shape)}")
                return
            for name, w in zip(("q_proj", "k_proj", "v_proj"),
                               weight.split([q_rows, kv_rows, kv_rows])):
                state_dict[f"{prefix}{name}.weight"] = w
            bias = state_dict.pop(prefix + "in_proj_bias", None)
            if bias is not None:
                for name, b in zip(("q_proj", "k_proj", "v_proj"),
                                   bias.split([q_rows, kv_rows, kv_rows])):
                    state_dict[f"{prefix}{name}.bias"] = b
            for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                state_dict.setdefault(prefix + name, getattr(self, name).detach().clone())
            state_dict.setdefault(prefix + "diff_norm.weight",
                                  self.diff_norm.weight.detach().clone())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # ---------------------------------------------------------------- forward
    def _attn_bias(self, attn_mask, key_padding_mask, B, N, M):
        """Normalise nn.MultiheadAttention's masks to (attn_mask for diff_attention,
        bool key_padding_mask)."""
        bias = None
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (N, M):
                    raise ValueError(f"attn_mask must have shape (L, S) = {(N, M)} or "
                                     f"(batch * num_heads, L, S) = {(B * self.num_heads, N, M)}, "
                                     f"got {tuple(attn_mask.shape)}")
                bias = attn_mask
            elif attn_mask.dim() == 3:
                if tuple(attn_mask.shape) != (B * self.num_heads, N, M):
                    raise ValueError(f"attn_mask must have shape (L, S) = {(N, M)} or "
                                     f"(batch * num_heads, L, S) = {(B * self.num_heads, N, M)}, "
                                     f"got {tuple(attn_mask.shape)}")
                bias = attn_mask.view(B, self.num_heads, N, M)
            else:
                raise ValueError(f"attn_mask must be 2-D or 3-D, got {attn_mask.dim()}-D")
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (B, M):
                raise ValueError(f"key_padding_mask must have shape (batch, S) = {(B, M)}, got "
                                 f"{tuple(key_padding_mask.shape)}")
            if key_padding_mask.dtype != torch.bool:
                if not key_padding_mask.is_floating_point():
                    raise TypeError("key_padding_mask must be bool (True = ignore) or float "
                                    f"(additive), got {key_padding_mask.dtype}")
                # An additive padding mask joins the additive attention mask (torch path).
                extra = key_padding_mask[:, None, None, :]
                if bias is not None and bias.dtype == torch.bool:
                    bias = torch.zeros(bias.shape, dtype=extra.dtype,
                                       device=bias.device).masked_fill(bias, float("-inf"))
                bias = extra if bias is None else bias + extra
                key_padding_mask = None
        return bias, key_padding_mask

    def forward(self, query: Tensor, key: Optional[Tensor] = None, value: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        """nn.MultiheadAttention's contract.

        query (N, B, E) or (B, N, E) with batch_first, or unbatched (N, E); key/value default to
        query (self-attention). key_padding_mask (B, S): bool True = ignore, or float additive.
        attn_mask: bool (True = masked out) or float additive, (L, S) or (B * num_heads, L, S);
        an exactly causal mask (or is_causal=True) takes the fused causal path, any other mask
        the torch path. Returns (output like query, weights or None); with need_weights=True
        the weights are the differential maps A1 - lambda * A2, (B, N, S) averaged over the
        differential heads, or (B, num_heads // 2, N, S) with average_attn_weights=False
        (a slow path that materialises the maps).
        """
        if not isinstance(query, Tensor):
            raise TypeError(f"query must be a tensor, got {type(query).__name__}")
        key = query if key is None else key
        value = key if value is None else value
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.dim() != 3 or t.shape[-1] != self.embed_dim:
                layout = "(B, L, E)" if self.batch_first else "(L, B, E)"
                raise ValueError(f"{name} must have shape {layout} or (L, E) with "
                                 f"E = {self.embed_dim}, got {tuple(t.shape)}")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        B, N, _ = query.shape
        M = key.shape[1]
        if key.shape[0] != B or tuple(value.shape[:2]) != (B, M):
            raise ValueError(f"key and value must have the same batch and length, got key "
                             f"{tuple(key.shape)} and value {tuple(value.shape)}")

        d, H2, Hk2 = self.head_dim, self.num_heads, self.num_kv_heads
        q = self.q_proj(query).unflatten(-1, (H2, d))
        k = self.k_proj(key).unflatten(-1, (Hk2, d))
        v = self.v_proj(value).unflatten(-1, (Hk2 // 2, 2 * d))
        lam = self.compute_lambda()

        causal = is_causal
        if attn_mask is not None and (is_causal or _is_causal_mask(attn_mask, N, M)):
            causal, attn_mask = True, None
        bias, key_padding_mask = self._attn_bias(attn_mask, key_padding_mask, B, N, M)
        dropout_p = self.dropout if self.training else 0.0
        self.last_backend = resolve_backend(self.backend, q.device, q.dtype, d,
                                            unsupported_features(dropout_p, bias))
        out = diff_attention(q, k, v, lam, causal=causal, key_padding_mask=key_padding_mask,
                             norm_weight=self.diff_norm.weight, eps=self.diff_norm.eps,
                             out_scale=1.0 - self.lambda_init, dropout_p=dropout_p,
                             attn_mask=bias, backend=self.last_backend)
        out = self.out_proj(out.flatten(2))

        weights = None
        if need_weights:
            *_, diff = differential_maps(q, k, lambda_=lam.to(q.dtype), causal=causal,
                                         key_padding_mask=key_padding_mask, attn_bias=bias)
            weights = diff.mean(1) if average_attn_weights else diff
            if unbatched:
                weights = weights.squeeze(0)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
        return out, weights
