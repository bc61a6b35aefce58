"""Image preprocessing for the CLIP image towers (PIL + torch, no torchvision).

Two recipes:

- ``"squash"`` (the DiffCLIP release demo, ``img.convert("RGB").resize((size, size))``):
  conversion to RGB, then PIL's default (bicubic) resize to ``(size, size)`` without keeping
  the aspect ratio, scale to [0, 1], ImageNet mean/std.
- ``"shortest"`` (open_clip / OpenAI CLIP): bicubic resize of the short side to ``size``
  (long side ``int(size * long / short)``, as torchvision's ``Resize(int)``), centre crop
  ``(size, size)`` (torchvision's ``CenterCrop`` rounding), then conversion to RGB (after the
  crop, as open_clip and OpenAI CLIP do: a palette, RGBA, LA, CMYK... image is resampled in
  its own mode), scale to [0, 1], OpenAI mean/std.

Every input (PIL image, file path, uint8 tensor) becomes a PIL image first (a file is opened
in its own mode, a tensor as RGB), so all input kinds go through the same resampling code and
agree exactly.

Images deeper than 8 bits are scaled to the 0..255 range the models were trained on before
anything else: 16-bit images (PIL modes ``I;16*``, and ``I`` as 16-bit decoders give it) by
1/257, so that 65535 becomes 255; float images (mode ``F``, e.g. float32 TIFF) must hold
values in [0, 1] and are multiplied by 255. Other values are an error, never a silently
white or black image. (PIL already reduces 16-bit RGB PNGs to 8-bit RGB.)

``ImageTransform.crop_box`` gives the region of the original image that ends up in the
model's input (the whole image for "squash", the centre crop for "shortest"); attention maps
are drawn over that region.
"""
import dataclasses
import os
import struct
import zlib

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

RESIZE_MODES = ("squash", "shortest")
_DEFAULT_MEAN_STD = {
    "squash": (IMAGENET_MEAN, IMAGENET_STD),
    "shortest": (OPENAI_MEAN, OPENAI_STD),
}


# What reading one image file can raise when the file is missing, not an image, truncated,
# corrupt, too large (decompression bomb) or holds values out of range: callers that skip
# unreadable files catch these.
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error,
                           Image.DecompressionBombError)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class UnreadableImageError(ValueError):
    """An image file exists but cannot be read: not an image, truncated, corrupt, too large,
    or pixel values out of range. The message names the file; ``reason`` says what is wrong."""

    def __init__(self, path, reason: str):
        super().__init__(f"cannot read image file {os.fspath(path)!r}: {reason}")
        self.path, self.reason = os.fspath(path), reason


def unreadable_image_reason(error: BaseException) -> str:
    """A short description of why an image file could not be read (one of
    UNREADABLE_IMAGE_ERRORS), for messages that already name the file."""
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if isinstance(error, UnreadableImageError):
        return error.reason
    return str(error) or type(error).__name__


def to_8bit(image: Image.Image) -> Image.Image:
    """``image`` with 16-bit and float pixels scaled to an 8-bit grey ("L") image; any other
    mode is returned as is.

    16-bit modes (``I;16*`` and ``I``): value / 257, rounded (0..65535 -> 0..255). Float
    (``F``): value * 255, rounded; the values must lie in [0, 1].

    Raises:
        ValueError: a float image with values outside [0, 1] (or NaN), or an ``I`` image
            with values outside 0..65535.
    """
    if image.mode not in _SIXTEEN_BIT_MODES and image.mode != "F":
        return image
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        if not np.isfinite(pixels).all():
            raise ValueError("float image values must lie in [0, 1], got NaN or infinite values")
        if pixels.min() < 0 or pixels.max() > 1:
            raise ValueError(f"float image values must lie in [0, 1], got values in "
                             f"[{pixels.min():g}, {pixels.max():g}]")
        scaled = pixels * 255.0
    else:
        if pixels.min() < 0 or pixels.max() > 65535:
            raise ValueError(f"16-bit image values must lie in 0..65535, got values in "
                             f"[{pixels.min():g}, {pixels.max():g}] (mode {image.mode})")
        scaled = pixels / 257.0
    return Image.fromarray(np.round(scaled).astype(np.uint8))


