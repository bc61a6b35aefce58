"""Tests for diffattn.models.checkpoint: safe loading, unwrapping, layouts, key checks."""
import argparse
import json
import os
import pathlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

import safetensors.torch

from diffattn.models.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    UnsafeCheckpointError,
    check_keys,
    detect_layout,
    load_state_dict_file,
    read_checkpoint_metadata,
    read_safetensors_header,
    save_checkpoint,
)


def _shared_data_dir() -> Path:
    if "DIFFATTN_SHARED" in os.environ:
        return Path(os.environ["DIFFATTN_SHARED"]) / "data"
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _tiny_state_dict() -> dict:
    return {"visual.proj": torch.randn(4, 3), "logit_scale": torch.tensor(2.6592)}


class _WritesMarkerFile:
    """Unpickling this runs ``os.system`` -- a loader that executes it is unsafe."""

    def __init__(self, marker_path: Path):
        self.marker_path = marker_path

    def __reduce__(self):
        return (os.system, (f"touch {self.marker_path}",))


class _CustomObject:
    pass


def test_release_style_training_checkpoint_is_unwrapped(tmp_path):
    weights = _tiny_state_dict()
    checkpoint = {
        "epoch": 40,
        "state_dict": OrderedDict((f"module.{key}", value) for key, value in weights.items()),
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(4, 3), "step": torch.tensor(7.0)}}, "param_groups": [{"lr": 5e-4, "params": [0]}]},
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 12},
        "best_acc1": np.float64(14.4),
        "args": argparse.Namespace(output_dir=pathlib.Path("/runs/diffclip"), lr=5e-4, epochs=40, use_amp=True),
    }
    checkpoint_path = tmp_path / "checkpoint_best.pt"
    torch.save(checkpoint, checkpoint_path)

    state_dict = load_state_dict_file(checkpoint_path)
    assert type(state_dict) is dict
    assert list(state_dict) == list(weights)
    for key, value in weights.items():
        assert torch.equal(state_dict[key], value)


def test_numpy_scalars_of_several_dtypes_are_allowed(tmp_path):
    checkpoint_path = tmp_path / "scalars.pt"
    extras = {name: dtype(1) for name, dtype in [("f32", np.float32), ("i32", np.int32), ("i64", np.int64), ("b", np.bool_)]}
    torch.save({"model": _tiny_state_dict(), "extras": extras}, checkpoint_path)
    assert set(load_state_dict_file(checkpoint_path)) == set(_tiny_state_dict())


def test_bare_state_dict_keeps_its_keys(tmp_path):
    weights = {"module.a": torch.zeros(1), "b": torch.ones(2)}  # prefix not shared by all keys
    checkpoint_path = tmp_path / "bare.pth"
    torch.save(weights, checkpoint_path)
    assert set(load_state_dict_file(checkpoint_path)) == {"module.a", "b"}


def test_code_executing_pickle_is_refused(tmp_path):
    marker_path = tmp_path / "pwned"
    checkpoint_path = tmp_path / "malicious.pt"
    torch.save({"state_dict": _tiny_state_dict(), "payload": _WritesMarkerFile(marker_path)}, checkpoint_path)
    assert not marker_path.exists()

    with pytest.raises(UnsafeCheckpointError) as raised:
        load_state_dict_file(checkpoint_path)
    message = str(raised.value)
    assert "malicious.pt" in message
    assert "system" in message  # the refused global: posix.system / nt.system
    assert "Nothing from the file was executed" in message
    assert not marker_path.exists()
    assert isinstance(raised.value, ValueError)


def test_custom_class_is_refused(tmp_path):
    checkpoint_path = tmp_path / "custom.pt"
    torch.save({"state_dict": _tiny_state_dict(), "extra": _CustomObject()}, checkpoint_path)
    with pytest.raises(UnsafeCheckpointError, match="_CustomObject"):
        load_state_dict_file(checkpoint_path)


def test_garbage_file_is_refused(tmp_path):
    checkpoint_path = tmp_path / "garbage.pt"
    checkpoint_path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UnsafeCheckpointError, match="garbage.pt"):
        load_state_dict_file(checkpoint_path)


