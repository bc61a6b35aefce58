"""scikit-learn's handwritten digits as an image-caption dataset, with a held-out zero-shot split.

``sklearn.datasets.load_digits`` ships 1,797 real 8x8 grey-level scans (values 0..16) of the
digits 0-9 with the package, so no download is needed. Each image is scaled to 0..255 uint8,
repeated to 3 channels and put through the model's own preprocessing (``model.preprocess``:
resize to the model's input size, then its mean/std). A training caption is one of
``DIGIT_TEMPLATES`` filled with the digit's number word ("a photo of the number seven"), drawn
at random each time the image is read. The images are split as ``diffattn.digits.split_digits``
splits them (80/20, stratified, seed ``SPLIT_SEED``), and the 20% are the held-out zero-shot
evaluation set, classified with the same templates.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..digits import DIGIT_TEMPLATES, NUMBER_WORDS, SPLIT_SEED, TEST_FRACTION, split_digits
from .evaluate import ZeroShotTask

__all__ = ["DIGIT_TEMPLATES", "NUMBER_WORDS", "SPLIT_SEED", "TEST_FRACTION", "DigitCaptions",
           "load_digits_data"]

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
