"""Command-line helpers shared by the benchmark scripts: an argument parser whose errors are
one ``error:`` line and exit status 2, and comma-separated choice lists."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, List, NoReturn, Sequence


class CliParser(argparse.ArgumentParser):
    """argparse.ArgumentParser that reports a bad argument as a single line
    ``error: <what is wrong>`` on stderr (no usage dump) and exits with status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def comma_list(choices: Sequence[str]) -> Callable[[str], List[str]]:
    """An argparse type: a comma-separated list, every item one of ``choices``."""
    def parse(text: str) -> List[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [t for t in items if t not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown) or 'empty list'}; "
                                             f"choose from {', '.join(choices)}")
        return items
    return parse


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {number}")
    return number


def positive_float(text: str) -> float:
    """An argparse type: a number > 0."""
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    if not number > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return number
