"""Packed variable-length sequences (diff_attention_varlen, diff_attention_v2_varlen), both
backends, against an independent float64 reference written out here one sequence at a time:
sequence b is rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 of q and the matching rows of
k and v; within it query i of N sees key j of M when i + (M - N) - left <= j <= i + (M - N) +
right (-1 unbounded; causal is right = 0), and a query that sees no key gives zeros. Forward
and every gradient (q, k, v, lambda, norm weight), zero-length sequences (queries and/or
keys), N != M, grouped-query attention, fp32 and fp16; outputs NaN-poisoned; gradcheck through
the kernels; a deterministic backward; bad offsets refused. The fused kernels run through the
Triton interpreter, whose tiles are 32 wide: the long sequence spans two query and key tiles.
"""
from __future__ import annotations

import pytest
import torch

from diffattn import diff_attention, diff_attention_v2_varlen, diff_attention_varlen
from helpers import assert_close_rel, poison_empty, requires_interpreter  # noqa: F401

BACKENDS = [pytest.param("triton", marks=requires_interpreter), "torch"]
# (query lengths, key lengths): empty query and key sequences, N != M, one sequence over two
# 32-wide tiles.
LENGTHS = ([5, 0, 37, 3, 2], [7, 4, 33, 0, 2])
GRAD_TOL = {torch.float32: 5e-5, torch.float16: 2e-2}


def offsets(lengths) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def keep_mask(N: int, M: int, causal: bool, window) -> torch.Tensor:
    """(N, M) bool from the rule, element by element."""
    left, right = (-1, -1) if window is None else window
    if causal:
        right = 0
    keep = torch.zeros(N, M, dtype=torch.bool)
    for i in range(N):
        for j in range(M):
            diagonal = i + M - N
            keep[i, j] = (left < 0 or j >= diagonal - left) and \
                (right < 0 or j <= diagonal + right)
    return keep


def reference(q, k, v, cu_q, cu_k, lam, *, causal=False, window=None, norm_weight=None,
              eps=1e-5, out_scale=1.0):
    """float64, one sequence and one head at a time. V1: k (Tk, 2Hk, d), v (Tk, Hk, 2d),
    lam () or (H,); V2: k, v (Tk, Hk, d), lam (), (H,) or per token (Tq, H)."""
    q, k, v = q.double(), k.double(), v.double()
    H, Hk, d = q.shape[1] // 2, v.shape[1], q.shape[2]
    pair = k.shape[1] != Hk
    lam = torch.as_tensor(lam, dtype=torch.float64)
    out = torch.zeros(q.shape[0], H, v.shape[2], dtype=torch.float64)
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        keep = keep_mask(q1 - q0, k1 - k0, causal, window)
        seen = keep.any(1, keepdim=True)
        for h in range(H):
            g = h // (H // Hk)
            maps = []
            for a in range(2):
                key = k[k0:k1, 2 * g + a] if pair else k[k0:k1, g]
                s = (q[q0:q1, 2 * h + a] @ key.T) * d ** -0.5
                p = torch.softmax(s.masked_fill(~keep, float("-inf")).masked_fill(~seen, 0.0),
                                  -1) * seen
                maps.append(p @ v[k0:k1, g])
            lam_h = lam if lam.dim() == 0 else lam[h] if lam.dim() == 1 else lam[q0:q1, h, None]
            out[q0:q1, h] = maps[0] - lam_h * maps[1]
    if norm_weight is not None:
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.double()
    return out * out_scale


