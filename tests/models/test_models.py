"""Tests for diffattn.models: configs, key layouts, agreement with the reference forwards,
checkpoint loading of each supported format, and input checks."""
import argparse
import dataclasses
import json
import os
import pathlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from diffattn import (DiffMultiheadAttention, DiffMultiheadAttentionV2, HeadRMSNorm,
                      lambda_init_for_depth)
from diffattn.models import (CLIP, CLIPConfig, TextConfig, UnsafeCheckpointError, VisionConfig,
                             create_model, get_config, list_models, save_pretrained)
from diffattn.models import factory
from diffattn.models.checkpoint import CheckpointError, save_checkpoint

import _clip_reference as ref

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["torch"] + (["triton"] if INTERPRET else [])


def _shared_data_dir() -> Path:
    if "DIFFATTN_SHARED" in os.environ:
        return Path(os.environ["DIFFATTN_SHARED"]) / "data"
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def _tiny_config(layout: str, attention: str) -> CLIPConfig:
    """A small config of ``layout`` with the published models' switches for that layout."""
    diffclip = layout == "diffclip"
    return CLIPConfig(
        embed_dim=24, layout=layout, attention=attention,
        preprocess="squash" if diffclip else "shortest",
        vision=VisionConfig(width=64, layers=2, heads=4, patch_size=4, image_size=16,
                            patch_bias=diffclip, ln_pre=not diffclip, act="gelu"),
        text=TextConfig(width=32, layers=2, heads=2, context_length=12, vocab_size=100,
                        act="quick_gelu" if diffclip else "gelu", ln_fp32=diffclip),
    )


