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

import functools
import inspect
import typing
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .kernels import INTERPRET, AttentionCall, diff_attn_bwd, diff_attn_fwd
from .kernels.call import FIELD_TYPES, call_dims

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
# Their schemas end with the AttentionCall's fields (register_call_op), which the
# implementations, the fake implementations and the autograd glue take as *call and turn
# back into the AttentionCall (AttentionCall.from_schema_args): no field is spelled here.
_register_op = torch.library.custom_op if INTERPRET else torch.library.triton_op
_WRAP = None if INTERPRET else torch.library.wrap_triton

# {AttentionCall field type: the Python annotation torch.library reads a schema type from}
_ANNOTATIONS = {"float": float, "bool": bool, "int": int, "Tuple[int, int]": Sequence[int],
                "Optional[Tuple[int, int]]": Optional[Sequence[int]]}


def register_call_op(name: str):
    """Register ``fn(<annotated arguments>, *call)`` as the custom operator ``name`` whose
    schema is fn's own arguments followed by AttentionCall's fields (fn receives their
    values, ``AttentionCall.as_schema_args()``, as ``call``). Returns the registered op (a
    ``torch.library`` CustomOpDef: ``register_fake``, ``register_autograd``)."""
    def register(fn):
        hints = typing.get_type_hints(fn)
        parameters = [p.replace(annotation=hints[p.name])
                      for p in inspect.signature(fn).parameters.values()
                      if p.kind is not inspect.Parameter.VAR_POSITIONAL]
        parameters += [inspect.Parameter(field, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                         annotation=_ANNOTATIONS[ty])
                       for field, ty in FIELD_TYPES.items()]

        @functools.wraps(fn)
        def op(*args):
            return fn(*args)
        op.__signature__ = inspect.Signature(parameters, return_annotation=hints["return"])
        return _register_op(name, op, mutates_args=())
    return register


# fused_fwd's arguments before the call's fields: six tensors, the two cumulative offsets
# of packed sequences (None for the padded layout), save_for_backward.
_N_TENSORS = 6
_N_FIXED = _N_TENSORS + 3
_FIVE = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


@register_call_op("diffattn::fwd")
def fused_fwd(q: Tensor, k: Tensor, v: Tensor, lam: Optional[Tensor],
              key_padding_mask: Optional[Tensor], norm_weight: Optional[Tensor],
              cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
              save_for_backward: bool, *call) -> _FIVE:
    """Forward kernel: fused_fwd(q, k, v, lam, key_padding_mask, norm_weight, cu_seqlens_q,
    cu_seqlens_k, save_for_backward, *call.as_schema_args()). Returns (out, x, o2, lse, rstd);
    x is empty when it would be out (outputs of an op may not alias), and all but out are
    empty without save_for_backward."""
    call = AttentionCall.from_schema_args(*call)
    out, x, o2, lse, rstd = _forward(q, k, v, lam, key_padding_mask, norm_weight, call,
                                     save_for_backward, _WRAP, cu_seqlens_q, cu_seqlens_k)
    if not save_for_backward:
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        return (out, out.new_empty(_EMPTY), out.new_empty(_EMPTY),
                out.new_empty(_EMPTY, dtype=acc), out.new_empty(_EMPTY, dtype=acc))
    if x is out:
        x = out.new_empty(_EMPTY)
    return out, x, o2, lse, rstd


@register_call_op("diffattn::bwd")
def fused_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lam: Optional[Tensor],
              key_padding_mask: Optional[Tensor], norm_weight: Optional[Tensor], x: Tensor,
              o2: Tensor, lse: Tensor, rstd: Tensor, cu_seqlens_q: Optional[Tensor],
              cu_seqlens_k: Optional[Tensor], need_dlam: bool, need_dw: bool, *call) -> _FIVE:
    """Backward kernels. Returns (dq, dk, dv, dlam, dnorm_weight); dlam and dnorm_weight are
    empty where not needed."""
    call = AttentionCall.from_schema_args(*call)
    dq, dk, dv, dlam, dw = _backward(dout, q, k, v, lam, key_padding_mask, norm_weight, x, o2,
                                     lse, rstd, call, need_dlam, need_dw, _WRAP, cu_seqlens_q,
                                     cu_seqlens_k)
    acc = lse.dtype
    dlam = lse.new_empty(_EMPTY, dtype=acc) if dlam is None else dlam
    dw = lse.new_empty(_EMPTY, dtype=acc) if dw is None else dw
    return dq, dk, dv, dlam, dw


def _setup_context(ctx, inputs, output):
    q, k, v, lam, kpm, norm_weight, cu_q, cu_k, save = inputs[:_N_FIXED]
    out, x, o2, lse, rstd = output
    ctx.save_for_backward(q, k, v, lam, kpm, norm_weight, x if x.numel() > 0 else out, o2, lse,
                          rstd, cu_q, cu_k)
    ctx.call = AttentionCall.from_schema_args(*inputs[_N_FIXED:])
    ctx.saved = save
    ctx.n_inputs = len(inputs)
    ctx.need = (lam is not None and lam.requires_grad,
                norm_weight is not None and norm_weight.requires_grad)


def _op_backward(ctx, dout, _dx, _do2, _dlse, _drstd):
    q, k, v, lam, kpm, norm_weight, x, o2, lse, rstd, cu_q, cu_k = ctx.saved_tensors
    if not ctx.saved:
        raise RuntimeError("diffattn::fwd ran with save_for_backward=False, so it kept nothing "
                           "to differentiate; call it with save_for_backward=True")
    dq, dk, dv, dlam, dw = torch.ops.diffattn.bwd(dout, q, k, v, lam, kpm, norm_weight, x, o2,
                                                  lse, rstd, cu_q, cu_k, *ctx.need,
                                                  *ctx.call.as_schema_args())
    grads = (dq, dk, dv, dlam if ctx.need[0] else None, None, dw if ctx.need[1] else None) + \
        (None,) * (ctx.n_inputs - _N_TENSORS)
    return _once_differentiable(grads, (dout, q, k, v, lam, norm_weight))


fused_fwd.register_autograd(_op_backward, setup_context=_setup_context)


if INTERPRET:
    @fused_fwd.register_fake
    def _(q, k, v, lam, key_padding_mask, norm_weight, cu_seqlens_q, cu_seqlens_k,
          save_for_backward, *call):
        call = AttentionCall.from_schema_args(*call)
        B, N, _, H, _, _, DV, rows = call_dims(call, q, v, cu_seqlens_q)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = q.new_empty(*rows, H, DV)
        if not save_for_backward:
            return (out, q.new_empty(_EMPTY), q.new_empty(_EMPTY), q.new_empty(_EMPTY, dtype=acc),
                    q.new_empty(_EMPTY, dtype=acc))
        has_norm = norm_weight is not None
        kept = acc if has_norm else out.dtype  # x and o2: see diff_attn_fwd
        x = out.new_empty(out.shape if call.stores_difference(has_norm) else _EMPTY, dtype=kept)
        rstd = q.new_empty(B, H, N if has_norm else 0, dtype=acc)
        return (out, x, out.new_empty(out.shape, dtype=kept), q.new_empty(B, H, 2, N, dtype=acc),
                rstd)

    @fused_bwd.register_fake
    def _(dout, q, k, v, lam, key_padding_mask, norm_weight, x, o2, lse, rstd, cu_seqlens_q,
          cu_seqlens_k, need_dlam, need_dw, *call):
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
        outputs = fused_fwd(q, k, v, lam, key_padding_mask, norm_weight, cu_seqlens_q,
                            cu_seqlens_k, save or return_lse, *call.as_schema_args())
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
