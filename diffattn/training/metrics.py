"""The run's ``metrics.jsonl``: one JSON object per completed epoch.

A run killed while appending leaves an unterminated last line: readers ignore it and
``truncate_metrics`` (called when a run resumes) removes it. The file is strict JSON: a value
that is not a finite number (a NaN or infinite loss) is written as ``null``.
"""
from __future__ import annotations

import json
import math
import os

from ..models.checkpoint import CheckpointError
from .run_directory import writing

METRICS_FILE = "metrics.jsonl"


def finite_or_none(record: dict) -> dict:
    """``record`` with every float that is not finite replaced by None (JSON ``null``)."""
    return {key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in record.items()}


def _line(record: dict) -> str:
    return json.dumps(finite_or_none(record), allow_nan=False) + "\n"


def append_metrics(out_dir: str, record: dict) -> None:
    """Append ``record`` as one JSON line to ``out_dir/metrics.jsonl`` (flushed and fsynced;
    non-finite floats as ``null``). A failed write is a RunWriteError naming the file."""
    path = os.path.join(out_dir, METRICS_FILE)
    with writing(path):
        with open(path, "a", encoding="utf-8") as file:
            file.write(_line(record))
            file.flush()
            os.fsync(file.fileno())


def _read_lines(path: str) -> tuple[list, bool]:
    """(records of the complete lines, whether an unterminated last line was dropped)."""
    with open(path, encoding="utf-8", errors="replace") as file:
        lines = file.read().split("\n")
    partial = lines.pop() != ""  # the text after the last newline: "" unless interrupted
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{path!r} line {number} is not valid JSON ({error})") from None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise CheckpointError(f"{path!r} line {number} is not an epoch record")
        records.append(record)
    return records, partial


def read_metrics(out_dir: str) -> list:
    """The records of ``out_dir/metrics.jsonl`` in order ([] when there is no file); an
    unterminated last line (a write that was interrupted) is ignored.

    Raises:
        CheckpointError: a complete line that is not a JSON epoch record, naming its number.
    """
    path = os.path.join(out_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    return _read_lines(path)[0]


def truncate_metrics(out_dir: str, last_epoch: int) -> None:
    """Drop the records of epochs after ``last_epoch`` (written by a run that stopped before
    saving their checkpoint) and an unterminated last line, so that a resumed run does not
    repeat them. Atomic rewrite; the file is removed when no record is left."""
    path = os.path.join(out_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return
    records, partial = _read_lines(path)
    kept = [record for record in records if record["epoch"] <= last_epoch]
    if len(kept) == len(records) and not partial:
        return
    if not kept:
        os.remove(path)
        return
    with writing(path):
        with open(path + ".tmp", "w", encoding="utf-8") as file:
            file.writelines(_line(record) for record in kept)
            file.flush()
            os.fsync(file.fileno())
        os.replace(path + ".tmp", path)
