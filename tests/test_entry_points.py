"""open_clip-style entry points of diffattn.models: create_model_and_transforms, get_tokenizer,
the training transform (checked against torchvision where it is installed) and the error for a
``pretrained`` that is not a local file."""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from diffattn.models import (PretrainedNotFoundError, RandomResizedCropTransform, create_model,
                             create_model_and_transforms, get_config, get_tokenizer,
                             make_train_transform, save_pretrained, tokenize)


def _image(width=60, height=44, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_create_model_and_transforms_returns_model_train_and_eval_transforms(tmp_path):
    model, train, evaluate = create_model_and_transforms("DiffCLIP-Tiny", backend="torch")
    assert model.training and evaluate is model.preprocess
    assert isinstance(train, RandomResizedCropTransform)
    assert (train.image_size, train.mean, train.std) == \
        (evaluate.image_size, evaluate.mean, evaluate.std)
    assert (train.scale, train.ratio) == ((0.9, 1.0), (0.75, 4 / 3))
    image = _image()
    for transform in (train, evaluate):
        pixels = transform(image)
        assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    with torch.no_grad():
        features = model.encode_image(torch.stack([train(image), evaluate(image)]))
    assert features.shape == (2, 64) and torch.isfinite(features).all()

    path = tmp_path / "tiny.safetensors"
    save_pretrained(model, path)
    loaded, _, _ = create_model_and_transforms(None, pretrained=path, backend="torch")
    assert loaded.config == model.config
    open_clip_layout, _, evaluate = create_model_and_transforms("ViT-B-32", device="meta")
    assert evaluate.resize_mode == "shortest" and open_clip_layout.config.layout == "open_clip"


def test_get_tokenizer_uses_the_models_context_length():
    tokenizer = get_tokenizer("ViT-B-32")
    assert tokenizer.context_length == 77
    ids = tokenizer(["a photo of a cat", "a dog"])
    assert torch.equal(ids, tokenize(["a photo of a cat", "a dog"]))
    config = get_config("DiffCLIP-Tiny")
    short = dataclasses.replace(config, text=dataclasses.replace(config.text, context_length=12))
    assert get_tokenizer(short)("a cat").shape == (1, 12)
    assert get_tokenizer(short)("a cat", context_length=20).shape == (1, 20)
    with pytest.raises(ValueError, match="unknown model name 'ViT-Q'"):
        get_tokenizer("ViT-Q")


@pytest.mark.parametrize("pretrained", ["openai", "laion2b_s34b_b88k", "missing/checkpoint.pt"])
@pytest.mark.parametrize("entry_point", [create_model, create_model_and_transforms])
def test_pretrained_that_is_not_a_file_names_what_is_supported(entry_point, pretrained):
    with pytest.raises(PretrainedNotFoundError) as error:
        entry_point("ViT-B-32", pretrained=pretrained)
    assert isinstance(error.value, ValueError) and isinstance(error.value, FileNotFoundError)
    message = str(error.value)
    assert message.startswith(f"checkpoint file not found: {pretrained!r}. pretrained must be "
                              "a local file")
    for supported in ("DiffCLIP release checkpoint", "open_clip state dict", ".safetensors",
                      "save_pretrained", "download tags"):
        assert supported in message
    with pytest.raises(TypeError, match="pretrained must be a file path"):
        entry_point("ViT-B-32", pretrained=True)


# ------------------------------------------------------------------------ training transform
def test_crop_boxes_stay_in_range():
    transform = make_train_transform(16, mean=(0.5,) * 3, std=(0.25,) * 3,
                                     generator=torch.Generator().manual_seed(0))
    for _ in range(200):
        left, top, w, h = transform.crop_box(100, 80)
        assert 0 <= left <= 100 - w and 0 <= top <= 80 - h
        assert 0.9 * 8000 * 0.98 <= w * h <= 8000
        assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
    # An image too elongated for any try: the central box at the nearest allowed ratio.
    assert transform.crop_box(1000, 10) == ((1000 - 13) // 2, 0, 13, 10)
    assert transform.crop_box(10, 1000) == (0, (1000 - 13) // 2, 10, 13)


def test_train_transform_is_seeded_and_resizes_the_crop():
    image = _image()
    first = make_train_transform(24, (0.5,) * 3, (0.25,) * 3,
                                 generator=torch.Generator().manual_seed(3))
    second = make_train_transform(24, (0.5,) * 3, (0.25,) * 3,
                                  generator=torch.Generator().manual_seed(3))
    draws = [first(image) for _ in range(3)]
    assert all(torch.equal(a, second(image)) for a in draws)
    assert not torch.equal(draws[0], draws[1])
    # scale 1 at the image's own ratio: the whole image, bicubic-resized and normalised.
    whole = make_train_transform(24, (0.5,) * 3, (0.25,) * 3, scale=(1.0, 1.0),
                                 ratio=(60 / 44, 60 / 44))(image)
    resized = np.asarray(image.resize((24, 24), Image.Resampling.BICUBIC), dtype=np.float32)
    expected = (torch.from_numpy(resized).permute(2, 0, 1) / 255.0 - 0.5) / 0.25
    torch.testing.assert_close(whole, expected)


def test_train_transform_accepts_paths_tensors_and_other_modes(tmp_path):
    transform = make_train_transform(8, (0.5,) * 3, (0.5,) * 3)
    path = tmp_path / "image.png"
    _image().convert("P").save(path)
    for image in (path, str(path), torch.zeros(3, 20, 30, dtype=torch.uint8),
                  _image().convert("L")):
        assert transform(image).shape == (3, 8, 8)


@pytest.mark.parametrize("change, error, message", [
    (dict(image_size=0), ValueError, "image_size"),
    (dict(scale=(0.5, 1.5)), ValueError, "scale must satisfy"),
    (dict(ratio=(2.0, 1.0)), ValueError, "ratio must satisfy"),
    (dict(scale=0.9), TypeError, "scale must be two numbers"),
    (dict(std=(1.0, 0.0, 1.0)), ValueError, "std must be positive"),
    (dict(generator=3), TypeError, "generator"),
])
def test_train_transform_bad_arguments(change, error, message):
    arguments = dict(image_size=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    arguments.update(change)
    with pytest.raises(error, match=message):
        make_train_transform(**arguments)


def test_train_transform_equals_torchvision_random_resized_crop():
    transforms = pytest.importorskip("torchvision.transforms")
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    ours = make_train_transform(24, mean, std, scale=(0.08, 1.0))
    theirs = transforms.Compose([
        transforms.RandomResizedCrop(24, scale=(0.08, 1.0),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(), transforms.Normalize(mean, std)])
    for seed in range(20):
        image = _image(40 + 7 * seed, 30 + 3 * seed, seed)
        torch.manual_seed(seed)
        expected = theirs(image)
        torch.manual_seed(seed)
        torch.testing.assert_close(ours(image), expected, rtol=0, atol=1e-6)
