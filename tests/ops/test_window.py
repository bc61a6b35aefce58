"""Local attention (window_size) for V1 and V2, both backends, against an independent float64
band-mask reference written out here: query i sees key j when
i + (M - N) - left <= j <= i + (M - N) + right (-1 unbounded; causal means right = 0), minus
padded keys; a query that sees no key gives zeros. Forward and every gradient (q, k, v,
lambda, norm weight). The fused kernels run through the Triton interpreter; the shapes span
several key and query tiles (32 wide there) so that tiles outside the band are skipped and
edge tiles masked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import pytest
import torch

from diffattn import DiffMultiheadAttention, DiffMultiheadAttentionV2, diff_attention, \
    diff_attention_v2
from helpers import INTERPRET, assert_close_rel, poison_empty  # noqa: F401


def band_keep(N: int, M: int, window: Tuple[int, int], causal: bool) -> torch.Tensor:
    """(N, M) bool, element by element from the rule."""
    left, right = window
    if causal:
        right = 0
    keep = torch.zeros(N, M, dtype=torch.bool)
    for i in range(N):
        for j in range(M):
            diagonal = i + M - N
            keep[i, j] = (left < 0 or j >= diagonal - left) and (right < 0 or j <= diagonal + right)
    return keep


def band_reference(q, k, v, lam, keep, kpm, norm_weight=None, eps=1e-5, out_scale=1.0,
                   scale=None):
    """Differential attention in float64 with an explicit (N, M) keep mask. q (B, N, 2H, d);
    V1: k (B, M, 2Hk, d), v (B, M, Hk, 2d); V2: k, v (B, M, Hk, d). lam: float, (), (H,) or
    (B, N, H)."""
    B, N, H2, d = q.shape
    H, Hk = H2 // 2, v.shape[2]
    scale = d ** -0.5 if scale is None else scale
    pair = k.shape[2] != Hk
    k1, k2 = (k[:, :, 0::2], k[:, :, 1::2]) if pair else (k, k)
    rep = H // Hk
    vis = keep[None, None] & ~kpm[:, None, None, :] if kpm is not None else keep[None, None]
    outs = []
    for qa, ka in ((q[:, :, 0::2], k1), (q[:, :, 1::2], k2)):
        s = torch.einsum("bnhd,bmhd->bhnm", qa, ka.repeat_interleave(rep, 2)) * scale
        s = s.masked_fill(~vis, float("-inf"))
        any_key = vis.any(-1, keepdim=True)
        p = torch.softmax(s.masked_fill(~any_key, 0.0), -1) * any_key
        outs.append(torch.einsum("bhnm,bmhe->bnhe", p, v.repeat_interleave(rep, 2)))
    lam_t = torch.as_tensor(lam, dtype=torch.float64)
    if lam_t.dim() == 1:
        lam_t = lam_t[None, None]
    lam_t = lam_t[..., None] if lam_t.dim() else lam_t
    x = outs[0] - lam_t * outs[1]
    if norm_weight is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight
    return x * out_scale


@dataclass
class Case:
    version: int
    N: int
    M: int
    window: Tuple[int, int]
    causal: bool = False
    padding: bool = False
    lam: str = "heads"         # "heads" (H,), "tokens" (B, N, H), "float"
    norm: bool = False
    H: int = 2
    Hk: int = 1
    d: int = 16
    dtype: torch.dtype = torch.float32

    def __str__(self):
        return (f"v{self.version}-N{self.N}-M{self.M}-w{self.window[0]}_{self.window[1]}"
                f"{'-causal' if self.causal else ''}{'-pad' if self.padding else ''}-{self.lam}"
                f"{'-norm' if self.norm else ''}-{str(self.dtype)[6:]}")


CASES = [
    Case(1, 70, 100, (9, 3), padding=True, norm=True),              # N < M, GQA, padding
    Case(1, 100, 70, (20, -1), causal=True, lam="float"),           # N > M: rows see no key
    Case(2, 70, 70, (-1, 5), padding=True, lam="tokens"),           # right bound only
    Case(2, 40, 72, (0, 0), lam="heads", Hk=2),                     # the diagonal alone
    Case(1, 40, 40, (4, 4), norm=True, dtype=torch.float64),
]


def _inputs(case: Case, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, H, Hk, d = 2, case.H, case.Hk, case.d

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    q = rnd(B, case.N, 2 * H, d)
    if case.version == 1:
        k, v = rnd(B, case.M, 2 * Hk, d), rnd(B, case.M, Hk, 2 * d)
    else:
        k, v = rnd(B, case.M, Hk, d), rnd(B, case.M, Hk, d)
    lam = {"heads": 0.2 + 0.5 * torch.rand(H, generator=g, dtype=torch.float64),
           "tokens": torch.rand(B, case.N, H, generator=g, dtype=torch.float64),
           "float": 0.35}[case.lam]
    kpm = None
    if case.padding:
        kpm = torch.zeros(B, case.M, dtype=torch.bool)
        kpm[0, case.M // 3:] = True          # most keys padded in batch 0
        kpm[1, :5] = True
    norm = 1.0 + 0.1 * rnd(v.shape[3]) if case.norm else None
    return q, k, v, lam, kpm, norm


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_window_matches_the_band_reference(case, backend, poison_empty):  # noqa: F811
    if backend == "triton" and not INTERPRET:
        pytest.skip("the fused kernels on CPU need TRITON_INTERPRET=1")
    q, k, v, lam, kpm, norm = _inputs(case)
    keep = band_keep(case.N, case.M, case.window, case.causal)
    out_scale = 0.8 if case.norm else 1.0
    tensors = [q, k, v] + ([lam] if isinstance(lam, torch.Tensor) else []) + \
        ([norm] if norm is not None else [])
    ref_in = [t.clone().requires_grad_() for t in tensors]
    got_in = [t.to(case.dtype if i < 3 else t.dtype).clone().requires_grad_()
              for i, t in enumerate(tensors)]

    def split(ts):
        q_, k_, v_ = ts[:3]
        rest = list(ts[3:])
        lam_ = rest.pop(0) if isinstance(lam, torch.Tensor) else lam
        norm_ = rest.pop(0) if norm is not None else None
        return q_, k_, v_, lam_, norm_

    rq, rk, rv, rlam, rnorm = split(ref_in)
    ref = band_reference(rq, rk, rv, rlam, keep, kpm, rnorm, out_scale=out_scale)
    gq, gk, gv, glam, gnorm = split(got_in)
    if case.version == 1:
        got = diff_attention(gq, gk, gv, lambda_=glam, causal=case.causal, key_padding_mask=kpm,
                             norm_weight=gnorm, out_scale=out_scale, window_size=case.window,
                             backend=backend)
    else:
        got = diff_attention_v2(gq, gk, gv, lambda_=glam, causal=case.causal, key_padding_mask=kpm,
                                window_size=case.window, backend=backend)
    assert_close_rel("out", got, ref, case.dtype)
    seen = keep[None].expand(got.shape[0], -1, -1)
    if kpm is not None:
        seen = seen & ~kpm[:, None, :]
    unseen = ~seen.any(-1)                                    # (B, N)
    assert (got.detach()[unseen] == 0).all(), "a query that sees no key must give zeros"

    dout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)
    grads_ref = torch.autograd.grad(ref, ref_in, dout)
    grads = torch.autograd.grad(got, got_in, dout.to(got.dtype))
    names = ["dq", "dk", "dv"] + (["dlambda"] if isinstance(lam, torch.Tensor) else []) + \
        (["dnorm_weight"] if norm is not None else [])
    for name, g_got, g_ref in zip(names, grads, grads_ref):
        assert_close_rel(name, g_got, g_ref, case.dtype)


def test_window_size_is_checked():
    q, k, v, lam, _, _ = _inputs(Case(1, 4, 4, (1, 1)))
    for bad, error in (((1,), TypeError), ((1, 2.0), TypeError), ((-2, 0), ValueError),
                       ("left", TypeError)):
        with pytest.raises(error, match="window_size"):
            diff_attention(q, k, v, lambda_=0.5, window_size=bad, backend="torch")
        with pytest.raises(error, match="window_size"):
            diff_attention_v2(q, k[:, :, :1], v[:, :, :, :16], lambda_=0.5, window_size=bad,
                              backend="torch")


def test_unbounded_window_is_full_attention():
    q, k, v, lam, kpm, _ = _inputs(Case(1, 20, 24, (-1, -1), padding=True))
    full = diff_attention(q, k, v, lambda_=lam, key_padding_mask=kpm, backend="torch")
    windowed = diff_attention(q, k, v, lambda_=lam, key_padding_mask=kpm, window_size=(-1, -1),
                              backend="torch")
    wide = diff_attention(q, k, v, lambda_=lam, key_padding_mask=kpm, window_size=(100, 100),
                          backend="torch")
    assert torch.equal(full, windowed)
    torch.testing.assert_close(full, wide)


@pytest.mark.parametrize("module", [DiffMultiheadAttention, DiffMultiheadAttentionV2])
def test_modules_take_window_size_in_forward(module):
    torch.manual_seed(0)
    layer = module(32, 4, batch_first=True, backend="torch").double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    out, weights = layer(x, need_weights=True, window_size=(2, 1))
    full, _ = layer(x)
    assert not torch.allclose(out, full)
    keep = band_keep(9, 9, (2, 1), False)
    assert (weights[:, ~keep] == 0).all()
    if INTERPRET:
        layer.backend = "triton"
        fused, _ = layer(x, window_size=(2, 1))
        torch.testing.assert_close(fused, out)
