"""scikit-learn's handwritten digits written as an evaluation set on disk, split exactly as
training splits them (``diffattn.digits.split_digits``: 80/20, stratified, seed ``SPLIT_SEED``)::

    OUT/train/<digit>/<index>.png   the 1,437 training images (for a linear probe)
    OUT/test/<digit>/<index>.png    the 360 held-out images
    OUT/classnames.txt              zero, one, ..., nine (the class folders 0..9, in order)
    OUT/templates.txt               the training captions' templates, the class name written
                                    {c} (as CLIP_benchmark's templates write it; diffattn's
                                    --templates reads {c} and {} alike)
    OUT/test_captions.csv           filepath,caption: two captions per held-out image

Images are 8x8 RGB PNGs with the values training feeds the model (0..16 scaled to 0..255), so
``model.preprocess`` gives the same input tensors as in training.
"""
from __future__ import annotations

import csv
import os

import numpy as np
from PIL import Image

from ..digits import DIGIT_TEMPLATES, NUMBER_WORDS, split_digits
from .datasets import EvalDataError


def _write_split(out_dir: str, split: str, pixels, labels, indices) -> list:
    files = []
    for index, image, label in zip(indices, pixels, labels):
        folder = os.path.join(out_dir, split, str(int(label)))
        os.makedirs(folder, exist_ok=True)
        values = np.clip(np.round(image.reshape(8, 8) * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        path = os.path.join(folder, f"{int(index):04d}.png")
        Image.fromarray(np.repeat(values[:, :, None], 3, axis=2)).save(path)
        files.append((os.path.relpath(path, out_dir), int(label)))
    return files


def export_digits(out_dir: str) -> dict:
    """Write the digits as class folders and a captions CSV (see the module docstring).

    Args:
        out_dir: a folder that does not exist yet, or an empty one.

    Returns:
        {"train": number of training images, "test": number of held-out images,
        "captions": number of caption rows}.

    Raises:
        EvalDataError: ``out_dir`` is a file or a folder that is not empty.
    """
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise EvalDataError(f"export-digits: {out_dir!r} exists and is not an empty folder")
    train_x, test_x, train_y, test_y, train_i, test_i = split_digits()
    os.makedirs(out_dir, exist_ok=True)
    train = _write_split(out_dir, "train", train_x, train_y, train_i)
    test = _write_split(out_dir, "test", test_x, test_y, test_i)
    with open(os.path.join(out_dir, "classnames.txt"), "w", encoding="utf-8") as file:
        file.write("\n".join(NUMBER_WORDS) + "\n")
    with open(os.path.join(out_dir, "templates.txt"), "w", encoding="utf-8") as file:
        file.write("\n".join(template.replace("{}", "{c}") for template in DIGIT_TEMPLATES)
                   + "\n")
    rows = 0
    with open(os.path.join(out_dir, "test_captions.csv"), "w", encoding="utf-8",
              newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["filepath", "caption"])
        for position, (path, label) in enumerate(test):
            for offset in (0, len(DIGIT_TEMPLATES) // 2):
                template = DIGIT_TEMPLATES[(position + offset) % len(DIGIT_TEMPLATES)]
                writer.writerow([path, template.format(NUMBER_WORDS[label])])
                rows += 1
    return {"train": len(train), "test": len(test), "captions": rows}
