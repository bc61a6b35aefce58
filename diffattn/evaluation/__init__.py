"""Evaluation of CLIP / DiffCLIP models on datasets; the command line, ``cli``, runs as
``python -m diffattn.eval`` (``diffattn-eval``). Training imports this package for its
per-epoch validation; nothing here imports ``diffattn.training``.

- ``metrics``: pure functions of feature tensors with CLIP_benchmark's metric names
  (zero-shot accuracy, retrieval recall@K, linear probe), for whole datasets and for
  validation during training.
- ``datasets``: class folders, labelled and captioned CSV files, the ImageNet variants.
- ``features``: streamed image and text features, unreadable images skipped up to a limit.
- ``results``: the JSON result files and the comparison table.
- ``digits_export``: the built-in digits written as files.
"""
from .metrics import classification_metrics, linear_probe, retrieval_recall, zero_shot_logits

__all__ = ["classification_metrics", "linear_probe", "retrieval_recall", "zero_shot_logits"]
