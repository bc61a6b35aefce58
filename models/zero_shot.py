"""Zero-shot classification with a CLIP model, and its command line.

    classifier = build_zero_shot_classifier(model, ["cat", "dog"], SIMPLE_IMAGENET_TEMPLATES)
    probs, indices = zero_shot_predict(model, images, classifier, top_k=1)

Command line (prints the top-k labels and probabilities of every image file given, or of
the image files in the folders given)::

    python -m diffattn.models.zero_shot --model DiffCLIP-ViT-B-16 --pretrained checkpoint_best.pt \\
        --images DIR cat.jpg --classes "cat,dog,bird" [--top-k 5] [--templates imagenet|simple|photo] [--json]

Without ``--pretrained`` the model has random weights (a try-out; a warning says so). A file
that cannot be read is reported on its own ``error:`` line and the others are still
classified; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import Tensor

from diffattn import BACKENDS
from diffattn.user_messages import print_error, print_warning

from .factory import create_model, list_models
from .imagenet_classes import IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from .preprocess import UNREADABLE_IMAGE_ERRORS, unreadable_image_reason

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
        model: a CLIP (anything with ``tokenize(texts, trim=True)`` and ``encode_text``).
        classnames: non-empty sequence of C class names.
        templates: non-empty sequence of T ``str.format`` patterns with one ``{}``
            (e.g. IMAGENET_TEMPLATES).
        batch_size: prompts per encode_text call.

    Returns:
        (embed_dim, C) float tensor on the model's device: per class, the mean of its T
        normalised prompt embeddings, normalised again (unit columns). Each batch of prompts is
        tokenized with ``trim=True``: the text tower runs on as many tokens as its longest
        prompt needs, with the same embeddings.
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
        model.encode_text(model.tokenize(prompts[start:start + batch_size], trim=True).to(device),
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
        description="Zero-shot classification of image files with a CLIP model.")
    parser.add_argument("--model", help=f"model config name, one of: {', '.join(list_models())} "
                        "(optional for checkpoints saved by diffattn)")
    parser.add_argument("--pretrained", help="checkpoint file (without it the model has random "
                        "weights: a try-out of the command, not a classifier)")
    parser.add_argument("--images", required=True, nargs="+", metavar="PATH",
                        help="image files and folders (the image files directly in them)")
    parser.add_argument("--classes", required=True, help='comma-separated labels, "cat,dog,..."')
    parser.add_argument("--top-k", type=int, default=None,
                        help="labels printed per image (default: 5, or all classes if fewer)")
    parser.add_argument("--templates", choices=sorted(TEMPLATE_SETS), default="imagenet",
                        help="prompt templates: OpenAI's 80 ImageNet ones (default), their "
                        "7-template subset, or just 'a photo of a {}.'")
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward (32)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (model, classes, and per file its top-k "
                        "labels and probabilities or its error) instead of text")
    return parser.parse_args(argv)


def _fail(message: str) -> int:
    print_error(message)
    return 2


def _image_files(paths: list) -> list:
    """The files named in ``paths``, folders replaced by their image files (sorted, not
    recursive). Raises FileNotFoundError naming a path that does not exist."""
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files.extend(sorted(child for child in path.iterdir()
                                if child.is_file() and child.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such image file or folder: {name!r}")
    return files


def _classify(model, files: list, classifier: Tensor, classnames: list, top_k: int,
              batch_size: int, device) -> list:
    """Per file, in order: {"file", "top_k": [{"label", "probability"}, ...]} or, for a file
    that cannot be read, {"file", "error"}."""
    results = []
    for start in range(0, len(files), batch_size):
        batch, images = [], []
        for path in files[start:start + batch_size]:
            result = {"file": str(path)}
            try:
                images.append(model.preprocess(path))
            except UNREADABLE_IMAGE_ERRORS as error:
                result["error"] = f"cannot read image: {unreadable_image_reason(error)}"
            batch.append(result)
            results.append(result)
        if not images:
            continue
        probs, indices = zero_shot_predict(model, torch.stack(images).to(device), classifier,
                                           top_k)
        readable = [result for result in batch if "error" not in result]
        for result, row_probs, row_indices in zip(readable, probs.tolist(), indices.tolist()):
            result["top_k"] = [{"label": classnames[index], "probability": prob}
                               for prob, index in zip(row_probs, row_indices)]
    return results


def main(argv=None) -> int:
    """Run the command line; returns the exit status: 0; 1 when some image files could not be
    read (each named on an ``error:`` line, the others classified); 2 after one ``error:``
    line for unusable arguments, model or checkpoint."""
    args = _parse_args(argv)
    classnames = [name.strip() for name in args.classes.split(",") if name.strip()]
    if not classnames:
        return _fail("--classes holds no class names")
    top_k = min(5, len(classnames)) if args.top_k is None else args.top_k
    if not 1 <= top_k <= len(classnames):
        return _fail(f"--top-k must be between 1 and the number of classes ({len(classnames)}), "
                     f"got {top_k}")
    if args.batch_size < 1:
        return _fail(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        files = _image_files(args.images)
    except FileNotFoundError as error:
        return _fail(str(error))
    if not files:
        return _fail(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in "
                     f"{', '.join(repr(name) for name in args.images)}")
    if args.pretrained is None:
        if args.model is None:
            return _fail("--model is required without --pretrained")
        print_warning(f"no --pretrained: {args.model} has random weights, its predictions mean "
                      "nothing")
    try:
        model = create_model(args.model, args.pretrained, device=args.device,
                             backend=args.backend)
    except (ValueError, OSError) as error:
        return _fail(str(error))
    model.eval()
    classifier = build_zero_shot_classifier(model, classnames, TEMPLATE_SETS[args.templates])
    results = _classify(model, files, classifier, classnames, top_k, args.batch_size,
                        args.device)
    for result in results:
        if "error" in result:
            print_error(f"{result['file']}: {result['error']}")
    if args.json:
        print(json.dumps({"model": args.model, "pretrained": args.pretrained,
                          "classes": classnames, "results": results}, indent=1))
    else:
        for result in results:
            if "top_k" in result:
                print(result["file"])
                for entry in result["top_k"]:
                    print(f"  {entry['probability']:.4f}  {entry['label']}")
    return 1 if any("error" in result for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
