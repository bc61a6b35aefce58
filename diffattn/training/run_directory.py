"""The run directory belongs to one run at a time: a lock held while training, a check that
files can be written in it, and write failures reported as one error naming the file.

``OUT/train.lock`` is locked with ``fcntl.flock`` by the process that trains (rank 0). The
operating system releases the lock when that process ends in any way (a kill -9 included), so
a lock is never stale; the file itself stays. A second run, or a ``--resume``, started while
the lock is held fails at once, naming the PID that holds it.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from typing import Optional

from ..models.checkpoint import CheckpointError

try:
    import fcntl
except ImportError:  # Windows: no lock
    fcntl = None

try:
    from safetensors import SafetensorError
except ImportError:  # safetensors is needed to save a checkpoint at all
    SafetensorError = RuntimeError

LOCK_FILE = "train.lock"


class RunWriteError(OSError):
    """A file of the run could not be written; the message names the path and the cause."""

    def __init__(self, path: str, cause: str, note: str = ""):
        super().__init__(f"cannot write {path!r}: {cause}" + (f"; {note}" if note else ""))
        self.path, self.cause = path, cause

    def __str__(self) -> str:
        return self.args[0]

    def with_note(self, note: str) -> "RunWriteError":
        return RunWriteError(self.path, self.cause, note)


def _describe_errno(number: int) -> str:
    name = errno.errorcode.get(number)
    text = os.strerror(number)
    hint = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "file too large for the "
            "file-size limit (ulimit -f) or the file system", errno.EROFS: "read-only file "
            "system", errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded"}
    return hint.get(number, text) + (f" ({name})" if name else "")


def write_failure_cause(error: BaseException) -> str:
    """What made a write fail: the errno of the OSError behind ``error`` (its own, a chained
    one, or an ``os error N`` in the text of a safetensors error), else its first line."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return _describe_errno(seen.errno)
        seen = seen.__cause__ or seen.__context__
    match = re.search(r"os error (\d+)", str(error))
    if match:
        return _describe_errno(int(match.group(1)))
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


@contextlib.contextmanager
def writing(path: str):
    """Turn a failure of the writes in the block (OSError; torch.save's and safetensors'
    errors) into a RunWriteError naming ``path`` and the cause."""
    try:
        yield
    except RunWriteError:
        raise
    except (OSError, RuntimeError, SafetensorError) as error:
        raise RunWriteError(path, write_failure_cause(error)) from None


def check_writable(out_dir: str) -> None:
    """Create (and drop) an unnamed file in ``out_dir``; RunWriteError when it cannot."""
    with writing(out_dir):
        tempfile.TemporaryFile(dir=out_dir).close()


class RunLock:
    """The exclusive lock of a run directory (``OUT/train.lock``); ``release`` or process
    exit frees it."""

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, LOCK_FILE)
        self._descriptor: Optional[int] = None

    def acquire(self) -> "RunLock":
        """Lock the directory, writing this process's PID into the lock file.

        Raises:
            CheckpointError: another process holds the lock (its PID named).
            RunWriteError: the lock file cannot be created.
        """
        if fcntl is None:
            return self
        if os.path.islink(self.path) or (os.path.lexists(self.path)
                                         and not os.path.isfile(self.path)):
            raise CheckpointError(f"{self.path!r} is not a regular file: the run's lock file is "
                                  "never written through a link or over anything else")
        with writing(self.path):
            # O_NOFOLLOW: a link put there between the check and the open is refused too
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT
                                 | getattr(os, "O_NOFOLLOW", 0), 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(descriptor)
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunWriteError(self.path, write_failure_cause(error)) from None
            raise CheckpointError(
                f"--out {os.path.dirname(self.path)!r} is in use by another training run "
                f"(PID {self._holder()}); wait for it to end, or choose another "
                "directory") from None
        self._descriptor = descriptor
        with writing(self.path):
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        return self

    def _holder(self) -> str:
        try:
            with open(self.path, encoding="ascii", errors="replace") as file:
                return file.read().strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)  # closing the only descriptor releases the flock
            self._descriptor = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
