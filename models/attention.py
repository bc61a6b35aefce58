"""Plain multi-head attention for the CLIP towers: nn.MultiheadAttention with a lean forward.

``MultiheadAttention`` has nn.MultiheadAttention's parameters, state dict (so open_clip and
OpenAI CLIP weights load unchanged) and forward contract. For the calls a CLIP tower makes
(self-attention, no attention weights, no mask or the causal one) it runs what timm's
attention runs: one packed projection GEMM, ``scaled_dot_product_attention`` on strided views
of its output (no copies) and the output projection, with no mask tensor built per call. Any
other call goes to nn.MultiheadAttention.forward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention whose self-attention forward is one GEMM, one SDPA call and the
    output projection (see the module docstring). ``key`` and ``value`` default to the query."""

    def _lean(self, query, key, value, key_padding_mask, need_weights, attn_mask) -> bool:
        return (not need_weights and key is query and value is query and query.dim() == 3
                and attn_mask is None and key_padding_mask is None and self._qkv_same_embed_dim
                and self.bias_k is None and not self.add_zero_attn)

    def forward(self, query: Tensor, key: Optional[Tensor] = None, value: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        key = query if key is None else key
        value = key if value is None else value
        if not self._lean(query, key, value, key_padding_mask, need_weights, attn_mask):
            if is_causal and attn_mask is None:  # nn.MultiheadAttention wants the mask itself
                seq = 1 if query.dim() == 3 and self.batch_first else 0
                n, m = query.shape[seq], key.shape[seq]
                attn_mask = torch.ones(n, m, dtype=torch.bool,
                                       device=query.device).triu_(1 + m - n)
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        x = query if self.batch_first else query.transpose(0, 1)         # (B, N, E) view
        B, N, E = x.shape
        h = self.num_heads
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)       # (B, N, 3E)
        q, k, v = qkv.view(B, N, 3, h, E // h).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, d)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal)
        out = self.out_proj(out.transpose(1, 2).reshape(B, N, E))
        return (out if self.batch_first else out.transpose(0, 1)), None
