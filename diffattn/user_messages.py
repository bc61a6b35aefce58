"""How diffattn's command lines report to their user: one-line ``error:`` and ``warning:``
messages on stderr, never a traceback for input the user can fix.

Multi-line library messages (e.g. a checkpoint's list of missing keys) are folded into one
line, so that every problem is exactly one line of the output.
"""
from __future__ import annotations

import argparse
import sys

import torch


def one_line(message) -> str:
    """``message`` with its lines joined: after a line ending in ':' by a space, else by '; '."""
    parts = [part.strip() for part in str(message).splitlines() if part.strip()]
    text = parts[0] if parts else ""
    for part in parts[1:]:
        text += (" " if text.endswith(":") else "; ") + part
    return text


def _write_line(text: str) -> None:
    """Write one line to stderr; a progress bar being drawn there is cleared first and drawn
    again below the line (tqdm.write), so that the line never lands inside the bar."""
    try:
        from tqdm import tqdm
    except ImportError:  # no progress bars without tqdm
        print(text, file=sys.stderr, flush=True)
        return
    tqdm.write(text, file=sys.stderr)
    sys.stderr.flush()


def print_error(message) -> None:
    """Print ``error: <message>`` as one line to stderr."""
    _write_line(f"error: {one_line(message)}")


def print_warning(message) -> None:
    """Print ``warning: <message>`` as one line to stderr."""
    _write_line(f"warning: {one_line(message)}")


def parse_device(name: str, option: str = "--device") -> torch.device:
    """The torch.device a command line's ``option`` names, checked to exist on this machine.

    Accepts ``cpu``, ``cuda`` / ``cuda:N`` (CUDA available, N below the device count) and the
    other accelerators torch knows (``mps``, ``xpu``, ...) when torch reports them available.

    Raises:
        ValueError: naming ``option``, the value and what is expected or missing.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{option} {name!r} is not a device: expected cpu, cuda or cuda:N") \
            from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = ("this torch is a CPU-only build" if torch.version.cuda is None
                     else "no CUDA device is visible")
            raise ValueError(f"{option} {name}: CUDA is not available on this machine ({build}); "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{option} {name}: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")
        return device
    backend = getattr(torch, device.type, None) if device.type != "mps" else torch.backends.mps
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ValueError(f"{option} {name}: no {device.type} device is available on this "
                         "machine; use cpu or cuda")
    return device


class CommandLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose argument errors are one ``error:`` line (naming ``--help``) and
    exit status 2, like every other error of diffattn's command lines."""

    def error(self, message):
        print_error(f"{message} (see {self.prog} --help)")
        sys.exit(2)