def test_non_tensor_state_dict_values_are_rejected(tmp_path):
    checkpoint_path = tmp_path / "mixed.pt"
    torch.save({"state_dict": {"weight": torch.zeros(1), "note": "hello"}}, checkpoint_path)
    with pytest.raises(ValueError, match="note"):
        load_state_dict_file(checkpoint_path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pt") as raised:
        load_state_dict_file(tmp_path / "absent.pt")
    assert isinstance(raised.value, CheckpointNotFoundError)
    assert isinstance(raised.value, CheckpointError)


def _damaged_copies(path: Path) -> dict:
    """Empty, truncated and random-bytes versions of the file at ``path``, next to it."""
    data = path.read_bytes()
    contents = {"empty": b"", "truncated": data[: len(data) // 2],
                "random": np.random.default_rng(0).bytes(len(data))}
    copies = {}
    for name, content in contents.items():
        copies[name] = path.with_name(f"{name}{path.suffix}")
        copies[name].write_bytes(content)
    return copies


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_damaged_files_raise_checkpoint_error_naming_the_path(tmp_path, suffix):
    path = tmp_path / f"good{suffix}"
    if suffix == ".pt":
        torch.save(_tiny_state_dict(), path)
    else:
        save_checkpoint(path, _tiny_state_dict(), {"embed_dim": 4})
    for name, damaged in _damaged_copies(path).items():
        with pytest.raises(CheckpointError, match=f"{name}{suffix}"):
            load_state_dict_file(damaged)
        if suffix == ".safetensors":
            with pytest.raises(CheckpointError, match=f"{name}{suffix}"):
                read_checkpoint_metadata(damaged)


def test_metadata_without_config_or_with_bad_json(tmp_path):
    path = tmp_path / "no_config.safetensors"
    safetensors.torch.save_file(_tiny_state_dict(), path, metadata={"format": "diffattn"})
    with pytest.raises(CheckpointError, match="no_config.safetensors.*no 'config' entry"):
        read_checkpoint_metadata(path)
    path = tmp_path / "bad_json.safetensors"
    safetensors.torch.save_file(_tiny_state_dict(), path,
                                metadata={"format": "diffattn", "config": "{width: 3"})
    with pytest.raises(CheckpointError, match="bad_json.safetensors.*not valid JSON"):
        read_checkpoint_metadata(path)
    path = tmp_path / "list.safetensors"
    safetensors.torch.save_file(_tiny_state_dict(), path,
                                metadata={"format": "diffattn", "config": "[1, 2]"})
    with pytest.raises(CheckpointError, match="list.safetensors.*must be a JSON object"):
        read_checkpoint_metadata(path)


def test_non_string_state_dict_key_is_named(tmp_path):
    path = tmp_path / "int_key.pt"
    torch.save({1: torch.zeros(2), "visual.proj": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=r"int_key.pt.*not strings, e.g. \[1\]"):
        load_state_dict_file(path)
    with pytest.raises(ValueError, match="it has 1, a"):  # mixed keys are listed, not sorted
        detect_layout({1: torch.zeros(1), "a": torch.zeros(1)})


def test_header_gives_shapes_without_loading(tmp_path):
    path = tmp_path / "model.safetensors"
    state_dict = {"module.a": torch.zeros(2, 3), "module.b": torch.zeros(5)}
    save_checkpoint(path, state_dict, {"embed_dim": 4})
    shapes, metadata = read_safetensors_header(path)
    assert shapes == {"a": (2, 3), "b": (5,)}
    assert metadata["format"] == "diffattn" and json.loads(metadata["config"]) == {"embed_dim": 4}
    check_keys({"a": torch.Size([2, 3]), "b": torch.Size([5])}, shapes)


def test_saved_file_has_the_permissions_of_other_new_files(tmp_path):
    reference = tmp_path / "reference.txt"
    reference.write_text("x")
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, _tiny_state_dict(), {})
    assert oct(path.stat().st_mode & 0o777) == oct(reference.stat().st_mode & 0o777)


def test_safetensors_round_trip_with_metadata(tmp_path):
    weights = _tiny_state_dict()
    config = {"embed_dim": 512, "vision": {"width": 768, "layers": 12}, "lambda_init": 0.8}
    checkpoint_path = tmp_path / "model.safetensors"
    save_checkpoint(checkpoint_path, weights, config)

    assert not Path(str(checkpoint_path) + ".tmp").exists()
    loaded = load_state_dict_file(checkpoint_path)
    assert set(loaded) == set(weights)
    for key, value in weights.items():
        assert torch.equal(loaded[key], value)
    metadata = read_checkpoint_metadata(checkpoint_path)
    assert metadata == {"format": "diffattn", "config": config}
    assert detect_layout(loaded, metadata) == "diffattn"


def test_save_checkpoint_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        save_checkpoint(tmp_path / "model.pt", _tiny_state_dict(), {})
    with pytest.raises(TypeError, match="state_dict"):
        save_checkpoint(tmp_path / "model.safetensors", {"a": 1}, {})
    with pytest.raises(TypeError, match="config"):
        save_checkpoint(tmp_path / "model.safetensors", _tiny_state_dict(), "config")


def test_metadata_of_other_files_is_none(tmp_path):
    import safetensors.torch

    plain_path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(_tiny_state_dict(), plain_path, metadata={"format": "pt"})
    assert read_checkpoint_metadata(plain_path) is None
    pickled_path = tmp_path / "plain.pt"
    torch.save(_tiny_state_dict(), pickled_path)
    assert read_checkpoint_metadata(pickled_path) is None


def _state_dict_from_key_list(file_name: str) -> dict:
    key_list_path = _shared_data_dir() / file_name
    if not key_list_path.is_file():
        pytest.skip(f"{key_list_path} not found")
    return {key: torch.zeros(1) for key in json.loads(key_list_path.read_text())}


def test_detect_layout_diffclip():
    state_dict = _state_dict_from_key_list("diffclip_vitb16_state_dict.json")
    assert detect_layout(state_dict) == "diffclip"


@pytest.mark.parametrize("file_name", ["open_clip_ViT-B-16_state_dict.json", "open_clip_ViT-B-32_state_dict.json"])
def test_detect_layout_open_clip(file_name):
    state_dict = _state_dict_from_key_list(file_name)
    assert detect_layout(state_dict) == "open_clip"


def test_detect_layout_from_marker_keys():
    diffclip = {"visual.patch_embed.proj.weight": torch.zeros(1), "image_projection": torch.zeros(1)}
    open_clip = {"visual.conv1.weight": torch.zeros(1), "visual.class_embedding": torch.zeros(1)}
    assert detect_layout(diffclip) == "diffclip"
    assert detect_layout(open_clip) == "open_clip"
    assert detect_layout(diffclip, {"format": "diffattn", "config": {}}) == "diffattn"


def test_detect_layout_unknown_lists_keys():
    with pytest.raises(ValueError, match="encoder.layer.0.weight"):
        detect_layout({"encoder.layer.0.weight": torch.zeros(1)})


def test_check_keys_accepts_matching_state_dict():
    got = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    check_keys({"a": torch.Size([2, 3]), "b": torch.Size([4])}, got)


def test_check_keys_reports_every_problem():
    expected = {"a": torch.Size([2, 3]), "b": torch.Size([4]), "c": torch.Size([1])}
    got = {"a": torch.zeros(3, 2), "b": torch.zeros(4), "extra": torch.zeros(1)}
    with pytest.raises(ValueError) as raised:
        check_keys(expected, got)
    message = str(raised.value)
    assert "1 missing keys:\n  c" in message
    assert "1 unexpected keys:\n  extra" in message
    assert "1 shape mismatches:\n  a: expected (2, 3), got (3, 2)" in message


def test_check_keys_lists_only_the_first_20():
    expected = {f"layer{index}": torch.Size([1]) for index in range(25)}
    with pytest.raises(ValueError) as raised:
        check_keys(expected, {})
    message = str(raised.value)
    assert "25 missing keys" in message
    assert "layer19" in message and "layer20" not in message
    assert "... and 5 more" in message


# ------------------------------------------------------------------ what the path is, dtypes
def _path_kinds(tmp_path) -> dict:
    loop = tmp_path / "loop.pt"
    os.symlink(loop, loop)
    folder = tmp_path / "folder.pt"
    folder.mkdir()
    kinds = {"a directory": folder, "a symbolic link loop": loop}
    if os.path.exists("/dev/zero"):
        kinds["a character device"] = Path("/dev/zero")
    return kinds


@pytest.mark.parametrize("reader", [load_state_dict_file, read_safetensors_header, read_checkpoint_metadata])
def test_directory_device_and_link_loop_are_named_as_such(tmp_path, reader):
    for kind, path in _path_kinds(tmp_path).items():
        with pytest.raises(CheckpointError, match=f"{kind}") as raised:
            reader(path)
        assert str(path) in str(raised.value) and "not found" not in str(raised.value)
        assert not isinstance(raised.value, CheckpointNotFoundError)


def test_pretrained_directory_device_and_link_loop_are_named_as_such(tmp_path):
    from diffattn.models import create_model

    for kind, path in _path_kinds(tmp_path).items():
        with pytest.raises(CheckpointError, match=f"pretrained '{path}' is {kind}"):
            create_model("CLIP-Tiny", pretrained=path)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.int64])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_non_floating_tensor_where_the_model_is_floating_names_file_and_key(tmp_path, dtype, suffix):
    from diffattn.models import create_model

    state_dict = create_model("CLIP-Tiny").state_dict()
    key = "visual.blocks.0.mlp.fc1.weight"
    state_dict[key] = state_dict[key].to(dtype)
    path = tmp_path / f"int{suffix}"
    if suffix == ".pt":
        torch.save(state_dict, path)
    else:
        safetensors.torch.save_file(state_dict, str(path))
    with pytest.raises(CheckpointError, match="dtype is not floating") as raised:
        create_model("CLIP-Tiny", pretrained=path)
    assert str(path) in str(raised.value) and f"{key} ({dtype})" in str(raised.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_non_finite_weights_are_refused_naming_file_and_tensor(tmp_path, value, suffix):
    from diffattn.models import create_model, save_pretrained

    model = create_model("CLIP-Tiny")
    key = "visual.blocks.0.mlp.fc1.weight"
    with torch.no_grad():
        model.state_dict()[key][0, :3] = value
    path = tmp_path / f"nan{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), path)
    else:
        save_pretrained(model, path)
    with pytest.raises(CheckpointError, match="not finite") as raised:
        create_model("CLIP-Tiny" if suffix == ".pt" else None, pretrained=path)
    assert str(path) in str(raised.value) and f"'{key}' has 3 of" in str(raised.value)
