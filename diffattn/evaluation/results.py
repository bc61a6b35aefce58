"""Result files of ``python -m diffattn.eval`` and the side-by-side comparison table.

A result is one JSON object in CLIP_benchmark's layout, so that ``clip_benchmark build``
reads it::

    {"task": "zeroshot_classification" | "zeroshot_retrieval" | "linear_probe",
     "model": "DiffCLIP-Tiny", "pretrained": "runs/digits/model.safetensors" (or ""),
     "dataset": "digits", "metrics": {"acc1": 0.9, ...}, "num_samples": 360, ...}

CLIP_benchmark's own result files have the same keys but ``num_samples``; ``read_result`` and
the comparison table read both. Metrics that are not numbers (CLIP_benchmark writes ``NaN``
for ``acc5`` below 5 classes, where diffattn writes ``null``) show as ``-``.

Files are written atomically (a temporary file in the same folder, then one rename). An
existing file is replaced only if it is a result file itself; anything else is refused.
"""
from __future__ import annotations

import json
import math
import os
import tempfile

RESULT_KEYS = ("task", "model", "pretrained", "dataset", "metrics")  # and ours: num_samples
# Entries of CLIP_benchmark's linear-probe "metrics" that are its settings, not measurements:
# left out of the comparison table.
SETTINGS_IN_METRICS = ("weight_decay", "epochs", "seed", "fewshot_k", "normalized")


class ResultFileError(ValueError):
    """A result file that cannot be read, or a path that must not be written; names the path."""


def is_result(data) -> bool:
    """Whether ``data`` (a parsed JSON value) is a result object."""
    return (isinstance(data, dict) and all(key in data for key in RESULT_KEYS)
            and isinstance(data["metrics"], dict))


def read_result(path: str) -> dict:
    """The result object of a JSON file; ResultFileError naming the path otherwise."""
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except FileNotFoundError:
        raise ResultFileError(f"result file not found: {path!r}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ResultFileError(f"cannot read result file {path!r}: {error}") from None
    if not is_result(data):
        raise ResultFileError(f"{path!r} is not a result file (a JSON object with the keys "
                              f"{', '.join(RESULT_KEYS)})")
    return data


def _check_replaceable(path: str) -> None:
    if not str(path).strip():
        raise ResultFileError(f"--out must name a file, got {path!r}")
    if os.path.isdir(path):
        raise ResultFileError(f"--out {path!r} is a folder, not a file")
    if not os.path.lexists(path):
        return
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if not is_result(data) or os.path.islink(path):
        raise ResultFileError(f"--out {path!r} exists and is not a result file of this command: "
                              "refusing to overwrite it (remove it or choose another path)")


def check_writable(path: str) -> None:
    """Raise ResultFileError unless ``write_result(path, ...)`` may write there (checked before
    an evaluation runs, so that it does not run for nothing): ``path`` is new or a result
    file, and its folder exists or can be made (its nearest existing ancestor is a folder)."""
    _check_replaceable(path)
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ResultFileError(f"--out {path!r}: {ancestor!r} is a file, not a folder")


def write_result(path: str, result: dict) -> None:
    """Write ``result`` as JSON to ``path`` atomically, making its folder if needed.

    Raises:
        ResultFileError: ``path`` exists and is not a result file (or is a folder or a link),
            or its folder cannot be made or written.
    """
    if not is_result(result):
        raise ValueError(f"result must hold the keys {', '.join(RESULT_KEYS)}")
    check_writable(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".result-", suffix=".json.tmp", dir=folder)
    except OSError as error:
        raise ResultFileError(f"--out {path!r}: cannot write in {folder!r}: "
                              f"{error.strerror}") from None
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(result, file, indent=1)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _column(result: dict) -> str:
    pretrained = result.get("pretrained") or ""
    return f"{result['model']} ({os.path.basename(pretrained)})" if pretrained else result["model"]


def _number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    return f"{100 * value:.2f}"


def compare_table(results: list) -> str:
    """A text table of result objects side by side: one column per model (model name and
    checkpoint file), one row per (dataset, task, metric), values in percent; with exactly
    two models a last column gives the second minus the first (e.g. DiffCLIP - CLIP)."""
    columns, rows, values = [], [], {}
    for result in results:
        column = _column(result)
        if column not in columns:
            columns.append(column)
        for metric, value in result["metrics"].items():
            if metric in SETTINGS_IN_METRICS:
                continue
            row = (str(result["dataset"]), str(result["task"]), str(metric))
            if row not in rows:
                rows.append(row)
            values[row, column] = value
    header = ["dataset", "task", "metric (%)"] + columns
    if len(columns) == 2:
        header.append("difference")
    lines = []
    for row in rows:
        cells = list(row) + [_number(values.get((row, column))) for column in columns]
        if len(columns) == 2:
            first, second = (values.get((row, column)) for column in columns)
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool)
                          for v in (first, second))
            cells.append(f"{100 * (second - first):+.2f}" if numbers and
                         math.isfinite(second - first) else "-")
        lines.append(cells)
    widths = [max(len(str(line[i])) for line in [header] + lines) for i in range(len(header))]
    numeric = [i >= 3 for i in range(len(header))]

    def render(cells):
        return "  ".join(str(cell).rjust(width) if right else str(cell).ljust(width)
                         for cell, width, right in zip(cells, widths, numeric)).rstrip()

    return "\n".join([render(header), render(["-" * width for width in widths])]
                     + [render(line) for line in lines])
