"""Zero-shot classification with a CLIP model, and its command line.

    classifier = build_zero_shot_classifier(model, ["cat", "dog"], SIMPLE_IMAGENET_TEMPLATES)
    probs, indices = zero_shot_predict(model, images, classifier, top_k=1)

Command line (prints the top-k labels and probabilities of every image file in DIR)::

    python -m diffattn.models.zero_shot --model DiffCLIP-ViT-B-16 --pretrained checkpoint_best.pt \\
        --images DIR --classes "cat,dog,bird" [--top-k 5] [--templates imagenet|simple|photo]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor

from diffattn import BACKENDS

from .factory import create_model, list_models
from .imagenet_classes import IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from .preprocess import preprocess_batch

TEMPLATE_SETS = {
    "imagenet": IMAGENET_TEMPLATES,
    "simple": SIMPLE_IMAGENET_TEMPLATES,
    "photo": ("a photo of a {}.",),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@torch.no_grad()
def build_zero_shot_classifier(model, classnames, templates, batch_size: int = 256) -> Tensor:
    """Class embeddings for zero-shot classification.

    Args:
        model: a CLIP (anything with ``tokenize`` and ``encode_text``).
        classnames: non-empty sequence of C class names.
        templates: non-empty sequence of T ``str.format`` patterns with one ``{}``
            (e.g. IMAGENET_TEMPLATES).
        batch_size: prompts per encode_text call.

    Returns:
        (embed_dim, C) float tensor on the model's device: per class, the mean of its T
        normalised prompt embeddings, normalised again (unit columns).
    """
    classnames, templates = list(classnames), list(templates)
    if not classnames:
        raise ValueError("classnames is empty")
    if not templates:
        raise ValueError("templates is empty")
    bad = [t for t in templates if not isinstance(t, str) or "{}" not in t]
    if bad:
        raise ValueError(f"templates must be strings with a '{{}}' placeholder, got {bad[:3]!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = [template.format(name) for name in classnames for template in templates]
    device = model.logit_scale.device
    embeddings = torch.cat([
        model.encode_text(model.tokenize(prompts[start:start + batch_size]).to(device),
                          normalize=True)
        for start in range(0, len(prompts), batch_size)
    ])
    per_class = embeddings.float().view(len(classnames), len(templates), -1).mean(dim=1)
    return torch.nn.functional.normalize(per_class, dim=-1).T


@torch.no_grad()
def zero_shot_predict(model, images: Tensor, classifier: Tensor, top_k: int = 5):
    """Top-k classes of preprocessed images.

    Args:
        model: a CLIP.
        images: (B, 3, S, S) preprocessed images.
        classifier: (embed_dim, C) from build_zero_shot_classifier.
        top_k: number of classes returned per image, 1 <= top_k <= C.

    Returns:
        (probabilities (B, top_k), class indices (B, top_k)), best first: softmax over the C
        classes of logit_scale.exp() * cosine similarity.
    """
    if classifier.dim() != 2:
        raise ValueError(f"classifier must be (embed_dim, n_classes), got {tuple(classifier.shape)}")
    if not 1 <= top_k <= classifier.shape[1]:
        raise ValueError(f"top_k must be in [1, {classifier.shape[1]}] (the number of classes), "
                         f"got {top_k}")
    features = model.encode_image(images, normalize=True).float()
    logits = model.logit_scale.exp().float() * features @ classifier.to(features)
    best = logits.softmax(dim=-1).topk(top_k, dim=-1)
    return best.values, best.indices


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m diffattn.models.zero_shot",
        description="Zero-shot classification of the images in a folder with a CLIP model.")
    parser.add_argument("--model", help=f"model config name, one of: {', '.join(list_models())} "
                        "(optional for checkpoints saved by diffattn)")
    parser.add_argument("--pretrained", required=True, help="checkpoint file")
    parser.add_argument("--images", required=True, help="folder of image files")
    parser.add_argument("--classes", required=True, help='comma-separated labels, "cat,dog,..."')
    parser.add_argument("--top-k", type=int, default=None,
                        help="labels printed per image (default: 5, or all classes if fewer)")
    parser.add_argument("--templates", choices=sorted(TEMPLATE_SETS), default="imagenet",
                        help="prompt templates: OpenAI's 80 ImageNet ones (default), their "
                        "7-template subset, or just 'a photo of a {}.'")
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward (32)")
    return parser.parse_args(argv)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0, or 2 after printing an error)."""
    args = _parse_args(argv)
    classnames = [name.strip() for name in args.classes.split(",") if name.strip()]
    folder = Path(args.images)
    if not classnames:
        return _fail("--classes holds no class names")
    top_k = min(5, len(classnames)) if args.top_k is None else args.top_k
    if not 1 <= top_k <= len(classnames):
        return _fail(f"--top-k must be between 1 and the number of classes ({len(classnames)}), "
                     f"got {top_k}")
    if args.batch_size < 1:
        return _fail(f"--batch-size must be >= 1, got {args.batch_size}")
    if not folder.is_dir():
        return _fail(f"image folder not found: {str(folder)!r}")
    files = sorted(path for path in folder.iterdir()
                   if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        return _fail(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {str(folder)!r}")
    try:
        model = create_model(args.model, args.pretrained, device=args.device,
                             backend=args.backend)
    except (ValueError, OSError) as error:
        return _fail(str(error))
    model.eval()
    classifier = build_zero_shot_classifier(model, classnames, TEMPLATE_SETS[args.templates])
    for start in range(0, len(files), args.batch_size):
        batch = files[start:start + args.batch_size]
        images = preprocess_batch(batch, model.preprocess).to(args.device)
        probs, indices = zero_shot_predict(model, images, classifier, top_k)
        for path, row_probs, row_indices in zip(batch, probs.tolist(), indices.tolist()):
            print(path.name)
            for prob, index in zip(row_probs, row_indices):
                print(f"  {prob:.4f}  {classnames[index]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
