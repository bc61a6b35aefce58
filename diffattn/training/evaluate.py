"""Held-out evaluation during training: zero-shot top-1 accuracy on a labelled, preprocessed
image set (split over the ranks); the contrastive loss and the retrieval Recall@K of held-out
image-caption pairs; zero-shot accuracy on a folder of labelled images (``--val-zeroshot``).

The metrics are ``diffattn.evaluation``'s (``retrieval_recall``, ``classification_metrics``,
``zero_shot_logits``), and the folder's features are computed as ``python -m diffattn.eval
classify`` computes them (``diffattn.evaluation.features``), so a checkpoint evaluated with
that command gives the numbers its epoch recorded."""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.distributed as dist

from ..digits import ZeroShotTask
from ..evaluation.datasets import LabelledImages
from ..evaluation.features import encode_image_files
from ..evaluation.metrics import classification_metrics, retrieval_recall, zero_shot_logits
from ..models.zero_shot import build_zero_shot_classifier
from .distributed import DistInfo
from .loss import contrastive_loss


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


RECALL_K = (1, 5, 10)


@torch.no_grad()
def validate_pairs(model, batches, autocast=contextlib.nullcontext,
                   recall_k=RECALL_K) -> tuple[float, dict, list]:
    """Mean contrastive loss and retrieval Recall@K of held-out pairs, in this process alone.

    Args:
        model: the (unwrapped) CLIP; put in eval mode for the call, then back.
        batches: an iterable of ``data.Batch`` (images, tokens, unreadable, gave_up); the loss
            of each batch is weighted by its size (the last one may be smaller).
        autocast: a callable returning the forward pass's autocast context.
        recall_k: the K of the retrieval metrics.

    Returns:
        (the loss; ``{"image_retrieval_recall@K", "text_retrieval_recall@K"}`` of
        ``diffattn.evaluation.retrieval_recall`` over all pairs, each pair one image and its
        caption ({} without pairs); the ``(path, reason)`` of every image file that could not
        be read). Batches with gave_up set are left out.
    """
    device = model.logit_scale.device
    was_training = model.training
    model.eval()
    total, count, unreadable = 0.0, 0, []
    all_images, all_texts = [], []
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
            all_images.append(image_features.float().cpu())
            all_texts.append(text_features.float().cpu())
    finally:
        model.train(was_training)
    recall = {}
    if count:
        recall = retrieval_recall(torch.cat(all_images), torch.cat(all_texts),
                                  torch.arange(count), recall_k)
    return (total / count if count else float("nan")), recall, unreadable


@dataclasses.dataclass(frozen=True)
class FolderZeroShotTask:
    """A labelled image folder (``--val-zeroshot``) and the templates of its classifier."""

    images: LabelledImages
    templates: tuple


@torch.no_grad()
def folder_zero_shot(model, task: FolderZeroShotTask, *, batch_size: int, workers: int,
                     max_unreadable_fraction: float, autocast=contextlib.nullcontext) -> dict:
    """Zero-shot ``acc1``, ``acc5`` and ``mean_per_class_recall`` of the readable images of
    ``task`` (``diffattn.evaluation.classification_metrics``; unreadable files are skipped
    with a warning, up to ``max_unreadable_fraction``), as ``python -m diffattn.eval classify``
    computes them; in this process alone.

    Args:
        model: the (unwrapped) CLIP; put in eval mode for the call, then back.
    """
    device = model.logit_scale.device
    was_training = model.training
    model.eval()
    try:
        with autocast():
            classifier = build_zero_shot_classifier(model, task.images.classnames, task.templates)
        features, kept = encode_image_files(model, task.images.paths, batch_size=batch_size,
                                            workers=workers, device=device, progress=False,
                                            max_unreadable_fraction=max_unreadable_fraction,
                                            desc="--val-zeroshot")
    finally:
        model.train(was_training)
    labels = torch.as_tensor(task.images.labels)[kept]
    return classification_metrics(zero_shot_logits(features, classifier.float().cpu()), labels)
