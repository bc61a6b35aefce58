"""Named model configs, model creation and (safe, strict) checkpoint loading.

The configs are the JSON files in ``configs/`` (package data); ``list_models()`` names them.
``create_model(name, pretrained=path)`` loads, with the format detected from the file:

- a DiffCLIP release checkpoint (``checkpoint_best.pt``: ``state_dict`` with ``module.`` keys,
  plus epoch/optimizer/scaler/best_acc1/args) into a config with the "diffclip" layout;
- an open_clip state dict into a config with the "open_clip" layout, or into one with the
  "diffclip" layout (e.g. open_clip's ViT-B-16 into "DiffCLIP-ViT-B-16"): its tensors are
  renamed (``checkpoint.open_clip_to_diffclip``), open_clip's bias-free patch embedding gets a
  zero bias, tensors the model lacks (``visual.ln_pre``) are left out, and the attention
  layers are warm-started as below; one warning lists what was left out and what is new;
- diffattn's own files (``save_pretrained``: safetensors with the config as metadata), whose
  saved config is used when no name is given and must match the named one otherwise.

Pickled files go through ``checkpoint.load_state_dict_file`` (weights_only with a short
allow-list; anything else is refused unexecuted). The file's tensor names and shapes (for
``.safetensors`` read from the header alone) are compared with the ones the config implies
before the model is built: a config that does not describe the file, however large, is
refused without allocating anything, and missing, unexpected or mis-shaped tensors raise a
CheckpointError (a ValueError) listing them. A file with plain attention weights (an
open_clip file, or a "plain" model's) loaded into a differential model is a warm start, and
one warning lists the tensors the file did not give as they are:

- ``attention="diff"`` (DiffMultiheadAttention): the projections come from the file, the lambda
  vectors and norm weights keep their initialisation;
- ``attention="diff2"`` (DiffMultiheadAttentionV2, e.g. "DiffCLIPv2-ViT-B-16" from an open_clip
  ViT-B-16 file): every layer is converted as ``DiffMultiheadAttentionV2.from_plain`` converts
  one (``diffattn.plain_to_v2_state_dict``): k/v/out from the file, q_proj derived (the plain q
  heads as the first maps, zeros as the second), lambda_proj weight 0 and bias
  logit(1e-5). The model then computes what the plain model computes, within about 1e-5
  relative per layer, until fine-tuning moves it.

open_clip-style entry points: ``create_model_and_transforms(name, pretrained)`` returns
(model, train transform, eval transform); ``get_tokenizer(name)`` the tokenizer callable.
Weights come from local files only; anything else (e.g. open_clip's tags "openai",
"laion2b_s34b_b88k") is a ``PretrainedNotFoundError`` naming what is supported.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from pathlib import Path
from typing import Optional, Union

import torch
from torch.overrides import TorchFunctionMode

from diffattn import DiffMultiheadAttention, DiffMultiheadAttentionV2
from diffattn.module_v2 import INITIAL_LAMBDA
from diffattn.user_warnings import warn_at_user_code

from .augment import make_train_transform
from .checkpoint import (DIFFATTN_FORMAT, CheckpointError, CheckpointNotFoundError,
                         check_finite, check_floating_dtypes, check_keys, describe_non_file, detect_layout,
                         open_clip_to_diffclip, diffattn_config_from_metadata, load_state_dict_file,
                         read_safetensors_header, save_checkpoint)
from .clip import ATTENTIONS, CLIP, CLIPConfig
from .tokenizer import tokenize

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


class _SkipParameterInit(TorchFunctionMode):
    """Inside this mode the ``torch.nn.init`` functions and ``Tensor.normal_``/``uniform_``
    return their tensor untouched: a model built on the meta device needs shapes, not values
    (and random fills of meta tensors are slow)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (getattr(func, "__module__", None) == "torch.nn.init"
                or func in (torch.Tensor.normal_, torch.Tensor.uniform_)):
            return args[0] if args else kwargs.get("tensor")
        return func(*args, **kwargs)


def _meta_model(config: CLIPConfig) -> CLIP:
    """``CLIP(config)`` built on the meta device: shapes without memory, and no parameter
    initialised."""
    with _SkipParameterInit():
        return CLIP(config, backend="torch", device="meta")


