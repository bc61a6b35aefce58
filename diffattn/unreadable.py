"""One warning per image file that cannot be read, shared by training
(``diffattn.training.unreadable``, which also counts them and applies the limit) and
evaluation (``diffattn.evaluation.features``)."""
from __future__ import annotations

from tqdm import tqdm

from .cli import print_warning


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
