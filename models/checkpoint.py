"""Safe reading and writing of model checkpoints.

- ``load_state_dict_file`` reads ``.safetensors`` files, and pickled ``torch.save`` files
  with ``weights_only=True`` plus a short allow-list of the harmless objects a training
  checkpoint holds next to its weights (``argparse.Namespace``, paths, numpy scalars). Any
  other object is refused before it is built: nothing in the file is executed.
- ``detect_layout`` names the key layout of a state dict (DiffCLIP release, open_clip, or
  diffattn's own files).
- ``save_checkpoint`` / ``read_checkpoint_metadata`` write and read diffattn's own format:
  a safetensors file whose metadata is ``{"format": "diffattn", "config": <json>}``.
- ``check_keys`` compares a state dict against the expected names and shapes.
"""
import argparse
import json
import os
import pathlib
import pickle
import re

import numpy as np
import safetensors
import safetensors.torch
import torch

try:
    from numpy._core.multiarray import scalar as numpy_scalar
except ImportError:  # numpy < 1.26 has no numpy._core
    from numpy.core.multiarray import scalar as numpy_scalar

DIFFATTN_FORMAT = "diffattn"

_DIFFCLIP_MARKER_KEYS = ("visual.patch_embed.proj.weight", "image_projection")
_OPEN_CLIP_MARKER_KEYS = ("visual.conv1.weight", "visual.class_embedding")
_DATA_PARALLEL_PREFIX = "module."
_MAX_LISTED_KEYS = 20


