"""scikit-learn's handwritten digits as diffattn uses them, for training (``--data digits``)
and evaluation (``diffattn.evaluation.digits_export``): the class names, the caption
templates, the fixed held-out split, and the image-caption dataset with its held-out
zero-shot task.

``sklearn.datasets.load_digits`` ships 1,797 real 8x8 grey-level scans (values 0..16) of the
digits 0-9 with the package, so no download is needed. The images are split 80/20, stratified
by digit, with the fixed seed ``SPLIT_SEED`` (independent of any training seed), and the 20%
are the held-out zero-shot evaluation set, classified with the caption templates. Each image
is scaled to 0..255 uint8, repeated to 3 channels and put through the model's own
preprocessing (``model.preprocess``: resize to the model's input size, then its mean/std). A
training caption is one of ``DIGIT_TEMPLATES`` filled with the digit's number word ("a photo
of the number seven"), drawn at random each time the image is read.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor
from torch.utils.data import Dataset

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = (
    "a photo of the number {}.",
    "a handwritten digit {}.",
    "an image of the digit {}.",
    "a scan of the handwritten number {}.",
    "the number {}, written by hand.",
    "a black and white picture of the digit {}.",
)
SPLIT_SEED = 0
TEST_FRACTION = 0.2


def split_digits() -> tuple:
    """(train_pixels (N, 64), test_pixels (M, 64), train_labels (N,), test_labels (M,),
    train_indices (N,), test_indices (M,)): numpy arrays of the 80/20 split, pixels 0..16,
    indices into ``load_digits()``'s order."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = np.arange(len(digits.target))
    return tuple(train_test_split(digits.data, digits.target, indices, test_size=TEST_FRACTION,
                                  stratify=digits.target, random_state=SPLIT_SEED))


@dataclasses.dataclass(frozen=True)
class ZeroShotTask:
    """A held-out classification set.

    Attributes:
        images: (N, 3, S, S) preprocessed images.
        labels: (N,) class indices into ``classnames``.
        classnames, templates: the zero-shot classifier's prompts (``template.format(name)``).
    """

    images: Tensor
    labels: Tensor
    classnames: tuple
    templates: tuple


class DigitCaptions(Dataset):
    """Preprocessed digit images with a random caption per read.

    Args:
        images: (N, 3, S, S) float, preprocessed.
        labels: (N,) int64 digits.
        caption_tokens: (10, T, L) token ids of template t filled with digit c's number word.

    Items are (image (3, S, S), token ids (L,)); the template is drawn with torch's RNG.
    """

    def __init__(self, images: Tensor, labels: Tensor, caption_tokens: Tensor):
        self.images, self.labels, self.caption_tokens = images, labels, caption_tokens

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        template = int(torch.randint(self.caption_tokens.shape[1], ()))
        return self.images[index], self.caption_tokens[self.labels[index], template]


def _preprocess_digits(pixels, transform) -> Tensor:
    """(N, 64) float 0..16 -> (N, 3, S, S) with ``transform`` applied to each uint8 image."""
    scaled = torch.from_numpy(pixels).reshape(-1, 1, 8, 8).mul(255.0 / 16.0).round()
    images = scaled.clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
    return torch.stack([transform(image.contiguous()) for image in images])


def _caption_tokens(tokenize) -> Tensor:
    """(10, T, L) token ids of every digit/template caption, cut after the longest caption's
    end-of-text token (the text tower is causal and pools at that token, so the padding
    after it never changes a feature)."""
    captions = [template.format(word) for word in NUMBER_WORDS for template in DIGIT_TEMPLATES]
    tokens = tokenize(captions)
    length = int(tokens.argmax(dim=-1).max()) + 1
    return tokens[:, :length].reshape(len(NUMBER_WORDS), len(DIGIT_TEMPLATES), length)


def load_digits_data(transform, tokenize) -> tuple[DigitCaptions, ZeroShotTask]:
    """The training split as a dataset and the held-out split as a zero-shot task.

    Args:
        transform: the model's ImageTransform (``model.preprocess``).
        tokenize: texts -> (n, context_length) token ids (``model.tokenize``).

    Returns:
        (DigitCaptions over the 80% split, ZeroShotTask over the 20% split).
    """
    train_x, test_x, train_y, test_y, _, _ = split_digits()
    train = DigitCaptions(_preprocess_digits(train_x, transform), torch.as_tensor(train_y),
                          _caption_tokens(tokenize))
    task = ZeroShotTask(images=_preprocess_digits(test_x, transform),
                        labels=torch.as_tensor(test_y), classnames=NUMBER_WORDS,
                        templates=DIGIT_TEMPLATES)
    return train, task