def _with_layers(config: CLIPConfig, vision_layers: int, text_layers: int) -> CLIPConfig:
    return dataclasses.replace(config,
                               vision=dataclasses.replace(config.vision, layers=vision_layers),
                               text=dataclasses.replace(config.text, layers=text_layers))


def _expected_tensor_count(config: CLIPConfig) -> int:
    """Number of state-dict entries of ``CLIP(config)``, from three 1- and 2-layer meta
    models (so a config with very many layers is never built)."""
    def count(vision_layers: int, text_layers: int) -> int:
        return len(_meta_model(_with_layers(config, vision_layers, text_layers)).state_dict())

    base = count(1, 1)
    per_vision_layer, per_text_layer = count(2, 1) - base, count(1, 2) - base
    return (base + (config.vision.layers - 1) * per_vision_layer
            + (config.text.layers - 1) * per_text_layer)


def _check_config_fits_file(config: CLIPConfig, shapes: dict, path: str) -> dict:
    """Refuse (CheckpointError) a config whose tensor names and shapes are not the file's
    ``shapes``; nothing of the size the config describes is allocated. Plain attention weights
    for differential layers are a warm start (``_expect_plain_attention``).

    Returns:
        {layer name: layer (of a meta-device model)} of the differential attention layers the
        file holds plain attention weights for (a warm start, see _from_plain_attention).
    """
    try:
        expected_count = _expected_tensor_count(config)
        model = _meta_model(config) if expected_count <= 2 * len(shapes) else None
    except (RuntimeError, OverflowError) as error:  # sizes beyond what torch can describe
        raise CheckpointError(f"checkpoint {path!r} holds a model config that cannot be "
                              f"built: {error}") from None
    # A config that implies far more tensors than the file holds cannot fit it; building even
    # a meta model of it would cost time and memory out of proportion to the file.
    if model is None:
        raise CheckpointError(
            f"checkpoint {path!r} does not fit the model: the config has "
            f"{config.vision.layers} vision and {config.text.layers} text layers, "
            f"{expected_count} tensors, but the file holds {len(shapes)} tensors")
    expected = {key: value.shape for key, value in model.state_dict().items()}
    layers = _plain_attention_layers(model, shapes)
    try:
        check_keys(_expect_plain_attention(expected, layers), shapes)
    except ValueError as error:
        raise CheckpointError(f"checkpoint {path!r} does not fit the model: {error}") from None
    return layers


def _inspect_checkpoint(path: str):
    """(tensor shapes, saved config dict or None, state dict or None) of a checkpoint file.

    A ``.safetensors`` file is read from its header only (the state dict is loaded after the
    checks); a pickle has no header, so it is loaded whole (``load_state_dict_file``).
    """
    if path.endswith(".safetensors"):
        shapes, metadata = read_safetensors_header(path)
        return shapes, diffattn_config_from_metadata(metadata, path), None
    state_dict = load_state_dict_file(path)
    return {key: tuple(value.shape) for key, value in state_dict.items()}, None, state_dict


def _saved_config(config_dict: dict, path: str, attention: Optional[str]) -> CLIPConfig:
    try:
        return _resolve_config(CLIPConfig.from_dict(config_dict), attention)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path!r} holds an invalid model config: {error}") from None


