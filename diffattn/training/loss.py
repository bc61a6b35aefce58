"""CLIP's contrastive loss over the global batch, computed per rank on its own rows.

Each rank holds n image/text pairs of a global batch of N = world_size * n. The features of all
ranks are gathered with gradients (``gather_with_grad``) and each rank computes the symmetric
cross-entropy of its n rows against all N columns (open_clip's ``local_loss`` with
``gather_with_grad``)::

    loss_r = ( CE(s * I_r @ T^T, labels_r) + CE(s * T_r @ I^T, labels_r) ) / 2
    labels_r = r * n + arange(n)

The mean of loss_r over the ranks is the single-process loss on the whole global batch. The
gather's backward sums every rank's gradient into the rows' owner, so rank r's parameter
gradient is d(sum_k loss_k)/dθ through its own rows; DistributedDataParallel averages over the
ranks, which gives d(mean_k loss_k)/dθ: exactly the single-process gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import gather_with_grad


def _checked_features(image_features: Tensor, text_features: Tensor, logit_scale: Tensor):
    """The features and scale in the loss's dtype (at least float32), after a shape check."""
    if image_features.shape != text_features.shape or image_features.dim() != 2:
        raise ValueError(f"image and text features must both be (n, E), got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    dtype = torch.promote_types(image_features.dtype, torch.float32)
    return image_features.to(dtype), text_features.to(dtype), logit_scale.to(dtype)


def _symmetric_cross_entropy(image_features: Tensor, text_features: Tensor, all_images: Tensor,
                             all_texts: Tensor, logit_scale: Tensor, first_row: int) -> Tensor:
    """Mean of the image->text and text->image cross-entropies of the n given rows against all
    columns; row i's match is column first_row + i."""
    n = image_features.shape[0]
    labels = torch.arange(first_row, first_row + n, device=image_features.device)
    logits_per_image = logit_scale * image_features @ all_texts.T
    logits_per_text = logit_scale * text_features @ all_images.T
    return (F.cross_entropy(logits_per_image, labels)
            + F.cross_entropy(logits_per_text, labels)) / 2


def contrastive_loss(image_features: Tensor, text_features: Tensor,
                     logit_scale: Tensor) -> Tensor:
    """CLIP's loss of n pairs against each other in this process alone (what ClipLoss gives
    with one rank); used for validation, which runs on one rank.

    Args:
        image_features, text_features: (n, E) unit-length features, row i of each a pair.
        logit_scale: 0-dim, the (already exponentiated) temperature multiplier.
    """
    image_features, text_features, logit_scale = _checked_features(
        image_features, text_features, logit_scale)
    return _symmetric_cross_entropy(image_features, text_features, image_features,
                                    text_features, logit_scale, 0)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over features gathered from every rank (see the module docstring)."""

    def forward(self, image_features: Tensor, text_features: Tensor,
                logit_scale: Tensor) -> Tensor:
        """Loss of this rank's rows.

        Args:
            image_features, text_features: (n, E) unit-length features of this rank's pairs
                (row i of each belongs to the same pair); n is equal on every rank.
            logit_scale: 0-dim, the (already exponentiated) temperature multiplier.

        Returns:
            0-dim loss in float32 (float64 for float64 features): the mean over this rank's
            n rows of the image->text and text->image cross-entropies, averaged.
        """
        image_features, text_features, logit_scale = _checked_features(
            image_features, text_features, logit_scale)
        all_images = gather_with_grad(image_features)
        all_texts = gather_with_grad(text_features)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return _symmetric_cross_entropy(image_features, text_features, all_images, all_texts,
                                        logit_scale, rank * image_features.shape[0])
