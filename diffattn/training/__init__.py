"""Contrastive training of CLIP / DiffCLIP on torch.distributed; the command line, ``cli``,
runs as ``python -m diffattn.train`` (``diffattn-train``).

- ``distributed``: process group from torchrun's environment; ``gather_with_grad``.
- ``loss``: ``ClipLoss``, the contrastive loss over the features of every rank.
- ``optim``: AdamW parameter groups without decay on norms/biases/lambdas/embeddings, the
  cosine schedule with warm-up, the logit-scale clamp.
- ``data`` / ``digits``: the ``--data`` schemes (digits, csv, folder, wds), their per-rank loaders
  (unreadable images replaced or skipped) and the validation split.
- ``unreadable``: one warning per unreadable image, a count per epoch, the limit on them.
- ``evaluate``: zero-shot top-1 on a held-out split; the validation pairs' loss and retrieval
  recall; zero-shot accuracy on a labelled folder (through ``diffattn.evaluation``).
- ``checkpointing`` / ``metrics``: a run directory with one complete checkpoint at every
  instant (switched by one atomic rename), the best checkpoint, safe resumption,
  ``metrics.jsonl``.
- ``plots``: ``training_curve.png``.
- ``run_directory``: the run's lock (``train.lock``), the writability check, write failures
  reported with the path and the cause (``RunWriteError``).
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
