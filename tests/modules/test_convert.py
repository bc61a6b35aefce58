"""diffattn.replace_attention: torch's TransformerEncoderLayer / TransformerEncoder and a plain
CLIP turned differential, against a float64 reference written from the original layer's
weights, in training and in eval mode (torch's inference fast paths must not run plain
attention on the converted layers). variant="v2" (DiffMultiheadAttentionV2.from_plain) starts
equal to the plain model; plain_to_v2_state_dict maps one layer's weights and names what does
not fit."""
import copy

import pytest
import torch
from torch import nn

import diffattn
from diffattn.self_attention import DiffSelfAttention, DiffSelfAttentionV2
from diffattn import (DiffMultiheadAttention, DiffMultiheadAttentionV2, diff_attention_ref,
                      lambda_init_for_depth)
from diffattn.models import create_model
from helpers import assert_close_rel

E, HEADS, FF = 32, 4, 48


def _encoder_layer(batch_first=True, **kwargs):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, dim_feedforward=FF, dropout=0.0,
                                       batch_first=batch_first, dtype=torch.float64, **kwargs)
    with torch.no_grad():  # non-trivial biases and norms
        for name, param in layer.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return layer


def _reference_self_attention(plain_state: dict, diff_state: dict, lambda_init: float,
                              x: torch.Tensor) -> torch.Tensor:
    """Differential self-attention written out from nn.MultiheadAttention's packed weights
    and the new layer's lambda vectors and norm weight; x (B, N, E), float64."""
    d = E // HEADS
    q, k, v = (x @ plain_state["in_proj_weight"].T + plain_state["in_proj_bias"]).split(E, -1)
    q, k = q.unflatten(-1, (HEADS, d)), k.unflatten(-1, (HEADS, d))
    v = v.unflatten(-1, (HEADS // 2, 2 * d))  # plain value heads 2h, 2h+1 side by side
    lam = (torch.exp((diff_state["lambda_q1"] * diff_state["lambda_k1"]).sum())
           - torch.exp((diff_state["lambda_q2"] * diff_state["lambda_k2"]).sum()) + lambda_init)
    out = diff_attention_ref(q, k, v, lam.double(), norm_weight=diff_state["diff_norm.weight"],
                             out_scale=1 - lambda_init)
    return out.flatten(2) @ plain_state["out_proj.weight"].T + plain_state["out_proj.bias"]


def _reference_encoder_layer(layer, plain_state, x):
    """Post-norm TransformerEncoderLayer (torch's default) with the reference attention."""
    diff_state = layer.self_attn.state_dict()
    attn = _reference_self_attention(plain_state, diff_state, layer.self_attn.lambda_init, x)
    x = layer.norm1(x + attn)
    return layer.norm2(x + layer.linear2(torch.relu(layer.linear1(x))))


@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_layer_is_converted_with_its_weights(batch_first):
    layer = _encoder_layer(batch_first)
    plain_state = {k: v.clone() for k, v in layer.self_attn.state_dict().items()}
    assert diffattn.replace_attention(layer, backend="torch") == 1
    attn = layer.self_attn
    assert type(attn) is DiffMultiheadAttention
    assert (attn.embed_dim, attn.num_heads, attn.batch_first, attn.dropout) == \
        (E, HEADS, batch_first, 0.0)
    assert attn.lambda_init == lambda_init_for_depth(0)
    state = attn.state_dict()
    assert all(t.dtype == torch.float64 for k, t in state.items() if "lambda" not in k)
    torch.testing.assert_close(torch.cat([state[f"{n}_proj.weight"] for n in "qkv"]),
                               plain_state["in_proj_weight"], rtol=0, atol=0)
    torch.testing.assert_close(state["out_proj.weight"], plain_state["out_proj.weight"],
                               rtol=0, atol=0)
    assert torch.equal(state["diff_norm.weight"], torch.ones(2 * E // HEADS, dtype=torch.float64))
    assert 0.02 < torch.cat([state[f"lambda_{n}"] for n in ("q1", "k1", "q2", "k2")]).std() < 0.3

    x = torch.randn(2, 6, E, dtype=torch.float64, requires_grad=True)
    x_layer = x if batch_first else x.transpose(0, 1)
    out = layer(x_layer)
    out = out if batch_first else out.transpose(0, 1)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = _reference_encoder_layer(layer, plain_state, ref_x)
    assert_close_rel("output", out, ref, torch.float64)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    assert_close_rel("grad x", x.grad, ref_x.grad, torch.float64)
    for name in ("lambda_vectors", "diff_norm.weight", "out_proj.weight"):
        param = dict(attn.named_parameters())[name]
        assert param.grad is not None and param.grad.abs().sum() > 0, name

    layer.eval()  # torch's fused inference path would compute plain attention here
    with torch.no_grad():
        torch.testing.assert_close(layer(x_layer), out.detach() if batch_first
                                   else out.detach().transpose(0, 1))


def test_encoder_stack_depth_schedule_and_padding_in_eval():
    encoder = nn.TransformerEncoder(_encoder_layer(), num_layers=3, enable_nested_tensor=True)
    assert encoder.use_nested_tensor
    assert diffattn.replace_attention(encoder, backend="torch") == 3
    assert [layer.self_attn.lambda_init for layer in encoder.layers] == \
        [lambda_init_for_depth(i) for i in range(3)]
    x = torch.randn(2, 7, E, dtype=torch.float64)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 4:] = True
    train_out = encoder(x, src_key_padding_mask=padding)
    encoder.eval()
    with torch.no_grad():
        eval_out = encoder(x, src_key_padding_mask=padding)
    torch.testing.assert_close(eval_out, train_out.detach())
    assert torch.isfinite(eval_out).all()


def test_constant_lambda_init_backend_and_modes():
    model = nn.Sequential(nn.MultiheadAttention(E, HEADS, batch_first=True, bias=False),
                          nn.MultiheadAttention(E, 2, dropout=0.1).eval())
    assert diffattn.replace_attention(model, lambda_init=0.5, backend="torch") == 2
    first, second = model
    assert (first.lambda_init, second.lambda_init) == (0.5, 0.5)
    assert first.backend == second.backend == "torch"
    assert not any(key.endswith("bias") for key in first.state_dict())
    assert first.training and not second.training
    assert (second.dropout, second.batch_first) == (0.1, False)
    with pytest.warns(UserWarning, match="replaced nothing: .* already holds 2 differential"):
        assert diffattn.replace_attention(model) == 0  # nothing left to replace


def test_plain_clip_becomes_differential():
    model = create_model("CLIP-Tiny", backend="torch")
    assert diffattn.replace_attention(model, backend="torch") == 4
    assert all(isinstance(layer, DiffMultiheadAttention) for layer in model.attention_layers())
    assert [layer.lambda_init for layer in model.attention_layers()] == \
        [lambda_init_for_depth(i) for i in range(4)]  # vision tower first, then text
    images = torch.randn(2, 3, 32, 32)
    features = model.encode_image(images) + model.encode_text(model.tokenize(["a", "b c"]))
    assert torch.isfinite(features).all()


@pytest.mark.parametrize("make, message", [
    (lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(33, 3, batch_first=True), 2,
                                   enable_nested_tensor=False),
     r"layer 'layers.0.self_attn' has num_heads=3"),
    (lambda: nn.Sequential(nn.MultiheadAttention(E, 4, add_bias_kv=True)),
     r"layer '0' uses add_bias_kv"),
])
def test_unconvertible_layers_are_named_and_nothing_changes(make, message):
    model = make()
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match=message):
        diffattn.replace_attention(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in before.modules()]


def test_bad_arguments():
    with pytest.raises(TypeError, match="itself an nn.MultiheadAttention"):
        diffattn.replace_attention(nn.MultiheadAttention(E, 4))
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        diffattn.replace_attention("model")
    with pytest.raises(TypeError, match="lambda_init must be \"depth\" or a float"):
        diffattn.replace_attention(nn.Sequential(), lambda_init="deep")
    with pytest.raises(ValueError, match=r"lambda_init must lie in \(0, 1\).*no gradient"):
        diffattn.replace_attention(nn.Sequential(), lambda_init=1.0)
    with pytest.raises(ValueError, match="backend"):
        diffattn.replace_attention(nn.Sequential(), backend="gpu")


def test_cross_attention_with_kdim_vdim_keeps_its_separate_projections():
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(E, HEADS, kdim=16, vdim=12, batch_first=True))
    plain = {k: v.clone() for k, v in model[0].state_dict().items()}
    assert diffattn.replace_attention(model, backend="torch") == 1
    attn = model[0]
    assert (attn.kdim, attn.vdim) == (16, 12)
    state = attn.state_dict()
    for name in "qkv":
        assert torch.equal(state[f"{name}_proj.weight"], plain[f"{name}_proj_weight"])
    query, key, value = torch.randn(2, 5, E), torch.randn(2, 7, 16), torch.randn(2, 7, 12)
    out, _ = attn(query, key, value)
    assert out.shape == (2, 5, E) and torch.isfinite(out).all()


