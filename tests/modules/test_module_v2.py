"""DiffMultiheadAttentionV2 against a float64 layer written from the Differential Transformer V2
formulas (sharing no code with diffattn), and from_plain against nn.MultiheadAttention."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffattn import DiffMultiheadAttentionV2
from helpers import INTERPRET, assert_close_rel

BACKENDS = ["torch"] + (["triton"] if INTERPRET else [])


def reference_layer(params: dict, x, kv, *, num_heads, num_kv_heads, causal=False,
                    key_padding_mask=None):
    """x (B, N, E), kv (B, M, E) float64 -> (B, N, E), by explicit matmuls."""
    B, N, E = x.shape
    M = kv.shape[1]
    h, hk, d = num_heads, num_kv_heads, E // num_heads

    def linear(name, t):
        out = t @ params[f"{name}.weight"].T
        return out + params[f"{name}.bias"] if f"{name}.bias" in params else out

    q = linear("q_proj", x).view(B, N, 2 * h, d)
    k = linear("k_proj", kv).view(B, M, hk, d)
    v = linear("v_proj", kv).view(B, M, hk, d)
    lam = torch.sigmoid(linear("lambda_proj", x))                    # (B, N, h)
    blocked = torch.zeros(B, N, M, dtype=torch.bool)
    if causal:
        blocked |= torch.ones(N, M, dtype=torch.bool).triu(1 + M - N)
    if key_padding_mask is not None:
        blocked |= key_padding_mask[:, None, :]
    heads = []
    for i in range(h):
        g = i // (h // hk)
        maps = []
        for a in range(2):
            s = q[:, :, 2 * i + a] @ k[:, :, g].transpose(1, 2) / math.sqrt(d)
            maps.append(torch.softmax(s.masked_fill(blocked, -math.inf), -1).nan_to_num(0.0))
        heads.append((maps[0] - lam[:, :, i, None] * maps[1]) @ v[:, :, g])
    return linear("out_proj", torch.cat(heads, -1))


def randomize_(module: nn.Module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def check(m: DiffMultiheadAttentionV2, x, kv=None, causal=False, key_padding_mask=None):
    m.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    kv_in = None if kv is None else kv.clone().requires_grad_()
    out, _ = m(x, kv_in, kv_in, is_causal=causal, key_padding_mask=key_padding_mask)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    out.backward(grad_out)

    params = {n: p.detach().double().requires_grad_() for n, p in m.state_dict().items()}
    xr = x.detach().double().requires_grad_()
    kvr = xr if kv is None else kv.detach().double().requires_grad_()
    bf = (lambda t: t) if m.batch_first else (lambda t: t.transpose(0, 1))
    ref = bf(reference_layer(params, bf(xr), bf(kvr), num_heads=m.num_heads,
                             num_kv_heads=m.num_kv_heads, causal=causal,
                             key_padding_mask=key_padding_mask))
    ref.backward(grad_out.double())
    assert_close_rel("out", out, ref, torch.float32)
    assert_close_rel("d input", x.grad, xr.grad, torch.float32)
    if kv is not None:
        assert_close_rel("d key/value input", kv_in.grad, kvr.grad, torch.float32)
    names = ("q_proj", "lambda_proj", "k_proj", "v_proj")
    for kind in ("weight", "bias"):
        want = torch.cat([params[f"{n}.{kind}"].grad for n in names])
        assert_close_rel(f"d in_proj_{kind}", getattr(m, f"in_proj_{kind}").grad, want,
                         torch.float32, tol=1e-4)
    assert_close_rel("d out_proj.weight", m.out_proj.weight.grad,
                     params["out_proj.weight"].grad, torch.float32, tol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_matches_reference(backend, batch_first):
    m = randomize_(DiffMultiheadAttentionV2(64, 4, batch_first=batch_first, backend=backend))
    x = torch.randn(2, 37, 64) if batch_first else torch.randn(37, 2, 64)
    check(m, x, causal=True)
    assert m.last_backend == backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_gqa_and_cross_attention(backend):
    m = randomize_(DiffMultiheadAttentionV2(64, 4, num_kv_heads=2, batch_first=True,
                                            backend=backend))
    x, kv = torch.randn(2, 20, 64), torch.randn(2, 33, 64)
    mask = torch.rand(2, 33) < 0.3
    mask[1] = True  # fully padded: zeros, never NaN
    check(m, x, kv, key_padding_mask=mask)
    check(m, x, causal=True, key_padding_mask=torch.rand(2, 20) < 0.2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", [True, False])
def test_from_plain_equals_the_plain_layer(backend, batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=batch_first)
    m = DiffMultiheadAttentionV2.from_plain(mha, backend=backend)
    assert (m.embed_dim, m.num_heads, m.num_kv_heads, m.batch_first) == (64, 4, 4, batch_first)
    x = torch.randn(3, 25, 64) if batch_first else torch.randn(25, 3, 64)
    causal = torch.ones(25, 25, dtype=torch.bool).triu(1)
    for mask in (None, causal):
        want = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
        got = m(x, attn_mask=mask)[0]
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
    torch.testing.assert_close(m.k_proj.weight, mha.in_proj_weight[64:128])
    torch.testing.assert_close(m.out_proj.weight, mha.out_proj.weight)
    lam = torch.sigmoid(m.lambda_proj(x)).detach()
    torch.testing.assert_close(lam, torch.full_like(lam, 1e-5))


def test_from_plain_refuses_what_it_cannot_start_equal():
    with pytest.raises(ValueError, match="with biases"):
        DiffMultiheadAttentionV2.from_plain(nn.MultiheadAttention(32, 2, bias=False))
    with pytest.raises(ValueError, match="kdim = vdim"):
        DiffMultiheadAttentionV2.from_plain(nn.MultiheadAttention(32, 2, kdim=16, vdim=16))
    with pytest.raises(TypeError, match="nn.MultiheadAttention"):
        DiffMultiheadAttentionV2.from_plain(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="initial_lambda"):
        DiffMultiheadAttentionV2.from_plain(nn.MultiheadAttention(32, 2), initial_lambda=0.0)


def test_state_dict_names_round_trip_and_shapes():
    m = randomize_(DiffMultiheadAttentionV2(96, 3, num_kv_heads=1))
    sd = m.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "q_proj.weight": (192, 96), "q_proj.bias": (192,),
        "lambda_proj.weight": (3, 96), "lambda_proj.bias": (3,),
        "k_proj.weight": (32, 96), "k_proj.bias": (32,),
        "v_proj.weight": (32, 96), "v_proj.bias": (32,),
        "out_proj.weight": (96, 96), "out_proj.bias": (96,)}
    assert len({t.data_ptr() for t in sd.values()}) == len(sd)  # no shared storage
    other = DiffMultiheadAttentionV2(96, 3, num_kv_heads=1)
    other.load_state_dict(sd, strict=True)
    assert torch.equal(other.in_proj_weight, m.in_proj_weight)
    partial = {k: v for k, v in sd.items() if k != "k_proj.weight"}
    with pytest.raises(RuntimeError, match="missing"):
        other.load_state_dict(partial)


def test_need_weights_and_dropout():
    m = DiffMultiheadAttentionV2(32, 2, dropout=0.5, batch_first=True, backend="auto")
    x = torch.randn(2, 6, 32)
    _, w = m.eval()(x, need_weights=True, average_attn_weights=False)
    assert w.shape == (2, 2, 6, 6)
    torch.testing.assert_close(w.sum(-1), (1 - torch.sigmoid(m.lambda_proj(x))).transpose(1, 2))
    m.train()
    assert not torch.allclose(m(x)[0], m(x)[0])
    assert m.last_backend == "torch"
    with pytest.raises(RuntimeError, match="dropout"):
        DiffMultiheadAttentionV2(32, 2, dropout=0.5, backend="triton")(x)


@pytest.mark.parametrize("kwargs,match", [
    (dict(embed_dim=65, num_heads=4), "multiple of num_heads"),
    (dict(embed_dim=64, num_heads=0), "num_heads must be a positive int"),
    (dict(embed_dim=64, num_heads=4, num_kv_heads=3), "num_kv_heads"),
    (dict(embed_dim=64, num_heads=4, dropout=1.0), "dropout"),
    (dict(embed_dim=64, num_heads=4, backend="fast"), "backend must be one of"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffMultiheadAttentionV2(**kwargs)
