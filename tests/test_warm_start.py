"""create_model(name, pretrained=<plain attention weights>, attention="diff"): a warm start that
loads every tensor the file has, keeps the new lambda vectors and norm weights as initialised,
says so in one grouped warning, and gives the model replace_attention would give."""
import dataclasses
import json
import os
import warnings
from pathlib import Path

import pytest
import torch

import diffattn
from diffattn.models import CLIP, create_model, get_config

_ATTN_NEW = "{lambda_q1, lambda_k1, lambda_q2, lambda_k2, diff_norm.weight}"


def _open_clip_tiny():
    """CLIP-Tiny in open_clip's layout, plain attention, as open_clip's own models are."""
    config = get_config("CLIP-Tiny")
    vision = dataclasses.replace(config.vision, patch_bias=False, ln_pre=True)
    return dataclasses.replace(config, layout="open_clip", preprocess="shortest", vision=vision)


def _random_plain_file(tmp_path, config):
    torch.manual_seed(0)
    source = CLIP(config, backend="torch")
    with torch.no_grad():
        for param in source.parameters():
            param.add_(0.05 * torch.randn_like(param))
    path = tmp_path / "open_clip_tiny.pt"
    torch.save(source.state_dict(), path)
    return source, path


def _load_warm(config, path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = create_model(config, pretrained=path, attention="diff", backend="torch")
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1, messages
    return model, messages[0]


def test_open_clip_file_warm_starts_a_differential_model(tmp_path):
    config = _open_clip_tiny()
    source, path = _random_plain_file(tmp_path, config)
    model, message = _load_warm(config, path)
    assert model.config.attention == "diff"
    assert all(isinstance(layer, diffattn.DiffMultiheadAttention)
               for layer in model.attention_layers())
    assert message.splitlines()[1:] == [
        f"  visual.transformer.resblocks.{{0-1}}.attn.{_ATTN_NEW}",
        f"  transformer.resblocks.{{0-1}}.attn.{_ATTN_NEW}",
    ]
    assert "for 4 differential attention layers" in message and "these 20 tensors" in message

    # Every tensor of the file is in the model; the projections are the packed ones split.
    loaded, plain = model.state_dict(), source.state_dict()
    for key, value in plain.items():
        if key.endswith("in_proj_weight") or key.endswith("in_proj_bias"):
            kind = key.rsplit(".", 1)[1].replace("in_proj_", "")
            stacked = torch.cat([loaded[key.replace("in_proj_" + kind, f"{n}_proj.{kind}")]
                                 for n in "qkv"])
            assert torch.equal(stacked, value), key
        else:
            assert torch.equal(loaded[key], value), key

    # The same model as replace_attention on the plain one, given the same new tensors.
    converted = create_model(config, pretrained=path, backend="torch")
    assert diffattn.replace_attention(converted, lambda_init=config.lambda_init,
                                      backend="torch") == 4
    converted.load_state_dict(model.state_dict(), strict=True)
    images = torch.randn(2, 3, 32, 32)
    tokens = model.tokenize(["a photo", "of a dog"])
    with torch.no_grad():
        for got, expected in zip(model(images, tokens), converted(images, tokens)):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_diffclip_layout_plain_file_warm_starts_too(tmp_path):
    source, path = _random_plain_file(tmp_path, get_config("CLIP-Tiny"))
    model, message = _load_warm(get_config("DiffCLIP-Tiny"), path)
    assert f"  visual.blocks.{{0-1}}.attn.{_ATTN_NEW}" in message.splitlines()


def test_packed_weights_of_the_wrong_shape_are_listed(tmp_path):
    config = _open_clip_tiny()
    source, _ = _random_plain_file(tmp_path, config)
    state_dict = source.state_dict()
    key = "visual.transformer.resblocks.1.attn.in_proj_weight"
    state_dict[key] = state_dict[key][:-8]
    state_dict.pop("transformer.resblocks.0.attn.in_proj_bias")
    path = tmp_path / "broken.pt"
    torch.save(state_dict, path)
    with pytest.raises(ValueError, match=r"missing keys:\n  transformer.resblocks.0.attn."
                                         r"in_proj_bias(.|\n)*shape mismatches:\n  "
                                         r"visual.transformer.resblocks.1.attn.in_proj_weight: "
                                         r"expected \(192, 64\), got \(184, 64\)"):
        create_model(config, pretrained=path, attention="diff")


def _shared_data_dir() -> Path:
    if "DIFFATTN_SHARED" in os.environ:
        return Path(os.environ["DIFFATTN_SHARED"]) / "data"
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def test_vit_b_32_open_clip_keys_warm_start_with_one_grouped_warning(tmp_path):
    keys = _shared_data_dir() / "open_clip_ViT-B-32_state_dict.json"
    if not keys.is_file():
        pytest.skip(f"{keys} not available")
    shapes = json.loads(keys.read_text())
    # Stride-0 tensors keep the file tiny: each tensor is saved as its single value.
    state_dict = {key: torch.full((), float(i) / 1000).expand(shape)
                  for i, (key, shape) in enumerate(shapes.items())}
    path = tmp_path / "open_clip_ViT-B-32.pt"
    torch.save(state_dict, path)
    model, message = _load_warm("ViT-B-32", path)
    assert message.splitlines()[1:] == [
        f"  visual.transformer.resblocks.{{0-11}}.attn.{_ATTN_NEW}",
        f"  transformer.resblocks.{{0-11}}.attn.{_ATTN_NEW}",
    ]
    assert "for 24 differential attention layers" in message and "these 120 tensors" in message
    loaded = model.state_dict()
    assert loaded["transformer.resblocks.11.attn.out_proj.bias"][0].item() == pytest.approx(
        state_dict["transformer.resblocks.11.attn.out_proj.bias"][0].item())


def test_warm_start_warning_names_the_callers_line(tmp_path):
    from diffattn.models import create_model_and_transforms
    config = _open_clip_tiny()
    _, path = _random_plain_file(tmp_path, config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        create_model_and_transforms(config, pretrained=path, attention="diff", backend="torch")
    assert [Path(w.filename).name for w in caught] == [Path(__file__).name]
