"""return_softmax_lse=True on diff_attention, diff_attention_v2 and their packed forms: lse in
flash-attn's layouts ((B, 2H, N) padded, (2H, total_q) packed), row 2h + a for map a of head
h, the natural log-sum-exp of the scaled scores over the keys a query sees, +inf where it sees
none; against a float64 reference written out here one row at a time. Both backends (the
fused kernels through the Triton interpreter), with and without autograd, masks (causal,
padding, window, an additive mask on the torch path), grouped keys, N != M, zero-length
packed sequences; lse is not differentiable and leaves the output and gradients unchanged."""
from __future__ import annotations

import math

import pytest
import torch

from diffattn import (diff_attention, diff_attention_v2, diff_attention_v2_varlen,
                      diff_attention_varlen)
from helpers import requires_interpreter

BACKENDS = [pytest.param("triton", marks=requires_interpreter), "torch"]


def visible(N: int, M: int, causal: bool, window) -> torch.Tensor:
    """(N, M) bool, element by element: query i sees key j when
    i + M - N - left <= j <= i + M - N + right (-1 unbounded, causal: right = 0)."""
    left, right = (-1, -1) if window is None else window
    if causal:
        right = 0
    keep = torch.zeros(N, M, dtype=torch.bool)
    for i in range(N):
        for j in range(M):
            diagonal = i + M - N
            keep[i, j] = (left < 0 or j >= diagonal - left) and (right < 0 or j <= diagonal + right)
    return keep


def key_head(j: int, H: int, kv_heads: int, pair: bool) -> int:
    """The key head q head j = 2h + a reads: 2g + a (V1, a key pair per group) or g (V2)."""
    h, a = divmod(j, 2)
    g = h // (H // kv_heads)
    return 2 * g + a if pair else g


