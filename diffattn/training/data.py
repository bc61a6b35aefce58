"""Training data for ``--data``: the schemes ``digits``, ``csv:FILE``, ``folder:ROOT`` and
``wds:PATTERN``, their per-rank loaders, and the held-out validation split.

- ``digits``: scikit-learn's handwritten digits (see ``diffattn.digits``), held in memory, with a
  held-out zero-shot split.
- ``csv:FILE``: a UTF-8 CSV file (a byte-order mark is allowed) with an image-path column and
  a caption column (``filepath`` and ``caption`` unless ``csv_img_key`` / ``csv_caption_key``
  say otherwise); relative paths are relative to the CSV file's folder. A file in another
  encoding is refused up front with the line that is not UTF-8.
- ``folder:ROOT``: the image files under ROOT (recursively, sorted; the suffixes of
  ``diffattn.models.zero_shot.IMAGE_SUFFIXES``). An image's caption comes from a caption
  file beside it when there is one (``dog1.jpg`` + ``dog1.txt``, UTF-8: one caption, or one
  per line and one of them drawn at random each time the image is read); otherwise from its
  class, the folder directly under ROOT that holds it (``ROOT/<class>/...``, the folder name
  as it is): a template (``templates``, by default OpenAI's 7 simple ImageNet ones) filled
  with the class name, drawn at random each read. A caption file always wins over the class
  name; an image directly in ROOT needs a caption file. Symbolic links to folders are
  followed, as evaluation follows them (``diffattn.evaluation.datasets.walk_folder``).
- ``wds:PATTERN``: WebDataset tar shards (``jpg``/``jpeg``/``png``/``webp`` image + ``txt``
  caption per sample), brace patterns such as ``data/shard-{000..127}.tar``. An epoch is
  ``train_num_samples`` samples.

Every rank loads ``global_batch_size // world_size`` pairs per step and every rank takes the
same number of steps: map-style data goes through a DistributedSampler with drop_last=True;
WebDataset shards are dealt to the ranks and loader workers with ``split_by_node`` /
``split_by_worker`` and read endlessly (reshuffled each pass), each epoch cut at
``train_num_samples // global_batch_size`` steps.

Unreadable images (missing, truncated, not an image, out-of-range pixels) never stop a loader:
a CSV sample whose image cannot be read is replaced by another sample drawn at random
(deterministically), a WebDataset sample is skipped, and every batch carries the files that
were passed over (``Batch.unreadable``) so that the training loop can report them and stop a
run that has too many. A sample that finds no readable image in ``MAX_READ_ATTEMPTS`` tries
marks its batch ``gave_up``.

``val_fraction`` holds out validation pairs: for CSV data that fraction of the rows (for
folder data, of the images; a held-out image's caption is its caption file's first line or
its class name in the first template) (a fixed
random choice, independent of the training seed), for WebDataset data that fraction of the
shards (the last ones of the expanded pattern, at least one).
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import io
import itertools
import math
import os
import random
import warnings
from typing import Callable, Iterable, NamedTuple, Optional

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Subset

from ..evaluation.datasets import walk_folder
from ..models.preprocess import UNREADABLE_IMAGE_ERRORS, load_image, unreadable_image_reason
from ..models.imagenet_classes import SIMPLE_IMAGENET_TEMPLATES
from ..models.tokenizer import tokenize, trim_padding
from ..models.zero_shot import IMAGE_SUFFIXES
from ..digits import ZeroShotTask, load_digits_data
from .distributed import DistInfo

SCHEMES = ("digits", "csv", "folder", "wds")
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
WDS_SHUFFLE_BUFFER = 1000
MAX_READ_ATTEMPTS = 32
SPLIT_SEED = 0


class DataError(ValueError):
    """The training data cannot be used: unknown scheme, missing or unreadable file, empty
    dataset, a dataset smaller than one global batch, or too many unreadable images."""


class Batch(NamedTuple):
    """One local batch.

    Attributes:
        images: (n, 3, S, S) float, preprocessed.
        tokens: (n, L) int64 token ids, L the longest caption of the batch (through its
            end-of-text token; at most the context length): the text tower's embeddings do not
            depend on padding after it, and shorter batches run faster.
        unreadable: ``(path, reason)`` of every image file that could not be read while the
            batch was assembled (each replaced by another sample, or skipped).
        gave_up: True when a sample found no readable image in MAX_READ_ATTEMPTS tries: the
            batch then holds placeholders and must not be trained on.
    """

    images: torch.Tensor
    tokens: torch.Tensor
    unreadable: list
    gave_up: bool


def collate_batch(items: list) -> Batch:
    """A Batch of dataset items: (image, tokens) or (image, tokens, unreadable, gave_up)."""
    images = torch.stack([item[0] for item in items])
    tokens = trim_padding(torch.stack([item[1] for item in items]))
    unreadable = [entry for item in items if len(item) > 2 for entry in item[2]]
    return Batch(images, tokens, unreadable, any(len(item) > 3 and item[3] for item in items))


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to load and how.

    Attributes:
        spec: the ``--data`` value: "digits", "csv:FILE" or "wds:PATTERN".
        global_batch_size: pairs per optimizer step over all ranks.
        seed: shuffling seed (the same on every rank).
        workers: DataLoader worker processes per rank.
        train_subset: keep only the first N training samples (digits, csv).
        train_num_samples: samples per epoch (wds; required there).
        csv_img_key, csv_caption_key, csv_separator: the CSV columns and delimiter.
        val_fraction: hold out this fraction of the data for validation (csv, folder, wds).
        templates: the caption templates of folder data's class names (one ``{}`` each).
    """

    spec: str
    global_batch_size: int
    seed: int = 0
    workers: int = 0
    train_subset: Optional[int] = None
    train_num_samples: Optional[int] = None
    csv_img_key: str = "filepath"
    csv_caption_key: str = "caption"
    csv_separator: str = ","
    val_fraction: Optional[float] = None
    templates: tuple = tuple(SIMPLE_IMAGENET_TEMPLATES)


