"""Evaluation metrics as pure functions of feature tensors (no model, no files), with the
names LAION's CLIP_benchmark gives them.

    zero_shot_logits(image_features, classifier)       -> (N, C) cosine similarities
    classification_metrics(logits, labels)             -> acc1, acc5, mean_per_class_recall
    retrieval_recall(image_feats, text_feats, text_image) -> image/text_retrieval_recall@K
    linear_probe(train_x, train_y, test_x, test_y)     -> the test set's classification_metrics

Training reuses them for its per-epoch validation (retrieval on held-out pairs, zero-shot
accuracy on a labelled set) and ``python -m diffattn.eval`` for whole datasets.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor


def _check_features(name: str, features: Tensor) -> None:
    if not isinstance(features, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 2:
        raise ValueError(f"{name} must be (n, dim), got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {features.dtype}")


def _check_labels(name: str, labels: Tensor, count: int, num_classes: Optional[int]) -> Tensor:
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point():
        raise TypeError(f"{name} must be a 1-d integer tensor")
    if labels.shape[0] != count:
        raise ValueError(f"{name} has {labels.shape[0]} entries, expected {count}")
    if count and (int(labels.min()) < 0
                  or (num_classes is not None and int(labels.max()) >= num_classes)):
        bound = "" if num_classes is None else f", < {num_classes}"
        raise ValueError(f"{name} must hold class indices >= 0{bound}, got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return labels.long().cpu()


def zero_shot_logits(image_features: Tensor, classifier: Tensor) -> Tensor:
    """Cosine similarity of every image with every class embedding.

    Args:
        image_features: (N, D) image features (normalised here).
        classifier: (D, C) class embeddings, unit columns
            (``diffattn.models.build_zero_shot_classifier``).

    Returns:
        (N, C) float32 logits (without the logit scale, which changes no ranking).
    """
    _check_features("image_features", image_features)
    _check_features("classifier", classifier)
    if classifier.shape[0] != image_features.shape[1]:
        raise ValueError(f"classifier must be (dim, n_classes) with dim = "
                         f"{image_features.shape[1]}, got {tuple(classifier.shape)}")
    features = torch.nn.functional.normalize(image_features.float(), dim=-1)
    return features @ classifier.float().to(features.device)


def classification_metrics(logits: Tensor, labels: Tensor, top_k: Sequence[int] = (1, 5)) -> dict:
    """Top-k accuracies and the mean per-class recall of class scores.

    Args:
        logits: (N, C) scores, higher is better (N >= 1).
        labels: (N,) the true class of each row, in [0, C).
        top_k: the k of the ``acc{k}`` entries.

    Returns:
        ``{"acc1": ..., "acc5": ..., "mean_per_class_recall": ...}`` as floats in [0, 1]:
        ``acc{k}`` is the fraction of rows whose label is among the k best scores (None when
        k > C, as CLIP_benchmark reports no acc5 for fewer than 5 classes);
        ``mean_per_class_recall`` the mean over the classes present in ``labels`` of the
        fraction of their rows whose best score is the label (scikit-learn's
        ``balanced_accuracy_score``).
    """
    _check_features("logits", logits)
    if logits.shape[0] == 0:
        raise ValueError("logits has no rows (no samples)")
    labels = _check_labels("labels", labels, logits.shape[0], logits.shape[1])
    logits = logits.float().cpu()
    metrics = {}
    for k in top_k:
        if k < 1:
            raise ValueError(f"top_k values must be >= 1, got {k}")
        if k > logits.shape[1]:
            metrics[f"acc{k}"] = None
            continue
        best = logits.topk(k, dim=1).indices
        metrics[f"acc{k}"] = float((best == labels[:, None]).any(dim=1).double().mean())
    predictions = logits.argmax(dim=1)
    present = labels.unique()
    correct = torch.bincount(labels[predictions == labels], minlength=logits.shape[1]).double()
    total = torch.bincount(labels, minlength=logits.shape[1]).double()
    metrics["mean_per_class_recall"] = float((correct[present] / total[present]).mean())
    return metrics


def _hits(scores: Tensor, positive: Tensor, ks: Sequence[int]) -> Tensor:
    """(len(ks), Q) bool: for each query row of ``scores`` (Q, R) with ``positive`` (Q, R)
    marking its matches, whether a match is among the k first candidates of the row sorted by
    score, high to low, equal scores in index order (a stable sort)."""
    best_match = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
    candidates = torch.arange(scores.shape[1], device=scores.device)
    first_best = torch.where(positive & (scores == best_match), candidates,
                             scores.shape[1]).amin(dim=1, keepdim=True)
    rank = ((scores > best_match) | ((scores == best_match) & (candidates < first_best))).sum(1)
    return torch.stack([rank < k for k in ks])


def retrieval_recall(image_features: Tensor, text_features: Tensor, text_image: Tensor,
                     recall_k: Sequence[int] = (1, 5, 10), chunk_size: int = 1024) -> dict:
    """Image and text retrieval Recall@K, as CLIP_benchmark's ``zeroshot_retrieval`` defines it.

    Args:
        image_features: (I, D) features of the images (normalised here: cosine similarity).
        text_features: (T, D) features of the captions (normalised here).
        text_image: (T,) int, the image each caption describes (an image may have several
            captions; every image needs at least one).
        recall_k: the K values.
        chunk_size: queries scored at once (memory is chunk_size x max(I, T) scores).

    Returns:
        ``{"image_retrieval_recall@K": ..., "text_retrieval_recall@K": ...}`` for every K,
        floats in [0, 1]. Image retrieval: each caption ranks the I images, a hit when its
        image is among the K best; the mean over the T captions. Text retrieval: each image
        ranks the T captions, a hit when any of its captions is among the K best; the mean
        over the I images. Candidates with equal scores are ranked in index order (as a
        stable sort does: the earlier image or caption first).
    """
    _check_features("image_features", image_features)
    _check_features("text_features", text_features)
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(f"image_features and text_features must have the same width, got "
                         f"{image_features.shape[1]} and {text_features.shape[1]}")
    num_images, num_texts = image_features.shape[0], text_features.shape[0]
    if num_images == 0 or num_texts == 0:
        raise ValueError(f"retrieval needs images and captions, got {num_images} images and "
                         f"{num_texts} captions")
    text_image = _check_labels("text_image", text_image, num_texts, num_images)
    if int(torch.bincount(text_image, minlength=num_images).min()) == 0:
        missing = (torch.bincount(text_image, minlength=num_images) == 0).nonzero()[:5, 0]
        raise ValueError(f"every image needs a caption in text_image; images {missing.tolist()} "
                         "have none")
    ks = list(recall_k)
    if not ks or min(ks) < 1:
        raise ValueError(f"recall_k must be a non-empty list of K >= 1, got {recall_k!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    images = torch.nn.functional.normalize(image_features.float(), dim=-1)
    texts = torch.nn.functional.normalize(text_features.float(), dim=-1).to(images.device)
    text_image = text_image.to(images.device)
    image_ids = torch.arange(num_images, device=images.device)
    image_hits, text_hits = [], []
    for start in range(0, num_texts, chunk_size):
        scores = texts[start:start + chunk_size] @ images.T                       # (t, I)
        positive = text_image[start:start + chunk_size, None] == image_ids[None, :]
        image_hits.append(_hits(scores, positive, ks))
    for start in range(0, num_images, chunk_size):
        scores = images[start:start + chunk_size] @ texts.T                       # (i, T)
        positive = image_ids[start:start + chunk_size, None] == text_image[None, :]
        text_hits.append(_hits(scores, positive, ks))
    image_hits, text_hits = torch.cat(image_hits, dim=1), torch.cat(text_hits, dim=1)
    metrics = {}
    for row, k in enumerate(ks):
        metrics[f"image_retrieval_recall@{k}"] = float(image_hits[row].double().mean())
        metrics[f"text_retrieval_recall@{k}"] = float(text_hits[row].double().mean())
    return metrics


DEFAULT_C_VALUES = tuple(float(c) for c in np.logspace(-2, 4, 7))


def linear_probe(train_features: Tensor, train_labels: Tensor, test_features: Tensor,
                 test_labels: Tensor, *, c_values: Sequence[float] = DEFAULT_C_VALUES,
                 val_fraction: float = 0.2, seed: int = 0, max_iter: int = 1000,
                 progress: bool = False) -> dict:
    """Logistic regression on frozen (L2-normalised) features, its inverse regularisation
    strength C chosen on a validation split of the training set.

    Args:
        train_features, train_labels: (N, D) and (N,) the training set.
        test_features, test_labels: (M, D) and (M,), labels in the training set's classes.
        c_values: the C values tried (scikit-learn's ``LogisticRegression(C=...)``).
        val_fraction: the fraction of the training set held out (stratified by class when
            every class has 2 or more samples) to pick C by its top-1 accuracy; the final
            model is then fitted on the whole training set.
        seed: the validation split's seed.
        max_iter: L-BFGS iterations per fit.
        progress: show a progress bar (tqdm, on stderr) over the fits: one per C value, then
            the final one.

    Returns:
        ``{"metrics": classification_metrics of the test set, "C": the chosen C,
        "val_acc1": its validation accuracy}``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    _check_features("train_features", train_features)
    _check_features("test_features", test_features)
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train_features and test_features must have the same width, got "
                         f"{train_features.shape[1]} and {test_features.shape[1]}")
    if test_features.shape[0] == 0:
        raise ValueError("test_features has no rows (no samples)")
    train_labels = _check_labels("train_labels", train_labels, train_features.shape[0], None)
    num_classes = int(train_labels.max()) + 1 if train_labels.numel() else 0
    classes = train_labels.unique()
    if classes.numel() < 2:
        raise ValueError(f"the training set needs 2 or more classes, got {classes.numel()}")
    test_labels = _check_labels("test_labels", test_labels, test_features.shape[0], num_classes)
    unseen = sorted(set(test_labels.tolist()) - set(classes.tolist()))
    if unseen:
        raise ValueError(f"test_labels holds classes without training samples: {unseen[:10]}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if not c_values or min(c_values) <= 0:
        raise ValueError(f"c_values must be positive numbers, got {c_values!r}")

    def normalised(features):
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()

    x, y = normalised(train_features), train_labels.numpy()
    stratify = y if np.bincount(y)[classes.numpy()].min() >= 2 else None
    fit_x, val_x, fit_y, val_y = train_test_split(x, y, test_size=val_fraction,
                                                  random_state=seed, stratify=stratify)

    def fit(features, targets, c):
        return LogisticRegression(C=c, max_iter=max_iter).fit(features, targets)

    from tqdm import tqdm

    best_c, best_acc = None, -1.0
    with tqdm(total=len(c_values) + 1, desc="linear probe fits", unit="fit",
              disable=not progress, leave=False) as bar:
        for c in c_values:
            bar.set_postfix(C=f"{c:g}")
            accuracy = float((fit(fit_x, fit_y, c).predict(val_x) == val_y).mean())
            if accuracy > best_acc:
                best_c, best_acc = float(c), accuracy
            bar.update()
        bar.set_postfix(C=f"{best_c:g}", final="all training samples")
        model = fit(x, y, best_c)
        bar.update()
    probabilities = model.predict_proba(normalised(test_features))
    logits = torch.full((probabilities.shape[0], num_classes), float("-inf"), dtype=torch.float64)
    log_probabilities = np.log(probabilities.astype(np.float64) + 1e-300)
    logits[:, torch.as_tensor(model.classes_)] = torch.from_numpy(log_probabilities)
    metrics = classification_metrics(logits, test_labels)
    return {"metrics": metrics, "C": best_c, "val_acc1": best_acc}
