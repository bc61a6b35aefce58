"""The image files a run cannot read: one warning per file (``UnreadableWarnings``, for
evaluation, ``diffattn.evaluation.features``, and training), and a training run's accounting
(``UnreadableImages``): a count per epoch and the limit on their fraction
(``--max-unreadable-fraction``).

The training loaders replace or skip an unreadable image and name it in the batch
(``diffattn.training.data.Batch``). The fraction of an epoch is
``unreadable / (samples_per_epoch + unreadable)``: the files that could not be read among all
the files read. A run stops with an error naming the files as soon as one rank's count alone
puts the epoch above the limit, or at the end of an epoch whose total over the ranks is above
it.
"""
from __future__ import annotations

import torch.distributed as dist
from tqdm import tqdm

from .user_messages import print_warning


class UnreadableWarnings:
    """The files already warned of; ``warn`` prints one ``warning:`` line for each new one."""

    def __init__(self):
        self.warned = set()

    def warn(self, entries) -> None:
        """One warning for each file of ``entries`` ((path, reason) pairs) not warned of yet."""
        for path, reason in entries:
            if path not in self.warned:
                self.warned.add(path)
                with tqdm.external_write_mode():  # on a line of its own, not after a bar
                    print_warning(f"skipped unreadable image {path}: {reason}")


_LISTED = 10


class UnreadableImages(UnreadableWarnings):
    """One rank's record of the image files it could not read.

    Args:
        limit: the largest fraction of unreadable files allowed per epoch, in [0, 1).
        samples_per_epoch: samples trained on per epoch over all ranks.
        max_read_attempts: how many files in a row a loader tries before it gives up.
        error: the ValueError subclass raised when the limit is passed.
    """

    def __init__(self, limit: float, samples_per_epoch: int, *, max_read_attempts: int,
                 error: type = ValueError):
        super().__init__()
        self.limit, self.samples_per_epoch = limit, samples_per_epoch
        self.max_read_attempts, self.error = max_read_attempts, error
        self.epoch_entries = []

    def _fraction(self, count: int) -> float:
        return count / (self.samples_per_epoch + count)

    def _error(self, entries: list, epoch: int, why: str) -> ValueError:
        listed = "; ".join(f"{path} ({reason})" for path, reason in entries[:_LISTED])
        more = f"; and {len(entries) - _LISTED} more" if len(entries) > _LISTED else ""
        return self.error(f"epoch {epoch}: {why}: {listed}{more}. Fix or remove these files "
                          "(--check-data lists every unreadable image of a CSV file) or raise "
                          "--max-unreadable-fraction")

    def add(self, entries, gave_up: bool, epoch: int) -> None:
        """Record a training batch's unreadable files (warning for new ones).

        Raises:
            error: the batch gave up (no readable image in ``max_read_attempts`` tries), or
                this rank's count alone puts the epoch above the limit.
        """
        self.warn(entries)
        self.epoch_entries.extend(entries)
        count = len(self.epoch_entries)
        if gave_up:
            raise self._error(self.epoch_entries, epoch, f"{self.max_read_attempts} image files "
                              "in a row could not be read, the data is mostly unreadable")
        if self._fraction(count) > self.limit:
            raise self._error(self.epoch_entries, epoch, f"{count} image files could not be read, "
                              f"more than --max-unreadable-fraction {self.limit:g} of the "
                              f"{self.samples_per_epoch} samples of an epoch")

    def end_epoch(self, epoch: int, initialized: bool) -> int:
        """The number of unreadable files of the epoch over all ranks (a collective call with
        a process group); resets the epoch's record.

        Raises:
            error: their fraction is above the limit.
        """
        entries = self.epoch_entries
        if initialized:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, entries)
            entries = [entry for rank_entries in gathered for entry in rank_entries]
        self.epoch_entries = []
        self.warned.update(path for path, _ in entries)
        if entries and self._fraction(len(entries)) > self.limit:
            raise self._error(entries, epoch, f"{len(entries)} of "
                              f"{self.samples_per_epoch + len(entries)} image files read could "
                              f"not be read ({self._fraction(len(entries)):.2%}, above "
                              f"--max-unreadable-fraction {self.limit:g})")
        return len(entries)
