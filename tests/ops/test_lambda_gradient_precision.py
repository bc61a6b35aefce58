"""The lambda gradient of V1 through the RMSNorm epilogue in fp16, where it is a small remainder
of large terms: the norm's backward takes dY's part along X out of dX, so wherever O2 lies along
X (one key, or two maps that agree: X = (1 - lambda) O2) each row's -rowsum(dX * O2) cancels to
a fraction of its terms; and rows whose contributions cancel each other leave a small total.
The fused path's error against float64 must stay within a few times the torch path's (which
computes X in fp32 from its fp16 map outputs), and so must every other gradient's (or within
the dtype's tolerance). The fused kernels run through the Triton interpreter in fp16 (its fp16
tl.dot is right, its bf16 is not); on a GPU the same cases run in fp16 and bf16.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from diffattn import diff_attention
from diffattn.reference import diff_attention_ref
from helpers import REL_TOL, assert_close_rel, rel_err, requires_interpreter



@dataclass
class Case:
    name: str
    B: int = 1
    N: int = 18
    M: int = 1
    H: int = 1
    Hk: int = 1
    d: int = 16
    causal: bool = False
    same_maps: bool = False      # q heads 2h, 2h+1 and key heads 2g, 2g+1 equal: O1 == O2
    cancel_rows: bool = False    # the second half of the rows mirrors the first, dY negated
    scalar_lambda: bool = False

    def __str__(self):
        return self.name


CASES = [
    Case("one-key"),                                                  # O1 = O2 = V exactly
    Case("one-key-two-heads", N=9, H=2, d=8),
    Case("same-maps-gqa-causal", B=2, N=12, M=20, H=2, Hk=1, d=16, causal=True,
         same_maps=True),
    Case("same-maps-scalar-lambda", N=10, M=6, H=2, d=8, causal=True, same_maps=True,
         scalar_lambda=True),
    Case("rows-cancel", N=16, M=7, H=2, d=16, cancel_rows=True),
    Case("same-maps-rows-cancel", N=16, M=7, H=2, d=16, same_maps=True, cancel_rows=True),
]


def _inputs(c: Case, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, k = rnd(c.B, c.N, 2 * c.H, c.d), rnd(c.B, c.M, 2 * c.Hk, c.d)
    v = rnd(c.B, c.M, c.Hk, 2 * c.d)
    dout = rnd(c.B, c.N, c.H, 2 * c.d)
    if c.same_maps:
        q[:, :, 1::2], k[:, :, 1::2] = q[:, :, 0::2], k[:, :, 0::2]
    if c.cancel_rows:
        half = c.N // 2
        q[:, half:] = q[:, :half]
        dout[:, half:] = -dout[:, :half] + 1e-2 * rnd(c.B, half, c.H, 2 * c.d)
    lam = 0.9 + 0.08 * torch.rand(() if c.scalar_lambda else (c.H,), generator=g)
    weight = 1 + 0.3 * rnd(2 * c.d)
    return [t.to(dtype) for t in (q, k, v)], lam, weight, dout.to(dtype)


def _gradients(c: Case, backend: str, dtype: torch.dtype, device: str):
    """(dq, dk, dv, dlambda, dnorm_weight) in float64: backend "reference" is the float64
    reference on the same (dtype-valued) inputs."""
    (q, k, v), lam, weight, dout = _inputs(c, dtype)
    if backend == "reference":
        q, k, v, lam, weight, dout = (t.double() for t in (q, k, v, lam, weight, dout))
    leaves = [t.to(device).requires_grad_() for t in (q, k, v, lam, weight)]
    q, k, v, lam, weight = leaves
    kw = dict(causal=c.causal, norm_weight=weight, out_scale=0.8)
    if backend == "reference":
        out = diff_attention_ref(q, k, v, lam, **kw)
    else:
        out = diff_attention(q, k, v, lambda_=lam, backend=backend, **kw)
    grads = torch.autograd.grad(out, leaves, dout.to(device=device, dtype=out.dtype))
    return [g.double().cpu() for g in grads]


def _check(c: Case, dtype: torch.dtype, device: str) -> None:
    ref = _gradients(c, "reference", dtype, device)
    fused = _gradients(c, "triton", dtype, device)
    torch_path = _gradients(c, "torch", dtype, device)
    dlam_ref = ref[3].abs().max().item()
    err_fused = (fused[3] - ref[3]).abs().max().item()
    err_torch = (torch_path[3] - ref[3]).abs().max().item()
    # a few times the torch path's error, or fp32 rounding of the remainder (1e-3 of it)
    allowed = 4 * err_torch + 1e-3 * dlam_ref
    assert err_fused <= allowed, (f"dlambda: fused error {err_fused:.2e}, torch path "
                                  f"{err_torch:.2e}, true value {dlam_ref:.3g}")
    names = ("dq", "dk", "dv", "dlambda", "dnorm_weight")
    for name, got, want, other in zip(names, fused, ref, torch_path):
        assert_close_rel(name, got, want, dtype, max(REL_TOL[dtype], 4 * rel_err(other, want)))


@requires_interpreter
@pytest.mark.parametrize("c", CASES, ids=str)
def test_fp16_lambda_gradient_through_the_norm(c):
    _check(c, torch.float16, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("c", CASES, ids=str)
def test_lambda_gradient_through_the_norm_on_gpu(c, dtype):
    _check(c, dtype, "cuda")
