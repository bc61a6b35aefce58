"""Logit soft-capping (``softcap``): the scaled scores s become softcap * tanh(s / softcap)
before the softmax, on all six ops, fused (interpreter) and torch paths, against the float64
reference; forward and every gradient where the op is differentiable; return_softmax_lse of
the capped scores on the dense and packed ops (the KV-cache options with softcap are in
test_kvcache_options.py)."""
from __future__ import annotations

import pytest
import torch

from diffattn import (diff_attention, diff_attention_v2, diff_attention_v2_varlen,
                      diff_attention_v2_with_kvcache, diff_attention_varlen,
                      diff_attention_with_kvcache)
from diffattn.reference import diff_attention_ref, diff_attention_v2_ref
from helpers import INTERPRET, assert_close_rel, poison_empty  # noqa: F401

BACKENDS = ["torch", "triton"] if INTERPRET else ["torch"]
CAP = 4.0   # scores reach |s| ~ 10 with the inputs below: the cap changes every map
FP32 = torch.float32


def _rand(g, *shape, scale=1.0):
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).float()


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _check_all(outs, refs, leaves, ref_leaves, names):
    """Forward, then the gradient of every leaf, fp32 against float64."""
    out, ref = outs, refs
    assert_close_rel("out", out, ref, FP32)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).float()
    got = torch.autograd.grad(out, leaves, dout)
    want = torch.autograd.grad(ref, ref_leaves, dout.double())
    for name, a, b in zip(names, got, want):
        assert_close_rel(f"d{name}", a, b, FP32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,window,padding", [
    (False, None, True), (True, None, False), (False, (3, 2), True),
], ids=["padding", "causal", "window-padding"])
def test_v1_forward_and_every_gradient(backend, causal, window, padding, poison_empty):
    g = torch.Generator().manual_seed(0)
    B, N, M, H, Hk, d = 2, 9, 11, 2, 1, 16      # grouped-query: two heads read one group
    q, k = _rand(g, B, N, 2 * H, d, scale=2.0), _rand(g, B, M, 2 * Hk, d, scale=2.0)
    v = _rand(g, B, M, Hk, 2 * d)
    lam, weight = 0.2 + 0.6 * _rand(g, H).abs(), 1 + 0.1 * _rand(g, 2 * d)
    mask = torch.zeros(B, M, dtype=torch.bool)
    if padding:
        mask[0, -3:] = True
    leaves = _leaves(q, k, v, lam, weight)
    out = diff_attention(*leaves[:3], lambda_=leaves[3], causal=causal, window_size=window,
                         key_padding_mask=mask if padding else None, norm_weight=leaves[4],
                         out_scale=0.7, softcap=CAP, backend=backend)
    ref_leaves = [t.double() for t in _leaves(q, k, v, lam, weight)]
    ref_leaves = [t.detach().requires_grad_() for t in ref_leaves]
    bias = None
    if window is not None:
        i = torch.arange(N)[:, None] + (M - N)
        j = torch.arange(M)[None, :]
        bias = ~((j >= i - window[0]) & (j <= i + window[1]))
    ref = diff_attention_ref(*ref_leaves[:4], causal=causal,
                             key_padding_mask=mask if padding else None,
                             norm_weight=ref_leaves[4], out_scale=0.7, attn_bias=bias,
                             softcap=CAP)
    _check_all(out, ref, leaves, ref_leaves, "q k v lambda norm_weight".split())


@pytest.mark.parametrize("backend", BACKENDS)
def test_v2_forward_and_every_gradient(backend, poison_empty):
    g = torch.Generator().manual_seed(2)
    B, N, M, H, Hk, d = 2, 10, 10, 2, 1, 16
    q, k = _rand(g, B, N, 2 * H, d, scale=2.0), _rand(g, B, M, Hk, d, scale=2.0)
    v, lam = _rand(g, B, M, Hk, d), 0.5 * _rand(g, B, N, H).abs()    # lambda per token
    leaves = _leaves(q, k, v, lam)
    out = diff_attention_v2(*leaves[:3], lambda_=leaves[3], causal=True, softcap=CAP,
                            backend=backend)
    ref_leaves = [t.double().detach().requires_grad_() for t in (q, k, v, lam)]
    ref = diff_attention_v2_ref(*ref_leaves, causal=True, softcap=CAP)
    _check_all(out, ref, leaves, ref_leaves, "q k v lambda".split())


