"""Safe reading and writing of model checkpoints.

- ``load_state_dict_file`` reads ``.safetensors`` files, and pickled ``torch.save`` files
  with ``weights_only=True`` plus a short allow-list of the harmless objects a training
  checkpoint holds next to its weights (``argparse.Namespace``, paths, numpy scalars). Any
  other object is refused before it is built: nothing in the file is executed.
- ``read_safetensors_header`` reads the tensor names and shapes and the metadata of a
  ``.safetensors`` file from its header alone, without reading (or allocating) any tensor.
- ``detect_layout`` names the key layout of a state dict (DiffCLIP release, open_clip, or
  diffattn's own files).
- ``save_checkpoint`` / ``read_checkpoint_metadata`` write and read diffattn's own format:
  a safetensors file whose metadata is ``{"format": "diffattn", "config": <json>}``.
- ``check_keys`` compares a state dict (or its shapes) against the expected names and shapes;
  ``check_floating_dtypes`` refuses integer or bool tensors where the model's are floating
  (loading would cast them silently); ``check_finite`` refuses tensors holding NaN or
  infinity (a model built from them computes NaN features and meaningless scores).
- ``check_is_file`` / ``describe_non_file``: a path that is a directory, a device or a symbolic
  link loop gets an error saying so, not "not found".

A file that cannot be used raises ``CheckpointError`` (a ``ValueError``) whose message names
the path and what is wrong: ``CheckpointNotFoundError`` (also a ``FileNotFoundError``) when
there is no such file, ``UnsafeCheckpointError`` when a pickle needs objects outside the
allow-list.
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


class CheckpointError(ValueError):
    """A checkpoint file (or a run directory's checkpoint) cannot be used: unreadable,
    truncated, corrupt, or not what its metadata says. The message names the path."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """There is no checkpoint file at the given path."""


class UnsafeCheckpointError(CheckpointError):
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


def _without_data_parallel_prefix(entries: dict) -> dict:
    """``entries`` ({name: value}) with a ``module.`` prefix shared by all names removed."""
    if entries and all(key.startswith(_DATA_PARALLEL_PREFIX) for key in entries):
        return {key[len(_DATA_PARALLEL_PREFIX) :]: value for key, value in entries.items()}
    return dict(entries)


def _unwrap_state_dict(checkpoint, path: str) -> dict:
    """The state dict inside a loaded checkpoint, with a common ``module.`` prefix removed.

    Training checkpoints hold it under ``"state_dict"`` (DiffCLIP release) or ``"model"``
    (diffattn's training loop); a bare state dict is used as is.
    """
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(checkpoint).__name__}, expected a dict of tensors")
    for wrapper_key in ("state_dict", "model"):
        if isinstance(checkpoint.get(wrapper_key), dict):
            checkpoint = checkpoint[wrapper_key]
            break
    if not checkpoint:
        raise CheckpointError(f"checkpoint {path!r} holds an empty state dict")
    non_string_keys = [key for key in checkpoint if not isinstance(key, str)]
    if non_string_keys:
        raise CheckpointError(
            f"state dict in {path!r} has {len(non_string_keys)} keys that are not strings, "
            f"e.g. {non_string_keys[:5]!r}"
        )
    non_tensor_keys = [key for key, value in checkpoint.items() if not isinstance(value, torch.Tensor)]
    if non_tensor_keys:
        raise CheckpointError(
            f"state dict in {path!r} has {len(non_tensor_keys)} non-tensor values, "
            f"e.g. {non_tensor_keys[:5]!r}"
        )
    return _without_data_parallel_prefix(checkpoint)


def describe_non_file(path: str) -> str | None:
    """None when ``path`` is (or links to) a regular file; else what it is instead, in words:
    "no such file", "a directory", "a symbolic link loop", "a character device", ..."""
    import errno
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "a symbolic link loop (resolving it never ends at a file)"
        if error.errno == errno.ENOENT and os.path.islink(path):
            return f"a broken symbolic link (to {os.readlink(path)!r}, which does not exist)"
        if error.errno in (errno.ENOENT, errno.ENOTDIR):
            return "no such file"
        return f"not accessible ({error.strerror or error})"
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a directory, not a checkpoint file"),
             (stat.S_ISCHR, "a character device, not a checkpoint file"),
             (stat.S_ISBLK, "a block device, not a checkpoint file"),
             (stat.S_ISFIFO, "a named pipe, not a checkpoint file"),
             (stat.S_ISSOCK, "a socket, not a checkpoint file"))
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


def check_is_file(path: str, what: str = "checkpoint") -> None:
    """Raise unless ``path`` is a regular file: CheckpointNotFoundError when nothing is there,
    CheckpointError saying what it is instead (a directory, a device, a link loop, ...)."""
    problem = describe_non_file(path)
    if problem == "no such file":
        raise CheckpointNotFoundError(f"{what} file not found: {path!r}")
    if problem is not None:
        raise CheckpointError(f"{what} {path!r} is {problem}")



def check_floating_dtypes(state_dict: dict, expected: dict, path: str) -> None:
    """Refuse tensors whose dtype is not floating where the model's is.

    Args:
        state_dict: ``{name: tensor}`` read from ``path``.
        expected: ``{name: dtype}`` of the model's tensors; a name the model lacks counts as
            floating (it is converted into floating parameters, e.g. plain attention weights).
        path: the file, for the message.

    Raises:
        CheckpointError: naming the file, the first offending keys and their dtypes (loading
            would silently cast, e.g. int32 or bool weights).
    """
    wrong = [f"{key} ({tensor.dtype})" for key, tensor in state_dict.items()
             if not (tensor.is_floating_point() or tensor.is_complex())
             and (key not in expected or expected[key].is_floating_point)]
    if wrong:
        shown = ", ".join(wrong[:5]) + (f", ... ({len(wrong)} in all)" if len(wrong) > 5 else "")
        raise CheckpointError(f"checkpoint {path!r} holds tensors whose dtype is not floating "
                              f"where the model's are: {shown}")


def check_finite(state_dict: dict, path: str) -> None:
    """Refuse floating tensors that hold NaN or infinity.

    Args:
        state_dict: ``{name: tensor}`` read from ``path``.
        path: the file, for the message.

    Raises:
        CheckpointError: naming the file, the first tensor (in the file's order) with values
            that are not finite, how many of its values are not, and how many tensors are
            affected in all.
    """
    bad = [key for key, tensor in state_dict.items()
           if (tensor.is_floating_point() or tensor.is_complex())
           and not bool(tensor.isfinite().all())]
    if bad:
        tensor = state_dict[bad[0]]
        count = int((~tensor.isfinite()).sum())
        others = f" ({len(bad)} tensors in all: {_keys_preview(bad)})" if len(bad) > 1 else ""
        raise CheckpointError(f"checkpoint {path!r} holds values that are not finite (NaN or "
                              f"infinity): tensor {bad[0]!r} has {count} of {tensor.numel()}"
                              f"{others}; a model built from it computes nothing meaningful")


def _safetensors_error(path: str, error: Exception) -> CheckpointError:
    return CheckpointError(f"cannot read checkpoint {path!r}: not a readable .safetensors file "
                           f"(truncated or corrupt?): {error}")


def load_state_dict_file(path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a plain ``{name: tensor}`` dict on the CPU.

    Args:
        path: a ``.safetensors`` file, or a ``torch.save`` file (``.pt``/``.pth``/...): a
            bare state dict, or a training checkpoint holding it under ``"state_dict"`` or
            ``"model"``. A ``module.`` prefix shared by all keys is removed.

    Raises:
        CheckpointNotFoundError: no such file (also a FileNotFoundError).
        CheckpointError: ``path`` is a directory, a device, a symbolic link loop, ... (the
            message says which).
        UnsafeCheckpointError: the pickle needs an object outside the allow-list (see
            ``_allowed_checkpoint_globals``); nothing was executed.
        CheckpointError: an empty, truncated or corrupt file, or one that holds no dict of
            tensors with string keys.
    """
    path = os.fspath(path)
    check_is_file(path)
    if path.endswith(".safetensors"):
        try:
            checkpoint = safetensors.torch.load_file(path, device="cpu")
        except (safetensors.SafetensorError, OSError) as error:
            raise _safetensors_error(path, error) from None
    else:
        try:
            with torch.serialization.safe_globals(_allowed_checkpoint_globals()):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise _unsafe_checkpoint_error(path, error) from error
        except Exception as error:  # a damaged pickle can raise almost anything while being read
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CheckpointError(f"cannot read checkpoint {path!r}: not a readable torch.save "
                                  f"file (empty, truncated or corrupt?): {reason}") from None
    return _unwrap_state_dict(checkpoint, path)


def read_safetensors_header(path) -> tuple[dict[str, tuple], dict]:
    """The tensor shapes and the metadata of a ``.safetensors`` file, from its header only.

    Nothing but the header is read: no tensor is loaded or allocated, whatever the sizes the
    header announces.

    Returns:
        (``{name: shape tuple}`` with a shared ``module.`` prefix removed, ``{key: str}``
        metadata, empty when the file has none).

    Raises:
        CheckpointNotFoundError: no such file.
        CheckpointError: not a readable safetensors file.
    """
    path = os.fspath(path)
    check_is_file(path)
    try:
        with safetensors.safe_open(path, framework="pt") as checkpoint_file:
            metadata = checkpoint_file.metadata() or {}
            shapes = {name: tuple(checkpoint_file.get_slice(name).get_shape())
                      for name in checkpoint_file.keys()}
    except (safetensors.SafetensorError, OSError) as error:
        raise _safetensors_error(path, error) from None
    if not shapes:
        raise CheckpointError(f"checkpoint {path!r} holds no tensors")
    return _without_data_parallel_prefix(shapes), metadata


def _keys_preview(keys, limit: int = 5) -> str:
    keys = sorted(str(key) for key in keys)
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


def fsync_path(path) -> None:
    """Flush a written file, or a folder's entries (files created or renamed in it), to the
    storage device. Folders are skipped where they cannot be opened (Windows)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        try:
            descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            return
    else:
        descriptor = os.open(path, os.O_RDWR)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_checkpoint(path, state_dict: dict[str, torch.Tensor], config: dict) -> None:
    """Write diffattn's own checkpoint format: safetensors with the model config as metadata.

    The metadata is ``{"format": "diffattn", "config": json.dumps(config)}``. The file is
    written to ``path + ".tmp"``, flushed to the storage device and then renamed over
    ``path``, so ``path`` never holds a partial file. It gets the permissions of any file
    this process creates (``0644`` under the usual umask ``022``).

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
        # safetensors creates its files 0600; give the file the mode open() gives (umask).
        with open(temporary_path, "wb"):
            pass
        mode = os.stat(temporary_path).st_mode & 0o777
        safetensors.torch.save_file(tensors, temporary_path, metadata=metadata)
        os.chmod(temporary_path, mode)
        fsync_path(temporary_path)
        os.replace(temporary_path, path)
    finally:
        if os.path.exists(temporary_path):
            os.remove(temporary_path)


def diffattn_config_from_metadata(metadata: dict, path: str) -> dict | None:
    """The model config (a dict) that diffattn's metadata holds, or None when ``metadata``
    (a safetensors file's ``{key: str}`` metadata) is not diffattn's.

    Raises:
        CheckpointError: diffattn metadata without a config, or whose config is not a JSON
            object.
    """
    if metadata.get("format") != DIFFATTN_FORMAT:
        return None
    if "config" not in metadata:
        raise CheckpointError(f"checkpoint {path!r} is marked as diffattn's format but its "
                              "metadata has no 'config' entry")
    try:
        config = json.loads(metadata["config"])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"checkpoint {path!r}: the 'config' metadata is not valid JSON "
                              f"({error})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {path!r}: the 'config' metadata must be a JSON "
                              f"object, got {type(config).__name__}")
    return config


def read_checkpoint_metadata(path) -> dict | None:
    """The diffattn metadata of a checkpoint file, or None for any other file.

    Returns:
        ``{"format": "diffattn", "config": dict}`` for a file written by
        ``save_checkpoint``; None for a pickled checkpoint or a safetensors file without
        diffattn metadata.

    Raises:
        CheckpointNotFoundError: no such file.
        CheckpointError: unreadable file, or diffattn metadata without a JSON config.
    """
    path = os.fspath(path)
    check_is_file(path)
    if not path.endswith(".safetensors"):
        return None
    _, metadata = read_safetensors_header(path)
    config = diffattn_config_from_metadata(metadata, path)
    return None if config is None else {"format": DIFFATTN_FORMAT, "config": config}


def _listed(title: str, entries: list[str]) -> str:
    shown = entries[:_MAX_LISTED_KEYS]
    more = f"\n  ... and {len(entries) - len(shown)} more" if len(entries) > len(shown) else ""
    return f"{len(entries)} {title}:\n  " + "\n  ".join(shown) + more


def _shape(value) -> tuple:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)


def check_keys(expected: dict[str, torch.Size], got: dict) -> None:
    """Check that ``got`` has exactly the names and shapes of ``expected``.

    Args:
        expected: ``{name: shape}`` the model needs.
        got: ``{name: tensor}`` read from a checkpoint, or ``{name: shape}`` read from its
            header (``read_safetensors_header``).

    Raises:
        ValueError: listing missing keys, unexpected keys and shape mismatches (counts, and
            the first 20 of each).
    """
    missing = [key for key in expected if key not in got]
    unexpected = [str(key) for key in got if key not in expected]
    mismatched = [
        f"{key}: expected {tuple(expected[key])}, got {_shape(got[key])}"
        for key in expected
        if key in got and _shape(got[key]) != tuple(expected[key])
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


# --------------------------------------------------------------------------- layout remapping
# open_clip's vision names -> the DiffCLIP release's (a timm VisionTransformer's); the text tower
# and the joint tensors have the same names in both layouts.
_OPEN_CLIP_TO_DIFFCLIP = (
    (r"visual\.transformer\.resblocks\.(\d+)\.ln_1\.", r"visual.blocks.\1.norm1."),
    (r"visual\.transformer\.resblocks\.(\d+)\.ln_2\.", r"visual.blocks.\1.norm2."),
    (r"visual\.transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"visual.blocks.\1.mlp.fc1."),
    (r"visual\.transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"visual.blocks.\1.mlp.fc2."),
    (r"visual\.transformer\.resblocks\.(\d+)\.attn\.", r"visual.blocks.\1.attn."),
    (r"visual\.conv1\.", "visual.patch_embed.proj."),
    (r"visual\.ln_post\.", "visual.norm."),
    (r"visual\.ln_pre\.", "visual.norm_pre."),
)
# Tensors whose shape changes: (open_clip name, DiffCLIP name, leading dims added).
_OPEN_CLIP_RESHAPED = (("visual.class_embedding", "visual.cls_token", 2),
                       ("visual.positional_embedding", "visual.pos_embed", 1),
                       ("visual.proj", "image_projection", 0))


def _with_leading_ones(value, count: int):
    if count == 0:
        return value
    if isinstance(value, torch.Tensor):
        return value.reshape((1,) * count + tuple(value.shape))
    return (1,) * count + tuple(value)


def open_clip_to_diffclip(entries: dict, *, patch_bias: bool, ln_pre: bool) -> tuple:
    """An open_clip-layout state dict renamed into the DiffCLIP release's layout.

    Args:
        entries: ``{name: tensor}`` or ``{name: shape tuple}`` (e.g. from a safetensors
            header) in open_clip's layout; attention layers stay in nn.MultiheadAttention's
            packed layout (``attn.in_proj_weight``), which the differential layers convert
            themselves (a warm start).
        patch_bias: the target model has a bias on its patch embedding (DiffCLIP: yes). When
            the file has none (open_clip's ``conv1`` has no bias) it is added as zeros, which
            computes what the bias-free convolution computes.
        ln_pre: the target model has a LayerNorm before the blocks (``visual.norm_pre``;
            DiffCLIP: no). Without it, open_clip's ``visual.ln_pre.*`` are left out.

    Returns:
        (entries in the DiffCLIP layout, names of the file's tensors left out, names of the
        tensors added).
    """
    renamed, dropped, added = {}, [], []
    for name, value in entries.items():
        reshaped = next((item for item in _OPEN_CLIP_RESHAPED if item[0] == name), None)
        if reshaped is not None:
            renamed[reshaped[1]] = _with_leading_ones(value, reshaped[2])
            continue
        new_name = name
        for pattern, replacement in _OPEN_CLIP_TO_DIFFCLIP:
            new_name, count = re.subn("^" + pattern, replacement, new_name)
            if count:
                break
        if new_name.startswith("visual.norm_pre.") and not ln_pre:
            dropped.append(name)
            continue
        renamed[new_name] = value
    bias, weight = "visual.patch_embed.proj.bias", renamed.get("visual.patch_embed.proj.weight")
    if patch_bias and bias not in renamed and weight is not None:
        if isinstance(weight, torch.Tensor):
            renamed[bias] = torch.zeros(weight.shape[0], dtype=weight.dtype)
        else:
            renamed[bias] = (weight[0],)
        added.append(bias)
    elif not patch_bias and bias in renamed:
        dropped.append("visual.conv1.bias")
        del renamed[bias]
    return renamed, dropped, added