@torch.no_grad()
def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every tensor random: norm weights 1 + N(0, 0.1), lambda vectors N(0, 0.2), the rest
    N(0, 0.05) (embeddings N(0, 0.1))."""
    generator = torch.Generator().manual_seed(seed)

    def fill(tensor, mean, std):
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
        tensor.copy_(mean + std * noise)

    norm_weights = {id(m.weight) for m in model.modules() if isinstance(m, (nn.LayerNorm, HeadRMSNorm))}
    for name, param in model.named_parameters():
        if id(param) in norm_weights:
            fill(param, 1.0, 0.1)
        elif ".lambda_" in name:
            fill(param, 0.0, 0.2)
        elif "embed" in name or "cls_token" in name:
            fill(param, 0.0, 0.1)
        else:
            fill(param, 0.0, 0.05)
    return model


def _inputs(config: CLIPConfig, batch: int = 2, length=None, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    size = config.vision.image_size
    images = torch.randn(batch, 3, size, size, generator=generator, dtype=torch.float64)
    length = config.text.context_length if length is None else length
    tokens = torch.randint(0, config.text.vocab_size, (batch, length), generator=generator)
    return images, tokens


def _assert_rel_close(actual, expected, rtol=1e-4):
    rel = ((actual - expected).norm() / expected.norm()).item()
    assert rel < rtol, f"relative error {rel:.3g}"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def _state_shapes(model) -> dict:
    return {key: list(value.shape) for key, value in model.state_dict().items()}


# ------------------------------------------------------------------------ configs and layouts
@pytest.mark.parametrize("name, json_name", [
    ("DiffCLIP-ViT-B-16", "diffclip_vitb16_state_dict.json"),
    ("ViT-B-16", "open_clip_ViT-B-16_state_dict.json"),
    ("ViT-B-32", "open_clip_ViT-B-32_state_dict.json"),
])
def test_state_dict_matches_published_layout(name, json_name):
    path = _shared_data_dir() / json_name
    if not path.is_file():
        pytest.skip(f"{path} not available")
    expected = json.loads(path.read_text())
    model = create_model(name, device="meta")
    shapes = _state_shapes(model)
    assert sorted(set(shapes) - set(expected)) == []
    assert sorted(set(expected) - set(shapes)) == []
    assert shapes == expected
    if name == "DiffCLIP-ViT-B-16":
        assert sum(t.numel() for t in model.state_dict().values()) == 149_629_185


def test_bundled_configs():
    assert set(list_models()) >= {"DiffCLIP-ViT-B-16", "DiffCLIP-ViT-L-14", "ViT-B-16",
                                  "ViT-B-32", "DiffCLIP-Tiny", "CLIP-Tiny"}
    for name in list_models():
        config = get_config(name)
        assert CLIPConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    release = get_config("DiffCLIP-ViT-B-16")
    assert (release.layout, release.attention, release.lambda_init, release.preprocess) == \
        ("diffclip", "diff", 0.8, "squash")
    assert (release.vision.act, release.text.act, release.text.ln_fp32) == ("gelu", "quick_gelu", True)
    assert get_config("ViT-B-32").preprocess == "shortest"
    tiny, baseline = get_config("DiffCLIP-Tiny"), get_config("CLIP-Tiny")
    assert dataclasses.replace(tiny, attention="plain") == baseline


def test_large_config_shapes():
    shapes = _state_shapes(create_model("DiffCLIP-ViT-L-14", device="meta"))
    assert shapes["visual.pos_embed"] == [1, 257, 1024]
    assert shapes["visual.patch_embed.proj.weight"] == [1024, 3, 14, 14]
    assert shapes["visual.blocks.23.attn.diff_norm.weight"] == [128]
    assert shapes["image_projection"] == [1024, 768]
    assert shapes["text_projection"] == [768, 768]
    assert shapes["transformer.resblocks.11.attn.lambda_q1"] == [64]


def test_attention_override_turns_open_clip_layout_differential():
    model = create_model("ViT-B-16", attention="diff", device="meta")
    keys = set(model.state_dict())
    assert "visual.transformer.resblocks.0.attn.q_proj.weight" in keys
    assert "transformer.resblocks.11.attn.diff_norm.weight" in keys
    assert not any("in_proj" in key for key in keys)
    assert all(isinstance(layer, DiffMultiheadAttention) for layer in model.attention_layers())
    plain = create_model("DiffCLIP-Tiny", attention="plain")
    assert all(isinstance(layer, nn.MultiheadAttention) for layer in plain.attention_layers())
    with pytest.raises(ValueError, match="attention"):
        create_model("DiffCLIP-Tiny", attention="linear")


def test_unknown_model_name_lists_available():
    with pytest.raises(ValueError, match="unknown model name 'ViT-Q-99'.*DiffCLIP-ViT-B-16"):
        create_model("ViT-Q-99")
    with pytest.raises(ValueError, match="available"):
        get_config("nope")


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(colour="red"), "unknown config fields"),
    (lambda d: d["vision"].update(heads=3, width=63), "vision.heads must be even"),
    (lambda d: d["vision"].update(image_size=30), "multiple of vision.patch_size"),
    (lambda d: d.update(layout="timm"), "layout"),
    (lambda d: d["text"].update(act="relu"), "text.act"),
    (lambda d: d["text"].pop("width"), "missing the required fields \\['width'\\]"),
    (lambda d: d["text"].update(ln_eps=float("inf")), "text.ln_eps must be finite, got inf"),
    (lambda d: d["vision"].update(ln_eps=float("nan")), "vision.ln_eps must be finite"),
    (lambda d: d["vision"].update(ln_eps=-1e-5), "vision.ln_eps must be positive"),
    (lambda d: d["vision"].update(ln_eps="1e-5"), "vision.ln_eps must be a number"),
    (lambda d: d["text"].update(mlp_ratio=float("inf")), "text.mlp_ratio must be finite"),
    (lambda d: d.update(lambda_init=float("nan")), "lambda_init must be finite, got nan"),
    (lambda d: d.update(lambda_init=float("-inf")), "lambda_init must be finite"),
    (lambda d: d.update(lambda_init=1.0), "lambda_init must lie in \\(0, 1\\).*no gradient"),
    (lambda d: d.update(lambda_init=0.0), "lambda_init must lie in \\(0, 1\\)"),
])
def test_config_validation(change, message):
    data = get_config("DiffCLIP-Tiny").to_dict()
    change(data)
    with pytest.raises(ValueError, match=message):
        CLIPConfig.from_dict(data)


def test_lambda_schedule():
    constant = create_model("DiffCLIP-Tiny", backend="torch")
    assert [layer.lambda_init for layer in constant.attention_layers()] == [0.8] * 4
    depth = CLIP(dataclasses.replace(get_config("DiffCLIP-Tiny"), lambda_schedule="depth"))
    expected = [lambda_init_for_depth(i) for i in range(2)] * 2
    assert [layer.lambda_init for layer in depth.attention_layers()] == pytest.approx(expected)


def test_model_conveniences():
    model = create_model("DiffCLIP-Tiny", backend="torch")
    assert model.preprocess.image_size == 32 and model.preprocess.resize_mode == "squash"
    assert create_model("ViT-B-32", device="meta").preprocess.resize_mode == "shortest"
    tokens = model.tokenize(["a photo of a cat"])
    assert tokens.shape == (1, 77) and tokens[0, 0] == 49406
    assert len(model.attention_layers("vision")) == 2 and len(model.attention_layers("text")) == 2
    model.set_backend("torch")
    assert {layer.backend for layer in model.attention_layers()} == {"torch"}
    with pytest.raises(ValueError, match="backend"):
        model.set_backend("cuda")


# ------------------------------------------------------------------------ numerics
@pytest.mark.parametrize("backend", BACKENDS)
def test_diffclip_layout_matches_reference(backend):
    config = _tiny_config("diffclip", "diff")
    model = _randomise(CLIP(config, backend=backend, dtype=torch.float64)).eval()
    sd = model.state_dict()
    images, tokens = _inputs(config)
    with torch.no_grad():
        _assert_rel_close(model.encode_image(images),
                          ref.diffclip_encode_image(sd, images, num_heads=4))
        _assert_rel_close(model.encode_text(tokens),
                          ref.diffclip_encode_text(sd, tokens, num_heads=2))
        short = tokens[:, :5]
        _assert_rel_close(model.encode_text(short), ref.diffclip_encode_text(sd, short, num_heads=2))


@pytest.mark.parametrize("attention, backend", [("plain", "torch")] + [("diff", b) for b in BACKENDS])
def test_open_clip_layout_matches_reference(attention, backend):
    config = _tiny_config("open_clip", attention)
    model = _randomise(CLIP(config, backend=backend, dtype=torch.float64)).eval()
    sd = model.state_dict()
    images, tokens = _inputs(config)
    with torch.no_grad():
        _assert_rel_close(model.encode_image(images),
                          ref.open_clip_encode_image(sd, images, 4, attention=attention))
        _assert_rel_close(model.encode_text(tokens),
                          ref.open_clip_encode_text(sd, tokens, 2, attention=attention))
    model.train()  # the training path of nn.MultiheadAttention (no fused fast path)
    _assert_rel_close(model.encode_text(tokens).detach(),
                      ref.open_clip_encode_text(sd, tokens, 2, attention=attention))


def test_forward_returns_features_and_scale():
    model = create_model("DiffCLIP-Tiny", backend="torch")
    images = torch.randn(3, 3, 32, 32)
    tokens = model.tokenize(["a cat", "a dog"])
    image_features, text_features, scale = model(images, tokens)
    assert image_features.shape == (3, 64) and text_features.shape == (2, 64)
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    normed = model.encode_image(images, normalize=True)
    torch.testing.assert_close(normed.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(normed, torch.nn.functional.normalize(image_features, dim=-1))


def _loss_and_grads(model, images, tokens):
    image_features, text_features, scale = model(images, tokens, normalize=True)
    logits = scale * image_features @ text_features.T
    target = torch.arange(len(images))
    loss = (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2
    model.zero_grad()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_tiny_backward_and_grad_checkpointing():
    torch.manual_seed(0)
    model = create_model("DiffCLIP-Tiny", backend="torch")
    images = torch.randn(2, 3, 32, 32)
    tokens = model.tokenize(["a cat", "two dogs"])
    loss, grads = _loss_and_grads(model, images, tokens)
    unused = {"token_embedding.weight"}  # only the ids present get gradients; still a tensor
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert all(g.abs().sum() > 0 for name, g in grads.items() if name not in unused)
    assert (grads["visual.blocks.0.attn.lambda_vectors"].abs().sum(1) > 0).all()
    model.set_grad_checkpointing(True)
    assert model.visual.grad_checkpointing and model.transformer.grad_checkpointing
    loss_ckpt, grads_ckpt = _loss_and_grads(model, images, tokens)
    torch.testing.assert_close(loss_ckpt, loss)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], msg=name)


@pytest.mark.skipif(not INTERPRET, reason="the fused kernels run on CPU only with TRITON_INTERPRET=1")
def test_tiny_triton_backend_matches_torch_forward_backward():
    torch.manual_seed(0)
    model = create_model("DiffCLIP-Tiny", backend="torch")
    images = torch.randn(2, 3, 32, 32)
    tokens = model.tokenize(["a cat", "two dogs"])
    loss, grads = _loss_and_grads(model, images, tokens)
    model.set_backend("triton")
    loss_triton, grads_triton = _loss_and_grads(model, images, tokens)
    assert {layer.last_backend for layer in model.attention_layers()} == {"triton"}
    torch.testing.assert_close(loss_triton, loss, rtol=1e-4, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads_triton[name], grads[name], rtol=1e-3, atol=1e-5, msg=name)


# ------------------------------------------------------------------------ input checks
def test_bad_images_are_named_errors():
    model = create_model("DiffCLIP-Tiny", backend="torch")
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, 32, 32\).*\(2, 3, 224, 224\)"):
        model.encode_image(torch.randn(2, 3, 224, 224))
    with pytest.raises(ValueError, match="images"):
        model.encode_image(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="images must be a float tensor"):
        model.encode_image(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="images"):
        model.encode_image([[0.0]])


def test_bad_tokens_are_named_errors():
    model = create_model("DiffCLIP-Tiny", backend="torch")
    with pytest.raises(ValueError, match=r"tokens must hold ids in \[0, 49408\)"):
        model.encode_text(torch.tensor([[49406, 49408, 0]]))
    with pytest.raises(ValueError, match="tokens must hold ids"):
        model.encode_text(torch.tensor([[-1, 5]]))
    with pytest.raises(ValueError, match="tokens must have shape"):
        model.encode_text(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens must have shape"):
        model.encode_text(torch.zeros(77, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens must be an integer tensor"):
        model.encode_text(torch.zeros(1, 77))


# ------------------------------------------------------------------------ checkpoints
def _release_checkpoint(state_dict: dict) -> dict:
    """A training checkpoint shaped like the DiffCLIP release's checkpoint_best.pt."""
    return {
        "epoch": 40,
        "state_dict": OrderedDict((f"module.{key}", value) for key, value in state_dict.items()),
        "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "weight_decay": 0.5, "params": [0]}]},
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 3},
        "best_acc1": np.float64(14.4),
        "args": argparse.Namespace(model="DiffCLIP_VITB16", output_dir=pathlib.Path("/runs/x"),
                                   lr=5e-4, epochs=40),
    }