@dataclasses.dataclass
class TrainData:
    """A rank's view of the training data.

    Attributes:
        loader: yields Batch (images (n, 3, S, S), tokens (n, L), unreadable, gave_up), n =
            the local batch; iterate it for ``steps_per_epoch`` batches per epoch.
        steps_per_epoch: optimizer steps per epoch (equal on every rank).
        set_epoch: call with the epoch index before iterating the loader for that epoch.
        samples_per_epoch: pairs trained on per epoch over all ranks.
        unused_per_epoch: samples of the dataset (or of ``train_num_samples``) left out of
            every epoch because they do not fill a whole global batch (drop_last).
        zero_shot: the held-out zero-shot task (digits), else None.
        validation: held-out pairs as an iterable of Batch of at most ``global_batch_size``
            pairs (iterate it on one rank), else None.
        validation_size: number of held-out pairs (for wds: of held-out shards).
        csv_paths: every image path of the CSV file or folder (training and validation),
            else None.
    """

    loader: Iterable
    steps_per_epoch: int
    set_epoch: Callable[[int], None]
    samples_per_epoch: int
    unused_per_epoch: int = 0
    zero_shot: Optional[ZeroShotTask] = None
    validation: Optional[Iterable] = None
    validation_size: int = 0
    csv_paths: Optional[list] = None


def parse_data_spec(spec: str) -> tuple[str, str]:
    """("digits", "") | ("csv", FILE) | ("folder", ROOT) | ("wds", PATTERN); DataError for
    anything else."""
    scheme, _, value = spec.partition(":")
    if scheme not in SCHEMES:
        raise DataError(f"unknown --data scheme {scheme!r} in {spec!r}; use 'digits', "
                        "'csv:FILE', 'folder:ROOT' or 'wds:PATTERN'")
    if scheme == "digits" and value:
        raise DataError(f"--data digits takes no argument, got {spec!r}")
    if scheme != "digits" and not value:
        example, what = {"csv": ("csv:train.csv", "file"), "folder": ("folder:images", "folder"),
                         "wds": ("wds:shards/{000..009}.tar", "pattern")}[scheme]
        raise DataError(f"--data {scheme}: the {what} after the colon is missing, e.g. {example}")
    return scheme, value


