"""scikit-learn's handwritten digits as diffattn uses them, for training
(``diffattn.training.digits``) and evaluation (``diffattn.evaluation.digits_export``): the
class names, the caption templates and the fixed held-out split.

``sklearn.datasets.load_digits`` ships 1,797 real 8x8 grey-level scans (values 0..16) of the
digits 0-9 with the package, so no download is needed. The images are split 80/20, stratified
by digit, with the fixed seed ``SPLIT_SEED`` (independent of any training seed).
"""
from __future__ import annotations

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