def _embeddings(model, config_size=32):
    torch.manual_seed(3)
    images = torch.randn(2, 3, config_size, config_size)
    tokens = model.tokenize(["a cat", "a photo of a dog"])
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def test_release_checkpoint_loads_with_same_embeddings(tmp_path):
    source = _randomise(create_model("DiffCLIP-Tiny", backend="torch")).eval()
    path = tmp_path / "checkpoint_best.pt"
    torch.save(_release_checkpoint(source.state_dict()), path)
    loaded = create_model("DiffCLIP-Tiny", pretrained=path, backend="torch").eval()
    for got, expected in zip(_embeddings(loaded), _embeddings(source)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_release_checkpoint_with_the_real_architecture(tmp_path):
    # Stride-0 tensors keep the file tiny: each tensor is saved as its single value.
    shapes = {key: value.shape for key, value in create_model("DiffCLIP-ViT-B-16", device="meta").state_dict().items()}
    state_dict = {key: torch.full((), float(i) / 1000).expand(shape) for i, (key, shape) in enumerate(shapes.items())}
    path = tmp_path / "checkpoint_best.pt"
    torch.save(_release_checkpoint(state_dict), path)
    model = create_model("DiffCLIP-ViT-B-16", pretrained=path, backend="torch")
    loaded = model.state_dict()
    for key, value in state_dict.items():
        assert loaded[key].shape == value.shape
        assert loaded[key].reshape(-1)[0].item() == pytest.approx(value.reshape(-1)[0].item()), key


def test_open_clip_state_dict_loads_with_same_embeddings(tmp_path):
    config = _tiny_config("open_clip", "plain")
    source = _randomise(CLIP(config)).eval()
    path = tmp_path / "open_clip_model.pt"
    torch.save(source.state_dict(), path)
    loaded = create_model(config, pretrained=path).eval()
    images, tokens = _inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images.float()), source.encode_image(images.float()))
        torch.testing.assert_close(loaded.encode_text(tokens), source.encode_text(tokens))
    # Into a DiffCLIP-layout config: renamed (a warm start, see test_warm_start.py); a config
    # of other sizes is refused with the mismatches listed.
    with pytest.warns(UserWarning, match="is in the open_clip layout: .* carried"):
        create_model(_tiny_config("diffclip", "diff"), pretrained=path)
    with pytest.raises(ValueError, match="(?s)does not fit the model.*shape mismatches"):
        create_model("DiffCLIP-Tiny", pretrained=path)


