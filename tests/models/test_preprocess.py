"""Tests for diffattn.models.preprocess: geometry, normalisation and input kinds."""
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from diffattn.models.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_MEAN,
    OPENAI_STD,
    ImageTransform,
    UnreadableImageError,
    make_transform,
    preprocess_batch,
)

MODES = ("squash", "shortest")


def _random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _normalised(colour, mean, std) -> torch.Tensor:
    """(c / 255 - mean) / std per channel, as a (3, 1, 1) float32 tensor."""
    pixels = torch.tensor(colour, dtype=torch.float32).view(3, 1, 1) / 255.0
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


@pytest.mark.parametrize("mode", MODES)
def test_shape_and_dtype(mode):
    transform = make_transform(image_size=32, mode=mode)
    output = transform(_random_image(50, 40))
    assert output.shape == (3, 32, 32)
    assert output.dtype == torch.float32


def test_make_transform_picks_mean_std_by_mode():
    squash = make_transform(mode="squash")
    shortest = make_transform(mode="shortest")
    assert (squash.image_size, squash.resize_mode) == (224, "squash")
    assert (squash.mean, squash.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert (shortest.mean, shortest.std) == (OPENAI_MEAN, OPENAI_STD)
    custom = make_transform(mode="shortest", mean=(0.5, 0.5, 0.5), std=[1, 1, 1])
    assert (custom.mean, custom.std) == ((0.5, 0.5, 0.5), (1.0, 1.0, 1.0))


@pytest.mark.parametrize("mode, mean, std", [("squash", IMAGENET_MEAN, IMAGENET_STD), ("shortest", OPENAI_MEAN, OPENAI_STD)])
def test_solid_colour_values(mode, mean, std):
    colour = (200, 100, 30)
    image = Image.new("RGB", (37, 23), colour)
    output = make_transform(image_size=16, mode=mode)(image)
    torch.testing.assert_close(output, _normalised(colour, mean, std).expand(3, 16, 16))


def test_identity_normalisation_gives_pixels_over_255():
    image = _random_image(8, 8)
    output = make_transform(image_size=8, mode="squash", mean=(0, 0, 0), std=(1, 1, 1))(image)
    expected = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0
    torch.testing.assert_close(output, expected, rtol=0, atol=0)


def test_shortest_centre_crop_geometry():
    # 60x20 image: black, with a white vertical stripe in the central 20 columns. The short
    # side is already 20, so "shortest" at 20 only crops columns 20..39: all white.
    pixels = np.zeros((20, 60, 3), dtype=np.uint8)
    pixels[:, 20:40] = 255
    image = Image.fromarray(pixels)
    identity = {"mean": (0, 0, 0), "std": (1, 1, 1)}
    cropped = make_transform(image_size=20, mode="shortest", **identity)(image)
    assert torch.equal(cropped, torch.ones(3, 20, 20))
    # "squash" keeps the whole width: black left and right, white in the middle.
    squashed = make_transform(image_size=20, mode="squash", **identity)(image)
    assert squashed[:, :, 0].max() == 0 and squashed[:, :, -1].max() == 0
    assert torch.equal(squashed[:, :, 10], torch.ones(3, 20))


def test_shortest_crop_offsets_follow_torchvision_rounding():
    # 10 wide, 13 high: short side 10 stays, the crop starts at row round(3 / 2) = 2.
    pixels = np.zeros((13, 10, 3), dtype=np.uint8)
    pixels[:, :, 0] = np.arange(13, dtype=np.uint8)[:, None]  # red channel = row index
    output = make_transform(image_size=10, mode="shortest", mean=(0, 0, 0), std=(1, 1, 1))(Image.fromarray(pixels))
    first_rows = (output[0, :, 0] * 255).round().to(torch.int64).tolist()
    assert first_rows == list(range(2, 12))


def test_shortest_resize_long_side_size():
    # 30x20 -> short side 10, long side int(10 * 30 / 20) = 15, then a central crop of 10.
    image = _random_image(30, 20)
    expected = image.resize((15, 10), Image.Resampling.BICUBIC).crop((2, 0, 12, 10))
    output = make_transform(image_size=10, mode="shortest", mean=(0, 0, 0), std=(1, 1, 1))(image)
    expected_tensor = torch.from_numpy(np.array(expected)).permute(2, 0, 1).float() / 255.0
    torch.testing.assert_close(output, expected_tensor, rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_tensor_and_pil_inputs_agree(mode):
    image = _random_image(45, 31, seed=1)
    pixels_hwc = torch.from_numpy(np.array(image))
    transform = make_transform(image_size=24, mode=mode)
    from_pil = transform(image)
    assert torch.equal(transform(pixels_hwc), from_pil)
    assert torch.equal(transform(pixels_hwc.permute(2, 0, 1)), from_pil)


def test_non_rgb_pil_image_is_converted():
    grey = Image.new("L", (12, 12), 128)
    output = make_transform(image_size=12, mode="squash", mean=(0, 0, 0), std=(1, 1, 1))(grey)
    torch.testing.assert_close(output, torch.full((3, 12, 12), 128 / 255.0))


def test_path_input(tmp_path):
    image = _random_image(33, 27, seed=2)
    image_path = tmp_path / "image.png"
    image.save(image_path)
    transform = make_transform(image_size=16, mode="shortest")
    assert torch.equal(transform(image_path), transform(image))
    assert torch.equal(transform(str(image_path)), transform(image))


def test_preprocess_batch():
    images = [_random_image(20, 30, seed=seed) for seed in range(3)]
    transform = make_transform(image_size=16)
    batch = preprocess_batch(images, transform)
    assert batch.shape == (3, 3, 16, 16)
    assert batch.dtype == torch.float32
    assert torch.equal(batch[1], transform(images[1]))


def test_bad_image_inputs(tmp_path):
    transform = make_transform(image_size=8)
    with pytest.raises(TypeError, match="image"):
        transform(torch.zeros(3, 8, 8, dtype=torch.float32))
    with pytest.raises(ValueError, match="image"):
        transform(torch.zeros(8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="image"):
        transform(torch.zeros(4, 8, 8, dtype=torch.uint8))
    with pytest.raises(TypeError, match="image"):
        transform(np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        transform(tmp_path / "missing.png")


def test_bad_transform_settings():
    with pytest.raises(ValueError, match="mode"):
        make_transform(mode="crop")
    with pytest.raises(ValueError, match="resize_mode"):
        ImageTransform(image_size=8, resize_mode="crop", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    with pytest.raises(ValueError, match="image_size"):
        make_transform(image_size=0)
    with pytest.raises(TypeError, match="image_size"):
        make_transform(image_size=22.5)
    with pytest.raises(ValueError, match="mean"):
        make_transform(mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="std"):
        make_transform(std=(0.5, 0.0, 0.5))


def test_bad_batch_inputs():
    transform = make_transform(image_size=8)
    with pytest.raises(TypeError, match="images"):
        preprocess_batch(_random_image(8, 8), transform)
    with pytest.raises(ValueError, match="images"):
        preprocess_batch([], transform)
    with pytest.raises(TypeError, match="transform"):
        preprocess_batch([_random_image(8, 8)], "squash")


def _to_tensor(image: Image.Image, mean, std) -> torch.Tensor:
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def test_squash_is_the_release_demo_resize():
    """The DiffCLIP demo: img.convert("RGB").resize((224, 224)), PIL's default (bicubic) filter."""
    image = _random_image(300, 180, seed=3)
    got = make_transform(224, mode="squash")(image)
    expected = _to_tensor(image.convert("RGB").resize((224, 224)), IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA"])
def test_shortest_resamples_in_the_image_mode_then_converts(mode):
    """open_clip and OpenAI CLIP resize and crop first and convert to RGB last."""
    image = _random_image(90, 60, seed=4).convert(mode)
    got = make_transform(32, mode="shortest")(image)
    resized = image.resize((int(32 * 90 / 60), 32), Image.Resampling.BICUBIC)
    left = int(round((resized.width - 32) / 2.0))
    expected_image = resized.crop((left, 0, left + 32, 32)).convert("RGB")
    torch.testing.assert_close(got, _to_tensor(expected_image, OPENAI_MEAN, OPENAI_STD),
                               rtol=0, atol=1e-6)


# ------------------------------------------------------------------------ deep images
IDENTITY = {"mean": (0, 0, 0), "std": (1, 1, 1)}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def _rgb16_png(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG of (H, W, 3) uint16 ``pixels`` (PIL cannot write one)."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\0" + pixels[row].astype(">u2").tobytes() for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b""))


@pytest.mark.parametrize("mode", MODES)
def test_16_bit_grey_png_is_scaled_by_1_over_257(tmp_path, mode):
    values = np.array([[0, 257, 32896], [65535, 12850, 1028]], dtype=np.uint16)  # 0 1 128 255 50 4
    path = tmp_path / "grey16.png"
    Image.fromarray(np.repeat(np.repeat(values, 8, axis=0), 8, axis=1)).save(path)
    with Image.open(path) as opened:
        assert opened.mode.startswith("I")
    output = make_transform(image_size=8, mode=mode, **IDENTITY)(path)
    # A flat 16-bit image of value v gives v / 257 / 255 everywhere.
    flat = Image.fromarray(np.full((10, 10), 32896, dtype=np.uint16))
    torch.testing.assert_close(make_transform(image_size=8, mode=mode, **IDENTITY)(flat),
                               torch.full((3, 8, 8), 128 / 255))
    assert 0.0 <= output.min() and output.max() <= 1.0
    assert output.mean() < 0.9  # not the ~99% white of clipping to 255


def test_16_bit_rgb_png_keeps_its_colours(tmp_path):
    pixels = np.zeros((6, 6, 3), dtype=np.uint16)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 65535, 32896, 257
    path = tmp_path / "rgb16.png"
    path.write_bytes(_rgb16_png(pixels))
    output = make_transform(image_size=6, mode="squash", **IDENTITY)(path)
    torch.testing.assert_close(output[:, 0, 0], torch.tensor([255, 128, 1]) / 255)


@pytest.mark.parametrize("mode", MODES)
def test_float_tiff_in_0_1_is_scaled_by_255(tmp_path, mode):
    path = tmp_path / "float.tif"
    Image.fromarray(np.full((12, 12), 0.5, dtype=np.float32)).save(path)
    with Image.open(path) as opened:
        assert opened.mode == "F"
    output = make_transform(image_size=8, mode=mode, **IDENTITY)(path)
    torch.testing.assert_close(output, torch.full((3, 8, 8), 128 / 255))  # round(127.5) = 128


@pytest.mark.parametrize("values, message", [
    (np.full((4, 4), 2.0, dtype=np.float32), r"float image values must lie in \[0, 1\], got values in \[2, 2\]"),
    (np.full((4, 4), np.nan, dtype=np.float32), "got NaN or infinite values"),
])
def test_float_image_out_of_range_is_an_error(values, message):
    with pytest.raises(ValueError, match=message):
        make_transform(image_size=4)(Image.fromarray(values))


def test_32_bit_integer_image_beyond_16_bits_is_an_error():
    with pytest.raises(ValueError, match="16-bit image values must lie in 0..65535"):
        make_transform(image_size=4)(Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)))


# ------------------------------------------------------------------------ crop box
def test_crop_box_of_each_mode():
    assert make_transform(10, mode="squash").crop_box(60, 20) == (0.0, 0.0, 60.0, 20.0)
    # 60x20 at 10: resized to 30x10, crop columns 10..20 of it = columns 20..40 of the original.
    assert make_transform(10, mode="shortest").crop_box(60, 20) == (20.0, 0.0, 40.0, 20.0)
    # 10x13 at 10: no resize, rows 2..12 (torchvision's rounding).
    assert make_transform(10, mode="shortest").crop_box(10, 13) == (0.0, 2.0, 10.0, 12.0)


@pytest.mark.parametrize("content", [b"", b"not an image", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"])
def test_unreadable_file_is_a_value_error_naming_it(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(UnreadableImageError, match="cannot read image file '.*broken.png': ") as raised:
        make_transform(image_size=8)(path)
    assert isinstance(raised.value, ValueError) and raised.value.path == str(path)
