"""create_model(name, pretrained=<plain attention weights>, attention="diff" or "diff2"): a warm
start that loads every tensor the file has, says in one grouped warning which tensors are new or
derived, and gives the model replace_attention would give. "diff" keeps the new lambda vectors
and norm weights as initialised; "diff2" converts each layer as
DiffMultiheadAttentionV2.from_plain does, so the model's embeddings start equal to the plain
model's (float64 reference, 1e-4 relative)."""
import dataclasses
import json
import math
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
    return Path(__file__).resolve().parents[3] / "shared" / "data"


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


# ------------------------------------------------------------------ Differential Transformer V2
_V2_DERIVED = "{q_proj.weight, q_proj.bias, lambda_proj.weight, lambda_proj.bias}"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _load_warm_v2(config, path, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = create_model(config, pretrained=path, **kwargs)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1, messages
    return model, messages[0]


def _rel(got, expected) -> float:
    return ((got.double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("dtype, backend", [
    (torch.float64, "torch"),
    (torch.float32, "triton" if INTERPRET else "torch"),
])
def test_open_clip_file_warm_starts_a_v2_model_equal_to_the_plain_one(tmp_path, dtype, backend):
    """attention="diff2" on a plain open_clip-layout file: every layer converted as
    DiffMultiheadAttentionV2.from_plain converts one, and the image and text embeddings equal
    the plain model's (float64) within 1e-4 relative."""
    config = _open_clip_tiny()
    source, path = _random_plain_file(tmp_path, config)
    model, message = _load_warm_v2(config, path, attention="diff2", backend=backend,
                                   dtype=dtype)
    assert model.config == dataclasses.replace(config, attention="diff2")
    assert all(isinstance(layer, diffattn.DiffMultiheadAttentionV2)
               for layer in model.attention_layers())
    assert message.splitlines()[1:] == [
        f"  visual.transformer.resblocks.{{0-1}}.attn.{_V2_DERIVED}",
        f"  transformer.resblocks.{{0-1}}.attn.{_V2_DERIVED}",
    ]
    assert "for 4 Differential Transformer V2 attention layers" in message
    assert "these 16 tensors were derived or newly initialised" in message

    reference = source.double().eval()
    model.eval()
    torch.manual_seed(1)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    tokens = model.tokenize(["a photo of a cat", "a dog"], trim=True)
    with torch.no_grad():
        image_rel = _rel(model.encode_image(images.to(dtype)), reference.encode_image(images))
        text_rel = _rel(model.encode_text(tokens), reference.encode_text(tokens))
    assert image_rel < 1e-4 and text_rel < 1e-4, (image_rel, text_rel)


def test_v2_warm_start_weights_follow_from_plain(tmp_path):
    """The loaded tensors: k/v/out from the file, q_proj the plain q heads as the first maps
    and zeros as the second, lambda_proj 0 and logit(1e-5); the same model as
    replace_attention(variant="v2") on the plain one."""
    config = _open_clip_tiny()
    source, path = _random_plain_file(tmp_path, config)
    model, _ = _load_warm_v2(config, path, attention="diff2", backend="torch")
    plain, loaded = source.state_dict(), model.state_dict()
    prefix = "transformer.resblocks.1.attn."
    E, h = config.text.width, config.text.heads
    wq, wk, wv = plain[prefix + "in_proj_weight"].split(E)
    assert torch.equal(loaded[prefix + "k_proj.weight"], wk)
    assert torch.equal(loaded[prefix + "v_proj.weight"], wv)
    assert torch.equal(loaded[prefix + "out_proj.weight"], plain[prefix + "out_proj.weight"])
    q = loaded[prefix + "q_proj.weight"].view(h, 2, E // h, E)
    assert torch.equal(q[:, 0], wq.view(h, E // h, E)) and not q[:, 1].any()
    assert not loaded[prefix + "lambda_proj.weight"].any()
    torch.testing.assert_close(loaded[prefix + "lambda_proj.bias"].double(),
                               torch.full((h,), math.log(1e-5 / (1 - 1e-5)), dtype=torch.float64))
    other = {k: v for k, v in loaded.items() if ".attn." not in k}
    assert all(torch.equal(value, plain[key]) for key, value in other.items())

    converted = create_model(config, pretrained=path, backend="torch")
    assert diffattn.replace_attention(converted, variant="v2", backend="torch") == 4
    assert converted.state_dict().keys() == loaded.keys()
    assert all(torch.equal(value, loaded[key]) for key, value in converted.state_dict().items())


def test_diffclip_layout_plain_file_warm_starts_diffclipv2_tiny(tmp_path):
    """A plain "CLIP-Tiny" file (DiffCLIP layout) into the bundled "DiffCLIPv2-Tiny"."""
    assert dataclasses.replace(get_config("CLIP-Tiny"), attention="diff2") == \
        get_config("DiffCLIPv2-Tiny")
    source, path = _random_plain_file(tmp_path, get_config("CLIP-Tiny"))
    model, message = _load_warm_v2("DiffCLIPv2-Tiny", path, backend="torch",
                                   dtype=torch.float64)
    assert f"  visual.blocks.{{0-1}}.attn.{_V2_DERIVED}" in message.splitlines()
    model.eval()
    reference = source.double().eval()
    tokens = model.tokenize(["a handwritten digit seven."], trim=True)
    with torch.no_grad():
        assert _rel(model.encode_text(tokens), reference.encode_text(tokens)) < 1e-4


def test_v2_packed_weights_of_the_wrong_shape_are_listed(tmp_path):
    config = _open_clip_tiny()
    source, _ = _random_plain_file(tmp_path, config)
    state_dict = source.state_dict()
    key = "visual.transformer.resblocks.0.attn.in_proj_weight"
    state_dict[key] = state_dict[key][:-8]
    path = tmp_path / "broken.pt"
    torch.save(state_dict, path)
    with pytest.raises(ValueError, match=r"shape mismatches:\n  visual.transformer.resblocks.0."
                                         r"attn.in_proj_weight: expected \(192, 64\), got "
                                         r"\(184, 64\)"):
        create_model(config, pretrained=path, attention="diff2")


def test_vit_b_16_open_clip_keys_warm_start_diffclipv2_vit_b_16(tmp_path):
    """The real open_clip ViT-B-16 key list maps completely onto DiffCLIPv2-ViT-B-16 (and
    onto ViT-B-16 with attention="diff2", the same config)."""
    keys = _shared_data_dir() / "open_clip_ViT-B-16_state_dict.json"
    if not keys.is_file():
        pytest.skip(f"{keys} not available")
    assert dataclasses.replace(get_config("ViT-B-16"), attention="diff2") == \
        get_config("DiffCLIPv2-ViT-B-16")
    shapes = json.loads(keys.read_text())
    # Stride-0 tensors keep the file tiny: each tensor is saved as its single value.
    state_dict = {key: torch.full((), float(i) / 1000).expand(shape)
                  for i, (key, shape) in enumerate(shapes.items())}
    path = tmp_path / "open_clip_ViT-B-16.pt"
    torch.save(state_dict, path)
    model, message = _load_warm_v2("DiffCLIPv2-ViT-B-16", path, backend="torch")
    assert message.splitlines()[1:] == [
        f"  visual.transformer.resblocks.{{0-11}}.attn.{_V2_DERIVED}",
        f"  transformer.resblocks.{{0-11}}.attn.{_V2_DERIVED}",
    ]
    assert "for 24 Differential Transformer V2 attention layers" in message
    assert "these 96 tensors" in message
    loaded = model.state_dict()
    for key, value in state_dict.items():
        if ".attn.in_proj_" not in key:
            assert loaded[key].reshape(-1)[0].item() == pytest.approx(value.reshape(-1)[0].item())
    packed = state_dict["visual.transformer.resblocks.11.attn.in_proj_weight"][0, 0].item()
    layer = "visual.transformer.resblocks.11.attn."
    assert loaded[layer + "k_proj.weight"].shape == (768, 768)
    assert loaded[layer + "q_proj.weight"].shape == (1536, 768)
    assert loaded[layer + "lambda_proj.weight"].shape == (12, 768)
    for name in ("q_proj", "k_proj", "v_proj"):
        assert loaded[layer + name + ".weight"][0, 0].item() == pytest.approx(packed)


# ----------------------------------------------------- open_clip ViT-B-16 into DiffCLIP-ViT-B-16
def _open_clip_vit_b_16_shapes() -> dict:
    """open_clip's ViT-B-16 state-dict names and shapes (302 tensors), written out."""
    shapes = {"positional_embedding": (77, 512), "text_projection": (512, 512), "logit_scale": (),
              "visual.class_embedding": (768,), "visual.positional_embedding": (197, 768),
              "visual.proj": (768, 512), "visual.conv1.weight": (768, 3, 16, 16),
              "visual.ln_pre.weight": (768,), "visual.ln_pre.bias": (768,),
              "visual.ln_post.weight": (768,), "visual.ln_post.bias": (768,),
              "token_embedding.weight": (49408, 512), "ln_final.weight": (512,),
              "ln_final.bias": (512,)}
    for tower, width in (("visual.transformer", 768), ("transformer", 512)):
        for i in range(12):
            block = f"{tower}.resblocks.{i}."
            shapes.update({
                block + "ln_1.weight": (width,), block + "ln_1.bias": (width,),
                block + "attn.in_proj_weight": (3 * width, width),
                block + "attn.in_proj_bias": (3 * width,),
                block + "attn.out_proj.weight": (width, width), block + "attn.out_proj.bias": (width,),
                block + "ln_2.weight": (width,), block + "ln_2.bias": (width,),
                block + "mlp.c_fc.weight": (4 * width, width), block + "mlp.c_fc.bias": (4 * width,),
                block + "mlp.c_proj.weight": (width, 4 * width), block + "mlp.c_proj.bias": (width,)})
    return shapes


def test_open_clip_vit_b_16_shapes_are_open_clips():
    keys = _shared_data_dir() / "open_clip_ViT-B-16_state_dict.json"
    if not keys.is_file():
        pytest.skip(f"{keys} not available")
    expected = {key: tuple(shape) for key, shape in json.loads(keys.read_text()).items()}
    assert _open_clip_vit_b_16_shapes() == expected


@pytest.fixture(scope="module")
def open_clip_vit_b_16_into_diffclip(tmp_path_factory):
    """(file's state dict, DiffCLIP-ViT-B-16 loaded from it, the warning). Each tensor is a
    random row broadcast over its leading dimensions (stride 0), so the file stays small."""
    generator = torch.Generator().manual_seed(0)
    state_dict = {key: torch.randn(shape[-1:] if shape else (), generator=generator).expand(shape)
                  for key, shape in _open_clip_vit_b_16_shapes().items()}
    path = tmp_path_factory.mktemp("open_clip") / "open_clip_ViT-B-16.pt"
    torch.save(state_dict, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = create_model("DiffCLIP-ViT-B-16", pretrained=path, backend="torch")
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1, messages
    return state_dict, model, messages[0], str(path)


def test_open_clip_vit_b_16_carries_every_shared_tensor_into_diffclip_vit_b_16(
        open_clip_vit_b_16_into_diffclip):
    state_dict, model, _, _ = open_clip_vit_b_16_into_diffclip
    loaded = model.state_dict()
    renamed = {"visual.class_embedding": "visual.cls_token",
               "visual.positional_embedding": "visual.pos_embed", "visual.proj": "image_projection",
               "visual.conv1.weight": "visual.patch_embed.proj.weight",
               "visual.ln_post.weight": "visual.norm.weight", "visual.ln_post.bias": "visual.norm.bias"}
    block_names = {"ln_1": "norm1", "ln_2": "norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                   "attn.out_proj": "attn.out_proj"}
    carried = 0
    for key, value in state_dict.items():
        if key.startswith("visual.transformer.resblocks."):
            index, rest = key[len("visual.transformer.resblocks."):].split(".", 1)
            module, _, tensor = rest.rpartition(".")
            if module in block_names:
                renamed[key] = f"visual.blocks.{index}.{block_names[module]}.{tensor}"
        if key.endswith("attn.in_proj_weight") or key.endswith("attn.in_proj_bias"):
            layer = key.rpartition(".")[0].replace("visual.transformer.resblocks", "visual.blocks")
            kind = key.rpartition("_")[2]
            got = torch.cat([loaded[f"{layer}.{proj}.{kind}"] for proj in ("q_proj", "k_proj", "v_proj")])
            assert torch.equal(got, value), key
            carried += 1
            continue
        target = renamed.get(key, key)
        if target not in loaded:
            assert key.startswith("visual.ln_pre."), key  # DiffCLIP has no norm before the blocks
            continue
        assert torch.equal(loaded[target].reshape(value.shape), value), key
        carried += 1
    assert carried == len(state_dict) - 2 and carried / len(state_dict) >= 0.9
    assert torch.equal(loaded["visual.patch_embed.proj.bias"], torch.zeros(768))


def test_open_clip_vit_b_16_into_diffclip_warns_once_listing_what_is_new(
        open_clip_vit_b_16_into_diffclip):
    _, model, message, path = open_clip_vit_b_16_into_diffclip
    lines = message.splitlines()
    assert lines[0] == (f"checkpoint {path!r} is in the open_clip layout: 300 of its 302 tensors "
                        f"were carried into the model's DiffCLIP layout under their DiffCLIP names")
    assert "left out" in lines[1] and "visual.ln_pre.bias, visual.ln_pre.weight" in lines[1]
    assert lines[2].startswith("  new: visual.patch_embed.proj.bias (zeros")
    assert "for 24 differential attention layers" in message and "these 120 tensors" in message
    assert lines[-2:] == [f"  visual.blocks.{{0-11}}.attn.{_ATTN_NEW}",
                          f"  transformer.resblocks.{{0-11}}.attn.{_ATTN_NEW}"]
    assert model.config.layout == "diffclip" and model.config.attention == "diff"


def test_diffclip_file_into_an_open_clip_config_is_refused(tmp_path):
    path = tmp_path / "diffclip_tiny.pt"
    torch.save(create_model("CLIP-Tiny").state_dict(), path)
    with pytest.raises(ValueError, match="is in the diffclip layout but the model config has layout 'open_clip'"):
        create_model(_open_clip_tiny(), pretrained=path)
