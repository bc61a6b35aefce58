"""The evaluation sets on disk: class folders, labelled and captioned CSV files, the
ImageNet variants, class names and templates.

Each reader returns plain lists (image paths, labels, class names, captions); nothing is
opened but the folder listings and the CSV file. Problems a user can fix raise EvalDataError
(a ValueError) naming the path, the column or the line.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
import string
from pathlib import Path
from typing import Optional

from ..models.imagenet_classes import (IMAGENET_CLASSNAMES, IMAGENET_TEMPLATES,
                                       SIMPLE_IMAGENET_TEMPLATES)
from ..models.zero_shot import IMAGE_SUFFIXES
from .imagenet_wnids import IMAGENET_A_WNIDS, IMAGENET_R_WNIDS, IMAGENET_WNIDS

TEMPLATE_SETS = {"imagenet": IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES}

# --dataset NAME: which ImageNet classes the folders of a local root hold, and how a folder
# name gives the class. ImageNet, -Sketch, -A and -R name their folders by WordNet id;
# ImageNet-V2 (matched-frequency, as CLIP_benchmark downloads it) by label number 0..999.
IMAGENET_DATASETS = ("imagenet", "imagenet-v2", "imagenet-sketch", "imagenet-a", "imagenet-r")


class EvalDataError(ValueError):
    """An evaluation set that cannot be used: the message names the path, column or line."""


@dataclasses.dataclass
class LabelledImages:
    """A classification set: ``paths[i]`` has class ``labels[i]``, an index into ``classnames``."""

    paths: list
    labels: list
    classnames: list


@dataclasses.dataclass
class CaptionedImages:
    """A retrieval set: the distinct image files in order of first appearance, every caption
    and the index (into ``paths``) of the image it describes."""

    paths: list
    captions: list
    text_image: list


def is_image_name(name: str) -> bool:
    """Whether a file name has one of the image suffixes (IMAGE_SUFFIXES, any case)."""
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def walk_folder(root: str, option: str, above: tuple = ()):
    """The folders under ``root``, as ``os.walk`` gives them (``(folder, subfolder names,
    file names)``, top-down, names sorted), following symbolic links to folders: a linked
    class folder is read like any other, by the training folder reader and by evaluation
    alike. Entries that are not folders (files, links to files, broken links) are listed as
    files. ``above``: the folders that hold ``root`` when it is walked on its own (a link back
    to them is a loop too).

    Raises:
        EvalDataError: naming ``option`` and the path: a folder that cannot be listed, or a
            link to a folder above it (a loop).
    """
    def walk(folder: str, ancestors: frozenset):
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as error:
            raise EvalDataError(f"{option}: cannot list the folder {folder!r}: "
                                f"{error.strerror}") from None
        subfolders, files = [], []
        for entry in entries:
            try:
                is_folder = entry.is_dir()  # follows a symbolic link
            except OSError:
                is_folder = False
            (subfolders if is_folder else files).append(entry.name)
        yield folder, subfolders, files
        for name in subfolders:
            path = os.path.join(folder, name)
            real = os.path.realpath(path)
            if real in ancestors:
                raise EvalDataError(f"{option}: {path!r} is a symbolic link to {real!r}, a "
                                    "folder that holds it: a loop")
            yield from walk(path, ancestors | {real})

    yield from walk(root, frozenset([os.path.realpath(root), *map(os.path.realpath, above)]))


def _class_folders(root: str, option: str) -> list:
    if not os.path.isdir(root):
        raise EvalDataError(f"{option}: no such folder: {root!r}")
    _, subfolders, _ = next(walk_folder(root, option))
    folders = [Path(root) / name for name in subfolders]
    if not folders:
        raise EvalDataError(f"{option}: {root!r} holds no class folders (expected one folder "
                            "of images per class)")
    return folders


def _folder_images(folder: Path, option: str) -> list:
    """The image files under ``folder`` (recursive, symbolic links to folders followed, see
    walk_folder), sorted; EvalDataError when there are none."""
    walked = walk_folder(str(folder), option, above=(str(folder.parent),))
    images = sorted(os.path.join(path, name) for path, _, files in walked
                    for name in files if is_image_name(name))
    if not images:
        raise EvalDataError(f"empty class folder: {str(folder)!r} holds no image files "
                            f"({', '.join(IMAGE_SUFFIXES)})")
    return images


SPLIT_NAMES = ("train", "training", "test", "testing", "val", "valid", "validation", "eval")


def split_named_folders(classnames: list) -> list:
    """The class names among ``classnames`` that are dataset split names (``train``, ``test``,
    ``val``, ...): a root that holds the splits, given where one split's class folders were
    meant."""
    return [name for name in classnames if name.lower() in SPLIT_NAMES]


def read_image_folder(root: str, option: str = "--images") -> LabelledImages:
    """One folder per class under ``root``: classes in sorted folder order, named by their
    folders, images found recursively in each (sorted)."""
    paths, labels, classnames = [], [], []
    for label, folder in enumerate(_class_folders(root, option)):
        images = _folder_images(folder, option)
        paths += images
        labels += [label] * len(images)
        classnames.append(folder.name)
    return LabelledImages(paths, labels, classnames)


def imagenet_classes(dataset: str) -> tuple[list, list]:
    """(folder names, class names) of an ImageNet variant, in label order."""
    if dataset not in IMAGENET_DATASETS:
        raise EvalDataError(f"--dataset must be one of {', '.join(IMAGENET_DATASETS)}, got "
                            f"{dataset!r}")
    if dataset in ("imagenet-a", "imagenet-r"):
        subset = set(IMAGENET_A_WNIDS if dataset == "imagenet-a" else IMAGENET_R_WNIDS)
        chosen = [i for i, wnid in enumerate(IMAGENET_WNIDS) if wnid in subset]
        return ([IMAGENET_WNIDS[i] for i in chosen], [IMAGENET_CLASSNAMES[i] for i in chosen])
    if dataset == "imagenet-v2":
        return [str(i) for i in range(1000)], list(IMAGENET_CLASSNAMES)
    return list(IMAGENET_WNIDS), list(IMAGENET_CLASSNAMES)


def read_imagenet_folder(root: str, dataset: str, option: str = "--images") -> LabelledImages:
    """An ImageNet variant's folder tree: every class folder of ``root`` must be one of the
    variant's (a WordNet id such as ``n01440764``, or a label number for imagenet-v2); the
    classifier covers all of the variant's classes, even those without a folder here."""
    folder_names, classnames = imagenet_classes(dataset)
    index = {name: label for label, name in enumerate(folder_names)}
    paths, labels = [], []
    for folder in _class_folders(root, option):
        if folder.name not in index:
            expected = "a label number 0..999" if dataset == "imagenet-v2" else \
                f"one of its {len(folder_names)} WordNet ids (e.g. {folder_names[0]})"
            raise EvalDataError(f"{option}: folder {str(folder)!r} is not a class of {dataset} "
                                f"(expected {expected})")
        images = _folder_images(folder, option)
        paths += images
        labels += [index[folder.name]] * len(images)
    return LabelledImages(paths, labels, classnames)


