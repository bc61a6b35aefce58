"""The fused kernels as PyTorch operators: ``torch.ops.diffattn.fwd`` / ``torch.ops.diffattn.bwd``.

Registered with ``torch.library.custom_op`` with fake (meta) implementations and
``register_autograd``, so autograd, ``torch.compile(fullgraph=True)`` and
``torch.library.opcheck`` all see one opaque operator per direction.

Under the Triton interpreter bf16 arithmetic is wrong, so there (and only there) bf16 inputs
are computed in fp32 and the results cast back.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .kernels import INTERPRET, diff_attn_bwd, diff_attn_fwd

_EMPTY_SHAPE = (0,)


def _interpret_dtype(t: Tensor) -> Tensor:
    return t.float() if INTERPRET and t.dtype == torch.bfloat16 else t


@torch.library.custom_op("diffattn::fwd", mutates_args=(), device_types=None)
def fused_fwd(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, key_padding_mask: Optional[Tensor],
              norm_weight: Optional[Tensor], scale: float, causal: bool, eps: float,
              out_scale: float, save_for_backward: bool
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward kernel. Returns (out, x, o2, lse, rstd); x and rstd are empty when unused, and
    all but out are empty without save_for_backward (inference)."""
    dtype = q.dtype
    out, x, o2, lse, rstd = diff_attn_fwd(
        _interpret_dtype(q), _interpret_dtype(k), _interpret_dtype(v), lam, key_padding_mask,
        norm_weight, scale, causal, eps, out_scale, save_for_backward)
    # Outputs of a custom op may not alias each other: x is returned empty when it is out.
    x = x.to(dtype) if x is not out else out.new_empty(_EMPTY_SHAPE, dtype=dtype)
    return out.to(dtype), x, o2.to(dtype), lse, rstd


@fused_fwd.register_fake
def _(q, k, v, lam, key_padding_mask, norm_weight, scale, causal, eps, out_scale,
      save_for_backward):
    B, N, H2, d = q.shape
    H = H2 // 2
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = q.new_empty(B, N, H, 2 * d)
    if not save_for_backward:
        return (out, q.new_empty(_EMPTY_SHAPE), q.new_empty(_EMPTY_SHAPE),
                q.new_empty(_EMPTY_SHAPE, dtype=acc), q.new_empty(_EMPTY_SHAPE, dtype=acc))
    x = q.new_empty(B, N, H, 2 * d) if (norm_weight is not None or out_scale != 1.0) \
        else q.new_empty(_EMPTY_SHAPE)
    rstd = q.new_empty(B, H, N if norm_weight is not None else 0, dtype=acc)
    return out, x, q.new_empty(B, N, H, 2 * d), q.new_empty(B, H, 2, N, dtype=acc), rstd


@torch.library.custom_op("diffattn::bwd", mutates_args=(), device_types=None)
def fused_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lam: Tensor,
              key_padding_mask: Optional[Tensor], norm_weight: Optional[Tensor], x: Tensor,
              o2: Tensor, lse: Tensor, rstd: Tensor, scale: float, causal: bool,
              out_scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward kernels. Returns (dq, dk, dv, dlam, dnorm_weight); dnorm_weight is empty
    without the norm."""
    dtype = q.dtype
    up = _interpret_dtype
    dq, dk, dv, dlam, dw = diff_attn_bwd(
        up(dout), up(q), up(k), up(v), lam, key_padding_mask, norm_weight, up(x), up(o2), lse,
        rstd, scale, causal, out_scale)
    if dw is None:
        dw = lam.new_empty(_EMPTY_SHAPE)
    return dq.to(dtype), dk.to(dtype), dv.to(dtype), dlam, dw


@fused_bwd.register_fake
def _(dout, q, k, v, lam, key_padding_mask, norm_weight, x, o2, lse, rstd, scale, causal,
      out_scale):
    dw = lam.new_empty(norm_weight.shape if norm_weight is not None else _EMPTY_SHAPE)
    # The kernels write contiguous gradients whatever the inputs' strides.
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), \
        lam.new_empty(lam.shape), dw


def _setup_context(ctx, inputs, output):
    q, k, v, lam, key_padding_mask, norm_weight, scale, causal, eps, out_scale, _ = inputs
    out, x, o2, lse, rstd = output
    ctx.save_for_backward(q, k, v, lam, key_padding_mask, norm_weight,
                          x if x.numel() > 0 else out, o2, lse, rstd)
    ctx.scale, ctx.causal, ctx.out_scale = scale, causal, out_scale


def _backward(ctx, dout, _dx, _do2, _dlse, _drstd):
    q, k, v, lam, key_padding_mask, norm_weight, x, o2, lse, rstd = ctx.saved_tensors
    # Gradients may arrive expanded (stride 0, as from out.sum()) or transposed: the kernels
    # need a contiguous last dimension only.
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv, dlam, dw = fused_bwd(dout, q, k, v, lam, key_padding_mask, norm_weight, x, o2,
                                     lse, rstd, ctx.scale, ctx.causal, ctx.out_scale)
    return (dq, dk, dv, dlam, None, dw if norm_weight is not None else None,
            None, None, None, None, None)


fused_fwd.register_autograd(_backward, setup_context=_setup_context)


def fused_diff_attention(q, k, v, lam, key_padding_mask, norm_weight, scale, causal, eps,
                         out_scale) -> Tensor:
    """Differentiable fused differential attention; see diffattn.diff_attention for the
    arguments. lam is (H,) and norm_weight (2d,) or None, both in the accumulation dtype.
    Without autograd (no_grad, or no input requiring grad) only the output is written."""
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, lam, norm_weight))
    return fused_fwd(q, k, v, lam, key_padding_mask, norm_weight, scale, causal, eps,
                     out_scale, save)[0]
