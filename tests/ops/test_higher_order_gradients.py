"""Second derivatives and torch.func: the torch path gives them (checked against the float64
reference); the fused path refuses them with an error naming backend="torch" instead of
returning wrong values."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffattn import (DiffMultiheadAttention, diff_attention, diff_attention_ref,
                      diff_attention_v2, diff_attention_v2_ref)
from diffattn.kernels.call import AttentionCall
from helpers import INTERPRET, assert_close_rel

needs_fused = pytest.mark.skipif(not INTERPRET, reason="needs the fused path (TRITON_INTERPRET=1)")
REMEDY = 'backend="torch"'


def _inputs(v2: bool, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, N, M, H, d = 1, 4, 5, 2, 4
    q = torch.randn(B, N, 2 * H, d, generator=g, dtype=dtype)
    k = torch.randn(B, M, 1 if v2 else 2, d, generator=g, dtype=dtype)
    v = torch.randn(B, M, 1, d if v2 else 2 * d, generator=g, dtype=dtype)
    lam = torch.tensor([0.3, 0.6], dtype=dtype)
    mask = torch.zeros(B, M, dtype=torch.bool)
    mask[0, 3] = True
    return [t.requires_grad_() for t in (q, k, v, lam)], mask


def _gradient_penalty_grads(fn, leaves, **kw):
    """Gradients of sum(|d(out . w)/d(q, k, v)|^2) with respect to q, k, v and lambda."""
    q, k, v, lam = leaves
    out = fn(q, k, v, lambda_=lam, **kw)
    w = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    first = torch.autograd.grad((out * w).sum(), (q, k, v), create_graph=True)
    penalty = sum(g.pow(2).sum() for g in first)
    return torch.autograd.grad(penalty, leaves)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_torch_path_second_derivatives_match_the_reference(v2):
    leaves, mask = _inputs(v2)
    fn, ref = (diff_attention_v2, diff_attention_v2_ref) if v2 else \
        (diff_attention, diff_attention_ref)
    kw = dict(causal=True, key_padding_mask=mask)
    # The torch path's second derivatives are SDPA's: its math kernel has them, PyTorch's
    # fused SDPA kernels (which V2's grouped call gets on CPU) refuse with their own error.
    with sdpa_kernel(SDPBackend.MATH) if v2 else contextlib.nullcontext():
        got = _gradient_penalty_grads(fn, leaves, backend="torch", **kw)
    want = _gradient_penalty_grads(ref, leaves, **kw)
    for name, g, r in zip(("q", "k", "v", "lambda"), got, want):
        assert_close_rel(f"d penalty / d {name}", g, r, torch.float64)


@needs_fused
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_fused_path_refuses_second_derivatives(v2):
    leaves, mask = _inputs(v2)
    fn = diff_attention_v2 if v2 else diff_attention
    with pytest.raises(RuntimeError, match=REMEDY):
        _gradient_penalty_grads(fn, leaves, backend="triton", key_padding_mask=mask)


@needs_fused
def test_fused_first_derivatives_under_create_graph_stay_right():
    # create_graph=True alone is fine as long as nothing differentiates the attention's
    # gradients again: the first derivatives are the usual ones.
    leaves, _ = _inputs(False)
    out = diff_attention(*leaves[:3], lambda_=leaves[3], backend="triton")
    got = torch.autograd.grad(out.sum(), leaves, create_graph=True)
    want = torch.autograd.grad(diff_attention_ref(*leaves).sum(), leaves)
    for g, r in zip(got, want):
        assert_close_rel("first derivative", g, r, torch.float64)


@needs_fused
def test_registered_op_refuses_second_derivatives():
    (q, k, v, lam), _ = _inputs(False)
    call = AttentionCall.create(0.5)
    out = torch.ops.diffattn.fwd(q, k, v, lam, None, None, None, None, True,
                                 *call.as_schema_args())[0]
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match=REMEDY):
        dq.pow(2).sum().backward()


@needs_fused
def test_gradient_penalty_through_the_fused_layer_is_refused():
    torch.manual_seed(0)
    layer = DiffMultiheadAttention(16, 4, batch_first=True, backend="triton").double()
    x = torch.randn(1, 5, 16, dtype=torch.float64, requires_grad=True)
    out, _ = layer(x, x, x)
    (dx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=REMEDY):
        dx.pow(2).sum().backward()


def _v1(q, k, v, lam, backend):
    return diff_attention(q, k, v, lambda_=lam, backend=backend)


@needs_fused
@pytest.mark.parametrize("transform", ["grad", "vjp", "jvp", "vmap"])
def test_fused_path_refuses_torch_func(transform):
    (q, k, v, lam), _ = _inputs(False)
    q, k, v, lam = (t.detach() for t in (q, k, v, lam))
    f = lambda q_: _v1(q_, k, v, lam, "triton")  # noqa: E731
    calls = {"grad": lambda: torch.func.grad(lambda q_: f(q_).sum())(q),
             "vjp": lambda: torch.func.vjp(f, q),
             "jvp": lambda: torch.func.jvp(f, (q,), (torch.ones_like(q),)),
             "vmap": lambda: torch.func.vmap(f)(q[None].expand(2, *q.shape))}
    with pytest.raises(RuntimeError, match=r"torch\.func.*" + REMEDY):
        calls[transform]()


def test_torch_path_under_torch_func_grad_matches_the_reference():
    (q, k, v, lam), mask = _inputs(False)
    q, k, v, lam = (t.detach() for t in (q, k, v, lam))
    got = torch.func.grad(lambda q_, l_: _v1(q_, k, v, l_, "torch").pow(2).sum(),
                          argnums=(0, 1))(q, lam)
    want = torch.func.grad(lambda q_, l_: diff_attention_ref(q_, k, v, l_).pow(2).sum(),
                           argnums=(0, 1))(q, lam)
    for g, r in zip(got, want):
        assert_close_rel("torch.func.grad", g, r, torch.float64)
