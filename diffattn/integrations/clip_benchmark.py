"""diffattn models in LAION's CLIP_benchmark (``pip install "diffattn[clip_benchmark]"``).

CLIP_benchmark loads a model through a *model type*: a function
``load(model_name, pretrained, cache_dir, device) -> (model, transform, tokenizer)`` listed in
``clip_benchmark.models.TYPE2FUNC`` (and ``MODEL_TYPES``, the CLI's ``--model_type`` choices).
``load_diffattn`` is that function for diffattn; ``register()`` adds it as the model type
``"diffattn"``. Its metrics call ``model.encode_image(images)`` and
``model.encode_text(tokenizer(texts))`` and normalise the features themselves, which diffattn's
CLIP does unchanged.

Command line (CLIP_benchmark's own, with the model type registered first)::

    python -m diffattn.integrations.clip_benchmark eval --model_type diffattn \\
        --model DiffCLIP-ViT-B-16 --pretrained checkpoint_best.pt \\
        --dataset imagenet1k --dataset_root /data/imagenet --output result.json

In Python::

    from diffattn.integrations.clip_benchmark import register
    register()                                   # before clip_benchmark parses its arguments
    from clip_benchmark.cli import main; main()

``--pretrained`` is a local file (see ``diffattn.models.create_model``); ``--model`` may be
empty for diffattn's own ``.safetensors`` files, which hold their config. Weights are never
downloaded: ``cache_dir`` is ignored.
"""
from __future__ import annotations

import sys
from typing import Optional, Union

import torch

from ..models import create_model
from ..models.factory import Tokenizer

MODEL_TYPE = "diffattn"
_NO_WEIGHTS = ("", "none", "random")


def load_diffattn(model_name: Optional[str] = None, pretrained: Optional[str] = None,
                  cache_dir: Optional[str] = None, device: Union[str, torch.device] = "cpu"):
    """A diffattn CLIP for CLIP_benchmark.

    Args:
        model_name: a bundled config (``diffattn.models.list_models()``), or empty/None for a
            diffattn ``.safetensors`` file, whose saved config is used.
        pretrained: a local checkpoint file; "", "none", "random" or None for random weights.
        cache_dir: ignored (nothing is downloaded).
        device: where the model goes.

    Returns:
        (model in eval mode on ``device``, its eval image transform (PIL image -> (3, S, S)
        float tensor), its tokenizer (texts -> (n, context_length) int64 token ids)).
    """
    del cache_dir
    name = model_name or None
    weights = None if pretrained is None or str(pretrained).lower() in _NO_WEIGHTS \
        else pretrained
    model = create_model(name, weights, device=device).eval()
    return model, model.preprocess, Tokenizer(model.config.text.context_length)


def register(model_type: str = MODEL_TYPE) -> None:
    """Add ``load_diffattn`` to CLIP_benchmark's model types as ``model_type`` (idempotent).
    Call it before CLIP_benchmark's CLI builds its argument parser."""
    from clip_benchmark import models

    models.TYPE2FUNC[model_type] = load_diffattn
    if model_type not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(model_type)  # the CLI's --model_type choices (same list)


def main(argv=None) -> None:
    """CLIP_benchmark's command line with the ``diffattn`` model type registered."""
    register()
    from clip_benchmark.cli import main as clip_benchmark_main

    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    clip_benchmark_main()


if __name__ == "__main__":
    main()