def load_image(image) -> Image.Image:
    """A PIL image from a PIL image (in its own mode), a file path (opened and loaded, in the
    file's own mode) or a uint8 tensor (RGB); 16-bit and float images are scaled to 8 bits
    (``to_8bit``). See ``load_rgb_image`` for the accepted inputs.

    Raises:
        FileNotFoundError: no such file.
        UnreadableImageError: a file that is not a readable image, naming it.
        ValueError: a PIL image with out-of-range values (see ``to_8bit``).
    """
    if isinstance(image, Image.Image):
        return to_8bit(image)
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"image file not found: {os.fspath(image)!r}")
        try:
            with Image.open(image) as opened:
                opened.load()
                return to_8bit(opened.copy())
        except UNREADABLE_IMAGE_ERRORS as error:
            raise UnreadableImageError(image, unreadable_image_reason(error)) from None
    return load_rgb_image(image)


def load_rgb_image(image) -> Image.Image:
    """An RGB PIL image from a PIL image, a file path or a uint8 tensor (16-bit and float
    images scaled to 8 bits first, see ``to_8bit``).

    Args:
        image: ``PIL.Image.Image`` (any mode, converted to RGB); ``str`` or ``os.PathLike``
            path of an image file; or a ``torch.uint8`` tensor of shape (3, H, W) or
            (H, W, 3) -- channels-last when the last dim is 3 and the first is not.

    Returns:
        PIL image in mode RGB, size (W, H).
    """
    if isinstance(image, (Image.Image, str, os.PathLike)):
        image = load_image(image)
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8:
            raise TypeError(f"image tensor must have dtype torch.uint8, got {image.dtype}")
        if image.dim() != 3 or 3 not in (image.shape[0], image.shape[-1]):
            raise ValueError(f"image tensor must have shape (3, H, W) or (H, W, 3), got {tuple(image.shape)}")
        channels_last = image.shape[0] != 3
        pixels_hwc = image if channels_last else image.permute(1, 2, 0)
        return Image.fromarray(pixels_hwc.detach().cpu().contiguous().numpy())
    raise TypeError(
        "image must be a PIL.Image.Image, a str/os.PathLike path or a uint8 torch.Tensor, "
        f"got {type(image).__name__}"
    )


def _shortest_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after resizing the short side to ``size`` (torchvision ``Resize(int)``)."""
    short_side, long_side = min(width, height), max(width, height)
    new_long_side = int(size * long_side / short_side)
    return (size, new_long_side) if width <= height else (new_long_side, size)


def _center_crop_offsets(width: int, height: int, size: int) -> tuple[int, int]:
    """(left, top) of the central (size, size) crop, with torchvision ``CenterCrop``'s rounding."""
    return int(round((width - size) / 2.0)), int(round((height - size) / 2.0))


def _resize_shortest_side(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so that the short side is ``size`` (torchvision ``Resize(int)`` sizes)."""
    return image.resize(_shortest_side_size(*image.size, size), Image.Resampling.BICUBIC)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    """Central (size, size) crop, with torchvision ``CenterCrop``'s rounding of the offsets."""
    left, top = _center_crop_offsets(*image.size, size)
    return image.crop((left, top, left + size, top + size))


def _validate_mean_std(name: str, values) -> tuple[float, float, float]:
    if not isinstance(values, (tuple, list)) or len(values) != 3:
        raise ValueError(f"{name} must be 3 numbers (one per RGB channel), got {values!r}")
    if not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values):
        raise TypeError(f"{name} must hold numbers, got {values!r}")
    return tuple(float(value) for value in values)


