"""The fused kernels as differentiable PyTorch operations, two ways over the same launchers.

- Eager: ``DiffAttentionFunction``, a ``torch.autograd.Function`` that calls the launchers
  directly. This is the lean path an eager call takes: no dispatcher round trip, no per-call
  tuning (tile choices are remembered per length bucket), and without autograd the forward
  writes the output alone.
- Traced: ``torch.ops.diffattn.fwd`` / ``torch.ops.diffattn.bwd``, registered with
  ``torch.library.triton_op`` (torch >= 2.6) with ``register_autograd``. torch.compile sees
  through them to the Triton kernels (``wrap_triton``), so a compiled model has no graph break
  in the attention and can be captured in a CUDA graph (``mode="reduce-overhead"``).
  ``torch.library.opcheck`` checks them.

``fused_attention`` picks the traced ops while torch.compile traces and the eager path
otherwise. Both give bitwise the same results.

Both are differentiable once: their gradients have no second derivative. Differentiating them
again (a gradient penalty, create_graph=True) raises a RuntimeError that names
``backend="torch"``, and so do ``torch.func`` transforms (grad, vjp, jvp, vmap) of the fused
path, instead of returning wrong or missing values.

Under the Triton interpreter bf16 arithmetic is wrong, so there (and only there) bf16 inputs
are computed in fp32 and the results cast back.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .kernels import INTERPRET, AttentionCall, diff_attn_bwd, diff_attn_fwd

_EMPTY = (0,)

_NO_SECOND_DERIVATIVE = (
    b"the fused differential attention (backend=\"triton\") has no second derivative: its "
    b"gradients cannot be differentiated again (gradient penalties, double backward, "
    b"create_graph=True through it); use backend=\"torch\" for higher-order gradients")
_NO_FUNCTORCH = (
    "the fused differential attention (backend=\"triton\") does not support torch.func "
    "transforms (grad, vjp, jvp, vmap, ...); use backend=\"torch\" under them")


def _once_differentiable(grads: tuple, inputs: tuple) -> tuple:
    """A backward's gradients, made to refuse a second derivative. While the backward itself
    is recorded (create_graph=True), each gradient is linked (by adding an exact 0) to the
    backward's inputs that require grad, through a node that raises a RuntimeError naming
    backend="torch" when something differentiates through it; so a gradient penalty fails
    loudly instead of silently missing the attention's share. Without create_graph, or when
    nothing could be differentiated again, the gradients are returned as they are."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return grads
    inputs = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
    if not inputs:
        return grads
    refuse = torch._C._functions.DelayedError(_NO_SECOND_DERIVATIVE, len(inputs))
    links = refuse(*inputs)
    links = links if isinstance(links, tuple) else (links,)
    zero = sum(t.flatten()[:0].sum() for t in links)  # exactly 0, whatever the values
    return tuple(g.detach() + zero.to(g.dtype) if isinstance(g, Tensor) else g for g in grads)


def _refuse_functorch(*tensors: Optional[Tensor]) -> None:
    """RuntimeError naming backend="torch" when a torch.func transform wraps an input (the
    kernels read memory that such a wrapper does not have)."""
    if torch._C._functorch.peek_interpreter_stack() is None:
        return
    if any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t)
           for t in tensors):
        raise RuntimeError(_NO_FUNCTORCH)