def test_save_pretrained_round_trip(tmp_path):
    source = _randomise(create_model("DiffCLIP-Tiny", backend="torch")).eval()
    path = tmp_path / "tiny.safetensors"
    save_pretrained(source, path)
    by_file = create_model(None, pretrained=path, backend="torch").eval()
    by_name = create_model("DiffCLIP-Tiny", pretrained=path, backend="torch").eval()
    assert by_file.config == source.config
    for model in (by_file, by_name):
        for got, expected in zip(_embeddings(model), _embeddings(source)):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="another config:\n  attention: model has 'plain', checkpoint has 'diff'"):
        create_model("CLIP-Tiny", pretrained=path)
    torch.save({"model": source.state_dict(), "step": 10}, tmp_path / "train.pt")
    from_training = create_model("DiffCLIP-Tiny", pretrained=tmp_path / "train.pt", backend="torch").eval()
    torch.testing.assert_close(_embeddings(from_training)[0], _embeddings(source)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="holds no config"):
        create_model(None, pretrained=tmp_path / "train.pt")


@pytest.mark.parametrize("corrupt, listed", [
    (lambda sd: sd.pop("visual.blocks.1.attn.lambda_k2"), "missing keys:\n  visual.blocks.1.attn.lambda_k2"),
    (lambda sd: sd.update({"visual.head.weight": torch.zeros(3)}), "unexpected keys:\n  visual.head.weight"),
    (lambda sd: sd.update({"text_projection": torch.zeros(64, 32)}),
     r"shape mismatches:\n  text_projection: expected \(64, 64\), got \(64, 32\)"),
])
def test_mismatched_checkpoint_is_refused_with_a_list(tmp_path, corrupt, listed):
    state_dict = create_model("DiffCLIP-Tiny", backend="torch").state_dict()
    corrupt(state_dict)
    path = tmp_path / "checkpoint_best.pt"
    torch.save(_release_checkpoint(state_dict), path)
    with pytest.raises(ValueError, match=listed):
        create_model("DiffCLIP-Tiny", pretrained=path)


