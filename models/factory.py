"""Named model configs, model creation and (safe, strict) checkpoint loading.

The configs are the JSON files in ``configs/`` (package data); ``list_models()`` names them.
``create_model(name, pretrained=path)`` loads, with the format detected from the file:

- a DiffCLIP release checkpoint (``checkpoint_best.pt``: ``state_dict`` with ``module.`` keys,
  plus epoch/optimizer/scaler/best_acc1/args) into a config with the "diffclip" layout;
- an open_clip state dict into a config with the "open_clip" layout;
- diffattn's own files (``save_pretrained``: safetensors with the config as metadata), whose
  saved config is used when no name is given and must match the named one otherwise.

Pickled files go through ``checkpoint.load_state_dict_file`` (weights_only with a short
allow-list; anything else is refused unexecuted). Names and shapes are compared before
loading: missing, unexpected or mis-shaped tensors raise ValueError listing them.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Optional, Union

from .checkpoint import (check_keys, detect_layout, load_state_dict_file,
                         read_checkpoint_metadata, save_checkpoint)
from .clip import ATTENTIONS, CLIP, CLIPConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@functools.lru_cache(maxsize=None)
def _config_files() -> dict:
    return {path.stem: path for path in sorted(CONFIG_DIR.glob("*.json"))}


def list_models() -> list:
    """Names of the bundled model configs, sorted."""
    return sorted(_config_files())


def get_config(name: str) -> CLIPConfig:
    """A fresh CLIPConfig for model ``name`` (see list_models()); ValueError for unknown names."""
    files = _config_files()
    if name not in files:
        raise ValueError(f"unknown model name {name!r}; available: {', '.join(list_models())}")
    with open(files[name], encoding="utf-8") as file:
        return CLIPConfig.from_dict(json.load(file))


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _config_differences(expected: CLIPConfig, saved: CLIPConfig) -> list:
    """'field: expected X, checkpoint has Y' for every field that differs."""
    ours, theirs = _flatten(expected.to_dict()), _flatten(saved.to_dict())
    return [f"{key}: model has {ours[key]!r}, checkpoint has {theirs[key]!r}"
            for key in ours if ours[key] != theirs[key]]


def _resolve_config(name, attention: Optional[str]) -> Optional[CLIPConfig]:
    if name is None:
        config = None
    elif isinstance(name, CLIPConfig):
        config = name
    elif isinstance(name, str):
        config = get_config(name)
    else:
        raise TypeError(f"name must be a model name or a CLIPConfig, got {type(name).__name__}")
    if attention is not None:
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS} or None, got {attention!r}")
        if config is not None:
            config = dataclasses.replace(config, attention=attention)
    return config


def create_model(name: Union[str, CLIPConfig, None], pretrained=None, *,
                 attention: Optional[str] = None, device=None, dtype=None,
                 backend: str = "auto") -> CLIP:
    """Build a CLIP model, optionally loading weights from a local file.

    Args:
        name: a bundled config name (list_models()), a CLIPConfig, or None when
            ``pretrained`` is one of diffattn's own files (its saved config is used).
        pretrained: path of a checkpoint file (format detected, see the module docstring).
        attention: "diff" or "plain" overrides the config's attention.
        device, dtype: where and in which dtype the model is created.
        backend: "auto" | "triton" | "torch", for the differential attention layers.

    Returns:
        CLIP with ``.config``, ``.preprocess`` and ``.tokenize``, in training mode.

    Raises:
        ValueError: unknown name; bad attention; checkpoint in another layout or with another
            saved config; missing/unexpected/mis-shaped tensors (listed).
        UnsafeCheckpointError: the pickle needs objects outside the allow-list.
        FileNotFoundError: no such checkpoint file.
    """
    config = _resolve_config(name, attention)
    if pretrained is None:
        if config is None:
            raise ValueError("name is required when no pretrained file is given; available: "
                             f"{', '.join(list_models())}")
        return CLIP(config, backend=backend, device=device, dtype=dtype)

    path = os.fspath(pretrained)
    metadata = read_checkpoint_metadata(path)
    state_dict = load_state_dict_file(path)
    layout = detect_layout(state_dict, metadata)
    if layout == "diffattn":
        saved = _resolve_config(CLIPConfig.from_dict(metadata["config"]), attention)
        if config is not None and config != saved:
            raise ValueError(f"checkpoint {path!r} was saved for another config:\n  "
                             + "\n  ".join(_config_differences(config, saved)))
        config = saved
    elif config is None:
        raise ValueError(f"checkpoint {path!r} holds no config (it is in the {layout} layout): "
                         f"pass a model name; available: {', '.join(list_models())}")
    elif config.layout != layout:
        raise ValueError(f"checkpoint {path!r} is in the {layout} layout but the model config "
                         f"has layout {config.layout!r}")

    model = CLIP(config, backend=backend, device=device, dtype=dtype)
    expected = {key: value.shape for key, value in model.state_dict().items()}
    try:
        check_keys(expected, state_dict)
    except ValueError as error:
        raise ValueError(f"checkpoint {path!r} does not fit the model: {error}") from None
    model.load_state_dict(state_dict, strict=True)
    return model


def save_pretrained(model: CLIP, path) -> None:
    """Write ``model``'s weights and config in diffattn's own format (a ``.safetensors`` file)
    that ``create_model(None, pretrained=path)`` reads back."""
    if not isinstance(model, CLIP):
        raise TypeError(f"model must be a CLIP, got {type(model).__name__}")
    save_checkpoint(path, model.state_dict(), model.config.to_dict())
