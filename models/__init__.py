"""diffattn.models: CLIP and DiffCLIP image/text encoders on diffattn's attention layers.

    from diffattn.models import create_model, list_models

    model = create_model("DiffCLIP-ViT-B-16", pretrained="checkpoint_best.pt").eval()
    images = preprocess_batch(["cat.jpg"], model.preprocess)     # (1, 3, 224, 224)
    image_features = model.encode_image(images, normalize=True)  # (1, 512)
    text_features = model.encode_text(model.tokenize(["a photo of a cat"]), normalize=True)

- ``create_model`` / ``list_models`` / ``get_config`` / ``save_pretrained``: bundled configs
  (DiffCLIP-ViT-B-16, DiffCLIP-ViT-L-14, ViT-B-16, ViT-B-32, DiffCLIP-Tiny, CLIP-Tiny, and the
  V2 attention configs DiffCLIPv2-ViT-B-16, DiffCLIPv2-Tiny) and safe loading of DiffCLIP
  release checkpoints, open_clip state dicts and diffattn's own files (an open_clip file into
  ``attention="diff"`` or ``"diff2"`` is a warm start; "diff2" starts equal to the plain
  model); a file that cannot be used raises ``CheckpointError`` (a ValueError) naming it.
- ``create_model_and_transforms`` / ``get_tokenizer``: open_clip-style entry points, returning
  (model, train transform, eval transform) and the tokenizer callable.
- ``CLIP`` / ``CLIPConfig``: the model and its configuration (attention "diff", "diff2" or
  "plain").
- ``tokenize``, ``make_transform``, ``preprocess_batch``: text and image inputs.
- ``build_zero_shot_classifier``, ``zero_shot_predict``: zero-shot classification
  (command line: ``python -m diffattn.models.zero_shot``); ImageNet names and templates in
  ``diffattn.models.imagenet_classes``.
- ``attention_maps``, ``cls_attention_map``, ``save_attention_overlay``: attention maps.
"""
from .attention_maps import attention_maps, cls_attention_map, save_attention_overlay
from .augment import RandomResizedCropTransform, make_train_transform
from .checkpoint import CheckpointError, CheckpointNotFoundError, UnsafeCheckpointError
from .clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from .factory import (PretrainedNotFoundError, Tokenizer, create_model,
                      create_model_and_transforms, get_config, get_tokenizer, list_models,
                      save_pretrained)
from .imagenet_classes import IMAGENET_CLASSNAMES, IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from .preprocess import UnreadableImageError, make_transform, preprocess_batch
from .tokenizer import tokenize

_ZERO_SHOT = ("build_zero_shot_classifier", "zero_shot_predict")


def __getattr__(name):
    # Imported on first use, so that ``python -m diffattn.models.zero_shot`` does not find
    # the module already imported by its own package.
    if name in _ZERO_SHOT:
        from . import zero_shot
        return getattr(zero_shot, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CLIP",
    "CLIPConfig",
    "CheckpointError",
    "CheckpointNotFoundError",
    "IMAGENET_CLASSNAMES",
    "IMAGENET_TEMPLATES",
    "PretrainedNotFoundError",
    "RandomResizedCropTransform",
    "SIMPLE_IMAGENET_TEMPLATES",
    "TextConfig",
    "Tokenizer",
    "UnreadableImageError",
    "UnsafeCheckpointError",
    "VisionConfig",
    "attention_maps",
    "build_zero_shot_classifier",
    "cls_attention_map",
    "create_model",
    "create_model_and_transforms",
    "get_config",
    "get_tokenizer",
    "list_models",
    "make_train_transform",
    "make_transform",
    "preprocess_batch",
    "save_attention_overlay",
    "save_pretrained",
    "tokenize",
    "zero_shot_predict",
]
