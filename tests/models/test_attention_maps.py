"""Tests for diffattn.models.attention_maps: per-layer maps, the cls map and the PNG overlay."""
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffattn.models import (attention_maps, cls_attention_map, create_model, make_transform,
                             save_attention_overlay)


def _model(name):
    torch.manual_seed(0)
    return create_model(name, backend="torch").eval()


def _image(seed=0, size=(48, 40)):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_differential_maps_shapes_and_row_sums():
    model = _model("DiffCLIP-Tiny")
    image = torch.randn(3, 32, 32)
    maps = attention_maps(model, image)
    assert len(maps) == 2
    assert all(m.shape == (2, 17, 17) and m.dtype == torch.float32 for m in maps)
    # Each row of A1 - lambda * A2 sums to 1 - lambda.
    for m, layer in zip(maps, model.attention_layers("vision")):
        lam = layer.compute_lambda().item()
        torch.testing.assert_close(m.sum(-1), torch.full((2, 17), 1 - lam), rtol=0, atol=1e-5)
    assert any((m < 0).any() for m in maps)
    # The hooks are gone and the model's output is unchanged by the recording.
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks
               for layer in model.attention_layers())
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(image[None]), model.encode_image(image[None]))


def test_plain_maps_are_softmax_rows():
    model = _model("CLIP-Tiny")
    maps = attention_maps(model, _image())  # a PIL image goes through model.preprocess
    assert len(maps) == 2
    for m in maps:
        assert m.shape == (4, 17, 17)
        assert (m >= 0).all()
        torch.testing.assert_close(m.sum(-1), torch.ones(4, 17))


def test_cls_attention_map():
    maps = attention_maps(_model("DiffCLIP-Tiny"), torch.randn(1, 3, 32, 32))
    heat = cls_attention_map(maps)
    assert heat.shape == (4, 4)
    torch.testing.assert_close(heat.flatten(), maps[-1][:, 0, 1:].mean(0))
    torch.testing.assert_close(cls_attention_map(maps, layer=0).flatten(), maps[0][:, 0, 1:].mean(0))
    with pytest.raises(ValueError, match="square grid"):
        cls_attention_map([torch.zeros(2, 6, 6)])


def test_bad_inputs():
    model = _model("DiffCLIP-Tiny")
    with pytest.raises(ValueError, match="one image"):
        attention_maps(model, torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="images must have shape"):
        attention_maps(model, torch.randn(3, 64, 64))


@pytest.mark.parametrize("with_matplotlib", [True, False])
def test_overlay_png_written_with_a_colour_bar(tmp_path, monkeypatch, with_matplotlib):
    if not with_matplotlib:
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails: built-in ramp
    image = _image(size=(48, 40))
    heat = torch.arange(16.0).reshape(4, 4) - 3
    path = tmp_path / "overlay.png"
    figure = save_attention_overlay(image, heat, path, alpha=0.6)
    with Image.open(path) as written:
        assert written.format == "PNG" and written.mode == "RGB"
        assert written.height == 40 and written.width > 48 + 4  # the image, then the bar
        assert np.array_equal(np.asarray(written), np.asarray(figure))
    pixels = np.asarray(figure).astype(int)
    assert not np.array_equal(pixels[:, :48], np.asarray(image))
    # The bar: the colour map's top colour at the top, its bottom colour at the bottom.
    top, bottom = pixels[0, 50], pixels[-1, 50]
    if not with_matplotlib:  # the built-in ramp: white (max) to black (min)
        assert top.tolist() == [255, 255, 255] and bottom.tolist() == [0, 0, 0]
    else:  # jet: dark red (max) to dark blue (min)
        assert top[0] > top[2] and bottom[2] > bottom[0]
    with pytest.raises(ValueError, match="alpha"):
        save_attention_overlay(image, heat, path, alpha=2)
    with pytest.raises(ValueError, match="heatmap must be a 2-D tensor"):
        save_attention_overlay(image, heat[None], path)
    with pytest.raises(TypeError, match="transform must be an ImageTransform"):
        save_attention_overlay(image, heat, path, transform="shortest")


def test_overlay_covers_only_the_centre_crop_of_shortest_preprocessing(tmp_path):
    # 60x20 at 10 ("shortest"): the model sees columns 20..40, so only they get the heat.
    image = _image(size=(60, 20))
    transform = make_transform(10, mode="shortest")
    figure = save_attention_overlay(image, torch.rand(2, 2), tmp_path / "crop.png", alpha=1.0,
                                    transform=transform)
    original, drawn = np.asarray(image), np.asarray(figure)[:, :60]
    assert np.array_equal(drawn[:, :20], original[:, :20])
    assert np.array_equal(drawn[:, 40:], original[:, 40:])
    assert not np.array_equal(drawn[:, 20:40], original[:, 20:40])
    # "squash" shows the model the whole image: the heat covers all of it.
    squash = save_attention_overlay(image, torch.rand(2, 2), tmp_path / "squash.png", alpha=1.0,
                                    transform=make_transform(10, mode="squash"))
    assert not np.array_equal(np.asarray(squash)[:, :20], original[:, :20])