def _tokenize_one(text: str, context_length: int) -> torch.Tensor:
    """Token ids (context_length,) of one caption."""
    return tokenize(text, context_length=context_length)[0]


def _placeholder(transform, context_length: int) -> tuple:
    """Zero image and tokens standing in for a sample that found no readable image."""
    size = transform.image_size
    return torch.zeros(3, size, size), torch.zeros(context_length, dtype=torch.int64)


# ------------------------------------------------------------------------ csv
class CsvCaptions(Dataset):
    """Image files and captions listed in a CSV file.

    Items are (image (3, S, S), tokens (L,), unreadable, gave_up): when an image cannot be
    read, samples drawn at random (deterministically from the index) stand in for it, up to
    MAX_READ_ATTEMPTS tries; ``unreadable`` lists the ``(path, reason)`` passed over.
    """

    def __init__(self, paths: list, captions: list, transform, context_length: int):
        self.paths, self.captions = paths, captions
        self.transform, self.context_length = transform, context_length

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        unreadable = []
        for attempt in range(MAX_READ_ATTEMPTS):
            position = index if attempt == 0 else random.Random(
                index * 1_000_003 + attempt).randrange(len(self.paths))
            try:
                image = self.transform(self.paths[position])
            except UNREADABLE_IMAGE_ERRORS as error:
                unreadable.append((self.paths[position], unreadable_image_reason(error)))
                continue
            tokens = _tokenize_one(self._caption(position), self.context_length)
            return image, tokens, tuple(unreadable), False
        return (*_placeholder(self.transform, self.context_length), tuple(unreadable), True)

    def _caption(self, position: int) -> str:
        return self.captions[position]


class FolderCaptions(CsvCaptions):
    """Image files with several caption choices each (``folder:ROOT``): ``captions[i]`` is a
    tuple of strings, one drawn with torch's RNG at every read, or the first one when
    ``draw`` is False (validation, which draws nothing from the RNGs). Unreadable images are
    replaced as in CsvCaptions."""

    def __init__(self, paths: list, captions: list, transform, context_length: int,
                 draw: bool = True):
        super().__init__(paths, captions, transform, context_length)
        self.draw = draw

    def _caption(self, position: int) -> str:
        choices = self.captions[position]
        if not self.draw or len(choices) == 1:
            return choices[0]
        return choices[int(torch.randint(len(choices), ()))]


