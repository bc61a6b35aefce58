"""Attention maps of the vision tower, for the DiffCLIP paper's kind of visualisation.

    maps = attention_maps(model, "cat.jpg")        # per layer (heads, N, N), N = 1 + grid^2
    heat = cls_attention_map(maps, layer=-1)       # (grid, grid): cls-token row, heads averaged
    save_attention_overlay("cat.jpg", heat, "cat_attention.png", transform=model.preprocess)

Differential layers give the differential maps A1 - lambda * A2 (one per differential head;
rows sum to 1 - lambda and entries can be negative); plain layers give their softmax maps.

The overlay covers the part of the original image that the model saw (``transform``: the
centre crop of the "shortest" preprocessing, the whole image for "squash") and carries a
colour bar labelled with the map's values.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .preprocess import load_rgb_image


def _as_batch(model, image) -> Tensor:
    """(1, 3, S, S): a preprocessed (3, S, S) / (1, 3, S, S) float tensor as is, any other image
    (PIL image, path, uint8 tensor) through model.preprocess."""
    if isinstance(image, Tensor) and image.is_floating_point():
        return image.unsqueeze(0) if image.dim() == 3 else image
    return model.preprocess(image).unsqueeze(0)


@torch.no_grad()
def attention_maps(model, image) -> list:
    """Per-layer attention maps of the vision tower for one image.

    Args:
        model: a CLIP.
        image: a preprocessed float tensor (3, S, S) or (1, 3, S, S), or a PIL image, path or
            uint8 tensor (preprocessed with model.preprocess).

    Returns:
        list (one per vision layer, input side first) of float32 CPU tensors (M, N, N), where
        N = 1 + grid^2 tokens (cls first) and M = heads // 2 differential maps
        (A1 - lambda * A2) for differential layers, or M = heads softmax maps for plain ones.
    """
    batch = _as_batch(model, image)
    if batch.shape[0] != 1:
        raise ValueError(f"image must be one image, got a batch of {batch.shape[0]}")
    device = model.logit_scale.device
    maps = []

    def want_weights(module, args, kwargs):
        return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

    def keep_weights(module, args, output):
        maps.append(output[1][0].detach().float().cpu())

    handles = []
    for layer in model.attention_layers("vision"):
        handles.append(layer.register_forward_pre_hook(want_weights, with_kwargs=True))
        handles.append(layer.register_forward_hook(keep_weights))
    try:
        model.encode_image(batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return maps


def cls_attention_map(maps: list, layer: int = -1) -> Tensor:
    """The cls token's attention over the patches of one layer, as an image-shaped grid.

    Args:
        maps: attention_maps() output.
        layer: which layer (index into maps).

    Returns:
        (grid, grid) float tensor: row 0 (the cls query) of every map, patch keys only,
        averaged over the maps of the layer.
    """
    layer_maps = maps[layer]
    if layer_maps.dim() != 3 or layer_maps.shape[-1] != layer_maps.shape[-2]:
        raise ValueError(f"maps[{layer}] must be (heads, N, N), got {tuple(layer_maps.shape)}")
    patches = layer_maps.shape[-1] - 1
    grid = math.isqrt(patches)
    if grid * grid != patches:
        raise ValueError(f"{patches} patch tokens do not form a square grid")
    return layer_maps[:, 0, 1:].mean(dim=0).reshape(grid, grid)


def _colourise(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 RGB, with matplotlib's "jet" colormap when
    matplotlib is installed, else a black-red-yellow-white ramp."""
    try:
        from matplotlib import colormaps
    except ImportError:
        ramp = np.stack([np.clip(3 * values, 0, 1), np.clip(3 * values - 1, 0, 1),
                         np.clip(3 * values - 2, 0, 1)], axis=-1)
    else:
        ramp = colormaps["jet"](values)[..., :3]
    return (ramp * 255).round().astype(np.uint8)


def _with_colour_bar(image: Image.Image, low: float, high: float) -> Image.Image:
    """``image`` with a vertical colour bar to its right, ``high`` at the top and ``low`` at the
    bottom, both written next to it."""
    width, height = image.size
    bar_width, gap = max(6, height // 12), max(2, height // 40)
    font = ImageFont.load_default()
    labels = (f"{high:.3g}", f"{low:.3g}")
    measure = ImageDraw.Draw(image)
    boxes = [measure.textbbox((0, 0), label, font=font) for label in labels]
    text_width = max(box[2] for box in boxes)
    canvas = Image.new("RGB", (width + 3 * gap + bar_width + text_width, height), "white")
    canvas.paste(image, (0, 0))
    ramp = np.repeat(np.linspace(1.0, 0.0, height)[:, None], bar_width, axis=1)
    canvas.paste(Image.fromarray(_colourise(ramp)), (width + gap, 0))
    draw = ImageDraw.Draw(canvas)
    x = width + 2 * gap + bar_width
    draw.text((x, 0), labels[0], fill="black", font=font)
    draw.text((x, height - boxes[1][3]), labels[1], fill="black", font=font)
    return canvas


def save_attention_overlay(image, heatmap: Tensor, path, alpha: float = 0.5,
                           transform=None) -> Image.Image:
    """Write ``image`` with ``heatmap`` blended over the region the model saw, and a colour
    scale, as a PNG.

    Args:
        image: the original image: PIL image, path or uint8 tensor (see
            preprocess.load_rgb_image).
        heatmap: (h, w) tensor, e.g. cls_attention_map(); its values from min to max take the
            colour map's range, resized bilinearly to the region.
        path: output file (PNG).
        alpha: weight of the heatmap in the blend, in [0, 1].
        transform: the model's preprocessing (``model.preprocess``): the heatmap covers
            ``transform.crop_box(width, height)`` of the image -- the centre crop for the
            "shortest" recipe, where the image outside the crop is left as it is. None: the
            whole image (what "squash" shows the model).

    Returns:
        the written RGB image: the overlay (the image's size) with a colour bar on its right,
        labelled with the heatmap's maximum (top) and minimum (bottom).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not isinstance(heatmap, Tensor) or heatmap.dim() != 2:
        raise ValueError(f"heatmap must be a 2-D tensor, got "
                         f"{tuple(heatmap.shape) if isinstance(heatmap, Tensor) else type(heatmap).__name__}")
    if transform is not None and not callable(getattr(transform, "crop_box", None)):
        raise TypeError(f"transform must be an ImageTransform (model.preprocess), got "
                        f"{type(transform).__name__}")
    rgb = load_rgb_image(image)
    width, height = rgb.size
    box = (0.0, 0.0, float(width), float(height)) if transform is None else \
        transform.crop_box(width, height)
    left, top = max(0, round(box[0])), max(0, round(box[1]))
    right, bottom = min(width, round(box[2])), min(height, round(box[3]))
    values = heatmap.detach().float().cpu().numpy()
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    resized = Image.fromarray(scaled.astype(np.float32)).resize((right - left, bottom - top),
                                                                Image.Resampling.BILINEAR)
    heat = Image.fromarray(_colourise(np.clip(np.asarray(resized), 0.0, 1.0)))
    overlay = rgb.copy()
    overlay.paste(Image.blend(rgb.crop((left, top, right, bottom)), heat, alpha), (left, top))
    figure = _with_colour_bar(overlay, low, high)
    figure.save(os.fspath(path), format="PNG")
    return figure
