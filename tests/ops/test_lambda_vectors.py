"""lambda from its four vectors in the functional ops (lambda_vectors=lv (4, d) = lq1, lk1, lq2,
lk2 and lambda_init: lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init), the weightless
RMSNorm (rms_norm=True), both also on the V1 KV-cache op, and the packed ops' keyword-only
lambda_ (a flash-style positional
dropout_p is a TypeError). Both backends (the fused kernels through the Triton interpreter);
gradients into lv against float64, gradcheck in float64."""
from __future__ import annotations

import pytest
import torch

from diffattn import (diff_attention, diff_attention_v2_varlen, diff_attention_varlen,
                      diff_attention_with_kvcache)
from helpers import assert_close_rel, requires_interpreter

BACKENDS = [pytest.param("triton", marks=requires_interpreter), "torch"]
LAMBDA_INIT = 0.3


def lambda_from(lv: torch.Tensor) -> torch.Tensor:
    lq1, lk1, lq2, lk2 = lv
    return torch.exp(lq1 @ lk1) - torch.exp(lq2 @ lk2) + LAMBDA_INIT


def inputs(dtype, packed=False, seed=0, d=8):
    g = torch.Generator().manual_seed(seed)
    lead = (11,) if packed else (2, 6)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_()

    q, k, v = rand(*lead, 4, d), rand(*lead, 2, d), rand(*lead, 1, 2 * d)
    lv = (0.3 * torch.randn(4, d, generator=g)).to(
        torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    return q, k, v, lv


CU = torch.tensor([0, 4, 4, 11], dtype=torch.int32)


def call(q, k, v, packed, **kwargs):
    if packed:
        return diff_attention_varlen(q, k, v, CU, CU, 7, 7, **kwargs)
    return diff_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_lambda_vectors_against_float64(backend, packed):
    q, k, v, lv = inputs(torch.float32, packed)
    out = call(q, k, v, packed, lambda_vectors=lv, lambda_init=LAMBDA_INIT, causal=True,
               rms_norm=True, out_scale=0.7, backend=backend)
    leaves = (q, k, v, lv)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    want = call(*ref[:3], packed, lambda_=lambda_from(ref[3]), causal=True,
                norm_weight=torch.ones(16, dtype=torch.float64), out_scale=0.7,
                backend="torch")
    assert_close_rel("out", out, want, torch.float32)
    dout = torch.randn(out.shape)
    got = torch.autograd.grad(out, leaves, dout)
    wanted = torch.autograd.grad(want, ref, dout.double())
    for name, a, b in zip(("dq", "dk", "dv", "dlambda_vectors"), got, wanted):
        assert_close_rel(name, a, b, torch.float32, 5e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_gradcheck_into_lambda_vectors(backend, packed):
    q, k, v, lv = inputs(torch.float64, packed, seed=1, d=4)

    rows = slice(0, 4)  # the first sequence (packed), or four queries and keys (padded)
    if not packed:
        rows = (slice(0, 1), rows)
    q, k, v = q[rows].detach(), k[rows].detach(), v[rows].detach()

    def f(lv):
        if packed:
            cu = torch.tensor([0, 4], dtype=torch.int32)
            return diff_attention_varlen(q, k, v, cu, cu, 4, 4, lambda_vectors=lv,
                                         lambda_init=LAMBDA_INIT, causal=True, backend=backend)
        return diff_attention(q, k, v, lambda_vectors=lv, lambda_init=LAMBDA_INIT, causal=True,
                              backend=backend)

    assert torch.autograd.gradcheck(f, (lv,), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_weightless_norm_is_a_norm_weight_of_ones(backend, packed):
    q, k, v, _ = inputs(torch.float32, packed, seed=2)
    weightless = call(q, k, v, packed, lambda_=0.4, rms_norm=True, backend=backend)
    ones = call(q, k, v, packed, lambda_=0.4, norm_weight=torch.ones(16), backend=backend)
    plain = call(q, k, v, packed, lambda_=0.4, rms_norm=False, backend=backend)
    assert torch.equal(weightless, ones)
    assert not torch.allclose(weightless, plain)
    weight = torch.rand(16)
    assert torch.equal(call(q, k, v, packed, lambda_=0.4, norm_weight=weight, rms_norm=True,
                            backend=backend),
                       call(q, k, v, packed, lambda_=0.4, norm_weight=weight, backend=backend))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(lambda_=0.5, lambda_vectors="lv", lambda_init=0.1), ValueError, "mutually exclusive"),
    (dict(), TypeError, "lambda_ is required"),
    (dict(lambda_=0.5, lambda_init=0.1), ValueError, "lambda_init is only used with"),
    (dict(lambda_vectors="lv"), TypeError, "lambda_init is required"),
    (dict(lambda_vectors="lv", lambda_init=float("nan")), ValueError, "lambda_init must be"),
    (dict(lambda_vectors=torch.zeros(4, 7), lambda_init=0.1), ValueError,
     r"lambda_vectors must have shape \(4, head_dim\) = \(4, 8\)"),
    (dict(lambda_vectors=torch.zeros(4, 8, dtype=torch.int64), lambda_init=0.1), TypeError,
     "lambda_vectors must be a floating-point tensor"),
    (dict(lambda_vectors=torch.full((4, 8), float("nan")), lambda_init=0.1), ValueError,
     "lambda_vectors must be finite"),
    (dict(lambda_=0.5, rms_norm=False, norm_weight=torch.ones(16)), ValueError,
     "rms_norm=False contradicts norm_weight"),
    (dict(lambda_=0.5, rms_norm=1), TypeError, "rms_norm must be a bool"),
], ids=["both", "neither", "init-alone", "no-init", "nan-init", "shape", "dtype", "nan",
        "norm-contradiction", "rms_norm-type"])