def _decode_utf8(raw: bytes, path: str) -> str:
    """The text of a CSV file: UTF-8, with or without a byte-order mark."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise DataError(f"--data csv: {path!r} is not UTF-8 text: line {line} holds the bytes "
                        f"{raw[error.start:error.end + 3]!r}; save the file as UTF-8") from None


def read_csv_rows(path: str, config: DataConfig) -> list:
    """The (image path, caption) rows of CSV file ``path``, image paths made absolute
    (relative ones are relative to the file's folder).

    Raises:
        DataError: missing or unreadable file, text that is not UTF-8 (naming the line),
            malformed CSV, missing columns, a row without an image path, or no rows.
    """
    if not os.path.isfile(path):
        raise DataError(f"--data csv: file not found: {path!r}")
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except OSError as error:
        raise DataError(f"--data csv: cannot read {path!r}: {error.strerror}") from None
    reader = csv.DictReader(io.StringIO(_decode_utf8(raw, path), newline=""),
                            delimiter=config.csv_separator)
    folder = os.path.dirname(os.path.abspath(path))
    rows = []
    try:
        columns = reader.fieldnames or []
        missing = [key for key in (config.csv_img_key, config.csv_caption_key)
                   if key not in columns]
        if missing:
            raise DataError(f"--data csv: {path!r} has no column(s) {missing}; its columns are "
                            f"{columns} (set --csv-img-key / --csv-caption-key / --csv-separator)")
        for row in reader:
            image, caption = row[config.csv_img_key], row[config.csv_caption_key]
            if image is None or caption is None:
                raise DataError(f"--data csv: {path!r} line {reader.line_num} has fewer fields "
                                "than the header")
            if not image.strip():
                raise DataError(f"--data csv: {path!r} line {reader.line_num} has an empty "
                                f"{config.csv_img_key!r}")
            rows.append((os.path.join(folder, image), caption))
    except csv.Error as error:
        raise DataError(f"--data csv: {path!r} line {reader.line_num}: {error}") from None
    if not rows:
        raise DataError(f"--data csv: {path!r} lists no images (empty dataset)")
    return rows


def check_images(paths: list, progress: bool = False) -> list:
    """The ``(path, reason)`` of every file in ``paths`` that is not a readable image (each is
    opened and decoded in full)."""
    from tqdm import tqdm

    unreadable = []
    for path in tqdm(paths, desc="checking images", disable=not progress, leave=False):
        try:
            load_image(path)
        except UNREADABLE_IMAGE_ERRORS as error:
            unreadable.append((path, unreadable_image_reason(error)))
    return unreadable


def _held_out_count(count: int, fraction: float, what: str) -> int:
    """round(fraction * count), at least 1; DataError when nothing would be left to train on."""
    held_out = max(1, round(fraction * count))
    if held_out >= count:
        raise DataError(f"--val-fraction {fraction:g} of {count} {what} leaves nothing to "
                        "train on")
    return held_out


def _split_validation(count: int, fraction: float, what: str) -> tuple[list, list]:
    """(training indices, validation indices) of ``count`` items, the validation ones a fixed
    random choice of ``_held_out_count`` items, both in their original order."""
    held_out = _held_out_count(count, fraction, what)
    chosen = set(random.Random(SPLIT_SEED).sample(range(count), held_out))
    return ([index for index in range(count) if index not in chosen], sorted(chosen))


class _ValidationLoader:
    """Re-iterable Batch-es of at most ``batch_size`` pairs of a map-style dataset, in order,
    read in this process (no DataLoader: validation draws nothing from the RNGs)."""

    def __init__(self, dataset: Dataset, batch_size: int):
        self.dataset, self.batch_size = dataset, batch_size

    def __iter__(self):
        for start in range(0, len(self.dataset), self.batch_size):
            stop = min(start + self.batch_size, len(self.dataset))
            yield collate_batch([self.dataset[index] for index in range(start, stop)])


def _map_style_data(dataset: Dataset, config: DataConfig, info: DistInfo, pin_memory: bool,
                    zero_shot: Optional[ZeroShotTask] = None, validation=None,
                    validation_size: int = 0, csv_paths=None) -> TrainData:
    """Loader over a map-style dataset: DistributedSampler (shuffled with ``config.seed`` and
    the epoch, drop_last=True) and whole local batches only."""
    if config.train_subset is not None:
        if config.train_subset < 1:
            raise DataError(f"--train-subset must be >= 1, got {config.train_subset}")
        dataset = Subset(dataset, range(min(config.train_subset, len(dataset))))
    if len(dataset) == 0:
        raise DataError(f"--data {config.spec}: empty dataset")
    steps = len(dataset) // config.global_batch_size
    if steps == 0:
        raise DataError(f"--data {config.spec}: {len(dataset)} training samples, fewer than one "
                        f"global batch of {config.global_batch_size}; lower --batch-size")
    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank,
                                 shuffle=True, seed=config.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=config.global_batch_size // info.world_size,
                        sampler=sampler, num_workers=config.workers, drop_last=True,
                        pin_memory=pin_memory, collate_fn=collate_batch)
    samples = steps * config.global_batch_size
    return TrainData(loader, steps, sampler.set_epoch, samples, len(dataset) - samples,
                     zero_shot, validation, validation_size, csv_paths)


def _csv_data(path: str, config: DataConfig, info: DistInfo, transform, context_length: int,
              pin_memory: bool) -> TrainData:
    rows = read_csv_rows(path, config)
    validation, validation_size = None, 0
    if config.val_fraction is not None:
        train_indices, val_indices = _split_validation(len(rows), config.val_fraction, "rows")
        val_rows = [rows[index] for index in val_indices]
        validation = _ValidationLoader(
            CsvCaptions([image for image, _ in val_rows], [caption for _, caption in val_rows],
                        transform, context_length), config.global_batch_size)
        validation_size = len(val_rows)
        train_rows = [rows[index] for index in train_indices]
    else:
        train_rows = rows
    dataset = CsvCaptions([image for image, _ in train_rows],
                          [caption for _, caption in train_rows], transform, context_length)
    return _map_style_data(dataset, config, info, pin_memory, validation=validation,
                           validation_size=validation_size,
                           csv_paths=[image for image, _ in rows])


# ------------------------------------------------------------------------ folder
def _caption_file_lines(path: str) -> tuple:
    """The non-empty lines of caption file ``path`` (UTF-8), stripped."""
    try:
        with open(path, encoding="utf-8-sig") as file:
            lines = tuple(line.strip() for line in file if line.strip())
    except UnicodeDecodeError:
        raise DataError(f"--data folder: caption file {path!r} is not UTF-8 text") from None
    except OSError as error:
        raise DataError(f"--data folder: cannot read caption file {path!r}: "
                        f"{error.strerror}") from None
    if not lines:
        raise DataError(f"--data folder: caption file {path!r} is empty")
    return lines


def read_folder_captions(root: str, templates) -> tuple[list, list]:
    """(image paths, caption choices per image) of ``folder:ROOT`` (see the module docstring:
    a caption file beside the image wins, else the templates filled with the class folder's
    name).

    Raises:
        DataError: ROOT is not a folder, holds no image files, or an image directly in ROOT
            has no caption file; an unreadable, non-UTF-8 or empty caption file.
        EvalDataError (a ValueError): a folder that cannot be listed, or a symbolic link to a
            folder above it (a loop).
    """
    if not os.path.isdir(root):
        raise DataError(f"--data folder: no such folder: {root!r}")
    templates = tuple(templates)
    paths, captions = [], []
    for folder, _, files in walk_folder(root, "--data folder"):
        relative = os.path.relpath(folder, root)
        classname = None if relative == os.curdir else relative.split(os.sep)[0]
        names = set(files)
        for name in files:
            stem, suffix = os.path.splitext(name)
            if suffix.lower() not in IMAGE_SUFFIXES:
                continue
            path = os.path.join(folder, name)
            if stem + ".txt" in names:
                choices = _caption_file_lines(os.path.join(folder, stem + ".txt"))
            elif classname is not None:
                choices = tuple(template.format(classname) for template in templates)
            else:
                raise DataError(f"--data folder: {path!r} is directly in {root!r} and has no "
                                f"caption file {stem + '.txt'!r}: put images in one folder per "
                                "class, or a caption file beside each image")
            paths.append(path)
            captions.append(choices)
    if not paths:
        raise DataError(f"--data folder: {root!r} holds no image files "
                        f"({', '.join(IMAGE_SUFFIXES)})")
    return paths, captions


def _folder_data(root: str, config: DataConfig, info: DistInfo, transform, context_length: int,
                 pin_memory: bool) -> TrainData:
    paths, captions = read_folder_captions(root, config.templates)
    validation, validation_size, train_indices = None, 0, range(len(paths))
    if config.val_fraction is not None:
        train_indices, val_indices = _split_validation(len(paths), config.val_fraction, "images")
        validation = _ValidationLoader(
            FolderCaptions([paths[i] for i in val_indices], [captions[i] for i in val_indices],
                           transform, context_length, draw=False), config.global_batch_size)
        validation_size = len(val_indices)
    dataset = FolderCaptions([paths[i] for i in train_indices],
                             [captions[i] for i in train_indices], transform, context_length)
    return _map_style_data(dataset, config, info, pin_memory, validation=validation,
                           validation_size=validation_size, csv_paths=paths)


# ------------------------------------------------------------------------ webdataset
def _decode_samples(samples, transform, context_length: int):
    """(image, tokens, unreadable, gave_up) items of WebDataset samples. A sample whose image
    or caption cannot be read is skipped and named in the next item's ``unreadable``; after
    MAX_READ_ATTEMPTS skipped samples in a row a placeholder item with gave_up=True is emitted."""
    unreadable = []
    for sample in samples:
        name = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        image_key = next((key for key in WDS_IMAGE_KEYS if key in sample), None)
        try:
            if image_key is None:
                raise ValueError(f"no image ({', '.join(WDS_IMAGE_KEYS)}) in the sample")
            if "txt" not in sample:
                raise ValueError("no txt caption in the sample")
            caption = sample["txt"].decode("utf-8")
            with Image.open(io.BytesIO(sample[image_key])) as opened:
                opened.load()
                image = transform(opened)
        except UNREADABLE_IMAGE_ERRORS as error:
            unreadable.append((name, unreadable_image_reason(error)))
            if len(unreadable) >= MAX_READ_ATTEMPTS:
                yield (*_placeholder(transform, context_length), tuple(unreadable), True)
                unreadable = []
            continue
        yield image, _tokenize_one(caption, context_length), tuple(unreadable), False
        unreadable = []


class WebDatasetCaptions(IterableDataset):
    """Endless local Batch-es from WebDataset shards, reshuffled per epoch.

    Each pass over the shards deals a freshly shuffled shard list (the same on every rank, seeded
    by seed, epoch and pass) to the ranks and workers with ``split_by_node`` /
    ``split_by_worker``; when there are fewer shards than ranks x workers the list is repeated
    so that nobody starves (the ranks then see the same samples). Samples go through a shuffle
    buffer, the model's preprocessing and the tokenizer (unreadable ones skipped, see
    ``_decode_samples``), then into local batches.
    """

    def __init__(self, urls: list, transform, context_length: int, local_batch_size: int,
                 seed: int, shuffle_buffer: int = WDS_SHUFFLE_BUFFER):
        self.urls, self.transform, self.context_length = urls, transform, context_length
        self.local_batch_size, self.seed = local_batch_size, seed
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the shard and sample order of ``epoch`` for the next iteration."""
        self.epoch = epoch

    def _endless_samples(self, epoch: int, copies: int):
        import webdataset as wds

        for pass_index in itertools.count():
            order = []
            for copy in range(copies):
                shuffled = list(self.urls)
                random.Random(f"{self.seed}:{epoch}:{pass_index}:{copy}").shuffle(shuffled)
                order.extend(shuffled)
            shards = wds.split_by_worker(wds.split_by_node({"url": url} for url in order))
            count = 0
            for sample in wds.tarfile_samples(shards):
                count += 1
                yield sample
            if count == 0:
                raise DataError(f"--data wds: a whole pass over the shards gave no samples "
                                f"(empty dataset?): {self.urls[:5]}")

    def __iter__(self):
        import webdataset as wds

        rank, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
        copies = math.ceil(world_size * num_workers / len(self.urls))
        rng = random.Random(f"{self.seed}:{self.epoch}:{rank}:{worker}")
        pipeline = wds.DataPipeline(
            functools.partial(self._endless_samples, self.epoch, copies),
            wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng),
            functools.partial(_decode_samples, transform=self.transform,
                              context_length=self.context_length),
            wds.batched(self.local_batch_size, collation_fn=collate_batch, partial=False),
        )
        return iter(pipeline)


