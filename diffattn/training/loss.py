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
        if image_features.shape != text_features.shape or image_features.dim() != 2:
            raise ValueError(f"image and text features must both be (n, E), got "
                             f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
        dtype = torch.promote_types(image_features.dtype, torch.float32)
        image_features, text_features = image_features.to(dtype), text_features.to(dtype)
        logit_scale = logit_scale.to(dtype)
        all_images = gather_with_grad(image_features)
        all_texts = gather_with_grad(text_features)
        n = image_features.shape[0]
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        labels = torch.arange(rank * n, (rank + 1) * n, device=image_features.device)
        logits_per_image = logit_scale * image_features @ all_texts.T
        logits_per_text = logit_scale * text_features @ all_images.T
        return (F.cross_entropy(logits_per_image, labels)
                + F.cross_entropy(logits_per_text, labels)) / 2