def _allowed_checkpoint_globals() -> list:
    """Globals (besides tensors and plain containers) a training checkpoint may reference.

    - ``argparse.Namespace``: the training arguments (``args`` in the DiffCLIP release).
    - the ``pathlib`` path classes: paths inside those arguments. Listed under their
      ``pathlib.<name>`` pickle names as well, which Python >= 3.13 no longer uses as the
      classes' own module.
    - ``numpy`` scalars (e.g. ``best_acc1`` as ``numpy.float64``): the scalar rebuilding
      function, under both its numpy 1 (``numpy.core``) and numpy 2 (``numpy._core``)
      pickle names, ``numpy.dtype`` and the dtype classes of float32/float64/int32/int64/bool.
      numpy arrays are not allowed: weights are tensors.
    """
    path_classes = (pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath)
    dtype_classes = {type(np.dtype(dtype)) for dtype in (np.float32, np.float64, np.int32, np.int64, np.bool_)}
    return [
        argparse.Namespace,
        *path_classes,
        *[(path_class, f"pathlib.{path_class.__name__}") for path_class in path_classes],
        (numpy_scalar, "numpy.core.multiarray.scalar"),
        (numpy_scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        *sorted(dtype_classes, key=lambda dtype_class: dtype_class.__name__),
    ]


class UnsafeCheckpointError(ValueError):
    """A pickled checkpoint references an object outside the allow-list; it was not loaded."""


_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_UNPICKLER_REASON = re.compile(r"WeightsUnpickler error: (.+?)\n\n", re.DOTALL)


def _unsafe_checkpoint_error(path: str, error: pickle.UnpicklingError) -> UnsafeCheckpointError:
    """An ``UnsafeCheckpointError`` naming the file and what torch's safe unpickler refused."""
    message = str(error)
    refused_global = _REFUSED_GLOBAL.search(message)
    if refused_global:
        reason = f"it references the global {refused_global.group(1)}, which is not on the allow-list"
    else:
        unpickler_reason = _UNPICKLER_REASON.search(message)
        reason = f"the safe unpickler refused it ({unpickler_reason.group(1).strip() if unpickler_reason else message})"
    return UnsafeCheckpointError(
        f"refused to load checkpoint {path!r}: {reason}. Nothing from the file was executed. "
        "Load it only through a converter you trust, or re-save its tensors as .safetensors."
    )


def _unwrap_state_dict(checkpoint, path: str) -> dict:
    """The state dict inside a loaded checkpoint, with a common ``module.`` prefix removed.

    Training checkpoints hold it under ``"state_dict"`` (DiffCLIP release) or ``"model"``
    (diffattn's training loop); a bare state dict is used as is.
    """
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {path!r} holds a {type(checkpoint).__name__}, expected a dict of tensors")
    for wrapper_key in ("state_dict", "model"):
        if isinstance(checkpoint.get(wrapper_key), dict):
            checkpoint = checkpoint[wrapper_key]
            break
    if not checkpoint:
        raise ValueError(f"checkpoint {path!r} holds an empty state dict")
    non_tensor_keys = [key for key, value in checkpoint.items() if not isinstance(value, torch.Tensor)]
    if non_tensor_keys:
        raise ValueError(
            f"state dict in {path!r} has {len(non_tensor_keys)} non-tensor values, "
            f"e.g. {non_tensor_keys[:5]!r}"
        )
    if all(isinstance(key, str) and key.startswith(_DATA_PARALLEL_PREFIX) for key in checkpoint):
        return {key[len(_DATA_PARALLEL_PREFIX) :]: value for key, value in checkpoint.items()}
    return dict(checkpoint)


def load_state_dict_file(path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a plain ``{name: tensor}`` dict on the CPU.

    Args:
        path: a ``.safetensors`` file, or a ``torch.save`` file (``.pt``/``.pth``/...): a
            bare state dict, or a training checkpoint holding it under ``"state_dict"`` or
            ``"model"``. A ``module.`` prefix shared by all keys is removed.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the pickle needs an object outside the allow-list (see
            ``_allowed_checkpoint_globals``); nothing was executed.
        ValueError: the file holds no dict of tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path!r}")
    if path.endswith(".safetensors"):
        checkpoint = safetensors.torch.load_file(path, device="cpu")
    else:
        try:
            with torch.serialization.safe_globals(_allowed_checkpoint_globals()):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise _unsafe_checkpoint_error(path, error) from error
    return _unwrap_state_dict(checkpoint, path)


def _keys_preview(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def detect_layout(state_dict: dict, metadata: dict | None = None) -> str:
    """Which model layout a state dict is in.

    Args:
        state_dict: ``{name: tensor}`` (as returned by ``load_state_dict_file``).
        metadata: what ``read_checkpoint_metadata`` returned for the file, if anything.

    Returns:
        ``"diffattn"`` when ``metadata`` marks diffattn's own format; else ``"diffclip"``
        (DiffCLIP release: ``visual.patch_embed.proj.weight`` and ``image_projection``) or
        ``"open_clip"`` (``visual.conv1.weight`` and ``visual.class_embedding``).

    Raises:
        ValueError: none of these layouts, listing a few of the keys.
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    if metadata is not None and metadata.get("format") == DIFFATTN_FORMAT:
        return "diffattn"
    if all(key in state_dict for key in _DIFFCLIP_MARKER_KEYS):
        return "diffclip"
    if all(key in state_dict for key in _OPEN_CLIP_MARKER_KEYS):
        return "open_clip"
    raise ValueError(
        "state_dict is in no known layout: expected keys "
        f"{_DIFFCLIP_MARKER_KEYS} (DiffCLIP) or {_OPEN_CLIP_MARKER_KEYS} (open_clip); "
        f"it has {_keys_preview(state_dict)}"
    )


def save_checkpoint(path, state_dict: dict[str, torch.Tensor], config: dict) -> None:
    """Write diffattn's own checkpoint format: safetensors with the model config as metadata.

    The metadata is ``{"format": "diffattn", "config": json.dumps(config)}``. The file is
    written to ``path + ".tmp"`` and then renamed over ``path``, so ``path`` never holds a
    partial file.

    Args:
        path: destination, ending in ``.safetensors``.
        state_dict: ``{name: tensor}``; tensors are written contiguous, from the CPU.
        config: JSON-serialisable model configuration.
    """
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"path must end in .safetensors, got {path!r}")
    if not isinstance(state_dict, dict) or not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise TypeError("state_dict must be a dict of tensors")
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    metadata = {"format": DIFFATTN_FORMAT, "config": json.dumps(config, sort_keys=True)}
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
    temporary_path = path + ".tmp"
    try:
        safetensors.torch.save_file(tensors, temporary_path, metadata=metadata)
        os.replace(temporary_path, path)
    finally:
        if os.path.exists(temporary_path):
            os.remove(temporary_path)


def read_checkpoint_metadata(path) -> dict | None:
    """The diffattn metadata of a checkpoint file, or None for any other file.

    Returns:
        ``{"format": "diffattn", "config": dict}`` for a file written by
        ``save_checkpoint``; None for a pickled checkpoint or a safetensors file without
        diffattn metadata.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path!r}")
    if not path.endswith(".safetensors"):
        return None
    with safetensors.safe_open(path, framework="pt") as checkpoint_file:
        metadata = checkpoint_file.metadata() or {}
    if metadata.get("format") != DIFFATTN_FORMAT:
        return None
    return {"format": DIFFATTN_FORMAT, "config": json.loads(metadata["config"])}


def _listed(title: str, entries: list[str]) -> str:
    shown = entries[:_MAX_LISTED_KEYS]
    more = f"\n  ... and {len(entries) - len(shown)} more" if len(entries) > len(shown) else ""
    return f"{len(entries)} {title}:\n  " + "\n  ".join(shown) + more


def check_keys(expected: dict[str, torch.Size], got: dict[str, torch.Tensor]) -> None:
    """Check that ``got`` has exactly the names and shapes of ``expected``.

    Args:
        expected: ``{name: shape}`` the model needs.
        got: ``{name: tensor}`` read from a checkpoint.

    Raises:
        ValueError: listing missing keys, unexpected keys and shape mismatches (counts, and
            the first 20 of each).
    """
    missing = [key for key in expected if key not in got]
    unexpected = [key for key in got if key not in expected]
    mismatched = [
        f"{key}: expected {tuple(expected[key])}, got {tuple(got[key].shape)}"
        for key in expected
        if key in got and tuple(got[key].shape) != tuple(expected[key])
    ]
    problems = [
        _listed(title, entries)
        for title, entries in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if entries
    ]
    if problems:
        raise ValueError("state dict does not match the model:\n" + "\n".join(problems))