class _WebDatasetValidation:
    """Re-iterable Batch-es of at most ``batch_size`` pairs: one ordered pass over ``urls``."""

    def __init__(self, urls: list, transform, context_length: int, batch_size: int):
        self.urls, self.transform = urls, transform
        self.context_length, self.batch_size = context_length, batch_size

    def __iter__(self):
        import webdataset as wds

        return iter(wds.DataPipeline(
            wds.SimpleShardList(self.urls),
            wds.tarfile_to_samples(),
            functools.partial(_decode_samples, transform=self.transform,
                              context_length=self.context_length),
            wds.batched(self.batch_size, collation_fn=collate_batch, partial=True),
        ))


def _webdataset_data(pattern: str, config: DataConfig, info: DistInfo, transform,
                     context_length: int, pin_memory: bool) -> TrainData:
    import webdataset as wds

    if config.train_subset is not None:
        raise DataError("--train-subset applies to digits, csv and folder data; for wds set "
                        "the epoch length with --train-num-samples")
    if config.train_num_samples is None:
        raise DataError("--data wds: --train-num-samples is required (the samples per epoch)")
    urls = wds.shardlists.expand_urls(pattern)
    local = [url for url in urls if "://" not in url and not url.startswith("pipe:")]
    missing = [url for url in local if not os.path.isfile(url)]
    if missing:
        raise DataError(f"--data wds: {len(missing)} of {len(urls)} shard file(s) not found, "
                        f"e.g. {missing[:3]}")
    validation, validation_size = None, 0
    if config.val_fraction is not None:
        if len(urls) < 2:
            raise DataError("--val-fraction with wds data holds out whole shards: the pattern "
                            f"must name at least 2 shards, it names {len(urls)}")
        held_out = _held_out_count(len(urls), config.val_fraction, "shards")
        urls, val_urls = urls[:-held_out], urls[-held_out:]
        validation = _WebDatasetValidation(val_urls, transform, context_length,
                                           config.global_batch_size)
        validation_size = len(val_urls)
    steps = config.train_num_samples // config.global_batch_size
    if steps == 0:
        raise DataError(f"--train-num-samples {config.train_num_samples} is fewer than one global "
                        f"batch of {config.global_batch_size}")
    readers = info.world_size * max(1, config.workers)
    if len(urls) < readers and info.is_main:
        warnings.warn(f"--data wds: {len(urls)} shard(s) for {readers} readers (ranks x workers): "
                      "shards are repeated, so ranks read the same samples", stacklevel=2)
    dataset = WebDatasetCaptions(urls, transform, context_length,
                                 config.global_batch_size // info.world_size, config.seed)
    loader = DataLoader(dataset, batch_size=None, num_workers=config.workers,
                        pin_memory=pin_memory)
    samples = steps * config.global_batch_size
    return TrainData(loader, steps, dataset.set_epoch, samples,
                     config.train_num_samples - samples, validation=validation,
                     validation_size=validation_size)


# ------------------------------------------------------------------------ entry point
def build_train_data(config: DataConfig, info: DistInfo, transform, context_length: int,
                     pin_memory: bool = False) -> TrainData:
    """The TrainData for ``config.spec`` on this rank.

    Args:
        config: see DataConfig; ``global_batch_size`` must be divisible by the world size.
        info: the process layout.
        transform: the model's ImageTransform (``model.preprocess``).
        context_length: the text tower's token count.
        pin_memory: pin the loaded batches (CUDA training).

    Raises:
        DataError: see the class.
    """
    scheme, value = parse_data_spec(config.spec)
    if config.global_batch_size % info.world_size:
        raise DataError(f"--batch-size {config.global_batch_size} (the global batch) is not "
                        f"divisible by the world size {info.world_size}")
    if config.val_fraction is not None and scheme == "digits":
        raise DataError("--val-fraction applies to csv, folder and wds data; digits already "
                        "holds out 20% of the images for the zero-shot evaluation")
    if scheme == "wds":
        return _webdataset_data(value, config, info, transform, context_length, pin_memory)
    if config.train_num_samples is not None:
        raise DataError("--train-num-samples applies to wds data only (digits, csv and folder "
                        "epochs are one pass over the data; see --train-subset)")
    if scheme == "csv":
        return _csv_data(value, config, info, transform, context_length, pin_memory)
    if scheme == "folder":
        return _folder_data(value, config, info, transform, context_length, pin_memory)
    train, task = load_digits_data(transform, functools.partial(tokenize,
                                                                context_length=context_length))
    return _map_style_data(train, config, info, pin_memory, zero_shot=task)
