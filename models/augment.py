"""Training-time image augmentation with PIL and torch only (no torchvision).

``RandomResizedCropTransform`` is the random resized crop that open_clip's default training
transform uses (torchvision's ``RandomResizedCrop(size, scale=(0.9, 1.0),
interpolation=BICUBIC)``), written out:

1. Up to 10 tries: draw an area fraction a ~ U(scale) and a log aspect ratio
   log r ~ U(log ratio[0], log ratio[1]); the box is w = round(sqrt(a * W * H * r)),
   h = round(sqrt(a * W * H / r)). The first box that fits inside the image (0 < w <= W,
   0 < h <= H) is placed at a uniformly random position.
2. If no try fits, a central box: the whole image, narrowed to the nearest allowed aspect ratio
   when the image's own ratio W / H is outside ``ratio``.
3. The box is cut out, resized to (size, size) with PIL's bicubic filter, converted to RGB,
   scaled to [0, 1] and normalised per channel with the model's mean and std.

Random numbers come from torch (``generator`` if given, else torch's global generator, which
DataLoader seeds differently in every worker). There is no flip or colour jitter, as in
open_clip's default.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .preprocess import check_normalization, load_image

_TRIES = 10


def _check_range(name: str, values, upper: Optional[float]) -> tuple:
    if not isinstance(values, (tuple, list)) or len(values) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{name} must be two numbers (low, high), got {values!r}")
    low, high = float(values[0]), float(values[1])
    if not 0 < low <= high or (upper is not None and high > upper):
        bound = f" <= {upper}" if upper is not None else ""
        raise ValueError(f"{name} must satisfy 0 < low <= high{bound}, got {values!r}")
    return low, high


@dataclasses.dataclass(frozen=True)
class RandomResizedCropTransform:
    """Callable turning one image into a randomly cropped, normalised float32 (3, S, S) tensor.

    Attributes:
        image_size: output side S in pixels.
        mean, std: per-channel normalisation (the model's, see ``model.preprocess``).
        scale: range of the crop's area as a fraction of the image's (open_clip: (0.9, 1.0)).
        ratio: range of the crop's aspect ratio width / height.
        generator: torch.Generator for the random draws; None uses torch's global generator.
    """

    image_size: int
    mean: tuple
    std: tuple
    scale: tuple = (0.9, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    generator: Optional[torch.Generator] = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) \
                or self.image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        object.__setattr__(self, "scale", _check_range("scale", self.scale, 1.0))
        object.__setattr__(self, "ratio", _check_range("ratio", self.ratio, None))
        mean, std = check_normalization(self.mean, self.std)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got "
                            f"{type(self.generator).__name__}")

    def _uniform(self, low, high) -> float:
        return torch.empty(1).uniform_(low, high, generator=self.generator).item()

    def _randint(self, high: int) -> int:
        """Uniform integer in [0, high]."""
        return int(torch.randint(0, high + 1, (1,), generator=self.generator).item())

    def crop_box(self, width: int, height: int) -> tuple:
        """A random (left, top, crop width, crop height) for a width x height image.

        The draws are made in torchvision's order and precision (area fraction, float32 log
        ratio, then top, then left), so with the same seed the boxes are torchvision's."""
        area = width * height
        log_ratio = torch.log(torch.tensor(self.ratio))
        for _ in range(_TRIES):
            target_area = area * self._uniform(*self.scale)
            aspect = torch.exp(torch.empty(1).uniform_(
                log_ratio[0], log_ratio[1], generator=self.generator)).item()
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = self._randint(height - h)
                return self._randint(width - w), top, w, h
        own_ratio = width / height
        if own_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif own_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def __call__(self, image) -> torch.Tensor:
        """Augment one image (PIL image, file path or uint8 tensor, as ``model.preprocess``).

        Returns:
            float32 tensor of shape (3, image_size, image_size).
        """
        image = load_image(image)
        left, top, w, h = self.crop_box(*image.size)
        size = self.image_size
        crop = image.crop((left, top, left + w, top + h))
        crop = crop.resize((size, size), Image.Resampling.BICUBIC)
        crop = crop if crop.mode == "RGB" else crop.convert("RGB")
        pixels = torch.from_numpy(np.array(crop, dtype=np.uint8)).permute(2, 0, 1)
        pixels = pixels.to(torch.float32) / 255.0
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (pixels - mean) / std


def make_train_transform(image_size: int, mean, std, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3),
                         generator: Optional[torch.Generator] = None
                         ) -> RandomResizedCropTransform:
    """A ``RandomResizedCropTransform`` (open_clip's training defaults for scale and ratio)."""
    return RandomResizedCropTransform(image_size=image_size, mean=mean, std=std, scale=scale,
                                      ratio=ratio, generator=generator)