def v1_inputs(dtype, lengths=LENGTHS, H=2, Hk=1, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    Tq, Tk = sum(lengths[0]), sum(lengths[1])

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_()

    q, k, v = rand(Tq, 2 * H, d), rand(Tk, 2 * Hk, d), rand(Tk, Hk, 2 * d)
    small = torch.float64 if dtype == torch.float64 else torch.float32  # lambda, norm weight
    lam = (0.2 + 0.6 * torch.rand(H, generator=g)).to(small).requires_grad_()
    weight = (1 + 0.1 * torch.randn(2 * d, generator=g)).to(small).requires_grad_()
    return q, k, v, lam, weight, offsets(lengths[0]), offsets(lengths[1])


def check(name, got, want, dtype, tol=None):
    assert_close_rel(name, got, want.to(got.dtype) if got.dtype == torch.float64 else want,
                     dtype, tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,causal,window", [
    (torch.float32, False, None),
    (torch.float32, True, None),
    (torch.float32, False, (3, 1)),
    (torch.float16, True, (5, -1)),
], ids=["fp32", "fp32-causal", "fp32-window", "fp16-causal-window"])
def test_v1_forward_and_every_gradient(backend, dtype, causal, window, poison_empty):
    q, k, v, lam, weight, cu_q, cu_k = v1_inputs(dtype)
    kwargs = dict(causal=causal, window_size=window)
    out = diff_attention_varlen(q, k, v, cu_q, cu_k, max(LENGTHS[0]), max(LENGTHS[1]), lambda_=lam,
                                norm_weight=weight, out_scale=0.6, backend=backend, **kwargs)
    assert out.shape == (q.shape[0], 2, 32) and out.dtype == dtype
    leaves = (q, k, v, lam, weight)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    want = reference(*ref_leaves[:3], cu_q, cu_k, ref_leaves[3], causal=causal, window=window,
                     norm_weight=ref_leaves[4], out_scale=0.6)
    check("out", out, want, dtype)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, leaves, dout.to(dtype))
    wanted = torch.autograd.grad(want, ref_leaves, dout.double())
    for name, a, b in zip(("dq", "dk", "dv", "dlambda", "dnorm_weight"), got, wanted):
        check(name, a, b, dtype, GRAD_TOL[dtype])
    # A query whose sequence has no key gives exactly zeros (sequence 3: 3 queries, 0 keys).
    start = sum(LENGTHS[0][:3])
    assert torch.equal(out[start:start + 3], torch.zeros_like(out[start:start + 3]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,window", [(True, None), (False, (2, 4))],
                         ids=["causal", "window"])
def test_v2_per_token_lambda(backend, causal, window, poison_empty):
    lengths = ([4, 0, 35, 3], [6, 3, 34, 0])
    g = torch.Generator().manual_seed(2)
    H, Hk, d = 4, 2, 16
    Tq, Tk = sum(lengths[0]), sum(lengths[1])
    q = torch.randn(Tq, 2 * H, d, generator=g).requires_grad_()
    k = torch.randn(Tk, Hk, d, generator=g).requires_grad_()
    v = torch.randn(Tk, Hk, d, generator=g).requires_grad_()
    lam = torch.rand(Tq, H, generator=g).requires_grad_()
    cu_q, cu_k = offsets(lengths[0]), offsets(lengths[1])
    out = diff_attention_v2_varlen(q, k, v, cu_q, cu_k, 35, 34, lambda_=lam, causal=causal,
                                   window_size=window, backend=backend)
    assert out.shape == (Tq, H, d)
    leaves = (q, k, v, lam)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    want = reference(*ref_leaves[:3], cu_q, cu_k, ref_leaves[3], causal=causal, window=window)
    check("out", out, want, torch.float32)
    dout = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, leaves, dout)
    wanted = torch.autograd.grad(want, ref_leaves, dout.double())
    for name, a, b in zip(("dq", "dk", "dv", "dlambda"), got, wanted):
        check(name, a, b, torch.float32, GRAD_TOL[torch.float32])


@requires_interpreter
def test_gradcheck_through_the_kernels():
    lengths = ([2, 0, 3], [3, 2, 1])
    q, k, v, lam, weight, cu_q, cu_k = v1_inputs(torch.float64, lengths, H=1, d=4, seed=3)

    def f(q, k, v, lam, weight):
        return diff_attention_varlen(q, k, v, cu_q, cu_k, 3, 3, lambda_=lam, causal=True,
                                     norm_weight=weight, out_scale=0.5, backend="triton")

    assert torch.autograd.gradcheck(f, (q, k, v, lam, weight), fast_mode=True)


@requires_interpreter
def test_backward_is_deterministic():
    q, k, v, lam, weight, cu_q, cu_k = v1_inputs(torch.float32, seed=4)
    dout = torch.randn(q.shape[0], 2, 32)
    runs = []
    for _ in range(2):
        out = diff_attention_varlen(q, k, v, cu_q, cu_k, 37, 33, lambda_=lam, causal=True,
                                    norm_weight=weight, backend="triton")
        runs.append(torch.autograd.grad(out, (q, k, v, lam, weight), dout))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@requires_interpreter