class _Payload:
    """Unpickling this would run ``os.system``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unsafe_pickle_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = _release_checkpoint(create_model("DiffCLIP-Tiny").state_dict())
    checkpoint["args"] = _Payload(marker)
    path = tmp_path / "checkpoint_best.pt"
    torch.save(checkpoint, path)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        create_model("DiffCLIP-Tiny", pretrained=path)
    assert not marker.exists()


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        create_model("DiffCLIP-Tiny", pretrained=tmp_path / "nope.pt")


# ------------------------------------------------------------------ model step and text length
@pytest.mark.parametrize("batch_first", [True, False])
def test_plain_attention_equals_nn_multihead_attention(batch_first):
    """The lean self-attention forward (one GEMM, SDPA on views) against nn.MultiheadAttention
    itself, forward and backward; other calls take nn.MultiheadAttention's own path."""
    from diffattn.models.attention import MultiheadAttention
    torch.manual_seed(0)
    plain = nn.MultiheadAttention(64, 4, batch_first=batch_first).double()
    lean = MultiheadAttention(64, 4, batch_first=batch_first).double()
    lean.load_state_dict(plain.state_dict(), strict=True)
    assert list(lean.state_dict()) == list(plain.state_dict())
    x = torch.randn(3, 11, 64, dtype=torch.float64)
    x = x if batch_first else x.transpose(0, 1)
    mask = torch.ones(11, 11, dtype=torch.bool).triu(1)
    for kwargs, lean_kwargs in (({}, {}), ({"attn_mask": mask, "is_causal": True},
                                           {"is_causal": True})):
        want = plain(x, x, x, need_weights=False, **kwargs)[0]
        got = lean(x, need_weights=False, **lean_kwargs)[0]
        torch.testing.assert_close(got, want)
        gw = torch.autograd.grad(want.sum(), list(plain.parameters()))
        gg = torch.autograd.grad(got.sum(), list(lean.parameters()))
        for a, b in zip(gg, gw):
            torch.testing.assert_close(a, b)
    out, weights = lean(x, x, x, is_causal=True)  # weights asked for: nn.MultiheadAttention's path
    assert weights.shape == (3, 11, 11)
    torch.testing.assert_close(out, plain(x, x, x, attn_mask=mask)[0])


