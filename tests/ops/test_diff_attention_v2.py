"""diff_attention_v2 (both backends) against its float64 reference, forward and every gradient.

Differential Transformer V2: q (B, N, 2H, d), one key and one value head per group
(k, v (B, M, Hk, d)), lambda a float, (), (H,) or per token (B, N, H), output (B, N, H, d).
The Triton kernels run on CPU through the interpreter; shapes are small but cover the edges
as in test_diff_attention.py: one token, ragged tiles, M != N, causal both ways, padding with
fully padded rows, grouped keys/values, every lambda layout, head dims 16 to 128.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from diffattn import diff_attention_v2, diff_attention_v2_ref
from helpers import assert_close_rel, poison_empty, requires_interpreter  # noqa: F401


@dataclass
class Case:
    B: int = 1
    N: int = 77
    M: int = 77
    H: int = 2
    Hk: int = 2
    d: int = 16
    causal: bool = False
    padding: bool = False
    lam: str = "tokens"  # "tokens" (B, N, H), "heads" (H,), "scalar" 0-dim, "float"
    strided: bool = False  # q/k/v as views of one packed projection output
    dtype: torch.dtype = torch.float32

    def __str__(self):
        flags = [f for f in ("causal", "padding", "strided") if getattr(self, f)]
        return (f"B{self.B}-N{self.N}-M{self.M}-H{self.H}-Hk{self.Hk}-d{self.d}-{self.lam}-"
                f"{str(self.dtype)[6:]}-{'-'.join(flags)}")


CASES = [
    Case(N=1, M=1, H=1, Hk=1, d=16),
    Case(N=1, M=77, d=32, causal=True, padding=True),
    Case(B=2, N=77, M=77, H=4, Hk=1, d=64, causal=True, strided=True),
    Case(B=2, N=197, M=197, H=2, Hk=1, d=32, padding=True, lam="heads"),
    Case(N=45, M=70, H=2, Hk=2, d=128, causal=True, padding=True, lam="scalar"),
    Case(N=70, M=45, d=16, causal=True),  # bottom-right: the first 25 queries see no key
    Case(B=2, N=33, M=100, H=4, Hk=2, d=48, padding=True, lam="float"),
    Case(B=2, N=50, M=61, H=4, Hk=1, d=24, padding=True, dtype=torch.float16),
    Case(N=37, M=29, d=16, causal=True, padding=True, dtype=torch.float64),
    Case(N=64, M=64, H=2, Hk=1, d=64, causal=True, strided=True, dtype=torch.float16),
    # bf16: under the interpreter the kernels compute it in fp32 (its bf16 math is wrong)
    Case(N=50, M=50, d=32, causal=True, lam="heads", dtype=torch.bfloat16),
]


def make_inputs(c: Case, seed: int = 0):
    """Random inputs in c.dtype (lambda in the accumulation dtype), requiring grad."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dtype=c.dtype):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    if c.strided:  # one projection output (B, L, 2H*d + 2 Hk*d), sliced: no copies
        assert c.N == c.M
        packed = rnd(c.B, c.N, (2 * c.H + 2 * c.Hk) * c.d).requires_grad_()
        q, k, v = packed.split([2 * c.H * c.d, c.Hk * c.d, c.Hk * c.d], dim=-1)
        q, k, v = q.unflatten(-1, (2 * c.H, c.d)), k.unflatten(-1, (c.Hk, c.d)), \
            v.unflatten(-1, (c.Hk, c.d))
        leaves = [packed]
    else:
        q = rnd(c.B, c.N, 2 * c.H, c.d).requires_grad_()
        k = rnd(c.B, c.M, c.Hk, c.d).requires_grad_()
        v = rnd(c.B, c.M, c.Hk, c.d).requires_grad_()
        leaves = [q, k, v]
    acc = torch.float64 if c.dtype == torch.float64 else torch.float32
    shapes = {"tokens": (c.B, c.N, c.H), "heads": (c.H,), "scalar": ()}
    if c.lam == "float":
        lam = 0.42
    else:
        lam = torch.rand(shapes[c.lam], generator=g, dtype=torch.float64).to(acc)
        lam.requires_grad_()
    mask = None
    if c.padding:
        mask = torch.rand(c.B, c.M, generator=g) < 0.3
        mask[0] = True  # batch 0: every key ignored -> fully masked rows
    return q, k, v, lam, mask, leaves


def _split_packed(packed, c: Case):
    q, k, v = packed.split([2 * c.H * c.d, c.Hk * c.d, c.Hk * c.d], dim=-1)
    return q.unflatten(-1, (2 * c.H, c.d)), k.unflatten(-1, (c.Hk, c.d)), \
        v.unflatten(-1, (c.Hk, c.d))