def _packed_reference(ref_fn, q, k, v, lengths, **kwargs):
    """The padded reference per sequence of packed q (total_q, ...), k, v (total_k, ...)."""
    outs, sq, sk = [], 0, 0
    for nq, nk in zip(*lengths):
        if nq:
            outs.append(ref_fn(q[None, sq:sq + nq], k[None, sk:sk + nk], v[None, sk:sk + nk],
                               **kwargs)[0])
        sq, sk = sq + nq, sk + nk
    return torch.cat(outs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_packed_forward_and_every_gradient(backend, v2, poison_empty):
    g = torch.Generator().manual_seed(3)
    lengths = ([3, 0, 6], [5, 2, 6])
    H, Hk, d = 2, 1, 16
    Tq, Tk = sum(lengths[0]), sum(lengths[1])
    cu_q, cu_k = (torch.tensor([0] + list(torch.tensor(n).cumsum(0)), dtype=torch.int32)
                  for n in lengths)
    q = _rand(g, Tq, 2 * H, d, scale=2.0)
    k = _rand(g, Tk, Hk if v2 else 2 * Hk, d, scale=2.0)
    v = _rand(g, Tk, Hk, d if v2 else 2 * d)
    lam = 0.2 + 0.6 * _rand(g, H).abs()
    leaves = _leaves(q, k, v, lam)
    ref_leaves = [t.double().detach().requires_grad_() for t in (q, k, v, lam)]
    fn, ref_fn = ((diff_attention_v2_varlen, diff_attention_v2_ref) if v2 else
                  (diff_attention_varlen, diff_attention_ref))
    out = fn(leaves[0], leaves[1], leaves[2], cu_q, cu_k, max(lengths[0]), max(lengths[1]),
             lambda_=leaves[3], causal=True, softcap=CAP, backend=backend)
    ref = _packed_reference(ref_fn, *ref_leaves[:3], lengths, lambda_=ref_leaves[3],
                            causal=True, softcap=CAP)
    _check_all(out, ref, leaves, ref_leaves, "q k v lambda".split())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_kvcache_forward(backend, v2):
    """A decoding step of two queries against caches of different lengths."""
    g = torch.Generator().manual_seed(4)
    B, Nq, H, Hk, d, capacity = 2, 2, 2, 1, 16, 24
    q = _rand(g, B, Nq, 2 * H, d, scale=2.0)
    k_cache = _rand(g, B, capacity, Hk if v2 else 2 * Hk, d, scale=2.0)
    v_cache = _rand(g, B, capacity, Hk, d if v2 else 2 * d)
    seqlens = torch.tensor([7, 19], dtype=torch.int32)
    lam, weight = torch.tensor([0.3, 0.6]), 1 + 0.1 * _rand(g, 2 * d)
    with torch.no_grad():
        if v2:
            out = diff_attention_v2_with_kvcache(q, k_cache, v_cache, lambda_=lam,
                                                 cache_seqlens=seqlens, causal=True,
                                                 softcap=CAP, backend=backend)
        else:
            out = diff_attention_with_kvcache(q, k_cache, v_cache, lambda_=lam,
                                              cache_seqlens=seqlens, causal=True,
                                              norm_weight=weight, out_scale=0.7, softcap=CAP,
                                              backend=backend)
    for b, length in enumerate(seqlens.tolist()):
        args = [t[b:b + 1].double() for t in (q, k_cache[:, :length], v_cache[:, :length])]
        if v2:
            ref = diff_attention_v2_ref(*args, lam.double(), causal=True, softcap=CAP)
        else:
            ref = diff_attention_ref(*args, lam.double(), causal=True,
                                     norm_weight=weight.double(), out_scale=0.7, softcap=CAP)
        assert_close_rel(f"out[{b}]", out[b:b + 1], ref, FP32)


def test_softcap_zero_is_off_and_bad_values_are_refused():
    g = torch.Generator().manual_seed(5)
    q, k, v = _rand(g, 1, 4, 2, 8), _rand(g, 1, 4, 2, 8), _rand(g, 1, 4, 1, 16)
    plain = diff_attention(q, k, v, lambda_=0.5, backend="torch")
    assert torch.equal(diff_attention(q, k, v, lambda_=0.5, softcap=0.0, backend="torch"), plain)
    for bad in (-1.0, float("inf"), float("nan"), "4"):
        with pytest.raises(ValueError, match="softcap"):
            diff_attention(q, k, v, lambda_=0.5, softcap=bad)


def _capped_lse(q, k, keep, scale):
    """(2H, N) float64 log-sum-exp of the soft-capped scores of q (N, 2H, d) against k
    (M, 2H, d) (one key head per q head), over keep (N, M); +inf for an empty row."""
    s = torch.einsum("nhd,mhd->hnm", q.double(), k.double()) * scale
    s = (CAP * torch.tanh(s / CAP)).masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return lse.masked_fill(torch.isneginf(lse), float("inf"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_dense_lse_is_of_the_capped_scores(backend, v2):
    """return_softmax_lse with softcap: the log-sum-exp of the scores the softmax sees (the
    capped ones, as flash-attn's), with a window and a key that no query sees."""
    g = torch.Generator().manual_seed(6)
    B, N, M, H, d = 2, 6, 8, 2, 16
    q = _rand(g, B, N, 2 * H, d, scale=2.0)
    k = _rand(g, B, M, H if v2 else 2 * H, d, scale=2.0)
    v = _rand(g, B, M, H, d if v2 else 2 * d)
    fn = diff_attention_v2 if v2 else diff_attention
    out, lse = fn(q, k, v, lambda_=0.4, causal=True, window_size=(2, 0), return_softmax_lse=True,
                  softcap=CAP, backend=backend)
    assert torch.equal(out, fn(q, k, v, lambda_=0.4, causal=True, window_size=(2, 0), softcap=CAP,
                               backend=backend))
    i, j = torch.arange(N)[:, None] + (M - N), torch.arange(M)[None, :]
    keep = (j <= i) & (j >= i - 2)
    heads = torch.arange(2 * H) // 2 if v2 else torch.arange(2 * H)
    want = torch.stack([_capped_lse(q[b], k[b][:, heads], keep, d ** -0.5) for b in range(B)])
    assert lse.dtype == torch.float32 and lse.shape == (B, 2 * H, N)
    torch.testing.assert_close(lse.double(), want, atol=2e-5, rtol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_lse_is_of_the_capped_scores(backend):
    g = torch.Generator().manual_seed(7)
    lengths = ([3, 0, 5], [4, 2, 5])
    H, d = 2, 16
    cu_q, cu_k = (torch.tensor([0] + list(torch.tensor(n).cumsum(0)), dtype=torch.int32)
                  for n in lengths)
    q = _rand(g, sum(lengths[0]), 2 * H, d, scale=2.0)
    k = _rand(g, sum(lengths[1]), 2 * H, d, scale=2.0)
    v = _rand(g, sum(lengths[1]), H, 2 * d)
    _, lse = diff_attention_varlen(q, k, v, cu_q, cu_k, 5, 5, lambda_=0.3, causal=True,
                                   softcap=CAP, return_softmax_lse=True, backend=backend)
    want, sq, sk = [], 0, 0
    for nq, nk in zip(*lengths):
        keep = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + (nk - nq)
        want.append(_capped_lse(q[sq:sq + nq], k[sk:sk + nk], keep, d ** -0.5))
        sq, sk = sq + nq, sk + nk
    torch.testing.assert_close(lse.double(), torch.cat(want, 1), atol=2e-5, rtol=2e-6)