def read_lines(path: str, option: str) -> list:
    """The non-empty lines of a UTF-8 text file, stripped."""
    try:
        with open(path, encoding="utf-8-sig") as file:
            lines = [line.strip() for line in file]
    except FileNotFoundError:
        raise EvalDataError(f"{option}: file not found: {path!r}") from None
    except UnicodeDecodeError:
        raise EvalDataError(f"{option}: {path!r} is not UTF-8 text") from None
    except OSError as error:
        raise EvalDataError(f"{option}: cannot read {path!r}: {error.strerror}") from None
    lines = [line for line in lines if line]
    if not lines:
        raise EvalDataError(f"{option}: {path!r} is empty")
    return lines


def _template_with_braces(template: str) -> Optional[str]:
    """``template`` with its class-name placeholder written ``{}``, or None unless it has
    exactly one placeholder, ``{}`` or ``{c}`` (``{{`` and ``}}`` are literal braces)."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError:  # an unmatched '{' or '}'
        return None
    fields = [(name, spec, conversion) for _, name, spec, conversion in parts if name is not None]
    if len(fields) != 1 or fields[0] not in (("", "", None), ("c", "", None)):
        return None
    escape = lambda text: text.replace("{", "{{").replace("}", "}}")  # noqa: E731
    return "".join(escape(literal) + ("{}" if name is not None else "")
                   for literal, name, _, _ in parts)


def read_templates(spec: str) -> list:
    """A built-in template set ("imagenet": OpenAI's 80, "simple": their 7) or a file with one
    template per line, each with exactly one placeholder for the class name: ``{}`` (Python's
    positional field) or ``{c}`` (CLIP_benchmark's). Returned with ``{}``, for
    ``template.format(classname)``."""
    if spec in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[spec])
    templates = []
    for template in read_lines(spec, "--templates"):
        converted = _template_with_braces(template)
        if converted is None:
            raise EvalDataError(f"--templates: {spec!r}: every line needs exactly one '{{}}' or "
                                f"'{{c}}' for the class name and no other braces (write a "
                                f"literal brace as '{{{{' or '}}}}'); not so: {template!r}")
        templates.append(converted)
    return templates


def _csv_rows(path: str, option: str, columns: tuple) -> list:
    """(line number, {column: value}) of a UTF-8 CSV file with the given columns; image
    paths are resolved by the caller."""
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except FileNotFoundError:
        raise EvalDataError(f"{option}: file not found: {path!r}") from None
    except OSError as error:
        raise EvalDataError(f"{option}: cannot read {path!r}: {error.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise EvalDataError(f"{option}: {path!r} is not UTF-8 text (line {line})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        header = reader.fieldnames or []
        missing = [column for column in columns if column not in header]
        if missing:
            raise EvalDataError(f"{option}: {path!r} has no column {missing[0]!r} (its columns: "
                                f"{', '.join(header) or 'none'})")
        for row in reader:
            values = {column: row[column] for column in columns}
            if any(value is None for value in values.values()):
                raise EvalDataError(f"{option}: {path!r} line {reader.line_num} has fewer "
                                    "fields than the header")
            empty = [column for column, value in values.items() if not value.strip()]
            if empty:
                raise EvalDataError(f"{option}: {path!r} line {reader.line_num} has an empty "
                                    f"{empty[0]!r}")
            rows.append((reader.line_num, values))
    except csv.Error as error:
        raise EvalDataError(f"{option}: {path!r} line {reader.line_num}: {error}") from None
    if not rows:
        raise EvalDataError(f"{option}: {path!r} has no rows")
    return rows


def _resolve(csv_path: str, image: str) -> str:
    """An image path of a CSV file: relative ones are relative to the file's folder."""
    return os.path.join(os.path.dirname(os.path.abspath(csv_path)), image.strip())


def _check_some_image_exists(csv_path: str, rows: list, column: str) -> None:
    """EvalDataError when not one image file a CSV file lists exists: the paths were written
    for another folder (the message names the first row's path, where it was looked for and
    the rule); a few missing files are left to the unreadable-image limit."""
    if any(os.path.lexists(_resolve(csv_path, values[column])) for _, values in rows):
        return
    line, values = rows[0]
    folder = os.path.dirname(os.path.abspath(csv_path))
    raise EvalDataError(
        f"--csv: none of the {len(rows)} image files {csv_path!r} lists exists; line {line}'s "
        f"{values[column].strip()!r} was looked for at {_resolve(csv_path, values[column])!r}. "
        f"Relative paths in column {column!r} are relative to the CSV file's folder "
        f"({folder!r}): check that the images are there, or write the paths relative to that "
        "folder or absolute (captions-csv writes them so)")


def read_label_csv(path: str, classnames: Optional[list] = None, image_column: str = "filepath",
                   label_column: str = "label") -> LabelledImages:
    """A CSV file of ``filepath,label`` rows. A label is a class name (of ``classnames`` when
    given, else the classes are the distinct labels, sorted) or, with ``classnames``, a
    class index 0..C-1."""
    rows = _csv_rows(path, "--csv", (image_column, label_column))
    labels_text = [values[label_column].strip() for _, values in rows]
    if classnames is None:
        classnames = sorted(set(labels_text))
    index = {name: label for label, name in enumerate(classnames)}
    labels = []
    for (line, _), text in zip(rows, labels_text):
        if text in index:
            labels.append(index[text])
        elif text.isdigit() and int(text) < len(classnames):
            labels.append(int(text))
        else:
            raise EvalDataError(f"--csv: {path!r} line {line}: label {text!r} is not a class "
                                f"name or index (0..{len(classnames) - 1}) of --classnames")
    _check_some_image_exists(path, rows, image_column)
    paths = [_resolve(path, values[image_column]) for _, values in rows]
    return LabelledImages(paths, labels, list(classnames))


def read_caption_csv(path: str, image_column: str = "filepath",
                     caption_column: str = "caption") -> CaptionedImages:
    """A CSV file of ``filepath,caption`` rows; an image listed on several rows has several
    captions."""
    rows = _csv_rows(path, "--csv", (image_column, caption_column))
    _check_some_image_exists(path, rows, image_column)
    image_index, paths, captions, text_image = {}, [], [], []
    for _, values in rows:
        image = _resolve(path, values[image_column])
        if image not in image_index:
            image_index[image] = len(paths)
            paths.append(image)
        captions.append(values[caption_column])
        text_image.append(image_index[image])
    return CaptionedImages(paths, captions, text_image)


def write_karpathy_csv(annotations: str, image_root: str, out_csv: str,
                       split: str = "test") -> tuple[int, int]:
    """The ``filepath,caption`` CSV of one split of Karpathy's caption files
    (``dataset_flickr30k.json``, ``dataset_flickr8k.json``, ``dataset_coco.json``: the splits
    the retrieval results of CLIP papers use), one row per caption.

    Args:
        annotations: the JSON file (``{"images": [{"filename", "split", "sentences":
            [{"raw"}], "filepath" (COCO only)}]}``).
        image_root: the folder of the images (COCO: the one holding ``val2014/``), joined
            with each image's (file)path. A relative ``image_root`` is relative to the
            current folder, like every path argument, and the CSV stores the paths relative
            to its own folder, which is how ``read_caption_csv`` resolves them; an absolute
            one stays absolute.
        out_csv: a new file (an existing one is never replaced).
        split: "test" (1,000 Flickr images, 5,000 COCO images), "val" or "train".

    Returns:
        (images, captions) written.
    """
    import json

    if os.path.exists(out_csv):
        raise EvalDataError(f"captions-csv: {out_csv!r} exists; refusing to overwrite it")
    if not os.path.isdir(image_root):
        raise EvalDataError(f"captions-csv: no such folder: {image_root!r} (IMAGE_ROOT, the "
                            "folder of the images)")
    csv_folder = os.path.dirname(os.path.abspath(out_csv))

    def stored(path: str) -> str:
        return path if os.path.isabs(image_root) else os.path.relpath(path, csv_folder)

    try:
        with open(annotations, encoding="utf-8") as file:
            entries = json.load(file)["images"]
    except FileNotFoundError:
        raise EvalDataError(f"captions-csv: file not found: {annotations!r}") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise EvalDataError(f"captions-csv: {annotations!r} is not a Karpathy caption file "
                            f"(a JSON object with 'images'): {error}") from None
    rows = []
    try:
        for entry in entries:
            if entry["split"] != split:
                continue
            path = os.path.join(image_root, entry.get("filepath", ""), entry["filename"])
            rows += [(os.path.abspath(path), sentence["raw"].strip())
                     for sentence in entry["sentences"]]
    except (KeyError, TypeError) as error:
        raise EvalDataError(f"captions-csv: {annotations!r}: an image entry lacks {error}") \
            from None
    if not rows:
        raise EvalDataError(f"captions-csv: {annotations!r} has no images in split {split!r}")
    if not any(os.path.lexists(path) for path, _ in rows):
        raise EvalDataError(f"captions-csv: none of the {len(rows)} images of split {split!r} "
                            f"is in {image_root!r}: the first was looked for at {rows[0][0]!r} "
                            "(IMAGE_ROOT is the folder of the images; for COCO the one holding "
                            "val2014/)")
    with open(out_csv, "x", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["filepath", "caption"])
        writer.writerows((stored(path), caption) for path, caption in rows)
    return len({path for path, _ in rows}), len(rows)