def reference_lse(q, k, keep, pair: bool, bias=None) -> torch.Tensor:
    """float64 (2H, N) of one sequence: q (N, 2H, d), k (M, 2Hk or Hk, d), keep (N, M)."""
    N, H2, d = q.shape
    kv_heads = k.shape[1] // 2 if pair else k.shape[1]
    lse = torch.empty(H2, N, dtype=torch.float64)
    for j in range(H2):
        s = q[:, j].double() @ k[:, key_head(j, H2 // 2, kv_heads, pair)].double().T * d ** -0.5
        if bias is not None:
            s = s + bias[j].double()
        for i in range(N):
            row = s[i][keep[i]]
            lse[j, i] = math.inf if row.numel() == 0 else torch.logsumexp(row, 0)
    return lse


def check_lse(got, want, tol=2e-6):
    assert got.dtype == torch.float32 and tuple(got.shape) == tuple(want.shape)
    assert not got.requires_grad
    inf = torch.isinf(want)
    assert torch.equal(torch.isinf(got), inf) and (got[inf] > 0).all(), "rows without a key"
    err = (got[~inf].double() - want[~inf]).abs().max().item() if (~inf).any() else 0.0
    assert err <= tol, f"lse error {err:.2e}"


def dense_inputs(v2: bool, B=2, N=5, M=9, H=2, Hk=1, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, 2 * H, d, generator=g)
    k = torch.randn(B, M, Hk if v2 else 2 * Hk, d, generator=g)
    v = torch.randn(B, M, Hk, d if v2 else 2 * d, generator=g)
    return q, k, v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("N,M,causal,window,padding,grad", [
    (5, 9, False, None, False, False),
    (9, 5, True, None, False, True),       # the first 4 queries see no key
    (6, 6, False, (2, 1), True, False),
    (7, 11, True, (3, -1), True, True),
], ids=["plain", "causal-N>M-autograd", "window-padding", "causal-window-padding-autograd"])
def test_dense_lse(backend, v2, N, M, causal, window, padding, grad):
    q, k, v = dense_inputs(v2, N=N, M=M, Hk=1)
    kpm = None
    if padding:  # batch 0 ignores its last 3 keys, batch 1 every key
        kpm = torch.zeros(2, M, dtype=torch.bool)
        kpm[0, -3:] = True
        kpm[1] = True
    if grad:
        q.requires_grad_()
    fn = diff_attention_v2 if v2 else diff_attention
    out, lse = fn(q, k, v, lambda_=0.4, causal=causal, window_size=window, key_padding_mask=kpm,
                  return_softmax_lse=True, backend=backend)
    assert torch.equal(out, fn(q, k, v, lambda_=0.4, causal=causal, window_size=window,
                               key_padding_mask=kpm, backend=backend))
    want = []
    for b in range(2):
        keep = visible(N, M, causal, window)
        if kpm is not None:
            keep = keep & ~kpm[b][None, :]
        want.append(reference_lse(q[b].detach(), k[b], keep, pair=not v2))
    check_lse(lse, torch.stack(want))
    if grad:
        out.sum().backward()
        assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_dense_lse_grouped_keys(backend, v2):
    """Four differential heads over two key groups: q heads 0-3 read group 0, 4-7 group 1."""
    q, k, v = dense_inputs(v2, B=1, N=4, M=6, H=4, Hk=2, seed=1)
    _, lse = (diff_attention_v2 if v2 else diff_attention)(
        q, k, v, lambda_=torch.rand(4), causal=True, return_softmax_lse=True, backend=backend)
    check_lse(lse, reference_lse(q[0], k[0], visible(4, 6, True, None), pair=not v2)[None])


def test_torch_path_lse_includes_the_additive_mask():
    q, k, v = dense_inputs(False, B=1, N=4, M=6, seed=2)
    bias = torch.randn(1, 4, 4, 6)
    bias[0, 1, 2] = -math.inf  # q head 1, query 2 sees no key
    _, lse = diff_attention(q, k, v, lambda_=0.5, attn_mask=bias, return_softmax_lse=True,
                            backend="torch")
    keep = torch.ones(4, 6, dtype=torch.bool)
    check_lse(lse, reference_lse(q[0], k[0], keep, pair=True, bias=bias[0])[None])


def offsets(lengths) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("causal,window,grad", [
    (False, None, False), (True, None, True), (False, (2, 0), False), (True, (3, -1), True)],
    ids=["plain", "causal-autograd", "window", "causal-window-autograd"])
def test_packed_lse(backend, v2, causal, window, grad):
    lengths_q, lengths_k = [3, 0, 6, 2, 4], [4, 3, 5, 0, 4]  # empty query and key sequences
    g = torch.Generator().manual_seed(3)
    H, Hk, d = 2, 1, 8
    q = torch.randn(sum(lengths_q), 2 * H, d, generator=g)
    k = torch.randn(sum(lengths_k), Hk if v2 else 2 * Hk, d, generator=g)
    v = torch.randn(sum(lengths_k), Hk, d if v2 else 2 * d, generator=g)
    if grad:
        k.requires_grad_()
    cu_q, cu_k = offsets(lengths_q), offsets(lengths_k)
    fn = diff_attention_v2_varlen if v2 else diff_attention_varlen
    out, lse = fn(q, k, v, cu_q, cu_k, 6, 5, lambda_=0.3, causal=causal, window_size=window,
                  return_softmax_lse=True, backend=backend)
    assert out.shape[0] == q.shape[0]
    want = torch.empty(2 * H, q.shape[0], dtype=torch.float64)
    for b in range(len(lengths_q)):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        keep = visible(q1 - q0, k1 - k0, causal, window)
        want[:, q0:q1] = reference_lse(q[q0:q1], k[k0:k1].detach(), keep, pair=not v2)
    check_lse(lse, want)
    assert lse.is_contiguous()
    if grad:
        out.sum().backward()
        assert k.grad is not None


@requires_interpreter
def test_backends_agree_on_float64_lse():
    q, k, v = dense_inputs(False, seed=4)
    q, k, v = q.double(), k.double(), v.double()
    lses = [diff_attention(q, k, v, lambda_=0.4, causal=True, return_softmax_lse=True,
                           backend=backend)[1] for backend in ("triton", "torch")]
    assert lses[0].dtype == lses[1].dtype == torch.float32  # flash-attn's dtype for every input
    torch.testing.assert_close(lses[0], lses[1], rtol=1e-6, atol=1e-6)


def test_return_softmax_lse_must_be_a_bool():
    q, k, v = dense_inputs(False)
    with pytest.raises(TypeError, match="return_softmax_lse must be a bool"):
        diff_attention(q, k, v, lambda_=0.4, return_softmax_lse=1, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_and_lambda_vectors_read_no_values_on_the_host(backend):
    from test_host_sync import NoHostReads
    q, k, v = dense_inputs(False, B=1, N=4, M=6)
    lv = torch.randn(4, 8, requires_grad=True)
    cu_q, cu_k = offsets([1, 0, 3]), offsets([2, 0, 4])
    with NoHostReads():
        out, lse = diff_attention(q, k, v, lambda_vectors=lv, lambda_init=0.2, rms_norm=True,
                                  causal=True, return_softmax_lse=True, backend=backend)
        out.sum().backward()
        out, lse = diff_attention_varlen(q[0], k[0], v[0], cu_q, cu_k, 3, 4, lambda_vectors=lv,
                                         lambda_init=0.2, causal=True,
                                         return_softmax_lse=True, backend=backend)
        out.sum().backward()
