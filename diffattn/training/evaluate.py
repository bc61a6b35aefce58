"""Held-out evaluation: zero-shot top-1 accuracy on a labelled, preprocessed image set (split
over the ranks), and the contrastive validation loss on held-out image-caption pairs."""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor

from ..models.zero_shot import build_zero_shot_classifier
from .distributed import DistInfo
from .loss import contrastive_loss


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


@torch.no_grad()
def zero_shot_top1(model, task: ZeroShotTask, info: DistInfo, autocast=contextlib.nullcontext,
                   batch_size: int = 256) -> float:
    """Fraction of ``task.images`` whose best class under the zero-shot classifier built from
    ``task.classnames`` and ``task.templates`` is the label.

    Args:
        model: the (unwrapped) CLIP; put in eval mode for the call, then back in training mode.
        task: the held-out set; rank r classifies images r, r + world_size, ...
        info: the process layout; with a process group the counts are summed over the ranks,
            so every rank returns the same accuracy.
        autocast: a callable returning the forward pass's autocast context.
        batch_size: images per encode_image call.
    """
    device = model.logit_scale.device
    was_training = model.training
    model.eval()
    try:
        with autocast():
            classifier = build_zero_shot_classifier(model, task.classnames, task.templates)
            images = task.images[info.rank::info.world_size]
            labels = task.labels[info.rank::info.world_size]
            correct = 0
            for start in range(0, images.shape[0], batch_size):
                features = model.encode_image(images[start:start + batch_size].to(device),
                                              normalize=True).float()
                predictions = (features @ classifier.float()).argmax(dim=-1).cpu()
                correct += int((predictions == labels[start:start + batch_size]).sum())
    finally:
        model.train(was_training)
    counts = torch.tensor([correct, labels.shape[0]], dtype=torch.float64, device=device)
    if info.initialized:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return float(counts[0] / counts[1])


@torch.no_grad()
def validation_loss(model, batches, autocast=contextlib.nullcontext) -> tuple[float, list]:
    """Mean contrastive loss over held-out batches, in this process alone.

    Args:
        model: the (unwrapped) CLIP; put in eval mode for the call, then back.
        batches: an iterable of ``data.Batch`` (images, tokens, unreadable, gave_up); the loss
            of each batch is weighted by its size (the last one may be smaller).
        autocast: a callable returning the forward pass's autocast context.

    Returns:
        (the loss, the ``(path, reason)`` of every image file that could not be read; batches
        with gave_up set are left out).
    """
    device = model.logit_scale.device
    was_training = model.training
    model.eval()
    total, count, unreadable = 0.0, 0, []
    try:
        for batch in batches:
            unreadable.extend(batch.unreadable)
            if batch.gave_up:
                continue
            with autocast():
                image_features, text_features, logit_scale = model(
                    batch.images.to(device), batch.tokens.to(device), normalize=True)
            loss = contrastive_loss(image_features, text_features, logit_scale)
            total += float(loss) * batch.images.shape[0]
            count += batch.images.shape[0]
    finally:
        model.train(was_training)
    return (total / count if count else float("nan")), unreadable