@pytest.mark.parametrize("name,backend,dtype,tol", [
    ("DiffCLIP-Tiny", "triton" if INTERPRET else "torch", torch.float32, 0.0),
    ("DiffCLIPv2-Tiny", "triton" if INTERPRET else "torch", torch.float32, 0.0),
    ("DiffCLIP-Tiny", "torch", torch.float64, 1e-12),
    ("CLIP-Tiny", "torch", torch.float64, 1e-12),
])
def test_trimmed_tokens_give_the_same_text_embeddings(name, backend, dtype, tol):
    """The text tower is causal and pools at the end-of-text token: columns after the longest
    row's end add nothing. Through the fused kernels the embeddings are bitwise equal."""
    model = create_model(name, backend=backend).to(dtype)
    texts = ["a photo of a cat.", "a dog", "a drawing of a small red bird on a branch"]
    full, trimmed = model.tokenize(texts), model.tokenize(texts, trim=True)
    assert trimmed.shape[1] < full.shape[1]
    with torch.no_grad():
        a, b = model.encode_text(full), model.encode_text(trimmed)
    assert (a - b).abs().max().item() <= tol * a.abs().max().item()


def test_token_ids_out_of_range_are_named_on_the_host():
    model = create_model("CLIP-Tiny")
    tokens = model.tokenize(["a cat"])
    tokens[0, 1] = 49408
    with pytest.raises(ValueError, match=r"ids in \[0, 49408\), got values in \[0, 49408\]"):
        model.encode_text(tokens)


def test_v2_configs_and_gradients_reach_lambda_projection():
    assert {"DiffCLIPv2-ViT-B-16", "DiffCLIPv2-Tiny"} <= set(list_models())
    big = create_model("DiffCLIPv2-ViT-B-16", device="meta")
    layers = big.attention_layers()
    assert all(isinstance(layer, DiffMultiheadAttentionV2) for layer in layers)
    assert (layers[0].num_heads, layers[0].head_dim) == (12, 64)
    keys = set(big.state_dict())
    assert "visual.transformer.resblocks.0.attn.lambda_proj.weight" in keys
    plain_keys = set(create_model("ViT-B-16", device="meta").state_dict())
    assert {k for k in keys if "attn" not in k} == {k for k in plain_keys if "attn" not in k}
    model = create_model("DiffCLIPv2-Tiny", backend="torch")
    images, tokens = torch.randn(2, 3, 32, 32), model.tokenize(["a cat", "a dog"])
    image_features, text_features, _ = model(images, tokens)
    (image_features.sum() + text_features.sum()).backward()
    for layer in model.attention_layers():
        lambda_rows = layer.in_proj_weight.grad[2 * layer.embed_dim:][:layer.num_heads]
        assert lambda_rows.abs().sum() > 0