def test_uniform_lengths_equal_the_padded_call():
    """The padded call is the varlen call with uniform offsets: bitwise the same."""
    g = torch.Generator().manual_seed(5)
    B, N, M = 3, 9, 11
    q, k, v = torch.randn(B, N, 4, 16, generator=g), torch.randn(B, M, 2, 16, generator=g), \
        torch.randn(B, M, 1, 32, generator=g)
    padded = diff_attention(q, k, v, lambda_=0.4, causal=True, backend="triton")
    packed = diff_attention_varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                                   offsets([N] * B), offsets([M] * B), N, M, lambda_=0.4,
                                   causal=True, backend="triton")
    assert torch.equal(packed, padded.flatten(0, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_value_is_read_on_the_host(backend):
    from test_host_sync import NoHostReads
    q, k, v, lam, weight, cu_q, cu_k = v1_inputs(torch.float32, ([3, 0, 4], [2, 5, 0]), d=8)
    with NoHostReads():
        out = diff_attention_varlen(q, k, v, cu_q, cu_k, 4, 5, lambda_=lam, causal=True,
                                    norm_weight=weight, backend=backend)
        out.sum().backward()
        lam_tokens = torch.rand(7, 2, requires_grad=True)
        out = diff_attention_v2_varlen(q, k[:, :1], v[..., :8], cu_q, cu_k, 4, 5,
                                       lambda_=lam_tokens, backend=backend)
        out.sum().backward()


@requires_interpreter
def test_registered_ops_opcheck_and_agree_with_the_eager_path():
    """torch.ops.diffattn.fwd / bwd take packed sequences' offsets after the tensors and
    their maximum lengths in the call's fields."""
    from diffattn import autograd
    from diffattn.kernels import AttentionCall
    q, k, v, lam, weight, cu_q, cu_k = v1_inputs(torch.float32, ([3, 0, 4], [2, 5, 0]), d=8)
    call = AttentionCall.create(0.25, causal=True, out_scale=0.5, max_seqlens=(4, 5))
    args = (q, k, v, lam, None, weight, cu_q, cu_k, True, *call.as_schema_args())
    torch.library.opcheck(torch.ops.diffattn.fwd.default, args)
    saved = [t.detach() for t in autograd.fused_fwd(*args)[1:]]
    dout = torch.randn(7, 2, 16)
    plain = [t.detach() for t in (q, k, v, lam, weight)]
    torch.library.opcheck(torch.ops.diffattn.bwd.default,
                          (dout, *plain[:4], None, plain[4], *saved, cu_q, cu_k, True, True,
                           *call.as_schema_args()))
    eager = autograd.fused_attention(q, k, v, lam, None, weight, call, cu_q, cu_k)
    traced = autograd.fused_fwd(*args)[0]
    assert torch.equal(eager, traced)
    leaves = (q, k, v, lam, weight)
    for a, b in zip(torch.autograd.grad(eager, leaves, dout),
                    torch.autograd.grad(traced, leaves, dout)):
        assert torch.equal(a, b)


def _small():
    q, k, v = torch.randn(5, 4, 8), torch.randn(6, 2, 8), torch.randn(6, 1, 16)
    return q, k, v, offsets([2, 3]), offsets([4, 2])


@pytest.mark.parametrize("change,error,match", [
    (dict(cu_seqlens_q=offsets([2, 3]).long()), TypeError, "cu_seqlens_q must be int32"),
    (dict(cu_seqlens_k=offsets([4, 2])[None]), ValueError, "cu_seqlens_k must be 1-D"),
    (dict(cu_seqlens_k=offsets([4, 2, 0])), ValueError, "the same length"),
    (dict(cu_seqlens_q=torch.tensor([1, 2, 5], dtype=torch.int32)), ValueError,
     "cu_seqlens_q must start at 0"),
    (dict(cu_seqlens_k=torch.tensor([0, 4, 5], dtype=torch.int32)), ValueError,
     "cu_seqlens_k must end at the packed total 6"),
    (dict(cu_seqlens_q=torch.tensor([0, 6, 5], dtype=torch.int32)), ValueError,
     "cu_seqlens_q must (end|be non-decreasing)"),
    (dict(cu_seqlens_k=torch.tensor([0, 7, 6], dtype=torch.int32)), ValueError,
     "cu_seqlens_k must be non-decreasing"),
    (dict(max_seqlen_q=2), ValueError, "max_seqlen_q = 2 is smaller than a sequence"),
    (dict(max_seqlen_k=3), ValueError, "max_seqlen_k = 3 is smaller than a sequence"),
    (dict(max_seqlen_k=4.0), TypeError, "max_seqlen_k must be an int"),
    (dict(max_seqlen_q=-1), ValueError, "max_seqlen_q must be >= 0"),
    (dict(q=torch.randn(1, 5, 4, 8)), ValueError, r"q must be packed as \(total"),
    (dict(lambda_=torch.rand(5, 2)), ValueError, "lambda_"),
])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_input_is_refused(change, error, match, backend):
    q, k, v, cu_q, cu_k = _small()
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=3,
                max_seqlen_k=4, lambda_=0.5)
    args.update(change)
    with pytest.raises(error, match=match):
        diff_attention_varlen(**args, backend=backend)


def test_v2_per_token_lambda_shape_is_checked():
    q, k, v = torch.randn(5, 4, 8), torch.randn(6, 1, 8), torch.randn(6, 1, 8)
    with pytest.raises(ValueError, match=r"lambda_ per token must have shape \(total_q, H\)"):
        diff_attention_v2_varlen(q, k, v, offsets([2, 3]), offsets([4, 2]), 3, 4,
                                 lambda_=torch.rand(4, 2), backend="torch")
    for backend in ("triton", "torch"):  # a padded-style (1, total_q, H) lambda is refused too
        with pytest.raises(ValueError, match=r"per token \(total_q, H\), got shape"):
            diff_attention_v2_varlen(q, k, v, offsets([2, 3]), offsets([4, 2]), 3, 4,
                                     lambda_=torch.rand(1, 5, 2), backend=backend)
