"""The evaluation command line: evaluate a CLIP / DiffCLIP model on a dataset.
``python -m diffattn.eval`` and the ``diffattn-eval`` script run ``main``.

    python -m diffattn.eval classify --images ROOT [--classnames FILE] [--templates T|FILE]
    python -m diffattn.eval classify --images IMAGENET_VAL --dataset imagenet  (-v2 -sketch -a -r)
    python -m diffattn.eval classify --csv FILE                               (filepath,label)
    python -m diffattn.eval retrieve --csv FILE [--recall-k 1 5 10]            (filepath,caption)
    python -m diffattn.eval linear-probe --train ROOT --test ROOT
    python -m diffattn.eval --compare A.json B.json ...               (or: compare A.json B.json)
    python -m diffattn.eval captions-csv dataset_coco.json COCO_ROOT coco_test.csv   (Karpathy)
    python -m diffattn.eval export-digits OUT                         (the digits as files)

The model options (``--model NAME --pretrained FILE --attention diff|diff2 --batch-size
--workers --device --backend``) are those of ``diffattn.models.create_model``. Features are
computed batch by batch (only they are kept, never the images), under bf16 autocast on a CUDA
device. Each command prints its metrics and, with ``--out FILE.json``, writes them in
CLIP_benchmark's result layout (``diffattn.evaluation.results``). Problems with the input are
one ``error:`` line naming the path or column, exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

from .. import BACKENDS
from ..user_messages import CommandLineParser, parse_device, print_error, print_warning
from .datasets import (IMAGENET_DATASETS, EvalDataError, read_caption_csv, read_image_folder,
                       read_imagenet_folder, read_label_csv, read_lines, read_templates,
                       split_named_folders, write_karpathy_csv)
from .digits_export import export_digits
from .features import autocast_for, encode_image_files, encode_texts
from .metrics import (classification_metrics, linear_probe, retrieval_recall,
                                 zero_shot_logits)
from .results import (ResultFileError, check_writable, compare_table, read_result,
                                write_result)
from ..models import create_model, get_config, list_models
from ..models.checkpoint import CheckpointError
from ..models.zero_shot import build_zero_shot_classifier


def _model_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("model")
    group.add_argument("--model", help=f"model config: {', '.join(list_models())} (optional for "
                       "files saved by diffattn, which hold their config)")
    group.add_argument("--pretrained", metavar="FILE", help="weights: a diffattn .safetensors "
                       "file (e.g. a training run's model.safetensors), a DiffCLIP release "
                       "checkpoint or an open_clip state dict; without it the weights are random")
    group.add_argument("--attention", choices=("diff", "diff2"), help="make the model's "
                       "attention differential (V1 or V2) when it is plain in the config or file")
    group.add_argument("--backend", choices=BACKENDS, default="auto",
                       help="differential attention implementation (auto)")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="cpu, cuda or cuda:N (default: cuda where CUDA is available)")
    group.add_argument("--batch-size", type=int, default=64, help="images per batch (64)")
    group.add_argument("--workers", type=int, default=None, help="DataLoader workers reading "
                       "images (default: 0 on the CPU, where the model needs the cores, 4 on a "
                       "GPU)")
    group.add_argument("--max-unreadable-fraction", type=float, default=0.01,
                       help="unreadable images are skipped with a warning; stop when more than "
                       "this fraction of the files cannot be read (0.01)")
    group.add_argument("--out", metavar="FILE.json", help="write the result here (an existing "
                       "file is replaced only if it is a result file)")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="python -m diffattn.eval", description="Zero-shot "
                               "classification, image-text retrieval and linear probes of CLIP / "
                               "DiffCLIP models, and tables comparing their results.")
    parser.add_argument("--compare", nargs="+", metavar="RESULT.json",
                        help="print the results side by side (one column per model)")
    commands = parser.add_subparsers(dest="command", parser_class=CommandLineParser)
    model = _model_options()

    classify = commands.add_parser("classify", parents=[model],
                                   help="zero-shot classification: acc1, acc5, "
                                   "mean_per_class_recall")
    source = classify.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="ROOT", help="one folder of images per class; "
                        "classes in sorted folder order")
    source.add_argument("--csv", metavar="FILE", help="a CSV file with columns filepath,label "
                        "(a label is a class name or, with --classnames, an index)")
    classify.add_argument("--classnames", metavar="FILE", help="class names, one per line, in "
                          "class order (default: the folder names or the CSV labels)")
    classify.add_argument("--templates", default="imagenet", metavar="imagenet|simple|FILE",
                          help="prompt templates: OpenAI's 80 ImageNet ones (imagenet, the "
                          "default), their 7-template subset (simple), or a file with one "
                          "template per line, the class name as '{}' or '{c}'")
    classify.add_argument("--dataset", metavar="NAME", help="the name recorded in the result "
                          f"(default: the folder or file name); {', '.join(IMAGENET_DATASETS)} "
                          "also take that variant's classes (200 for -a and -r) and names "
                          "from the folder names of --images")
    classify.add_argument("--csv-img-key", default="filepath")
    classify.add_argument("--csv-label-key", default="label")

    retrieve = commands.add_parser("retrieve", parents=[model], help="image and text retrieval "
                                   "recall@K")
    retrieve.add_argument("--csv", metavar="FILE", required=True, help="a CSV file with columns "
                          "filepath,caption; an image on several rows has several captions")
    retrieve.add_argument("--recall-k", type=int, nargs="+", default=[1, 5, 10], metavar="K")
    retrieve.add_argument("--dataset", metavar="NAME", help="the name recorded in the result "
                          "(default: the file name)")
    retrieve.add_argument("--csv-img-key", default="filepath")
    retrieve.add_argument("--csv-caption-key", default="caption")

    probe = commands.add_parser("linear-probe", parents=[model], help="logistic regression on "
                                "frozen image features: lp_acc1, lp_acc5, "
                                "lp_mean_per_class_recall")
    probe.add_argument("--train", metavar="ROOT", required=True, help="class folders to fit on")
    probe.add_argument("--test", metavar="ROOT", required=True, help="class folders to test on "
                       "(the same class folder names)")
    probe.add_argument("--val-fraction", type=float, default=0.2, help="held out of --train to "
                       "choose the regularisation (0.2)")
    probe.add_argument("--seed", type=int, default=0, help="the validation split's seed")
    probe.add_argument("--dataset", metavar="NAME", help="the name recorded in the result "
                       "(default: the folder name above --train)")

    compare = commands.add_parser("compare", help="print result files side by side")
    compare.add_argument("files", nargs="+", metavar="RESULT.json")

    captions = commands.add_parser("captions-csv", help="the filepath,caption CSV of a split of "
                                   "Karpathy's Flickr30k / Flickr8k / COCO caption files")
    captions.add_argument("annotations", metavar="JSON", help="dataset_flickr30k.json, "
                          "dataset_flickr8k.json or dataset_coco.json")
    captions.add_argument("images", metavar="IMAGE_ROOT", help="the images' folder (COCO: the "
                          "one holding val2014/)")
    captions.add_argument("out", metavar="OUT.csv", help="a new file")
    captions.add_argument("--split", default="test", choices=("test", "val", "train"))

    export = commands.add_parser("export-digits", help="write scikit-learn's digits, split as "
                                 "training splits them, as class folders and a captions CSV")
    export.add_argument("out", metavar="OUT", help="a new (or empty) folder")
    return parser


def _load_model(args):
    if args.pretrained is None:
        if args.model is None:
            raise EvalDataError("--model is required without --pretrained")
        print_warning(f"no --pretrained: {args.model} has random weights")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = create_model(args.model, args.pretrained, attention=args.attention,
                             device=args.device, backend=args.backend)
    for warning in caught:
        if not issubclass(warning.category, DeprecationWarning):
            print_warning(warning.message)
    if args.model is None:  # a diffattn file: name it by the bundled config it was made from
        args.model = next((name for name in list_models() if get_config(name) == model.config),
                          _name(args.pretrained))
    args.model_attention = model.config.attention
    return model.eval()


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print_warning(message)


def _check_options(args) -> None:
    parse_device(args.device)
    if args.out is not None and not args.out.strip():
        raise EvalDataError(f"--out must name a file, got {args.out!r}")
    if args.batch_size < 1:
        raise EvalDataError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        raise EvalDataError(f"--workers must be >= 0, got {args.workers}")
    if not 0 <= args.max_unreadable_fraction < 1:
        raise EvalDataError("--max-unreadable-fraction must be in [0, 1), got "
                            f"{args.max_unreadable_fraction}")


def _encode(model, paths, args, desc):
    workers = args.workers if args.workers is not None else (
        4 if torch.device(args.device).type == "cuda" else 0)
    return encode_image_files(model, paths, batch_size=args.batch_size, workers=workers,
                              device=args.device, progress=not args.no_progress,
                              max_unreadable_fraction=args.max_unreadable_fraction, desc=desc)


def _name(path: str) -> str:
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


def _result(args, task, dataset, metrics, num_samples, **extra) -> dict:
    result = {"task": task, "model": args.model,
              "pretrained": args.pretrained or "", "dataset": dataset, "metrics": metrics,
              "num_samples": num_samples, "language": "en", "attention": args.model_attention}
    result.update(extra)
    return result


def _warn_of_split_folders(data, root: str, option: str) -> None:
    """A warning when class folders are named like dataset splits (ROOT/train, ROOT/test):
    ROOT is most likely the dataset's root, not the split's folder of classes."""
    splits = split_named_folders(data.classnames)
    if splits:
        print_warning(f"{option} {root!r}: the class folder(s) {', '.join(splits)} look like "
                      f"dataset splits, not classes: {option} takes one split's folder of "
                      f"class folders (e.g. {os.path.join(root, splits[0])!r})")


def run_classify(args) -> dict:
    classnames = read_lines(args.classnames, "--classnames") if args.classnames else None
    templates = read_templates(args.templates)
    if args.dataset in IMAGENET_DATASETS:
        if args.images is None:
            raise EvalDataError(f"--dataset {args.dataset} reads class folders: use --images")
        data = read_imagenet_folder(args.images, args.dataset)
    elif args.images is not None:
        data = read_image_folder(args.images)
        _warn_of_split_folders(data, args.images, "--images")
    else:
        data = read_label_csv(args.csv, classnames, args.csv_img_key, args.csv_label_key)
    if classnames is not None:
        if len(classnames) != len(data.classnames):
            raise EvalDataError(f"--classnames: {args.classnames!r} has {len(classnames)} names "
                                f"for {len(data.classnames)} classes")
        data.classnames = classnames
    model = _load_model(args)
    with torch.no_grad(), autocast_for(args.device):
        classifier = build_zero_shot_classifier(model, data.classnames, templates)
    features, kept = _encode(model, data.paths, args, "classify")
    labels = torch.as_tensor(data.labels)[kept]
    metrics = classification_metrics(zero_shot_logits(features, classifier.float().cpu()), labels)
    dataset = args.dataset or _name(args.images or args.csv)
    return _result(args, "zeroshot_classification", dataset, metrics, int(kept.numel()),
                   num_classes=len(data.classnames), num_templates=len(templates),
                   num_unreadable=len(data.paths) - int(kept.numel()))


def run_retrieve(args) -> dict:
    if min(args.recall_k) < 1:
        raise EvalDataError(f"--recall-k values must be >= 1, got {args.recall_k}")
    data = read_caption_csv(args.csv, args.csv_img_key, args.csv_caption_key)
    model = _load_model(args)
    image_features, kept = _encode(model, data.paths, args, "retrieve")
    # Captions of unreadable images are left out with them.
    position = torch.full((len(data.paths),), -1, dtype=torch.long)
    position[kept] = torch.arange(kept.numel())
    text_image = position[torch.as_tensor(data.text_image)]
    captions = [caption for caption, image in zip(data.captions, text_image.tolist())
                if image >= 0]
    text_image = text_image[text_image >= 0]
    text_features = encode_texts(model, captions, device=args.device,
                                 progress=not args.no_progress)
    metrics = retrieval_recall(image_features, text_features, text_image, args.recall_k)
    return _result(args, "zeroshot_retrieval", args.dataset or _name(args.csv), metrics,
                   int(kept.numel()), num_captions=len(captions),
                   num_unreadable=len(data.paths) - int(kept.numel()))


def run_linear_probe(args) -> dict:
    train = read_image_folder(args.train, "--train")
    test = read_image_folder(args.test, "--test")
    _warn_of_split_folders(train, args.train, "--train")
    _warn_of_split_folders(test, args.test, "--test")
    index = {name: label for label, name in enumerate(train.classnames)}
    unknown = [name for name in test.classnames if name not in index]
    if unknown:
        raise EvalDataError(f"--test: class folder {os.path.join(args.test, unknown[0])!r} has "
                            f"no counterpart in --train {args.train!r}")
    if not 0 < args.val_fraction < 1:
        raise EvalDataError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    model = _load_model(args)
    train_features, train_kept = _encode(model, train.paths, args, "train images")
    test_features, test_kept = _encode(model, test.paths, args, "test images")
    train_labels = torch.as_tensor(train.labels)[train_kept]
    test_labels = torch.as_tensor([index[test.classnames[label]] for label in test.labels])
    try:
        probe = linear_probe(train_features, train_labels, test_features, test_labels[test_kept],
                             val_fraction=args.val_fraction, seed=args.seed,
                             progress=not args.no_progress)
    except ValueError as error:
        raise EvalDataError(f"linear probe: {error}") from None
    dataset = args.dataset or _name(os.path.dirname(os.path.normpath(args.train)) or args.train)
    # CLIP_benchmark's names for a linear probe's metrics: lp_acc1, lp_acc5, ...
    metrics = {f"lp_{name}": value for name, value in probe["metrics"].items()}
    return _result(args, "linear_probe", dataset, metrics, int(test_kept.numel()),
                   num_train_samples=int(train_kept.numel()), C=probe["C"],
                   val_acc1=probe["val_acc1"])


def _print_metrics(result: dict) -> None:
    print(f"{result['task']} on {result['dataset']} ({result['num_samples']} images), "
          f"{result['model']}:")
    for metric, value in result["metrics"].items():
        print(f"  {metric:<28} {'-' if value is None else f'{value:.4f}'}")


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0, or 2 after one ``error:`` line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    shown, warnings.showwarning = warnings.showwarning, _show_warning  # "warning:" lines
    try:
        return _run(parser, args)
    finally:
        warnings.showwarning = shown


def _run(parser, args) -> int:
    try:
        if args.compare or args.command == "compare":
            if args.command not in (None, "compare"):
                raise EvalDataError("--compare does not go with a command")
            files = args.compare if args.compare else args.files
            print(compare_table([read_result(path) for path in files]))
            return 0
        if args.command is None:
            parser.print_help()
            return 2
        if args.command == "export-digits":
            counts = export_digits(args.out)
            print(f"wrote {counts['train']} training and {counts['test']} held-out images, "
                  f"{counts['captions']} captions to {args.out}")
            return 0
        if args.command == "captions-csv":
            images, rows = write_karpathy_csv(args.annotations, args.images, args.out, args.split)
            print(f"wrote {rows} captions of {images} images to {args.out}")
            return 0
        _check_options(args)
        if args.out is not None:
            check_writable(args.out)
        run = {"classify": run_classify, "retrieve": run_retrieve,
               "linear-probe": run_linear_probe}[args.command]
        result = run(args)
        _print_metrics(result)
        if args.out is not None:
            write_result(args.out, result)
            print(f"wrote {args.out}")
    except (EvalDataError, ResultFileError, CheckpointError) as error:
        print_error(error)
        return 2
    except (ValueError, OSError) as error:
        print_error(error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
