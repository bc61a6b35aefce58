"""DiffMultiheadAttention (V1, DiffCLIP) and DiffMultiheadAttentionV2 against float64 layers
written from their formulas.

The references below share no code with diffattn: projections, lambda, both softmax maps, the
difference, (V1) the per-head RMSNorm and (1 - lambda_init), and out_proj, all by explicit
matmuls. The comparison with the reference, the shared cases (self attention, causal, padding,
GQA, cross attention) and the bad constructor arguments run for both layers from one harness;
what only one layer has (V1's lambda vectors, masks and checkpoint layouts, V2's from_plain and
state-dict names) has its own tests.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

from diffattn import DiffMultiheadAttention, DiffMultiheadAttentionV2, lambda_init_for_depth
from helpers import INTERPRET, REL_TOL, assert_close_rel

BACKENDS = ["torch"] + (["triton"] if INTERPRET else [])


def reference_layer_v1(params: dict, x, kv, *, num_heads, num_kv_heads, lambda_init,
                    causal=False, key_padding_mask=None, attn_mask=None):
    """x (B, N, E), kv (B, M, E) float64 -> (B, N, E). attn_mask: bool (True = masked) or
    float additive, (N, M) or (B, num_heads, N, M)."""
    B, N, E = x.shape
    M = kv.shape[1]
    d = E // num_heads
    H, Hk = num_heads // 2, num_kv_heads // 2

    def linear(name, t):
        out = t @ params[f"{name}.weight"].T
        return out + params[f"{name}.bias"] if f"{name}.bias" in params else out

    q = linear("q_proj", x).view(B, N, 2 * H, d)
    k = linear("k_proj", kv).view(B, M, 2 * Hk, d)
    v = linear("v_proj", kv).view(B, M, Hk, 2 * d)
    lam = (torch.exp((params["lambda_q1"] * params["lambda_k1"]).sum())
           - torch.exp((params["lambda_q2"] * params["lambda_k2"]).sum()) + lambda_init)
    heads = []
    for h in range(H):
        g = h // (H // Hk)
        maps = []
        for a in range(2):
            s = q[:, :, 2 * h + a] @ k[:, :, 2 * g + a].transpose(1, 2) / math.sqrt(d)
            blocked = torch.zeros(B, N, M, dtype=torch.bool)
            if causal:
                blocked |= torch.ones(N, M, dtype=torch.bool).triu(1 + M - N)
            if key_padding_mask is not None:
                blocked |= key_padding_mask[:, None, :]
            if attn_mask is not None:
                m = attn_mask if attn_mask.dim() == 2 else attn_mask[:, 2 * h + a]
                if m.dtype == torch.bool:
                    blocked |= m
                else:
                    s = s + m
                    blocked |= torch.isneginf(m)
            s = s.masked_fill(blocked, -math.inf)
            p = torch.softmax(s, -1).nan_to_num(0.0)  # rows with no key -> 0
            maps.append(p)
        o = (maps[0] - lam * maps[1]) @ v[:, :, g]
        o = o / torch.sqrt((o * o).mean(-1, keepdim=True) + 1e-5) * params["diff_norm.weight"]
        heads.append(o * (1 - lambda_init))
    return linear("out_proj", torch.cat(heads, -1))


def reference_layer_v2(params: dict, x, kv, *, num_heads, num_kv_heads, causal=False,
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
        for name, p in module.named_parameters():
            std = 0.3 if "lambda" in name else 0.2
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if "norm" in name else 0.0))
    return module


@dataclass(frozen=True)
class Variant:
    """What the shared harness needs to know about one layer."""
    name: str
    layer: type
    reference: object                     # reference_layer_v1 / reference_layer_v2
    in_proj: tuple                        # the per-projection names stacked in in_proj_*
    reference_kwargs: object = lambda m: {}
    gqa_kwargs: dict = field(default_factory=dict)
    self_attention_causal: bool = False   # the causal flag of the plain self-attention case


VARIANTS = {
    "DiffMultiheadAttention": Variant(
        "v1", DiffMultiheadAttention, reference_layer_v1, ("q_proj", "k_proj", "v_proj"),
        reference_kwargs=lambda m: {"lambda_init": m.lambda_init},
        gqa_kwargs={"lambda_init": lambda_init_for_depth(3)}),
    "DiffMultiheadAttentionV2": Variant(
        "v2", DiffMultiheadAttentionV2, reference_layer_v2,
        ("q_proj", "lambda_proj", "k_proj", "v_proj"), self_attention_causal=True),
}
BOTH = pytest.mark.parametrize("variant", list(VARIANTS.values()), ids=lambda v: v.name)


def check_against_reference(m, x, kv=None, **mask_kwargs):
    """Output and gradients of the input and of every parameter, in fp32, against float64
    (the V1 or V2 reference, chosen by the layer's class)."""
    variant = VARIANTS[type(m).__name__]
    m.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    kv_in = None if kv is None else kv.clone().requires_grad_()
    call_masks = dict(mask_kwargs)
    causal = call_masks.pop("causal", False)
    out, _ = m(x, kv_in, kv_in, is_causal=causal, **call_masks)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    out.backward(grad_out)

    # The reference reads the published per-projection names of the state dict.
    params = {n: p.detach().double().requires_grad_() for n, p in m.state_dict().items()}
    xr = x.detach().double().requires_grad_()
    kvr = xr if kv is None else kv.detach().double().requires_grad_()
    bf = (lambda t: t) if m.batch_first else (lambda t: t.transpose(0, 1))
    ref_masks = {k: (v.double() if v is not None and v.is_floating_point() else v)
                 for k, v in call_masks.items()}
    if ref_masks.get("attn_mask") is not None and ref_masks["attn_mask"].dim() == 3:
        am = ref_masks["attn_mask"]
        ref_masks["attn_mask"] = am.view(-1, m.num_heads, *am.shape[1:])
    ref = bf(variant.reference(params, bf(xr), bf(kvr), num_heads=m.num_heads,
                               num_kv_heads=m.num_kv_heads, causal=causal,
                               **variant.reference_kwargs(m), **ref_masks))
    ref.backward(grad_out.double())
    assert_close_rel("out", out, ref, torch.float32)
    assert_close_rel("d input", x.grad, xr.grad, torch.float32)
    if kv is not None:
        assert_close_rel("d key/value input", kv_in.grad, kvr.grad, torch.float32)
    for n, p in m.named_parameters():
        # parameter gradients sum over every token: fp32 rounding grows with the sum
        assert_close_rel(f"d {n}", p.grad, reference_grad(params, n, variant), torch.float32,
                         tol=1e-4)


def reference_grad(params: dict, name: str, variant: Variant):
    """The reference's gradient of module parameter ``name`` (packed projections stacked)."""
    if name.startswith("in_proj_"):
        kind = name[len("in_proj_"):]
        return torch.cat([params[f"{p}.{kind}"].grad for p in variant.in_proj])
    if name == "lambda_vectors":
        return torch.stack([params[n].grad for n in ("lambda_q1", "lambda_k1", "lambda_q2",
                                                      "lambda_k2")])
    return params[name].grad


@BOTH
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_matches_reference(variant, backend, batch_first):
    m = randomize_(variant.layer(64, 4, batch_first=batch_first, backend=backend))
    x = torch.randn(2, 37, 64) if batch_first else torch.randn(37, 2, 64)
    check_against_reference(m, x, causal=variant.self_attention_causal)
    assert m.last_backend == backend


@BOTH
@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_padding_gqa_and_cross_attention(variant, backend):
    m = randomize_(variant.layer(96, 4, num_kv_heads=2, batch_first=True, backend=backend,
                                 **variant.gqa_kwargs), seed=1)
    x = torch.randn(2, 29, 96)
    pad = torch.rand(2, 29) < 0.25
    pad[1] = True  # a batch element with every key padded: zeros, not NaN
    check_against_reference(m, x, causal=True, key_padding_mask=pad)
    kv = torch.randn(2, 41, 96)
    kv_pad = torch.rand(2, 41) < 0.3
    kv_pad[1] = True  # the same with keys and values from another sequence
    check_against_reference(m, x, kv, key_padding_mask=kv_pad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_attn_mask_takes_the_fused_causal_path(backend):
    m = randomize_(DiffMultiheadAttention(64, 4, batch_first=True, backend=backend))
    x = torch.randn(2, 21, 64)
    float_mask = torch.full((21, 21), float("-inf")).triu(1)
    bool_mask = torch.ones(21, 21, dtype=torch.bool).triu(1)
    ref, _ = m(x, is_causal=True)
    for mask in (float_mask, bool_mask):
        out, _ = m(x, attn_mask=mask)
        assert m.last_backend == backend  # not the general-mask torch path
        torch.testing.assert_close(out, ref)
    check_against_reference(m, x, attn_mask=float_mask)


def test_general_attn_masks_use_the_torch_path_and_match_reference():
    m = randomize_(DiffMultiheadAttention(64, 4, batch_first=True), seed=3)
    x = torch.randn(2, 15, 64)
    additive = torch.randn(15, 15)
    check_against_reference(m, x, attn_mask=additive)
    assert m.last_backend == "torch"
    per_head = torch.rand(2 * 4, 15, 15) < 0.3
    check_against_reference(m, x, attn_mask=per_head)
    float_pad = torch.zeros(2, 15).masked_fill(torch.rand(2, 15) < 0.3, float("-inf"))
    out, _ = m(x, key_padding_mask=float_pad)
    ref, _ = m(x, key_padding_mask=torch.isneginf(float_pad))
    torch.testing.assert_close(out, ref)


def test_need_weights_returns_the_differential_maps():
    m = randomize_(DiffMultiheadAttention(32, 4, batch_first=True, backend="torch"))
    x = torch.randn(3, 7, 32)
    _, w_avg = m(x, need_weights=True, is_causal=True)
    _, w_all = m(x, need_weights=True, is_causal=True, average_attn_weights=False)
    assert w_avg.shape == (3, 7, 7) and w_all.shape == (3, 2, 7, 7)
    torch.testing.assert_close(w_avg, w_all.mean(1))
    lam = m.compute_lambda()
    # rows of A1 - lambda A2 sum to 1 - lambda; nothing above the diagonal
    torch.testing.assert_close(w_all.sum(-1), (1 - lam).expand(3, 2, 7))
    assert torch.equal(w_all.triu(1), torch.zeros_like(w_all))


def test_unbatched_input():
    m = randomize_(DiffMultiheadAttention(32, 2, backend="torch"))
    x = torch.randn(9, 32)
    out, _ = m(x)
    assert out.shape == (9, 32)
    torch.testing.assert_close(out, m(x[:, None])[0][:, 0])


def _shared_file(name):
    root = Path(os.environ.get("DIFFATTN_SHARED", Path(__file__).resolve().parents[3] / "shared"))
    path = root / "data" / name
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def test_strict_loading_of_diffclip_attention_keys():
    layout = json.loads(_shared_file("diffclip_vitb16_state_dict.json").read_text())
    for prefix, width, heads in (("visual.blocks.0.attn.", 768, 12),
                                 ("transformer.resblocks.0.attn.", 512, 8)):
        shapes = {k[len(prefix):]: s for k, s in layout.items() if k.startswith(prefix)}
        assert shapes, prefix
        g = torch.Generator().manual_seed(0)
        sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        m = DiffMultiheadAttention(width, heads, batch_first=True)
        m.load_state_dict(sd, strict=True)
        for k, t in sd.items():
            assert torch.equal(m.state_dict()[k], t), k
        assert m.lambda_q1.dtype == torch.float32


def test_loading_packed_multihead_attention_weights():
    mha = nn.MultiheadAttention(64, 4, batch_first=True)
    m = DiffMultiheadAttention(64, 4, batch_first=True)
    lam_before = m.lambda_q1.detach().clone()
    m.load_state_dict(mha.state_dict(), strict=True)
    w = mha.in_proj_weight.detach()
    torch.testing.assert_close(m.q_proj.weight, w[:64])
    torch.testing.assert_close(m.k_proj.weight, w[64:128])
    torch.testing.assert_close(m.v_proj.weight, w[128:])
    torch.testing.assert_close(m.v_proj.bias, mha.in_proj_bias[128:])
    torch.testing.assert_close(m.out_proj.weight, mha.out_proj.weight)
    torch.testing.assert_close(m.lambda_q1, lam_before)
    bad = {k: v for k, v in mha.state_dict().items()}
    bad["in_proj_weight"] = bad["in_proj_weight"][:100]
    with pytest.raises(RuntimeError, match="in_proj_weight"):
        m.load_state_dict(bad)


def test_parameters_shapes_and_init():
    m = DiffMultiheadAttention(768, 12)
    mha = nn.MultiheadAttention(768, 12)
    n_diff = sum(p.numel() for p in m.parameters())
    n_plain = sum(p.numel() for p in mha.parameters())
    assert n_diff - n_plain == 4 * 64 + 2 * 64  # 384 extra numbers at d = 64
    assert torch.equal(m.diff_norm.weight, torch.ones(128))
    lam = torch.cat([m.lambda_q1, m.lambda_k1, m.lambda_q2, m.lambda_k2])
    assert 0.05 < lam.std().item() < 0.15
    assert m.compute_lambda().dtype == torch.float32


def test_lambda_gradients_reach_all_four_vectors():
    m = DiffMultiheadAttention(32, 2, batch_first=True, backend="torch")
    m(torch.randn(2, 5, 32))[0].sum().backward()
    assert m.lambda_vectors.grad is not None
    assert (m.lambda_vectors.grad.abs().sum(1) > 0).all()  # lq1, lk1, lq2, lk2


def test_lambda_init_for_depth():
    assert lambda_init_for_depth(0) == pytest.approx(0.2)
    assert lambda_init_for_depth(5) == pytest.approx(0.8 - 0.6 * math.exp(-1.5))
    assert lambda_init_for_depth(100) == pytest.approx(0.8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_and_to_dtype(backend):
    m = randomize_(DiffMultiheadAttention(64, 4, batch_first=True, backend=backend))
    x = torch.randn(2, 19, 64)
    ref, _ = m(x)
    for dtype in (torch.float16, torch.float64 if backend == "torch" else torch.float16):
        mh = DiffMultiheadAttention(64, 4, batch_first=True, backend=backend)
        mh.load_state_dict(m.state_dict())
        mh = mh.half() if dtype == torch.float16 else mh.to(dtype)
        out, _ = mh(x.to(dtype), is_causal=False)
        assert out.dtype == dtype
        assert (out.double() - ref.double()).abs().max() < REL_TOL[torch.float16] * 10


def test_dropout_refused_by_triton_and_used_by_torch():
    m = DiffMultiheadAttention(32, 2, dropout=0.5, batch_first=True, backend="triton")
    x = torch.randn(2, 5, 32)
    with pytest.raises(RuntimeError, match="dropout"):
        m(x)
    m.eval()
    if INTERPRET:
        m(x)  # no dropout in eval: fused path is fine
        assert m.last_backend == "triton"
    auto = DiffMultiheadAttention(32, 2, dropout=0.5, batch_first=True, backend="torch")
    a, b = auto(x)[0], auto(x)[0]
    assert not torch.allclose(a, b)
    assert auto.last_backend == "torch"


def test_extra_repr_shows_heads_lambda_and_backend():
    text = repr(DiffMultiheadAttention(64, 4, lambda_init=0.5, backend="torch"))
    assert "num_heads=4" in text and "2 differential heads" in text
    assert "lambda_init=0.5" in text and "backend='torch'" in text


BAD_CONSTRUCTOR_ARGUMENTS = {
    "v1": [
    (dict(embed_dim=65, num_heads=4), "embed_dim"),
    (dict(embed_dim=64, num_heads=3), "num_heads must be a positive even"),
    (dict(embed_dim=64, num_heads=4, num_kv_heads=3), "num_kv_heads"),
    (dict(embed_dim=64, num_heads=4, dropout=1.0), "dropout"),
    (dict(embed_dim=64, num_heads=4, backend="fast"), "backend must be one of"),
    (dict(embed_dim=64, num_heads=0), "num_heads must be a positive even"),
    (dict(embed_dim=64, num_heads=4, lambda_init=float("nan")), "lambda_init must be finite"),
    (dict(embed_dim=64, num_heads=4, lambda_init=float("inf")), "lambda_init must be finite"),
    (dict(embed_dim=64, num_heads=4, lambda_init=1.0),
     r"lambda_init must lie in \(0, 1\), got 1.0: the output is scaled by 1 - lambda_init, so at 1 "
     r"it is zero and the projections get no gradient"),
    (dict(embed_dim=64, num_heads=4, lambda_init=1.5), r"lambda_init must lie in \(0, 1\)"),
    (dict(embed_dim=64, num_heads=4, lambda_init=0.0), r"lambda_init must lie in \(0, 1\).*below zero"),
    (dict(embed_dim=64, num_heads=4, lambda_init=-0.2), r"lambda_init must lie in \(0, 1\)"),
    ],
    "v2": [
    (dict(embed_dim=65, num_heads=4), "multiple of num_heads"),
    (dict(embed_dim=64, num_heads=0), "num_heads must be a positive int"),
    (dict(embed_dim=64, num_heads=4, num_kv_heads=3), "num_kv_heads"),
    (dict(embed_dim=64, num_heads=4, dropout=1.0), "dropout"),
    (dict(embed_dim=64, num_heads=4, backend="fast"), "backend must be one of"),
    ],
}


@pytest.mark.parametrize("variant,kwargs,match", [
    pytest.param(VARIANTS[layer], kwargs, match, id=f"{name}-kwargs{i}-{match}")
    for layer, name in (("DiffMultiheadAttention", "v1"), ("DiffMultiheadAttentionV2", "v2"))
    for i, (kwargs, match) in enumerate(BAD_CONSTRUCTOR_ARGUMENTS[name])])
def test_bad_constructor_arguments(variant, kwargs, match):
    with pytest.raises(ValueError, match=match):
        variant.layer(**kwargs)


def test_lambda_init_type_and_depth_index_are_checked():
    with pytest.raises(TypeError, match="lambda_init must be a float in \\(0, 1\\)"):
        DiffMultiheadAttention(64, 4, lambda_init="0.8")
    with pytest.raises(ValueError, match="layer_index must be >= 0"):
        lambda_init_for_depth(-1)
    with pytest.raises(TypeError, match="layer_index must be an int"):
        lambda_init_for_depth(1.5)
    assert all(0 < lambda_init_for_depth(i) < 1 for i in range(50))


def test_bad_forward_inputs():
    m = DiffMultiheadAttention(32, 2, batch_first=True, backend="torch")
    x = torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="query must have shape"):
        m(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        m(x, attn_mask=torch.zeros(4, 4))
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        m(x, attn_mask=torch.zeros(3, 5, 5))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        m(x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be bool"):
        m(x, key_padding_mask=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="value must have key's batch size and length"):
        m(x, torch.randn(2, 6, 32), torch.randn(2, 7, 32))
    with pytest.raises(ValueError, match="key must have query's batch size 2"):
        m(x, torch.randn(3, 6, 32), torch.randn(3, 6, 32))


def test_head_rms_norm_is_callable_and_matches_float64_math():
    from diffattn import HeadRMSNorm
    torch.manual_seed(0)
    norm = HeadRMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 4, 8)
    x64 = x.double()
    ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    got = norm(x)
    assert got.dtype == x.dtype and got.shape == x.shape
    assert torch.allclose(got.double(), ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="8 features"):
        norm(torch.randn(2, 7))


# V2 only: from_plain, the per-projection state dict, need_weights with a per-token lambda.

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", [True, False])
def test_v2_from_plain_equals_the_plain_layer(backend, batch_first):
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


def test_v2_from_plain_refuses_what_it_cannot_start_equal():
    with pytest.raises(ValueError, match="with biases"):
        DiffMultiheadAttentionV2.from_plain(nn.MultiheadAttention(32, 2, bias=False))
    with pytest.raises(ValueError, match="kdim = vdim"):
        DiffMultiheadAttentionV2.from_plain(nn.MultiheadAttention(32, 2, kdim=16, vdim=16))
    with pytest.raises(TypeError, match="nn.MultiheadAttention"):
        DiffMultiheadAttentionV2.from_plain(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="initial_lambda"):
        DiffMultiheadAttentionV2.from_plain(nn.MultiheadAttention(32, 2), initial_lambda=0.0)


def test_v2_state_dict_names_round_trip_and_shapes():
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


def test_v2_need_weights_and_dropout():
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
