"""Training checkpoints: atomic writes, and resumption that never unpickles arbitrary objects.

A run directory holds the latest checkpoint as two files:

- ``model.safetensors``: the weights and config in diffattn's own format
  (``diffattn.models.save_pretrained``), loadable with
  ``create_model(name, pretrained=DIR/model.safetensors)``;
- ``train_state.pt``: everything else needed to continue exactly (``torch.save`` of plain
  containers, numbers, strings and tensors only, so ``torch.load(weights_only=True)`` reads it):
  optimizer and scheduler state, completed epochs, optimizer steps, the RNG states of torch,
  numpy and Python of every rank, the SHA-256 of the model file it belongs to, and the
  training arguments.

Both are written to a temporary name and renamed into place (``os.replace``), model first; the
recorded SHA-256 catches a model file that does not belong to the state file.
"""
from __future__ import annotations

import hashlib
import os
import random

import numpy as np
import torch

from ..models import save_pretrained

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A run directory's checkpoint is missing, inconsistent or from another setup."""


def capture_rng_state(device: torch.device) -> dict:
    """This process's RNG states as plain data (tensors, ints, lists, floats)."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "state": list(python_state), "gauss_next": gauss_next},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict, device: torch.device) -> None:
    """Inverse of ``capture_rng_state``."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"],
                         numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]),
                     python_state["gauss_next"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def has_checkpoint(out_dir: str) -> bool:
    """True when ``out_dir`` holds a training state file."""
    return os.path.isfile(os.path.join(out_dir, STATE_FILE))


def save_checkpoint(out_dir: str, model, optimizer, scheduler, *, epoch: int, step: int,
                    rng_states: list, args: dict) -> None:
    """Write ``out_dir``'s checkpoint (see the module docstring); call on one rank.

    Args:
        model: the unwrapped CLIP.
        optimizer, scheduler: their state_dicts are saved.
        epoch: completed epochs; step: optimizer steps taken.
        rng_states: ``capture_rng_state()`` of every rank, in rank order.
        args: the training arguments (plain values).
    """
    model_path = os.path.join(out_dir, MODEL_FILE)
    save_pretrained(model, model_path)
    state = {
        "format_version": FORMAT_VERSION,
        "epoch": epoch,
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_states,
        "model_sha256": _sha256(model_path),
        "args": args,
    }
    state_path = os.path.join(out_dir, STATE_FILE)
    temporary = state_path + ".tmp"
    try:
        torch.save(state, temporary)
        os.replace(temporary, state_path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def load_training_state(out_dir: str) -> dict:
    """The state saved by ``save_checkpoint`` (``torch.load(weights_only=True)``, on the CPU),
    after checking that ``out_dir``'s model file is the one it was saved with.

    Raises:
        CheckpointError: no checkpoint, an unknown format version, or a model file that does
            not match (e.g. a run killed between writing the two files).
    """
    state_path = os.path.join(out_dir, STATE_FILE)
    model_path = os.path.join(out_dir, MODEL_FILE)
    if not os.path.isfile(state_path) or not os.path.isfile(model_path):
        raise CheckpointError(f"--resume: no checkpoint in {out_dir!r} (expected {STATE_FILE} "
                              f"and {MODEL_FILE})")
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{state_path!r}: unknown training-state format "
                              f"{state.get('format_version')!r} (expected {FORMAT_VERSION})")
    if _sha256(model_path) != state["model_sha256"]:
        raise CheckpointError(f"{model_path!r} is not the model file {state_path!r} was saved "
                              "with (was the run stopped while saving?)")
    return state