def check_normalization(mean, std) -> tuple[tuple, tuple]:
    """Per-channel normalisation as (mean, std) float triples; a ValueError/TypeError naming
    the bad one (std must be positive)."""
    mean, std = _validate_mean_std("mean", mean), _validate_mean_std("std", std)
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {std!r}")
    return mean, std


@dataclasses.dataclass(frozen=True)
class ImageTransform:
    """Callable turning one image into a normalised float32 tensor of shape (3, size, size).

    Attributes:
        image_size: output side length in pixels.
        resize_mode: ``"squash"`` (bicubic resize to a square, the DiffCLIP release demo) or
            ``"shortest"`` (bicubic short-side resize + centre crop, open_clip).
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel standard deviation divided by after subtracting the mean.
    """

    image_size: int
    resize_mode: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self):
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int):
            raise TypeError(f"image_size must be an int, got {type(self.image_size).__name__}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        mean, std = check_normalization(self.mean, self.std)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The region (left, top, right, bottom), in pixels of a ``width`` x ``height``
        original image, that the model input shows: the whole image for "squash"; for
        "shortest" the centre crop, mapped back through the short-side resize."""
        if self.resize_mode == "squash":
            return 0.0, 0.0, float(width), float(height)
        resized_width, resized_height = _shortest_side_size(width, height, self.image_size)
        left, top = _center_crop_offsets(resized_width, resized_height, self.image_size)
        scale_x, scale_y = width / resized_width, height / resized_height
        return (left * scale_x, top * scale_y, (left + self.image_size) * scale_x,
                (top + self.image_size) * scale_y)

    def __call__(self, image) -> torch.Tensor:
        """Preprocess one image (see ``load_rgb_image`` for the accepted inputs).

        Returns:
            float32 tensor of shape (3, image_size, image_size).
        """
        size = self.image_size
        if self.resize_mode == "squash":
            # The DiffCLIP demo: convert first, then PIL's default resize filter (bicubic).
            rgb_image = load_rgb_image(image).resize((size, size), Image.Resampling.BICUBIC)
        else:
            # open_clip / OpenAI CLIP: resize and crop in the image's own mode, then convert.
            rgb_image = _center_crop(_resize_shortest_side(load_image(image), size), size)
            rgb_image = rgb_image if rgb_image.mode == "RGB" else rgb_image.convert("RGB")
        pixels_hwc = torch.from_numpy(np.array(rgb_image, dtype=np.uint8))
        pixels = pixels_hwc.permute(2, 0, 1).to(torch.float32) / 255.0
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (pixels - mean) / std


def make_transform(image_size: int = 224, mode: str = "squash", mean=None, std=None) -> ImageTransform:
    """An ``ImageTransform`` for ``mode``, with that mode's usual normalisation.

    Args:
        image_size: output side length (224 for ViT-B/16).
        mode: ``"squash"`` (DiffCLIP release, ImageNet mean/std) or ``"shortest"``
            (open_clip, OpenAI mean/std).
        mean, std: 3 numbers each, overriding the mode's default normalisation.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"mode must be one of {RESIZE_MODES}, got {mode!r}")
    default_mean, default_std = _DEFAULT_MEAN_STD[mode]
    return ImageTransform(
        image_size=image_size,
        resize_mode=mode,
        mean=default_mean if mean is None else mean,
        std=default_std if std is None else std,
    )


def preprocess_batch(images, transform) -> torch.Tensor:
    """Preprocess a list of images into one batch.

    Args:
        images: non-empty list/tuple of images (anything ``transform`` accepts).
        transform: an ``ImageTransform`` (or any callable image -> (3, size, size) tensor).

    Returns:
        float32 tensor of shape (n, 3, size, size).
    """
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be a list or tuple of images, got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("images is empty")
    if not callable(transform):
        raise TypeError(f"transform must be callable, got {type(transform).__name__}")
    return torch.stack([transform(image) for image in images])
