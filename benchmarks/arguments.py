"""Command-line helpers shared by the benchmark scripts: an argument parser whose errors are
one ``error:`` line and exit status 2, comma-separated choice lists, positive numbers, and
the timing arguments of ``triton.testing.do_bench``."""
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


def _positive(convert: Callable[[str], float], what: str) -> Callable[[str], float]:
    """An argparse type: ``convert(text)``, which must be > 0; errors say ``what`` it expects."""
    def parse(text: str):
        try:
            number = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if not number > 0:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return number
    parse.__name__ = f"positive_{convert.__name__}"
    return parse


positive_int = _positive(int, "a positive integer")
positive_float = _positive(float, "a positive number")


def add_do_bench_arguments(parser: argparse.ArgumentParser, warmup_ms: int, rep_ms: int,
                           per: str) -> None:
    """``--warmup-ms`` and ``--rep-ms``, do_bench's warm-up and repetition times ``per`` timing
    (e.g. "per candidate"), with their defaults."""
    parser.add_argument("--warmup-ms", type=positive_int, default=warmup_ms,
                        help=f"do_bench warm-up {per} (default {warmup_ms})")
    parser.add_argument("--rep-ms", type=positive_int, default=rep_ms,
                        help=f"do_bench repetition {per} (default {rep_ms})")
