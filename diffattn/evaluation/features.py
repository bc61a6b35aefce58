"""Image and text features of a whole evaluation set, streamed: images are read, preprocessed
and encoded batch by batch (DataLoader workers), and only the features are kept.

Image files that cannot be read are skipped with one warning each (as training does,
``diffattn.unreadable``); more than ``max_unreadable_fraction`` of the files stops
the run with an error listing them.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..models.preprocess import UNREADABLE_IMAGE_ERRORS, unreadable_image_reason
from ..unreadable import UnreadableWarnings
from .datasets import EvalDataError

_LISTED = 10


def autocast_for(device) -> contextlib.AbstractContextManager:
    """bf16 autocast on a CUDA device, nothing elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class ImageFiles(Dataset):
    """Items are (image (3, S, S), index, reason): ``reason`` is "" for a readable file; for an
    unreadable one the image is zeros and ``reason`` says why."""

    def __init__(self, paths: list, transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return self.transform(self.paths[index]), index, ""
        except UNREADABLE_IMAGE_ERRORS as error:
            size = self.transform.image_size
            return torch.zeros(3, size, size), index, unreadable_image_reason(error) or "unreadable"


def _unreadable_error(entries: list, total: int, limit: float) -> EvalDataError:
    listed = "; ".join(f"{path} ({reason})" for path, reason in entries[:_LISTED])
    more = f"; and {len(entries) - _LISTED} more" if len(entries) > _LISTED else ""
    if all(reason == "file not found" for _, reason in entries):
        return EvalDataError(f"{len(entries)} of {total} image files were not found, more than "
                             f"--max-unreadable-fraction {limit:g}: {listed}{more}. Check that "
                             "these paths exist (a CSV file's relative paths are relative to "
                             "its folder)")
    return EvalDataError(f"{len(entries)} of {total} image files could not be read, more than "
                         f"--max-unreadable-fraction {limit:g}: {listed}{more}. Fix or remove "
                         "these files or raise --max-unreadable-fraction")


@torch.no_grad()
def encode_image_files(model, paths: list, *, batch_size: int = 64, workers: int = 0,
                       device="cpu", max_unreadable_fraction: float = 0.01,
                       progress: bool = True, desc: str = "images") -> tuple[Tensor, Tensor]:
    """Normalised image features of the readable files of ``paths``.

    Args:
        model: a CLIP in eval mode on ``device`` (``model.preprocess`` reads each file).
        paths: image file paths.
        batch_size, workers: DataLoader settings.
        max_unreadable_fraction: the largest fraction of ``paths`` that may be unreadable.
        progress: show a progress bar (tqdm, on stderr).

    Returns:
        (features (n, D) float32 on the CPU, unit rows; indices (n,) int64 into ``paths`` of
        the files they belong to, in order).

    Raises:
        EvalDataError: more than ``max_unreadable_fraction`` of the files are unreadable (as
            soon as that is certain), listing them.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    device = torch.device(device)
    loader = DataLoader(ImageFiles(paths, model.preprocess), batch_size=batch_size,
                        num_workers=workers, pin_memory=device.type == "cuda")
    tracker = UnreadableWarnings()
    unreadable, features, indices = [], [], []
    for images, batch_indices, reasons in tqdm(loader, desc=desc, unit="batch",
                                               disable=not progress, leave=False):
        readable = torch.tensor([not reason for reason in reasons])
        entries = [(paths[int(i)], reason) for i, reason in zip(batch_indices, reasons) if reason]
        if entries:
            tracker.warn(entries)
            unreadable.extend(entries)
            if len(unreadable) > max_unreadable_fraction * len(paths):
                raise _unreadable_error(unreadable, len(paths), max_unreadable_fraction)
        if not bool(readable.any()):
            continue
        with autocast_for(device):
            batch = model.encode_image(images[readable].to(device, non_blocking=True),
                                       normalize=True)
        features.append(batch.float().cpu())
        indices.append(batch_indices[readable])
    if not features:
        raise _unreadable_error(unreadable, len(paths), max_unreadable_fraction)
    return torch.cat(features), torch.cat(indices).long()


@torch.no_grad()
def encode_texts(model, texts: list, *, batch_size: int = 256, device="cpu",
                 progress: bool = True) -> Tensor:
    """(len(texts), D) float32 normalised text features on the CPU (tokenized with
    ``trim=True``: the same features on fewer token columns)."""
    device = torch.device(device)
    features = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="captions", unit="batch", disable=not progress, leave=False):
        tokens = model.tokenize(texts[start:start + batch_size], trim=True).to(device)
        with autocast_for(device):
            features.append(model.encode_text(tokens, normalize=True).float().cpu())
    return torch.cat(features)
