"""The run's ``metrics.jsonl``: one JSON object per completed epoch."""
from __future__ import annotations

import json
import os

METRICS_FILE = "metrics.jsonl"


def append_metrics(out_dir: str, record: dict) -> None:
    """Append ``record`` as one JSON line to ``out_dir/metrics.jsonl`` (flushed and fsynced)."""
    with open(os.path.join(out_dir, METRICS_FILE), "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")
        file.flush()
        os.fsync(file.fileno())


def read_metrics(out_dir: str) -> list:
    """The records of ``out_dir/metrics.jsonl`` in order ([] when there is no file)."""
    path = os.path.join(out_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def truncate_metrics(out_dir: str, last_epoch: int) -> None:
    """Drop the records of epochs after ``last_epoch`` (written by a run that stopped before
    saving their checkpoint), so that a resumed run does not repeat them. Atomic rewrite."""
    records = read_metrics(out_dir)
    kept = [record for record in records if record["epoch"] <= last_epoch]
    if len(kept) == len(records):
        return
    path = os.path.join(out_dir, METRICS_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        file.writelines(json.dumps(record) + "\n" for record in kept)
    os.replace(path + ".tmp", path)
