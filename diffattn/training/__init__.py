"""Contrastive training of CLIP / DiffCLIP on torch.distributed; the command line is
``python -m diffattn.train`` (``diffattn-train``).

- ``distributed``: process group from torchrun's environment; ``gather_with_grad``.
- ``loss``: ``ClipLoss``, the contrastive loss over the features of every rank.
- ``optim``: AdamW parameter groups without decay on norms/biases/lambdas/embeddings, the
  cosine schedule with warm-up, the logit-scale clamp.
- ``data`` / ``digits``: the ``--data`` schemes (digits, csv, wds) and their per-rank loaders.
- ``evaluate``: zero-shot top-1 on a held-out split.
- ``checkpointing`` / ``metrics``: atomic checkpoints, safe resumption, ``metrics.jsonl``.
"""
from .checkpointing import CheckpointError
from .data import DataConfig, DataError, TrainData, build_train_data
from .distributed import DistInfo, gather_with_grad
from .loss import ClipLoss
from .optim import clamp_logit_scale, cosine_schedule, create_optimizer, parameter_groups

__all__ = [
    "CheckpointError",
    "ClipLoss",
    "DataConfig",
    "DataError",
    "DistInfo",
    "TrainData",
    "build_train_data",
    "clamp_logit_scale",
    "cosine_schedule",
    "create_optimizer",
    "gather_with_grad",
    "parameter_groups",
]
