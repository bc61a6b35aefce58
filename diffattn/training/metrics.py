"""The run's ``metrics.jsonl``: one JSON object per completed epoch.

A run killed while appending leaves an unterminated last line: readers ignore it and
``truncate_metrics`` (called when a run resumes) removes it.
"""
from __future__ import annotations

import json
import os

from ..models.checkpoint import CheckpointError

METRICS_FILE = "metrics.jsonl"


def append_metrics(out_dir: str, record: dict) -> None:
    """Append ``record`` as one JSON line to ``out_dir/metrics.jsonl`` (flushed and fsynced)."""
    with open(os.path.join(out_dir, METRICS_FILE), "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")
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
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        file.writelines(json.dumps(record) + "\n" for record in kept)
        file.flush()
        os.fsync(file.fileno())
    os.replace(path + ".tmp", path)