def _check(c: Case, backend: str):
    q, k, v, lam, mask, leaves = make_inputs(c)
    out = diff_attention_v2(q, k, v, lam, causal=c.causal, key_padding_mask=mask,
                            backend=backend)
    assert out.dtype == c.dtype and out.shape == (c.B, c.N, c.H, c.d)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64)
    inputs = leaves + ([lam] if isinstance(lam, torch.Tensor) else [])
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))

    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    if c.strided:
        rq, rk, rv = _split_packed(ref_inputs[0], c)
    else:
        rq, rk, rv = ref_inputs[:3]
    rlam = ref_inputs[-1] if isinstance(lam, torch.Tensor) else lam
    ref = diff_attention_v2_ref(rq, rk, rv, rlam, causal=c.causal, key_padding_mask=mask)
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out)

    assert_close_rel("out", out, ref, c.dtype)
    names = (["packed_qkv"] if c.strided else ["q", "k", "v"]) + ["lambda"] * (c.lam != "float")
    for name, got, want in zip(names, grads, ref_grads):
        # A per-head or scalar lambda's gradient is a sum over every row: allow for it in fp16.
        dtype = torch.bfloat16 if name == "lambda" and c.dtype == torch.float16 \
            and c.lam != "tokens" else c.dtype
        assert_close_rel(f"d{name}", got, want, dtype)


@requires_interpreter
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_float64_reference(case, poison_empty):
    _check(case, "triton")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_torch_backend_matches_float64_reference(case):
    _check(case, "torch")


@requires_interpreter
def test_gradcheck_triton_float64_per_token_lambda():
    """gradcheck through the kernels (fp64 tl.dot is exact in the interpreter) with causal
    masking, padding (one batch element fully padded), grouped keys and a per-token lambda."""
    g = torch.Generator().manual_seed(3)
    B, N, M, H, Hk, d = 2, 6, 9, 2, 1, 4
    q = torch.randn(B, N, 2 * H, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, M, Hk, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, M, Hk, d, generator=g, dtype=torch.float64, requires_grad=True)
    lam = torch.rand(B, N, H, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(B, M, dtype=torch.bool)
    mask[0, 6:] = True
    mask[1, :] = True

    def fn(q, k, v, lam):
        return diff_attention_v2(q, k, v, lam, causal=True, key_padding_mask=mask,
                                 backend="triton")

    assert torch.autograd.gradcheck(fn, (q, k, v, lam), eps=1e-6, atol=1e-5, rtol=1e-4,
                                    fast_mode=True)


@requires_interpreter
def test_fully_masked_rows_are_zero_and_lambda_per_token_gradient_is_zero_there():
    c = Case(B=2, N=20, M=30, H=2, Hk=1, d=16, padding=True)
    q, k, v, lam, mask, _ = make_inputs(c)
    out = diff_attention_v2(q, k, v, lam, key_padding_mask=mask, backend="triton")
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # batch 0 sees no key
    out.sum().backward()
    for t in (q, k, v, lam):
        assert torch.equal(t.grad[0], torch.zeros_like(t.grad[0]))
        assert torch.isfinite(t.grad).all()


def test_v2_is_v1_with_each_key_head_shared_by_both_maps():
    """With lambda per head, V2 equals V1 on keys repeated per pair and values of width d."""
    from diffattn import diff_attention
    c = Case(B=2, N=9, M=11, H=4, Hk=2, d=16, lam="heads")
    q, k, v, lam, _, _ = make_inputs(c)
    v2 = diff_attention_v2(q, k, v, lam, causal=True, backend="torch")
    # V1 value heads have width 2d: put V2's values in the first half, zeros in the second.
    v1_values = torch.cat([v, torch.zeros_like(v)], dim=-1)
    v1 = diff_attention(q, k.repeat_interleave(2, dim=2), v1_values, lam, causal=True,
                        backend="torch")
    torch.testing.assert_close(v2, v1[..., :c.d])


def _bad_inputs():
    q = torch.randn(2, 5, 4, 16)
    k = torch.randn(2, 6, 1, 16)
    v = torch.randn(2, 6, 1, 16)
    ok = dict(q=q, k=k, v=v, lambda_=0.5)
    yield "q odd heads", dict(ok, q=torch.randn(2, 5, 3, 16)), ValueError, "even number of heads"
    yield ("pair split across groups", dict(ok, q=torch.randn(2, 5, 6, 16), k=torch.randn(2, 6, 2, 16),
                                            v=torch.randn(2, 6, 2, 16)),
           ValueError, "both maps of a head pair read the same group")
    yield "k no heads", dict(ok, k=torch.randn(2, 6, 0, 16)), ValueError, "k must have shape"
    yield "k head dim", dict(ok, k=torch.randn(2, 6, 1, 8)), ValueError, "k must have shape"
    yield "v width", dict(ok, v=torch.randn(2, 6, 1, 32)), ValueError, "v must have k's shape"
    yield "lambda shape", dict(ok, lambda_=torch.ones(2, 5, 3)), ValueError, "lambda_ must be"
    yield "lambda heads", dict(ok, lambda_=torch.ones(4)), ValueError, r"\(2,\) or \(2, 5, 2\)"
    yield "lambda type", dict(ok, lambda_="0.5"), TypeError, "lambda_ must be a float"
    yield "mixed dtypes", dict(ok, v=v.double()), TypeError, "v must have q's dtype"
    yield ("mask shape", dict(ok, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)),
           ValueError, "key_padding_mask must have shape")
    yield "causal", dict(ok, causal=1), TypeError, "causal must be a bool"
    yield "backend", dict(ok, backend="flash"), ValueError, "backend must be one of"


@pytest.mark.parametrize("name,kwargs,exc,match", list(_bad_inputs()),
                         ids=[b[0] for b in _bad_inputs()])
def test_bad_inputs_raise_named_errors(name, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        diff_attention_v2(**kwargs)
