"""Empty calls: zero batch, zero queries or zero keys give the same correctly shaped result on
both backends for every op (padded V1 and V2, packed V1 and V2, KV cache V1 and V2 with
contiguous and paged caches); a query that sees no key gives zeros. Where the op is
differentiable the backward runs too: every gradient has its input's shape and is zero
(nothing was attended). KV-cache calls without queries still append their new keys in place,
the same way on both backends. Outputs are NaN-poisoned.
"""
from __future__ import annotations

import pytest
import torch

from diffattn import (diff_attention, diff_attention_v2, diff_attention_v2_varlen,
                      diff_attention_v2_with_kvcache, diff_attention_varlen,
                      diff_attention_with_kvcache)
from helpers import poison_empty, requires_interpreter  # noqa: F401

H, HK, D = 2, 1, 16
OPS = ["v1", "v2", "varlen_v1", "varlen_v2", "kvcache_v1", "kvcache_v2", "kvcache_v1_paged",
       "kvcache_v2_paged"]
# (batch, queries, keys), one of them zero
SIZES = {"batch": (0, 3, 5), "queries": (2, 0, 5), "keys": (2, 3, 0)}


def _offsets(lengths) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist(),
                        dtype=torch.int32)


def _call(op: str, axis: str, backend: str):
    """(function, tensors, differentiable): the call as a function of its tensors (the
    differentiable inputs, or the query and the caches of a KV-cache call), same values for
    every backend."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    B, N, M = SIZES[axis]
    v2 = "v2" in op
    key_heads, dv = (HK, D) if v2 else (2 * HK, 2 * D)
    lam = 0.2 + 0.6 * torch.rand(H, generator=g)
    w = 1 + 0.3 * rnd(dv)
    norm = {} if v2 else dict(norm_weight=w)
    if op in ("v1", "v2"):
        fn = diff_attention_v2 if v2 else diff_attention
        tensors = [rnd(B, N, 2 * H, D), rnd(B, M, key_heads, D), rnd(B, M, HK, dv), lam, w]
        return (lambda q, k, v, lam, w: fn(q, k, v, lambda_=lam, causal=True, backend=backend,
                                           **({} if v2 else dict(norm_weight=w)))), tensors, True
    if op.startswith("varlen"):
        cu_q, cu_k = _offsets([N] * B), _offsets([M] * B)
        fn = diff_attention_v2_varlen if v2 else diff_attention_varlen
        tensors = [rnd(B * N, 2 * H, D), rnd(B * M, key_heads, D), rnd(B * M, HK, dv), lam, w]
        return (lambda q, k, v, lam, w: fn(q, k, v, cu_q, cu_k, N, M, lambda_=lam, causal=True,
                                           backend=backend,
                                           **({} if v2 else dict(norm_weight=w)))), tensors, True
    # KV cache: zero keys = empty caches and no new keys; otherwise 2 cached keys, M - 2 new
    n_new = 0 if axis == "keys" else M - 2
    cached = torch.full((B,), 0 if axis == "keys" else 2, dtype=torch.int32)
    k_new, v_new = rnd(B, n_new, key_heads, D), rnd(B, n_new, HK, dv)
    block_table = None
    if op.endswith("paged"):
        block_table = torch.randperm(2 * B + 1, generator=g)[:2 * B].view(B, 2).to(torch.int32)
        caches = [rnd(2 * B + 1, 16, key_heads, D), rnd(2 * B + 1, 16, HK, dv)]
    else:
        caches = [rnd(B, 32, key_heads, D), rnd(B, 32, HK, dv)]
    fn = diff_attention_v2_with_kvcache if v2 else diff_attention_with_kvcache

    def call(q, k_cache, v_cache):
        with torch.no_grad():
            return fn(q, k_cache, v_cache, k=k_new if n_new else None,
                      v=v_new if n_new else None, cache_seqlens=cached, block_table=block_table,
                      lambda_=lam, causal=True, backend=backend, **norm)
    return call, [rnd(B, N, 2 * H, D)] + caches, False


def _run(op: str, axis: str, backend: str):
    fn, tensors, differentiable = _call(op, axis, backend)
    tensors = [t.clone().requires_grad_(differentiable) for t in tensors]
    out = fn(*tensors)
    grads = None
    if differentiable:
        grads = torch.autograd.grad(out, tensors, torch.randn(out.shape), allow_unused=True)
    return out, tensors, grads


@requires_interpreter
@pytest.mark.parametrize("axis", list(SIZES))
@pytest.mark.parametrize("op", OPS)
def test_empty_call_agrees_across_backends(op, axis, poison_empty):  # noqa: F811
    B, N, _ = SIZES[axis]
    out_f, tensors_f, grads_f = _run(op, axis, "triton")
    out_t, tensors_t, grads_t = _run(op, axis, "torch")
    rows = (B * N,) if op.startswith("varlen") else (B, N)
    expected = (*rows, H, D if "v2" in op else 2 * D)
    for name, out in (("triton", out_f), ("torch", out_t)):
        assert tuple(out.shape) == expected, f"{name}: output shape {tuple(out.shape)}"
        assert out.dtype == torch.float32, f"{name}: output dtype {out.dtype}"
        assert torch.equal(out, torch.zeros_like(out)), f"{name}: output not zero"
    if grads_f is None:  # KV cache: the append wrote the same caches on both paths
        for name, a, b in zip(("k_cache", "v_cache"), tensors_f[1:], tensors_t[1:]):
            assert torch.equal(a, b), name
        return
    names = ("q", "k", "v", "lambda", "norm_weight")
    for name, t, gf, gt in zip(names, tensors_f, grads_f, grads_t):
        if name == "norm_weight" and "v2" in op:
            assert gf is None and gt is None
            continue
        for backend, grad in (("triton", gf), ("torch", gt)):
            assert grad is not None and grad.shape == t.shape, f"{backend}: d{name} shape"
            assert torch.equal(grad, torch.zeros_like(grad)), f"{backend}: d{name} not zero"
