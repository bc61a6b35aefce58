"""Padding keys are excluded exactly on both backends: NaN or inf in a key or value row that
key_padding_mask masks out reaches no output and no gradient, and both backends agree with the
float64 reference computed on clean inputs."""
from __future__ import annotations

import pytest
import torch

from diffattn import diff_attention, diff_attention_ref, diff_attention_v2, diff_attention_v2_ref
from helpers import INTERPRET, assert_close_rel

BACKENDS = ["torch"] + (["triton"] if INTERPRET else [])
# The interpreter's numpy matmul warns on the NaN scores of poisoned keys, which are then masked.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _inputs(v2: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, N, M, H, d = 2, 5, 7, 2, 8
    q = torch.randn(B, N, 2 * H, d, generator=g)
    k = torch.randn(B, M, 1 if v2 else 2, d, generator=g)
    v = torch.randn(B, M, 1, d if v2 else 2 * d, generator=g)
    mask = torch.zeros(B, M, dtype=torch.bool)
    mask[0, [2, 6]] = True     # padding inside and at the end
    mask[1] = True             # a batch element with no visible key: zeros
    lam = torch.rand(B, N, H, generator=g) if v2 else torch.tensor(0.4)
    return q, k, v, mask, lam


def _run(fn, q, k, v, lam, dout, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, lam)]
    out = fn(*leaves[:3], lambda_=leaves[3], **kw)
    (out * dout).sum().backward()
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_poisoned_padding_keys_reach_no_output_or_gradient(backend, v2, causal, poison):
    q, k, v, mask, lam = _inputs(v2)
    fn, ref_fn = (diff_attention_v2, diff_attention_v2_ref) if v2 else \
        (diff_attention, diff_attention_ref)
    kw = dict(causal=causal, key_padding_mask=mask)
    if not v2:
        kw["norm_weight"] = torch.linspace(0.5, 1.5, v.shape[3])
    dout = torch.randn(q.shape[0], q.shape[1], q.shape[2] // 2, v.shape[3])
    ref_out, ref_grads = _run(ref_fn, q.double(), k.double(), v.double(), lam.double(),
                              dout.double(), **{n: t.double() if n == "norm_weight" else t
                                                for n, t in kw.items()})
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[mask], v_bad[mask] = poison, poison
    out, grads = _run(fn, q, k_bad, v_bad, lam, dout, backend=backend, **kw)
    assert_close_rel("out", out, ref_out, torch.float32)
    assert (out[1] == 0).all(), "a row with no visible key must be exactly zero"
    for name, got, ref in zip(("dq", "dk", "dv", "dlambda"), grads, ref_grads):
        assert_close_rel(name, got, ref, torch.float32)
    assert (grads[1][mask] == 0).all() and (grads[2][mask] == 0).all()


@pytest.mark.skipif(not INTERPRET, reason="needs the fused path (TRITON_INTERPRET=1)")
def test_backends_agree_with_poisoned_padding_keys():
    q, k, v, mask, lam = _inputs(False, seed=1)
    k[mask], v[mask] = float("nan"), float("inf")
    outs = [diff_attention(q, k, v, lambda_=lam, key_padding_mask=mask, backend=b)
            for b in ("torch", "triton")]
    assert_close_rel("triton vs torch", outs[1], outs[0], torch.float32)


@pytest.mark.parametrize("layer_cls", ["v1", "v2"])
def test_layers_ignore_nan_in_padded_positions(layer_cls):
    from diffattn import DiffMultiheadAttention, DiffMultiheadAttentionV2
    cls = DiffMultiheadAttentionV2 if layer_cls == "v2" else DiffMultiheadAttention
    torch.manual_seed(0)
    layer = cls(16, 4, batch_first=True, backend="torch")
    x = torch.randn(2, 6, 16)
    kv = torch.randn(2, 7, 16)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[0, 4:] = True
    clean = layer(x, kv, kv, key_padding_mask=padding)[0]
    for backend in BACKENDS:
        layer.backend = backend
        # (The projection weights' gradients read the NaN inputs themselves: not checked.)
        kv_bad = kv.masked_fill(padding[..., None], float("nan")).requires_grad_()
        out = layer(x, kv_bad, kv_bad, key_padding_mask=padding)[0]
        out.sum().backward()
        assert_close_rel(f"{backend} out", out.detach(), clean.detach(), torch.float32)
        assert torch.isfinite(kv_bad.grad).all() and (kv_bad.grad[padding] == 0).all()