# ------------------------------------------------------------------ variant="v2"
def _v2_reference(mha: nn.MultiheadAttention, x: torch.Tensor, lam: float) -> torch.Tensor:
    """What the V2 layer converted from ``mha`` computes, float64, written from the plain
    weights: its first maps are the plain heads, its second maps have zero queries and so
    attend uniformly, adding lam times each head's mean value row (x (B, N, E), no mask)."""
    plain = mha(x, x, x, need_weights=False)[0]
    width = mha.embed_dim
    v = x @ mha.in_proj_weight[2 * width:].T + mha.in_proj_bias[2 * width:]   # (B, N, E)
    return plain - lam * v.mean(1, keepdim=True) @ mha.out_proj.weight.T


def test_v2_layer_matches_the_plain_weights_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(36, 3, batch_first=True, dtype=torch.float64))
    mha = copy.deepcopy(model[0])
    assert diffattn.replace_attention(model, variant="v2", initial_lambda=0.3,
                                      backend="torch") == 1
    layer = model[0]
    assert type(layer) is DiffMultiheadAttentionV2
    assert (layer.num_heads, layer.head_dim, layer.batch_first) == (3, 12, True)
    x = torch.randn(2, 6, 36, dtype=torch.float64)
    with torch.no_grad():
        assert_close_rel("output", layer(x)[0], _v2_reference(mha, x, 0.3), torch.float64)
        lam = torch.sigmoid(layer.lambda_proj(x))
    torch.testing.assert_close(lam, torch.full_like(lam, 0.3))