def create_model(name: Union[str, CLIPConfig, None], pretrained=None, *,
                 attention: Optional[str] = None, device=None, dtype=None,
                 backend: str = "auto") -> CLIP:
    """Build a CLIP model, optionally loading weights from a local file.

    Args:
        name: a bundled config name (list_models()), a CLIPConfig, or None when
            ``pretrained`` is one of diffattn's own files (its saved config is used).
        pretrained: path of a checkpoint file (format detected, see the module docstring).
        attention: "diff", "diff2" or "plain" overrides the config's attention (e.g.
            ``create_model("ViT-B-16", pretrained=<open_clip file>, attention="diff2")``).
        device, dtype: where and in which dtype the model is created.
        backend: "auto" | "triton" | "torch", for the differential attention layers.

    Returns:
        CLIP with ``.config``, ``.preprocess`` and ``.tokenize``, in training mode.

    Raises:
        ValueError: unknown name; bad attention.
        CheckpointError (a ValueError), naming the file: a path that is a directory, a
            device or a symbolic link loop (the message says which); unreadable, empty,
            truncated or corrupt file; a tensor whose dtype is not floating where the model's
            is (the key named); a tensor holding NaN or infinity (the key named); a
            checkpoint in another layout, with another saved config or an
            invalid one; tensors that do not fit the config (missing, unexpected and
            mis-shaped ones listed), found before the model is built.
        UnsafeCheckpointError (a CheckpointError): the pickle needs objects outside the
            allow-list.
        PretrainedNotFoundError (a CheckpointError and a FileNotFoundError): ``pretrained`` is
            not a local file (e.g. an open_clip tag); the message names what is supported.
    Warns:
        UserWarning, once, listing the tensors newly initialised or derived when a file with
        plain attention weights is loaded into differential attention layers (warm start;
        see the module docstring).
    """
    config = _resolve_config(name, attention)
    if pretrained is None:
        if config is None:
            raise ValueError("name is required when no pretrained file is given; available: "
                             f"{', '.join(list_models())}")
        return CLIP(config, backend=backend, device=device, dtype=dtype)

    path = _check_pretrained_file(pretrained)
    shapes, saved_config, state_dict = _inspect_checkpoint(path)
    try:
        layout = detect_layout(shapes, None if saved_config is None
                               else {"format": DIFFATTN_FORMAT})
    except ValueError as error:
        raise CheckpointError(f"checkpoint {path!r}: {error}") from None
    if layout == "diffattn":
        saved = _saved_config(saved_config, path, attention)
        if config is not None and config != saved:
            raise CheckpointError(f"checkpoint {path!r} was saved for another config:\n  "
                                  + "\n  ".join(_config_differences(config, saved)))
        config = saved
    elif config is None:
        raise CheckpointError(f"checkpoint {path!r} holds no config (it is in the {layout} "
                              f"layout): pass a model name; available: "
                              f"{', '.join(list_models())}")
    remap, layout_note = None, None
    if layout != "diffattn" and config.layout != layout:
        if (layout, config.layout) != ("open_clip", "diffclip"):
            raise CheckpointError(f"checkpoint {path!r} is in the {layout} layout but the model "
                                  f"config has layout {config.layout!r}")
        # An open_clip file into a DiffCLIP-layout model (e.g. open_clip's ViT-B-16 into
        # DiffCLIP-ViT-B-16): the same ViT/CLIP under other names.
        remap = functools.partial(open_clip_to_diffclip, patch_bias=config.vision.patch_bias,
                                  ln_pre=config.vision.ln_pre)
        file_count = len(shapes)
        shapes, dropped, added = remap(shapes)
        layout_note = _layout_message(path, file_count, dropped, added)
    layers = _check_config_fits_file(config, shapes, path)

    model = CLIP(config, backend=backend, device=device, dtype=dtype)
    if state_dict is None:
        state_dict = load_state_dict_file(path)
    if remap is not None:
        state_dict = remap(state_dict)[0]
    check_floating_dtypes(state_dict, {key: value.dtype for key, value in model.state_dict().items()},
                          path)
    check_finite(state_dict, path)
    state_dict, warm = _from_plain_attention(state_dict, layers)
    model.load_state_dict(state_dict, strict=True)
    if warm or layout_note:
        warn_at_user_code("\n".join(filter(None, [layout_note,
                                                   warm and _warm_start_message(path, warm)])))
    return model


def save_pretrained(model: CLIP, path) -> None:
    """Write ``model``'s weights and config in diffattn's own format (a ``.safetensors`` file)
    that ``create_model(None, pretrained=path)`` reads back."""
    if not isinstance(model, CLIP):
        raise TypeError(f"model must be a CLIP, got {type(model).__name__}")
    save_checkpoint(path, model.state_dict(), model.config.to_dict())


# --------------------------------------------------------------------------- pretrained files
class PretrainedNotFoundError(CheckpointNotFoundError):
    """``pretrained`` is not a local file (a CheckpointError, so a ValueError, and a
    FileNotFoundError for code that catches that)."""


