"""How diffattn's command lines report to their user: one-line ``error:`` and ``warning:``
messages on stderr, never a traceback for input the user can fix.

Multi-line library messages (e.g. a checkpoint's list of missing keys) are folded into one
line, so that every problem is exactly one line of the output.
"""
from __future__ import annotations

import sys


def one_line(message) -> str:
    """``message`` with its lines joined: after a line ending in ':' by a space, else by '; '."""
    parts = [part.strip() for part in str(message).splitlines() if part.strip()]
    text = parts[0] if parts else ""
    for part in parts[1:]:
        text += (" " if text.endswith(":") else "; ") + part
    return text


def print_error(message) -> None:
    """Print ``error: <message>`` as one line to stderr."""
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)


def print_warning(message) -> None:
    """Print ``warning: <message>`` as one line to stderr."""
    print(f"warning: {one_line(message)}", file=sys.stderr, flush=True)
