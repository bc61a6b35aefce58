"""diffattn.integrations.timm against timm's own DiffAttention: the layer, a tiny ViT built with
attn_layer=FusedDiffAttention and one swapped by fuse_diff_attention, forward and every
gradient, compared with timm's module in float64. Skipped where timm is not installed (it is an
optional extra)."""
import copy
import warnings

import pytest
import torch

timm = pytest.importorskip("timm")

from timm.layers import DiffAttention  # noqa: E402

from diffattn import BackendFallbackWarning  # noqa: E402
from diffattn.integrations import timm as integration  # noqa: E402
from diffattn.integrations.timm import FusedDiffAttention, fuse_diff_attention  # noqa: E402
from helpers import INTERPRET, assert_close_rel  # noqa: E402

BACKENDS = ["torch"] + (["triton"] if INTERPRET else [])
DTYPES = [torch.float32, torch.float64]


@torch.no_grad()
def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere: norm weights 1 + N(0, 0.1), lambda parameters N(0, 0.2),
    the rest N(0, 0.1), so that no gradient is trivially zero or one."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
        if "norm" in name and name.endswith("weight"):
            param.copy_(1.0 + 0.1 * noise)
        elif "lambda" in name:
            param.copy_(0.2 * noise)
        else:
            param.copy_(0.1 * noise)
    return module


def _timm_pair(dtype, backend, **kwargs):
    """(FusedDiffAttention in dtype, timm's DiffAttention in float64) with the same weights."""
    reference = _randomise(DiffAttention(32, num_heads=2, **kwargs)).double()
    fused = FusedDiffAttention(32, num_heads=2, backend=backend, **kwargs)
    fused.load_state_dict(reference.state_dict(), strict=True)
    return fused.to(dtype), reference


def _forward_backward(module, x, **forward_kwargs):
    """Output and the gradients of x and of every parameter for a random output gradient."""
    x = x.detach().clone().requires_grad_(True)
    out = module(x, **forward_kwargs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out.backward(grad.to(out.dtype))
    grads = {"x": x.grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return out, grads


def _assert_same(got, ref, dtype):
    (out, grads), (ref_out, ref_grads) = got, ref
    assert_close_rel("output", out, ref_out, dtype)
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        assert_close_rel(f"grad {name}", grad, ref_grads[name], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", [
    dict(),
    dict(qkv_bias=True, qk_norm=True, depth=3),
    dict(dual_lambda=True, scale_norm=True, depth=1),
    dict(causal=True, qkv_bias=True, depth=5),
])
def test_layer_matches_timm(variant, dtype, backend):
    kwargs = dict(variant)
    causal = kwargs.pop("causal", False)
    fused, reference = _timm_pair(dtype, backend, **kwargs)
    if kwargs.get("dual_lambda"):
        with torch.no_grad():  # timm initialises lambda_a = lambda_b = 0
            reference.lambda_a.fill_(0.3), reference.lambda_b.fill_(-0.2)
            fused.lambda_a.fill_(0.3), fused.lambda_b.fill_(-0.2)
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = _forward_backward(fused, x.to(dtype), is_causal=causal)
    ref = _forward_backward(reference, x, is_causal=causal)
    _assert_same(got, ref, dtype)
    assert fused.last_backend == backend


def test_attention_core_reads_views_of_the_projection(monkeypatch):
    fused, _ = _timm_pair(torch.float32, "torch", qkv_bias=True)
    captured = {}
    fused.qkv.register_forward_hook(lambda module, args, out: captured.update(qkv=out))
    real = integration.run_diff_attention

    def spy(q, k, v, lambda_, backend, **kwargs):
        captured.update(q=q, k=k, v=v, kwargs=kwargs)
        return real(q, k, v, lambda_, backend, **kwargs)

    monkeypatch.setattr(integration, "run_diff_attention", spy)
    fused(torch.randn(2, 5, 32))
    qkv = captured["qkv"]
    for index, name in enumerate("qkv"):
        view = captured[name]
        assert view.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr(), name
        assert view.data_ptr() == qkv.data_ptr() + index * 32 * qkv.element_size(), name
    assert captured["q"].shape == captured["k"].shape == (2, 5, 4, 8)
    assert captured["v"].shape == (2, 5, 2, 16)
    kwargs = captured["kwargs"]
    assert kwargs["norm_weight"] is fused.sub_norm.weight
    assert kwargs["out_scale"] == pytest.approx(1 - fused.lambda_init)
    assert kwargs["eps"] == fused.sub_norm.eps == 1e-5


def _tiny_vit(attn_layer, seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, attn_layer=attn_layer,
                             img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             num_classes=5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_vit_with_fused_layers_matches_timm(dtype, backend):
    reference = _randomise(_tiny_vit("diff")).double()
    built = _tiny_vit(FusedDiffAttention)
    built.load_state_dict(reference.state_dict(), strict=True)
    swapped = copy.deepcopy(reference)
    assert fuse_diff_attention(swapped, backend=backend) == 2
    for model in (built, swapped):
        model.to(dtype)
        layers = [m for m in model.modules() if isinstance(m, DiffAttention)]
        assert len(layers) == 2 and all(type(m) is FusedDiffAttention for m in layers)
        for layer in layers:
            layer.backend = backend
    assert [b.attn.lambda_init for b in built.blocks] == \
        [b.attn.lambda_init for b in reference.blocks]

    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2),
                         dtype=torch.float64)
    ref = _forward_backward(reference, images)
    for model in (built, swapped):
        _assert_same(_forward_backward(model, images.to(dtype)), ref, dtype)
        assert {b.attn.last_backend for b in model.blocks} == {backend}