def test_bad_lambda_and_norm_arguments_are_refused(packed, kwargs, error, match):
    q, k, v, lv = inputs(torch.float32, packed)
    kwargs = {name: lv if isinstance(value, str) else value for name, value in kwargs.items()}
    with pytest.raises(error, match=match):
        call(q, k, v, packed, backend="torch", **kwargs)


def test_flash_style_positional_dropout_is_a_type_error():
    """flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, ...): in the packed
    ops every argument after max_seqlen_k is keyword-only, so a positional 0.0 never becomes
    lambda."""
    q, k, v, _ = inputs(torch.float32, packed=True)
    with pytest.raises(TypeError, match="positional"):
        diff_attention_varlen(q, k, v, CU, CU, 7, 7, 0.0)
    with pytest.raises(TypeError, match="positional"):
        diff_attention_v2_varlen(q, k[:, :1], v[..., :8], CU, CU, 7, 7, 0.0)
    with pytest.raises(TypeError, match="lambda_"):
        diff_attention_v2_varlen(q, k[:, :1], v[..., :8], CU, CU, 7, 7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_lambda_vectors_and_weightless_norm(backend):
    """diff_attention_with_kvcache(lambda_vectors=, lambda_init=, rms_norm=True) equals the
    call with the lambda they compute and a norm weight of ones (an append, causal, two
    sequence lengths); neither lambda_ nor lambda_vectors is refused."""
    g = torch.Generator().manual_seed(4)
    B, Nq, d, capacity = 2, 2, 8, 20
    q = torch.randn(B, Nq, 4, d, generator=g)
    k_new, v_new = torch.randn(B, Nq, 2, d, generator=g), torch.randn(B, Nq, 1, 2 * d,
                                                                        generator=g)
    k_cache = torch.randn(B, capacity, 2, d, generator=g)
    v_cache = torch.randn(B, capacity, 1, 2 * d, generator=g)
    lv = 0.3 * torch.randn(4, d, generator=g)
    seqlens = torch.tensor([3, 11], dtype=torch.int32)

    def step(**kwargs):
        kc, vc = k_cache.clone(), v_cache.clone()
        with torch.no_grad():
            return diff_attention_with_kvcache(q, kc, vc, k=k_new, v=v_new,
                                               cache_seqlens=seqlens, causal=True,
                                               backend=backend, **kwargs)

    got = step(lambda_vectors=lv, lambda_init=LAMBDA_INIT, rms_norm=True)
    want = step(lambda_=float(lambda_from(lv)), norm_weight=torch.ones(2 * d))
    assert_close_rel("out", got, want, torch.float32, 1e-5)
    assert not torch.allclose(got, step(lambda_vectors=lv, lambda_init=LAMBDA_INIT))
    with pytest.raises(TypeError, match="lambda_ is required"):
        step()