# ------------------------------------------------------------------ untrusted checkpoint files
@pytest.fixture
def models_built(monkeypatch):
    """The devices of every CLIP that create_model builds (meta ones allocate nothing)."""
    devices = []

    class RecordingCLIP(CLIP):
        def __init__(self, config, **kwargs):
            devices.append(str(kwargs.get("device")))
            super().__init__(config, **kwargs)

    monkeypatch.setattr(factory, "CLIP", RecordingCLIP)
    return devices


def test_huge_config_in_a_tiny_file_is_refused_before_building(tmp_path, models_built):
    config = get_config("DiffCLIP-Tiny").to_dict()
    for tower in ("vision", "text"):
        config[tower].update(width=16384, layers=64, heads=128)
    path = tmp_path / "crafted.safetensors"
    save_checkpoint(path, {"visual.patch_embed.proj.weight": torch.zeros(1),
                           "image_projection": torch.zeros(1)}, config)
    assert path.stat().st_size < 1024
    with pytest.raises(CheckpointError, match="crafted.safetensors.*64 vision and 64 text layers"):
        create_model(None, pretrained=path)
    assert all(device == "meta" for device in models_built)


def test_config_that_does_not_describe_the_tensors_is_refused_before_building(tmp_path,
                                                                              models_built):
    model = create_model("DiffCLIP-Tiny", backend="torch")
    config = model.config.to_dict()
    config["vision"].update(width=4096, heads=64)  # same tensor names, other shapes
    path = tmp_path / "wider.safetensors"
    save_checkpoint(path, model.state_dict(), config)
    models_built.clear()
    with pytest.raises(CheckpointError, match=r"(?s)wider.safetensors.*shape mismatches:\n  "
                                              r"image_projection: expected \(4096, 64\)"):
        create_model(None, pretrained=path)
    assert models_built and all(device == "meta" for device in models_built)


@pytest.mark.parametrize("change, message", [
    (lambda config: config.update(lambda_init=float("nan")), "lambda_init must be finite"),
    (lambda config: config["text"].update(ln_eps=float("inf")), "text.ln_eps must be finite"),
    (lambda config: config.update(vision=[1, 2]), "vision config must be a dict"),
])
def test_invalid_saved_config_names_the_file(tmp_path, change, message):
    model = create_model("DiffCLIP-Tiny", backend="torch")
    config = model.config.to_dict()
    change(config)
    path = tmp_path / "bad_config.safetensors"
    save_checkpoint(path, model.state_dict(), config)
    with pytest.raises(CheckpointError, match=f"bad_config.safetensors.*invalid model config.*{message}"):
        create_model(None, pretrained=path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("damage", ["empty", "truncated", "random"])
def test_damaged_files_through_create_model_name_the_file(tmp_path, suffix, damage):
    model = create_model("DiffCLIP-Tiny", backend="torch")
    path = tmp_path / f"damaged{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), path)
    else:
        save_pretrained(model, path)
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                      "random": np.random.default_rng(0).bytes(4096)}[damage])
    with pytest.raises(CheckpointError, match=f"damaged{suffix}"):
        create_model("DiffCLIP-Tiny", pretrained=path)


@pytest.mark.parametrize("metadata, message", [
    ({"format": "diffattn"}, "no 'config' entry"),
    ({"format": "diffattn", "config": "{'width': 3"}, "not valid JSON"),
])
def test_bad_metadata_through_create_model(tmp_path, metadata, message):
    import safetensors.torch

    path = tmp_path / "metadata.safetensors"
    safetensors.torch.save_file(create_model("DiffCLIP-Tiny", backend="torch").state_dict(), path,
                                metadata=metadata)
    with pytest.raises(CheckpointError, match=f"metadata.safetensors.*{message}"):
        create_model(None, pretrained=path)


def test_non_string_key_through_create_model(tmp_path):
    state_dict = create_model("DiffCLIP-Tiny", backend="torch").state_dict()
    state_dict[7] = torch.zeros(1)
    path = tmp_path / "int_key.pt"
    torch.save(state_dict, path)
    with pytest.raises(CheckpointError, match=r"int_key.pt.*not strings, e.g. \[7\]"):
        create_model("DiffCLIP-Tiny", pretrained=path)
