"""Training data for ``--data``: the schemes ``digits``, ``csv:FILE`` and ``wds:PATTERN``, and
their per-rank loaders.

- ``digits``: scikit-learn's handwritten digits (see ``digits.py``), held in memory, with a
  held-out zero-shot split.
- ``csv:FILE``: a CSV file with an image-path column and a caption column (``filepath`` and
  ``caption`` unless ``csv_img_key`` / ``csv_caption_key`` say otherwise); relative paths are
  relative to the CSV file's folder.
- ``wds:PATTERN``: WebDataset tar shards (``jpg``/``jpeg``/``png``/``webp`` image + ``txt``
  caption per sample), brace patterns such as ``data/shard-{000..127}.tar``. An epoch is
  ``train_num_samples`` samples.

Every rank loads ``global_batch_size // world_size`` pairs per step and every rank takes the
same number of steps: map-style data goes through a DistributedSampler with drop_last=True;
WebDataset shards are dealt to the ranks and loader workers with ``split_by_node`` /
``split_by_worker`` and read endlessly (reshuffled each pass), each epoch cut at
``train_num_samples // global_batch_size`` steps.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import itertools
import math
import os
import random
import warnings
from typing import Callable, Iterable, Optional

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Subset

from ..models.tokenizer import tokenize
from .digits import load_digits_data
from .distributed import DistInfo
from .evaluate import ZeroShotTask

SCHEMES = ("digits", "csv", "wds")
WDS_IMAGE_KEYS = "jpg;jpeg;png;webp"
WDS_SHUFFLE_BUFFER = 1000


class DataError(ValueError):
    """The training data cannot be used: unknown scheme, missing file, empty dataset, or a
    dataset smaller than one global batch."""


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


@dataclasses.dataclass
class TrainData:
    """A rank's view of the training data.

    Attributes:
        loader: yields (images (n, 3, S, S) float, tokens (n, L) int64), n = the local batch;
            iterate it for ``steps_per_epoch`` batches per epoch.
        steps_per_epoch: optimizer steps per epoch (equal on every rank).
        set_epoch: call with the epoch index before iterating the loader for that epoch.
        zero_shot: the held-out zero-shot task (digits), else None.
    """

    loader: Iterable
    steps_per_epoch: int
    set_epoch: Callable[[int], None]
    zero_shot: Optional[ZeroShotTask] = None


def parse_data_spec(spec: str) -> tuple[str, str]:
    """("digits", "") | ("csv", FILE) | ("wds", PATTERN); DataError for anything else."""
    scheme, _, value = spec.partition(":")
    if scheme not in SCHEMES:
        raise DataError(f"unknown --data scheme {scheme!r} in {spec!r}; use 'digits', "
                        "'csv:FILE' or 'wds:PATTERN'")
    if scheme == "digits" and value:
        raise DataError(f"--data digits takes no argument, got {spec!r}")
    if scheme != "digits" and not value:
        example = "csv:train.csv" if scheme == "csv" else "wds:shards/{000..009}.tar"
        raise DataError(f"--data {scheme}: the {'file' if scheme == 'csv' else 'pattern'} after "
                        f"the colon is missing, e.g. {example}")
    return scheme, value


def _tokenize_one(text: str, context_length: int) -> torch.Tensor:
    """Token ids (context_length,) of one caption."""
    return tokenize(text, context_length=context_length)[0]


class CsvCaptions(Dataset):
    """Image files and captions listed in a CSV file; items (image (3, S, S), tokens (L,))."""

    def __init__(self, paths: list, captions: list, transform, context_length: int):
        self.paths, self.captions = paths, captions
        self.transform, self.context_length = transform, context_length

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return (self.transform(self.paths[index]),
                _tokenize_one(self.captions[index], self.context_length))


def read_csv_captions(path: str, config: DataConfig, transform, context_length: int) -> CsvCaptions:
    """The CsvCaptions of CSV file ``path``; DataError for a missing file, missing columns, an
    empty table or a first image that does not exist (later missing images raise
    FileNotFoundError when read)."""
    if not os.path.isfile(path):
        raise DataError(f"--data csv: file not found: {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file, delimiter=config.csv_separator)
        columns = reader.fieldnames or []
        missing = [key for key in (config.csv_img_key, config.csv_caption_key)
                   if key not in columns]
        if missing:
            raise DataError(f"--data csv: {path!r} has no column(s) {missing}; its columns are "
                            f"{columns} (set --csv-img-key / --csv-caption-key / --csv-separator)")
        rows = [(row[config.csv_img_key], row[config.csv_caption_key]) for row in reader]
    if not rows:
        raise DataError(f"--data csv: {path!r} lists no images (empty dataset)")
    paths = [os.path.join(folder, image) for image, _ in rows]
    if not os.path.isfile(paths[0]):
        raise DataError(f"--data csv: image file not found: {paths[0]!r} (first row of {path!r}; "
                        "relative paths are relative to the CSV file's folder)")
    return CsvCaptions(paths, [caption for _, caption in rows], transform, context_length)


def _map_style_data(dataset: Dataset, config: DataConfig, info: DistInfo, pin_memory: bool,
                    zero_shot: Optional[ZeroShotTask]) -> TrainData:
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
                        pin_memory=pin_memory)
    return TrainData(loader, steps, sampler.set_epoch, zero_shot)


class WebDatasetCaptions(IterableDataset):
    """Endless (image, tokens) local batches from WebDataset shards, reshuffled per epoch.

    Each pass over the shards deals a freshly shuffled shard list (the same on every rank, seeded
    by seed, epoch and pass) to the ranks and workers with ``split_by_node`` /
    ``split_by_worker``; when there are fewer shards than ranks x workers the list is repeated
    so that nobody starves (the ranks then see the same samples). Samples go through a shuffle
    buffer, the model's preprocessing and the tokenizer, then into local batches.
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
            wds.decode("pil"),
            wds.to_tuple(WDS_IMAGE_KEYS, "txt"),
            wds.map_tuple(self.transform,
                          functools.partial(_tokenize_one, context_length=self.context_length)),
            wds.batched(self.local_batch_size, partial=False),
        )
        return iter(pipeline)


def _webdataset_data(pattern: str, config: DataConfig, info: DistInfo, transform,
                     context_length: int, pin_memory: bool) -> TrainData:
    import webdataset as wds

    if config.train_subset is not None:
        raise DataError("--train-subset applies to digits and csv data; for wds set the epoch "
                        "length with --train-num-samples")
    if config.train_num_samples is None:
        raise DataError("--data wds: --train-num-samples is required (the samples per epoch)")
    urls = wds.shardlists.expand_urls(pattern)
    local = [url for url in urls if "://" not in url and not url.startswith("pipe:")]
    missing = [url for url in local if not os.path.isfile(url)]
    if missing:
        raise DataError(f"--data wds: {len(missing)} of {len(urls)} shard file(s) not found, "
                        f"e.g. {missing[:3]}")
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
    return TrainData(loader, steps, dataset.set_epoch)


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
    if scheme == "wds":
        return _webdataset_data(value, config, info, transform, context_length, pin_memory)
    if config.train_num_samples is not None:
        raise DataError("--train-num-samples applies to wds data only (digits and csv epochs "
                        "are one pass over the data; see --train-subset)")
    if scheme == "csv":
        dataset = read_csv_captions(value, config, transform, context_length)
        return _map_style_data(dataset, config, info, pin_memory, None)
    train, task = load_digits_data(transform, functools.partial(tokenize,
                                                                context_length=context_length))
    return _map_style_data(train, config, info, pin_memory, task)