def _compute_dtype(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.float() if INTERPRET and t is not None and t.dtype == torch.bfloat16 else t


def _forward(q, k, v, lam, kpm, norm_weight, call: AttentionCall, save, wrap=None, cu_q=None,
             cu_k=None):
    dtype = q.dtype
    up = _compute_dtype
    out, x, o2, lse, rstd = diff_attn_fwd(up(q), up(k), up(v), lam, kpm, norm_weight, call,
                                          cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                          save_for_backward=save, wrap=wrap)
    if out.dtype != dtype:  # the interpreter's bf16 detour: cast back what is kept
        x_is_out = x is out
        out = out.to(dtype)
        if save and norm_weight is None:  # with the norm, x and o2 stay fp32 (diff_attn_fwd)
            o2 = o2.to(dtype)
            x = out if x_is_out else x.to(dtype)
    return out, x, o2, lse, rstd


def _backward(dout, q, k, v, lam, kpm, norm_weight, x, o2, lse, rstd, call: AttentionCall,
              need_dlam, need_dw, wrap=None, cu_q=None, cu_k=None):
    # Gradients may arrive expanded (stride 0, as from out.sum()) or transposed: the kernels
    # need a contiguous last dimension only.
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dtype = q.dtype
    up = _compute_dtype
    dq, dk, dv, dlam, dw = diff_attn_bwd(up(dout), up(q), up(k), up(v), lam, kpm, norm_weight,
                                         (up(x), up(o2), lse, rstd), call, cu_seqlens_q=cu_q,
                                         cu_seqlens_k=cu_k, need_dlam=need_dlam,
                                         need_dw=need_dw, wrap=wrap)
    if dq.dtype != dtype:
        dq, dk, dv = dq.to(dtype), dk.to(dtype), dv.to(dtype)
    return dq, dk, dv, dlam, dw


class DiffAttentionFunction(torch.autograd.Function):
    """Eager autograd glue around the launchers; see fused_attention for the arguments."""

    @staticmethod
    def forward(ctx, q, k, v, lam, kpm, norm_weight, call, cu_q=None, cu_k=None,
                return_lse=False):
        out, x, o2, lse, rstd = _forward(q, k, v, lam, kpm, norm_weight, call, True, None,
                                         cu_q, cu_k)
        ctx.save_for_backward(q, k, v, lam, kpm, norm_weight, x, o2, lse, rstd, cu_q, cu_k)
        ctx.call = call
        if not return_lse:
            return out
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, *_dlse):
        q, k, v, lam, kpm, norm_weight, x, o2, lse, rstd, cu_q, cu_k = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dq, dk, dv, dlam, dw = _backward(dout, q, k, v, lam, kpm, norm_weight, x, o2, lse, rstd,
                                         ctx.call, needs[3], needs[5], None, cu_q, cu_k)
        return _once_differentiable((dq, dk, dv, dlam, None, dw, None, None, None, None),
                                    (dout, q, k, v, lam, norm_weight))


# ------------------------------------------------------------------ registered ops (traced)
# On a GPU the ops are triton_ops: torch.compile traces through their bodies to the kernels.
# Under the interpreter the kernels cannot run on the fake tensors of a trace (they read
# memory), so there the ops are opaque custom ops with shape-only fake implementations.
# Their schemas take the AttentionCall's fields as plain arguments (AttentionCall.as_schema_args),
# and last, with defaults for the padded layout, packed sequences' cumulative offsets and
# maximum lengths (AttentionCall.packed_schema_args).
_register_op = torch.library.custom_op if INTERPRET else torch.library.triton_op
_WRAP = None if INTERPRET else torch.library.wrap_triton


