"""Small image-caption datasets for the training tests: tiny PNG files listed in a CSV file,
some of them unreadable where asked, and the command-line arguments of a short run on them."""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Tiny models train fastest on one thread, and a busy machine slows several threads far more.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}

# How write_csv_dataset damages an image file.
DAMAGES = ("missing", "random", "truncated", "text")


def png_bytes(value: int, size: int = 12) -> bytes:
    """A size x size PNG: a grey level from ``value`` with a little seeded noise."""
    noise = np.random.default_rng(value).integers(0, 20, (size, size, 3))
    pixels = np.clip(10 * value + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_csv_dataset(folder: Path, count: int = 16, damaged: dict = None,
                      name: str = "train.csv") -> Path:
    """Write ``count`` PNG files under ``folder/images`` and a CSV file listing them with
    captions; ``damaged`` maps row indices to one of DAMAGES. Returns the CSV path."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    damaged = damaged or {}
    lines = ["filepath,caption"]
    for index in range(count):
        path = images / f"{index}.png"
        data = png_bytes(index)
        damage = damaged.get(index)
        if damage == "random":
            data = np.random.default_rng(100 + index).bytes(len(data))
        elif damage == "truncated":
            data = data[: len(data) // 2]
        elif damage == "text":
            data = b"this is not an image\n"
        if damage != "missing":
            path.write_bytes(data)
        lines.append(f"images/{index}.png,a grey square number {index}")
    csv_path = folder / name
    csv_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return csv_path


def csv_run(csv_path: Path, out: Path, epochs: int = 2, *extra: str) -> list:
    """Arguments of a short run: batch 4 (so 4 steps per epoch for 16 rows), warm-up 2."""
    return ["--data", f"csv:{csv_path}", "--backend", "torch", "--batch-size", "4",
            "--workers", "0", "--warmup", "2", "--epochs", str(epochs), "--seed", "1",
            "--out", str(out), *extra]


@contextlib.contextmanager
def one_training_thread():
    """In-process training on one thread: OMP_NUM_THREADS set (so training leaves torch's
    thread count alone) and torch at one thread; both restored afterwards."""
    saved_env = {name: os.environ.get(name) for name in ONE_THREAD}
    threads = torch.get_num_threads()
    os.environ.update(ONE_THREAD)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(autouse=True)
def one_thread():
    """Every test of a module that imports this fixture trains on one thread."""
    with one_training_thread():
        yield


def error_lines(capsys) -> list:
    """The ``error:`` lines the command printed to stderr since the last read."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def one_error_line(capsys) -> str:
    """The single ``error:`` line the command printed (asserted to be exactly one)."""
    errors = error_lines(capsys)
    assert len(errors) == 1, errors
    return errors[0]