def test_v2_encoder_stack_starts_equal_to_the_plain_one_in_train_and_eval():
    encoder = nn.TransformerEncoder(_encoder_layer(), num_layers=3, enable_nested_tensor=True)
    plain = copy.deepcopy(encoder)
    plain.use_nested_tensor = False  # torch's fast path, without the prototype nested tensors
    assert diffattn.replace_attention(encoder, variant="v2", backend="torch") == 3
    assert all(type(layer.self_attn) is DiffMultiheadAttentionV2 for layer in encoder.layers)
    x = torch.randn(2, 7, E, dtype=torch.float64)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 4:] = True
    for mode in ("train", "eval"):
        encoder.train(mode == "train"), plain.train(mode == "train")
        with torch.no_grad():
            want = plain(x, src_key_padding_mask=padding)
            got = encoder(x, src_key_padding_mask=padding)
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < 1e-4, (mode, rel)


def test_plain_clip_becomes_v2_with_the_same_embeddings():
    torch.manual_seed(0)
    model = create_model("CLIP-Tiny", backend="torch", dtype=torch.float64).eval()
    images, tokens = torch.randn(2, 3, 32, 32, dtype=torch.float64), model.tokenize(["a", "b c"])
    with torch.no_grad():
        want = model.encode_image(images), model.encode_text(tokens)
        assert diffattn.replace_attention(model, variant="v2", backend="torch") == 4
        got = model.encode_image(images), model.encode_text(tokens)
    assert all(isinstance(layer, DiffMultiheadAttentionV2) for layer in model.attention_layers())
    for a, b in zip(got, want):
        assert ((a - b).norm() / b.norm()).item() < 1e-4