def test_fuse_diff_attention_counts_and_refuses_foreign_subclasses():
    model = _tiny_vit("diff")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert fuse_diff_attention(model) == 2
    with pytest.warns(UserWarning, match="swapped nothing: .* not fused already \\(2 are"):
        assert fuse_diff_attention(model) == 0  # already fused
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.warns(UserWarning, match="swapped nothing: Linear holds no timm DiffAttention"):
        assert fuse_diff_attention(torch.nn.Linear(2, 2)) == 0

    class Custom(DiffAttention):
        pass

    holder = torch.nn.Sequential(DiffAttention(32, num_heads=2), Custom(32, num_heads=2))
    with pytest.raises(TypeError, match="layer '1' is a .*Custom.*subclass"):
        fuse_diff_attention(holder)
    assert type(holder[0]) is DiffAttention  # nothing was changed
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fuse_diff_attention("vit")
    with pytest.raises(ValueError, match="backend"):
        fuse_diff_attention(model, backend="cuda")


@pytest.mark.parametrize("case", ["attn_mask", "dropout"])
def test_unsupported_calls_run_timm_forward_visibly(case, monkeypatch):
    monkeypatch.setattr("diffattn.backend._warned", set())
    kwargs = {"attn_drop": 0.3} if case == "dropout" else {}
    fused, reference = _timm_pair(torch.float64, "torch", **kwargs)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    forward_kwargs = {}
    if case == "attn_mask":
        keep = torch.rand(6, 6, generator=torch.Generator().manual_seed(3)) > 0.3
        forward_kwargs["attn_mask"] = keep.fill_diagonal_(True)  # SDPA's bool mask: True = attend
    else:
        fused.train(), reference.train()
    with pytest.warns(BackendFallbackWarning, match="runs timm's own DiffAttention forward"):
        torch.manual_seed(5)
        out = fused(x, **forward_kwargs)
    assert fused.last_backend == "timm"
    torch.manual_seed(5)
    torch.testing.assert_close(out, reference(x, **forward_kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process and reason
        fused(x, **forward_kwargs)
    if case == "dropout":
        fused.eval()
        fused(x)
        assert fused.last_backend == "torch"


# ------------------------------------------------------- plain timm ViTs through replace_attention
import diffattn  # noqa: E402
from diffattn.self_attention import DiffSelfAttention, DiffSelfAttentionV2  # noqa: E402


def _plain_vit_tiny(seed=0):
    """timm's plain ViT-Tiny (12 blocks of timm's Attention, fused qkv, 3 heads), small images."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              num_classes=5)
    return _randomise(model).eval()


def test_plain_vit_tiny_converts_to_v2_computing_what_it_computed():
    plain = _plain_vit_tiny()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = plain(images)
    converted = copy.deepcopy(plain)
    assert diffattn.replace_attention(converted, variant="v2", backend="torch") == 12
    assert all(type(block.attn) is DiffSelfAttentionV2 for block in converted.blocks)
    with torch.no_grad():
        got = converted(images)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4
    layer = converted.blocks[0].attn
    assert (layer.num_heads, layer.head_dim, layer.last_backend) == (3, 64, "torch")
    assert torch.equal(layer.k_proj.weight, plain.blocks[0].attn.qkv.weight[192:384])


def test_plain_vit_tiny_converts_to_v1_as_a_warm_start_that_trains():
    plain = _plain_vit_tiny()
    converted = copy.deepcopy(plain).train()
    assert diffattn.replace_attention(converted, variant="v1", backend="torch") == 12
    layer = converted.blocks[5].attn
    assert type(layer) is DiffSelfAttention
    # timm's DiffAttention head layout: 3 differential heads, maps of width 32, values of 64.
    assert (layer.num_heads, layer.head_dim) == (6, 32)
    assert layer.lambda_init == pytest.approx(diffattn.lambda_init_for_depth(5))
    qkv = plain.blocks[5].attn.qkv
    assert torch.equal(layer.in_proj_weight, qkv.weight) and torch.equal(layer.in_proj_bias, qkv.bias)
    out = converted(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert torch.isfinite(out).all() and layer.lambda_vectors.grad.abs().sum() > 0


def test_plain_vit_with_masks_and_nothing_to_replace():
    plain = _plain_vit_tiny()
    attention = plain.blocks[0].attn
    converted = DiffSelfAttentionV2.from_qkv_attention(attention, backend="torch").eval()
    x = torch.randn(2, 7, 192)
    mask = torch.rand(7, 7) > 0.3
    mask.fill_diagonal_(True)
    for attn_mask in (mask, mask[None, None].expand(2, 1, 7, 7),
                      torch.zeros(2, 3, 7, 7).masked_fill(~mask, float("-inf"))):
        with torch.no_grad():
            expected, got = attention(x, attn_mask=attn_mask), converted(x, attn_mask=attn_mask)
        assert ((got - expected).norm() / expected.norm()).item() < 1e-4
    with pytest.warns(UserWarning, match="fuse_diff_attention swapped nothing: .* 12 plain "
                                         "attention layers .*diffattn.replace_attention"):
        assert fuse_diff_attention(plain) == 0
    diffattn.replace_attention(plain, variant="v2", backend="torch")
    with pytest.warns(UserWarning, match="replaced nothing: .* already holds 12 differential"):
        assert diffattn.replace_attention(plain) == 0
    with pytest.warns(UserWarning, match="replaced nothing: .* 2 timm DiffAttention layers"):
        assert diffattn.replace_attention(_tiny_vit("diff")) == 0


def test_backend_chosen_when_timm_builds_the_layers():
    layer_class = FusedDiffAttention.with_backend("torch")
    assert FusedDiffAttention.with_backend("torch") is layer_class
    assert issubclass(layer_class, DiffAttention)
    model = _tiny_vit(layer_class)
    assert {block.attn.backend for block in model.blocks} == {"torch"}
    model(torch.randn(1, 3, 16, 16))
    assert {block.attn.last_backend for block in model.blocks} == {"torch"}
    assert _tiny_vit(FusedDiffAttention).blocks[0].attn.backend == "auto"
    with pytest.raises(ValueError, match="backend"):
        FusedDiffAttention.with_backend("cuda")