@_register_op("diffattn::fwd", mutates_args=())
def fused_fwd(q: Tensor, k: Tensor, v: Tensor, lam: Optional[Tensor],
              key_padding_mask: Optional[Tensor], norm_weight: Optional[Tensor], scale: float,
              causal: bool, window_left: int, window_right: int, lam_value: float,
              lam_vectors: bool, eps: float, out_scale: float, save_for_backward: bool,
              cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
              max_seqlen_q: int = -1, max_seqlen_k: int = -1
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward kernel. Returns (out, x, o2, lse, rstd); x is empty when it would be out (outputs
    of an op may not alias), and all but out are empty without save_for_backward. Packed
    sequences: the cumulative offsets and max_seqlen_q / max_seqlen_k >= 0."""
    call = AttentionCall.from_schema_args(scale, causal, window_left, window_right, lam_value,
                                          lam_vectors, eps, out_scale, max_seqlen_q,
                                          max_seqlen_k)
    out, x, o2, lse, rstd = _forward(q, k, v, lam, key_padding_mask, norm_weight, call,
                                     save_for_backward, _WRAP, cu_seqlens_q, cu_seqlens_k)
    if not save_for_backward:
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        return (out, out.new_empty(_EMPTY), out.new_empty(_EMPTY),
                out.new_empty(_EMPTY, dtype=acc), out.new_empty(_EMPTY, dtype=acc))
    if x is out:
        x = out.new_empty(_EMPTY)
    return out, x, o2, lse, rstd


@_register_op("diffattn::bwd", mutates_args=())
def fused_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lam: Optional[Tensor],
              key_padding_mask: Optional[Tensor], norm_weight: Optional[Tensor], x: Tensor,
              o2: Tensor, lse: Tensor, rstd: Tensor, scale: float, causal: bool,
              window_left: int, window_right: int, lam_value: float, lam_vectors: bool,
              eps: float, out_scale: float, need_dlam: bool, need_dw: bool,
              cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
              max_seqlen_q: int = -1, max_seqlen_k: int = -1
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward kernels. Returns (dq, dk, dv, dlam, dnorm_weight); dlam and dnorm_weight are
    empty where not needed."""
    call = AttentionCall.from_schema_args(scale, causal, window_left, window_right, lam_value,
                                          lam_vectors, eps, out_scale, max_seqlen_q,
                                          max_seqlen_k)
    dq, dk, dv, dlam, dw = _backward(dout, q, k, v, lam, key_padding_mask, norm_weight, x, o2,
                                     lse, rstd, call, need_dlam, need_dw, _WRAP, cu_seqlens_q,
                                     cu_seqlens_k)
    acc = lse.dtype
    dlam = lse.new_empty(_EMPTY, dtype=acc) if dlam is None else dlam
    dw = lse.new_empty(_EMPTY, dtype=acc) if dw is None else dw
    return dq, dk, dv, dlam, dw


# fused_fwd's inputs: six tensors, the call's fields, save_for_backward, then the two
# cumulative offsets and the two maximum lengths of packed sequences.
_N_TENSORS = 6
_N_CALL_FIELDS = len(AttentionCall(1.0).as_schema_args())
_SAVE = _N_TENSORS + _N_CALL_FIELDS


def _setup_context(ctx, inputs, output):
    q, k, v, lam, kpm, norm_weight = inputs[:_N_TENSORS]
    out, x, o2, lse, rstd = output
    cu_q, cu_k, max_q, max_k = (tuple(inputs[_SAVE + 1:]) + (None, None, -1, -1)[
        len(inputs) - _SAVE - 1:])
    ctx.save_for_backward(q, k, v, lam, kpm, norm_weight, x if x.numel() > 0 else out, o2, lse,
                          rstd, cu_q, cu_k)
    ctx.call_args = tuple(inputs[_N_TENSORS:_SAVE])
    ctx.max_seqlens = (max_q, max_k)
    ctx.saved = inputs[_SAVE]
    ctx.n_inputs = len(inputs)
    ctx.need = (lam is not None and lam.requires_grad,
                norm_weight is not None and norm_weight.requires_grad)


def _op_backward(ctx, dout, _dx, _do2, _dlse, _drstd):
    q, k, v, lam, kpm, norm_weight, x, o2, lse, rstd, cu_q, cu_k = ctx.saved_tensors
    if not ctx.saved:
        raise RuntimeError("diffattn::fwd ran with save_for_backward=False, so it kept nothing "
                           "to differentiate; call it with save_for_backward=True")
    dq, dk, dv, dlam, dw = torch.ops.diffattn.bwd(dout, q, k, v, lam, kpm, norm_weight, x, o2,
                                                  lse, rstd, *ctx.call_args, *ctx.need, cu_q,
                                                  cu_k, *ctx.max_seqlens)
    grads = (dq, dk, dv, dlam if ctx.need[0] else None, None, dw if ctx.need[1] else None) + \
        (None,) * (ctx.n_inputs - _N_TENSORS)
    return _once_differentiable(grads, (dout, q, k, v, lam, norm_weight))


fused_fwd.register_autograd(_op_backward, setup_context=_setup_context)


if INTERPRET:
    @fused_fwd.register_fake
    def _(q, k, v, lam, key_padding_mask, norm_weight, scale, causal, window_left,
          window_right, lam_value, lam_vectors, eps, out_scale, save_for_backward,
          cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=-1, max_seqlen_k=-1):
        H2 = q.shape[-2]
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        if max_seqlen_q >= 0:  # packed: (total_q, H, DV); row statistics (batch, H, ., max)
            B, N = cu_seqlens_q.shape[0] - 1, max_seqlen_q
            out = q.new_empty(q.shape[0], H2 // 2, v.shape[-1])
        else:
            B, N = q.shape[0], q.shape[1]
            out = q.new_empty(B, N, H2 // 2, v.shape[3])
        if not save_for_backward:
            return (out, q.new_empty(_EMPTY), q.new_empty(_EMPTY), q.new_empty(_EMPTY, dtype=acc),
                    q.new_empty(_EMPTY, dtype=acc))
        kept = acc if norm_weight is not None else out.dtype  # x and o2: see diff_attn_fwd
        x = out.new_empty(out.shape if norm_weight is not None or out_scale != 1.0 else _EMPTY,
                          dtype=kept)
        rstd = q.new_empty(B, H2 // 2, N if norm_weight is not None else 0, dtype=acc)
        return (out, x, out.new_empty(out.shape, dtype=kept),
                q.new_empty(B, H2 // 2, 2, N, dtype=acc), rstd)

    @fused_bwd.register_fake
    def _(dout, q, k, v, lam, key_padding_mask, norm_weight, x, o2, lse, rstd, scale, causal,
          window_left, window_right, lam_value, lam_vectors, eps, out_scale, need_dlam,
          need_dw, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=-1, max_seqlen_k=-1):
        dlam = lse.new_empty(lam.shape if need_dlam and lam is not None else _EMPTY)
        dw = lse.new_empty((v.shape[-1],) if need_dw and norm_weight is not None else _EMPTY)
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dlam, dw


# ------------------------------------------------------------------ entry point
def fused_attention(q: Tensor, k: Tensor, v: Tensor, lam: Optional[Tensor],
                    key_padding_mask: Optional[Tensor], norm_weight: Optional[Tensor],
                    call: AttentionCall, cu_seqlens_q: Optional[Tensor] = None,
                    cu_seqlens_k: Optional[Tensor] = None, return_lse: bool = False):
    """Differentiable fused differential attention (any variant; see diff_attn_fwd for the
    layouts). lam: a (), (H,) or (B, N, H) tensor in the accumulation dtype ((total_q, H) for
    packed sequences), or None to use call.lam_value, or with call.lam_vectors the (4, L)
    stacked lambda vectors (lambda_init in call.lam_value). norm_weight (DV,) or None. call:
    scale, masks, lambda mode, epilogue and, for packed sequences, the maximum lengths
    (diffattn.kernels.AttentionCall); cu_seqlens_q / cu_seqlens_k: the packed sequences' int32
    cumulative offsets. Without autograd (no_grad, or no input requiring grad) only the output
    is written. return_lse: return (out, lse) with the forward's own row statistics, the
    base-2 log-sum-exp of each map's scaled scores (B, H, 2, N) (N the maximum length for
    packed sequences), +inf for a row that sees no key; not differentiable."""
    if torch.compiler.is_compiling():
        save = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, lam, norm_weight))
        packed = (cu_seqlens_q, cu_seqlens_k, *call.packed_schema_args()) if call.varlen \
            else ()
        outputs = fused_fwd(q, k, v, lam, key_padding_mask, norm_weight,
                            *call.as_schema_args(), save or return_lse, *packed)
        return (outputs[0], outputs[3]) if return_lse else outputs[0]
    _refuse_functorch(q, k, v, lam, key_padding_mask, norm_weight)
    if torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad
            or (lam is not None and lam.requires_grad)
            or (norm_weight is not None and norm_weight.requires_grad)):
        packed = (cu_seqlens_q, cu_seqlens_k) if call.varlen or return_lse else ()
        lse = (return_lse,) if return_lse else ()
        return DiffAttentionFunction.apply(q, k, v, lam, key_padding_mask, norm_weight, call,
                                           *packed, *lse)
    outputs = _forward(q, k, v, lam, key_padding_mask, norm_weight, call, return_lse, None,
                       cu_seqlens_q, cu_seqlens_k)
    return (outputs[0], outputs[3]) if return_lse else outputs[0]