def _check_pretrained_file(pretrained) -> str:
    """The path of ``pretrained``; PretrainedNotFoundError naming what is supported when it is
    not a local file."""
    if not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(f"pretrained must be a file path (str or os.PathLike) or None, got "
                        f"{type(pretrained).__name__}")
    path = os.fspath(pretrained)
    problem = describe_non_file(path)
    if problem is not None and problem != "no such file":
        raise CheckpointError(f"pretrained {path!r} is {problem}; pass the path of a checkpoint file")
    if problem is not None:
        raise PretrainedNotFoundError(
            f"checkpoint file not found: {path!r}. pretrained must be a local file (diffattn "
            "downloads nothing): a DiffCLIP release checkpoint (e.g. "
            "checkpoint_best.pt), an open_clip state dict (torch.save(model.state_dict(), "
            "path)), or a diffattn .safetensors file written by save_pretrained. Names such as "
            "'openai' or 'laion2b_s34b_b88k' are open_clip download tags: load that model with "
            "open_clip once, save its state_dict() and pass the file (with attention=\"diff\" "
            "or \"diff2\" to warm-start a differential model from it).")
    return path


# --------------------------------------------------------------------------- warm start
def _plain_attention_layers(model: CLIP, state_dict: dict) -> dict:
    """{name: layer} of the differential attention layers (V1 or V2) of ``model`` whose
    weights the file holds in nn.MultiheadAttention's packed layout
    (``<name>.in_proj_weight``). Each such layer converts plain weights itself
    (``plain_state_dict_shapes``, ``state_dict_from_plain``)."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (DiffMultiheadAttention, DiffMultiheadAttentionV2))
            and f"{name}.in_proj_weight" in state_dict}


def _expect_plain_attention(expected: dict, layers: dict) -> dict:
    """The expected {name: shape} for a file with plain attention weights for ``layers``:
    each layer's own tensors are replaced by the plain ones it converts from
    (``layer.plain_state_dict_shapes()``: the packed ``in_proj_*`` and ``out_proj.*``)."""
    expected = dict(expected)
    for name, layer in layers.items():
        prefix = name + "."
        for key in [key for key in expected if key.startswith(prefix)]:
            del expected[key]
        expected.update((prefix + key, shape)
                        for key, shape in layer.plain_state_dict_shapes().items())
    return expected


def _from_plain_attention(state_dict: dict, layers: dict) -> tuple:
    """The file's plain attention weights made loadable into ``layers``, and which tensors
    the file did not give as they are.

    Each layer's ``state_dict_from_plain`` converts its plain tensors: V1 layers take them
    as they are (their lambda vectors and norm weight keep their initialisation), V2 layers
    get ``diffattn.plain_to_v2_state_dict`` of them (DiffMultiheadAttentionV2.from_plain's
    weights: q_proj derived, lambda_proj new).
    Returns (state_dict, {"v1" | "v2": {layer name: names of its derived or new tensors}}).
    """
    state_dict, warm = dict(state_dict), {"v1": {}, "v2": {}}
    for name, layer in layers.items():
        prefix = name + "."
        plain = {key[len(prefix):]: state_dict.pop(key)
                 for key in [key for key in state_dict if key.startswith(prefix)]}
        converted, new = layer.state_dict_from_plain(plain)
        state_dict.update((prefix + key, value) for key, value in converted.items())
        warm["v2" if isinstance(layer, DiffMultiheadAttentionV2) else "v1"][name] = list(new)
    return state_dict, {kind: names for kind, names in warm.items() if names}


def _index_ranges(indices) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    indices, parts = sorted(set(indices)), []
    start = previous = indices[0]
    for index in indices[1:] + [None]:
        if index is not None and index == previous + 1:
            previous = index
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if index is not None:
            start = previous = index
    return ",".join(parts)


def _grouped_tensor_names(initialised: dict) -> list:
    """One line per group of layers that differ only in their block index:
    "visual.transformer.resblocks.{0-11}.attn.{lambda_q1, ..., diff_norm.weight}"."""
    groups: dict = {}
    for layer, tensors in initialised.items():
        match = re.fullmatch(r"(.*\.)(\d+)((?:\..*)?)", layer)
        template = match.group(1) + "{}" + match.group(3) if match else layer
        index = int(match.group(2)) if match else None
        groups.setdefault((template, tuple(tensors)), []).append(index)
    lines = []
    for (template, tensors), indices in groups.items():
        layer = template if None in indices else \
            template.format("{" + _index_ranges(indices) + "}")
        lines.append(f"{layer}.{{{', '.join(tensors)}}}")
    return lines


def _layout_message(path: str, file_count: int, dropped: list, added: list) -> str:
    """What renaming an open_clip file into the DiffCLIP layout carried, left out and added."""
    carried = file_count - len(dropped)
    lines = [f"checkpoint {path!r} is in the open_clip layout: {carried} of its {file_count} "
             f"tensors were carried into the model's DiffCLIP layout under their DiffCLIP names"]
    if dropped:
        lines.append(f"  left out (the model has no such tensor, e.g. no LayerNorm before the "
                     f"vision blocks): {', '.join(sorted(dropped))}")
    if added:
        lines.append(f"  new: {', '.join(sorted(added))} (zeros: open_clip's patch embedding "
                     f"has no bias, so the model computes what the file's does)")
    return "\n".join(lines)


def _warm_start_message(path: str, warm: dict) -> str:
    """One message for the whole warm start: per kind of layer ("v1", "v2"), what was done
    and the derived or new tensors, grouped by layer."""
    paragraphs = []
    for kind, initialised in warm.items():
        count = sum(len(tensors) for tensors in initialised.values())
        names = "\n  " + "\n  ".join(_grouped_tensor_names(initialised))
        if kind == "v1":
            paragraphs.append(
                f"checkpoint {path!r} holds plain attention weights for {len(initialised)} "
                f"differential attention layers: their q/k/v/out projections were loaded from "
                f"it, and these {count} tensors were newly initialised (lambda vectors ~ "
                f"N(0, 0.1), diff_norm.weight = 1, as DiffMultiheadAttention initialises "
                f"them); fine-tune before use:" + names)
        else:
            lam = INITIAL_LAMBDA
            paragraphs.append(
                f"checkpoint {path!r} holds plain attention weights for {len(initialised)} "
                f"Differential Transformer V2 attention layers, converted as "
                f"DiffMultiheadAttentionV2.from_plain converts a plain layer: their k/v/out "
                f"projections were loaded from it, and these {count} tensors were derived or "
                f"newly initialised (q_proj: the plain q heads as the first map of each pair, "
                f"zeros as the second; lambda_proj: weight 0, bias logit({lam}), so every "
                f"token's lambda is {lam}). The model computes what the plain model computes "
                f"(within about {lam} relative) until fine-tuning moves the second maps:"
                + names)
    return "\n".join(paragraphs)


# --------------------------------------------------------------------------- open_clip style
@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """CLIP's BPE tokenizer bound to a model's context length.

    tokenizer(texts) -> (n, context_length) int64 token ids, for a string or a list of
    strings (``diffattn.models.tokenize``); ``context_length=`` overrides it for one call.
    """

    context_length: int

    def __call__(self, texts, context_length: Optional[int] = None) -> torch.Tensor:
        length = self.context_length if context_length is None else context_length
        return tokenize(texts, context_length=length)


def get_tokenizer(name: Union[str, CLIPConfig]) -> Tokenizer:
    """The tokenizer of model ``name`` (a bundled config name or a CLIPConfig), like
    open_clip.get_tokenizer: a callable texts -> (n, context_length) token ids."""
    config = _resolve_config(name, None)
    if config is None:
        raise TypeError("name must be a model name or a CLIPConfig, got None")
    return Tokenizer(config.text.context_length)


def create_model_and_transforms(name: Union[str, CLIPConfig, None], pretrained=None,
                                **kwargs) -> tuple:
    """Like open_clip.create_model_and_transforms: (model, train transform, eval transform).

    Args:
        name, pretrained: as create_model (``pretrained`` a local file; see there).
        **kwargs: create_model's keywords (attention, device, dtype, backend).
    Returns:
        model: the CLIP, in training mode (as create_model returns it).
        train transform: ``RandomResizedCropTransform``, a random crop of 90-100% of the image
            area with aspect ratio in [3/4, 4/3], bicubic resize to the model's image size and
            the model's normalisation (open_clip's training default, PIL and torch only; see
            diffattn.models.augment).
        eval transform: ``model.preprocess``, the model's deterministic preprocessing.
    Each transform maps one image (PIL image, file path or uint8 tensor) to a float32
    (3, S, S) tensor.
    """
    model = create_model(name, pretrained, **kwargs)
    preprocess = model.preprocess
    train = make_train_transform(preprocess.image_size, mean=preprocess.mean, std=preprocess.std)
    return model, train, preprocess