def test_v2_variant_arguments_and_unconvertible_layers():
    odd = nn.Sequential(nn.MultiheadAttention(33, 3))  # any head count for V2
    assert diffattn.replace_attention(odd, variant="v2") == 1
    with pytest.raises(ValueError, match="variant must be one of"):
        diffattn.replace_attention(nn.Sequential(), variant="v3")
    with pytest.raises(ValueError, match="lambda_init is an argument of variant=\"v1\""):
        diffattn.replace_attention(nn.Sequential(), variant="v2", lambda_init=0.5)
    with pytest.raises(ValueError, match="initial_lambda is an argument of variant=\"v2\""):
        diffattn.replace_attention(nn.Sequential(), initial_lambda=0.1)
    with pytest.raises(ValueError, match=r"initial_lambda must be in \(0, 1\)"):
        diffattn.replace_attention(nn.Sequential(), variant="v2", initial_lambda=1.0)
    model = nn.Sequential(nn.MultiheadAttention(E, HEADS),
                          nn.MultiheadAttention(E, HEADS, bias=False))
    with pytest.raises(ValueError, match="layer '1': V2 conversion needs an "
                                         "nn.MultiheadAttention with biases"):
        diffattn.replace_attention(model, variant="v2")
    assert all(type(layer) is nn.MultiheadAttention for layer in model)  # nothing changed
    with pytest.raises(ValueError, match="layer '0': V2 conversion needs .* kdim = vdim"):
        diffattn.replace_attention(nn.Sequential(nn.MultiheadAttention(E, 2, kdim=16)),
                                   variant="v2")


def _plain_state(embed_dim=E, heads=HEADS):
    torch.manual_seed(0)
    return nn.MultiheadAttention(embed_dim, heads).state_dict()


def test_plain_to_v2_state_dict_shapes_and_values():
    state = _plain_state()
    v2 = diffattn.plain_to_v2_state_dict(state, HEADS, initial_lambda=0.25)
    d = E // HEADS
    assert {k: tuple(v.shape) for k, v in v2.items()} == {
        "q_proj.weight": (2 * E, E), "q_proj.bias": (2 * E,),
        "lambda_proj.weight": (HEADS, E), "lambda_proj.bias": (HEADS,),
        "k_proj.weight": (E, E), "k_proj.bias": (E,), "v_proj.weight": (E, E),
        "v_proj.bias": (E,), "out_proj.weight": (E, E), "out_proj.bias": (E,)}
    q = v2["q_proj.weight"].view(HEADS, 2, d, E)
    assert torch.equal(q[:, 0].reshape(E, E), state["in_proj_weight"][:E])
    assert not q[:, 1].any() and not v2["lambda_proj.weight"].any()
    torch.testing.assert_close(torch.sigmoid(v2["lambda_proj.bias"]), torch.full((HEADS,), 0.25))
    assert torch.equal(v2["v_proj.bias"], state["in_proj_bias"][2 * E:])
    assert v2["k_proj.weight"].data_ptr() != state["in_proj_weight"].data_ptr()  # copies
    layer = DiffMultiheadAttentionV2(E, HEADS)
    layer.load_state_dict(v2, strict=True)


@pytest.mark.parametrize("change, error, match", [
    (lambda s: s.pop("in_proj_bias"), ValueError, r"missing \['in_proj_bias'\]"),
    (lambda s: s.update(bias_k=torch.zeros(1, 1, E)), ValueError, r"unexpected \['bias_k'\]"),
    (lambda s: s.update(in_proj_weight=torch.zeros(3 * E, E + 1)), ValueError,
     r"in_proj_weight: expected \(99, 33\), got \(96, 33\)"),
    (lambda s: s.update({"out_proj.bias": [0.0] * E}), TypeError,
     r"state_dict\['out_proj.bias'\] must be a tensor"),
])
def test_plain_to_v2_state_dict_names_what_does_not_fit(change, error, match):
    state = dict(_plain_state())
    change(state)
    with pytest.raises(error, match=match):
        diffattn.plain_to_v2_state_dict(state, HEADS)


