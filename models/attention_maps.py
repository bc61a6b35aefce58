"""Attention maps of the vision tower, for the DiffCLIP paper's kind of visualisation.

    maps = attention_maps(model, "cat.jpg")        # per layer (heads, N, N), N = 1 + grid^2
    heat = cls_attention_map(maps, layer=-1)       # (grid, grid): cls-token row, heads averaged
    save_attention_overlay("cat.jpg", heat, "cat_attention.png")

Differential layers give the differential maps A1 - lambda * A2 (one per differential head;
rows sum to 1 - lambda and entries can be negative); plain layers give their softmax maps.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image
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


def save_attention_overlay(image, heatmap: Tensor, path, alpha: float = 0.5) -> Image.Image:
    """Write ``image`` with ``heatmap`` blended over it as a PNG.

    Args:
        image: PIL image, path or uint8 tensor (see preprocess.load_rgb_image); the overlay
            has its size.
        heatmap: (h, w) tensor, e.g. cls_attention_map(); min-max scaled to [0, 1] and
            resized bilinearly to the image.
        path: output file (PNG).
        alpha: weight of the heatmap in the blend, in [0, 1].

    Returns:
        the overlay as an RGB PIL image.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not isinstance(heatmap, Tensor) or heatmap.dim() != 2:
        raise ValueError(f"heatmap must be a 2-D tensor, got "
                         f"{tuple(heatmap.shape) if isinstance(heatmap, Tensor) else type(heatmap).__name__}")
    rgb = load_rgb_image(image)
    values = heatmap.detach().float().cpu().numpy()
    span = values.max() - values.min()
    values = (values - values.min()) / span if span > 0 else np.zeros_like(values)
    resized = Image.fromarray(values.astype(np.float32)).resize(rgb.size, Image.Resampling.BILINEAR)
    heat = Image.fromarray(_colourise(np.clip(np.asarray(resized), 0.0, 1.0)))
    overlay = Image.blend(rgb, heat, alpha)
    overlay.save(os.fspath(path), format="PNG")
    return overlay