def test_plain_to_v2_state_dict_arguments():
    state = _plain_state()
    with pytest.raises(ValueError, match=r"num_heads must be a positive divisor of embed_dim "
                                         r"\(32\), got 5"):
        diffattn.plain_to_v2_state_dict(state, 5)
    with pytest.raises(TypeError, match="num_heads must be an int"):
        diffattn.plain_to_v2_state_dict(state, 4.0)
    with pytest.raises(TypeError, match="initial_lambda must be a float"):
        diffattn.plain_to_v2_state_dict(state, HEADS, initial_lambda="small")
    with pytest.raises(ValueError, match=r"initial_lambda must be in \(0, 1\)"):
        diffattn.plain_to_v2_state_dict(state, HEADS, initial_lambda=0.0)


# ------------------------------------------------ fused-qkv self-attention (timm's Attention form)
class _QkvAttention(nn.Module):
    """timm's plain Attention, written out: qkv Linear(E, 3E), SDPA, proj."""

    def __init__(self, dim, num_heads, qk_norm=False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = torch.nn.functional.scaled_dot_product_attention(
            self.q_norm(q), self.k_norm(k), v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj_drop(self.proj(self.norm(x.transpose(1, 2).reshape(B, N, C))))


class _QkvBlock(nn.Module):
    def __init__(self, dim, num_heads, **kwargs):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _QkvAttention(dim, num_heads, **kwargs)

    def forward(self, x):
        return x + self.attn(self.norm1(x))


def test_fused_qkv_attention_becomes_v2_computing_what_it_computed():
    torch.manual_seed(0)
    model = nn.Sequential(_QkvBlock(48, 3), _QkvBlock(48, 3)).double().eval()
    x = torch.randn(2, 9, 48, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        causal = model[0].attn(x, is_causal=True)
    assert diffattn.replace_attention(model, variant="v2", backend="torch") == 2
    assert all(isinstance(block.attn, DiffSelfAttentionV2) for block in model)
    with torch.no_grad():
        assert ((model(x) - expected).norm() / expected.norm()).item() < 1e-4
        got = model[0].attn(x, is_causal=True)
        assert ((got - causal).norm() / causal.norm()).item() < 1e-4


def test_fused_qkv_attention_becomes_v1_in_timms_diff_head_layout():
    torch.manual_seed(0)
    model = nn.Sequential(_QkvBlock(48, 3))
    plain_qkv = model[0].attn.qkv.weight.detach().clone()
    assert diffattn.replace_attention(model, lambda_init=0.5, backend="torch") == 1
    layer = model[0].attn
    assert isinstance(layer, DiffSelfAttention) and (layer.num_heads, layer.head_dim) == (6, 8)
    assert layer.lambda_init == 0.5 and torch.equal(layer.in_proj_weight, plain_qkv)
    assert model(torch.randn(2, 5, 48)).shape == (2, 5, 48)


def test_fused_qkv_attention_that_cannot_convert_is_named():
    with pytest.raises(ValueError, match="layer '0.attn' has a q_norm"):
        diffattn.replace_attention(nn.Sequential(_QkvBlock(48, 3, qk_norm=True)))
    with pytest.raises(ValueError, match="layer '0.attn' has heads of odd width 3"):
        diffattn.replace_attention(nn.Sequential(_QkvBlock(12, 4)), variant="v1")
    assert diffattn.replace_attention(nn.Sequential(_QkvBlock(12, 4)), variant="v2") == 1


def test_nothing_to_replace_warns():
    with pytest.warns(UserWarning, match="replace_attention replaced nothing: Sequential holds no "
                                         "nn.MultiheadAttention"):
        assert diffattn.replace_attention(nn.Sequential(nn.Linear(4, 4))) == 0
