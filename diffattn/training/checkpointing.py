"""Training checkpoints: a run directory that holds one complete, consistent checkpoint at
every instant, and resumption that never unpickles arbitrary objects.

Layout of a run directory ``OUT``::

    OUT/checkpoint.json          the manifest: which checkpoint folders are current
    OUT/epoch-0007/              a complete checkpoint, never modified once written:
        model.safetensors        weights and config (diffattn's format, ``save_pretrained``)
        train_state.pt           optimizer state, epoch, step, RNG states, arguments
    OUT/model.safetensors        the last checkpoint's weights (a hard link into its folder)
    OUT/best_model.safetensors   the weights of the best epoch by the validation metric

``train_state.pt`` is a ``torch.save`` of plain containers, numbers, strings and tensors only,
so ``torch.load(weights_only=True)`` reads it. It records the SHA-256 of the model file it
belongs to.

Saving epoch E (``save_checkpoint``):

1. write ``OUT/epoch-E.tmp/`` (model, then state), flush each file and the folder to disk;
2. rename it to ``OUT/epoch-E``: complete, but not yet current;
3. write ``OUT/checkpoint.json.tmp`` naming it as the last checkpoint (and as the best one when
   its validation metric is the best so far), flush it, and rename it over
   ``OUT/checkpoint.json``. This one atomic rename is the switch from the previous checkpoint
   to the new one;
4. point ``model.safetensors`` / ``best_model.safetensors`` at the new files (each replaced by
   a rename);
5. delete the folders that the manifest no longer names.

A kill at any instant leaves the previous manifest with its folders (deleted only in step 5)
or the new one with its folder.

The manifest also records what the run wrote, so that nothing else is ever deleted: a run
starts by writing a manifest with no checkpoint (``start_run``), and before step 1 every save
adds the folder names it is about to create to the manifest's ``folders`` list.
``clean_run_directory`` removes what an interrupted save left -- the listed folders the
manifest no longer names as its checkpoints, and the trainer's own temporary files
(``checkpoint.json.tmp``, ``model.safetensors.tmp``, ...) -- and repairs the two links. A
file that the run did not write is never deleted, whatever its name. A write that fails
(no space left, a file-size limit, a read-only file system) is a ``RunWriteError`` naming the
file and the cause; the previous checkpoint stays current.

For crash tests, the environment variable ``DIFFATTN_CHECKPOINT_PAUSE`` widens the saving
window: ``SECONDS`` makes every step above (``SAVE_STAGES``) print ``checkpoint stage: NAME``
to stderr and then sleep that long; ``NAME=SECONDS`` does so after step NAME only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from typing import Optional

import numpy as np
import torch

from ..models import save_pretrained
from ..models.checkpoint import CheckpointError, fsync_path
from .run_directory import LOCK_FILE, RunWriteError, write_failure_cause, writing

MANIFEST_FILE = "checkpoint.json"
MODEL_FILE = "model.safetensors"
BEST_MODEL_FILE = "best_model.safetensors"
STATE_FILE = "train_state.pt"
FORMAT_VERSION = 2
# Versions of train_state.pt this code reads. Version 1 kept the checkpoint's two files
# directly in OUT (no manifest) and a scheduler state that is no longer needed.
READABLE_FORMAT_VERSIONS = (1, 2)
PAUSE_VARIABLE = "DIFFATTN_CHECKPOINT_PAUSE"
SAVE_STAGES = ("model written", "state written", "folder complete", "switched",
               "links updated", "old folders removed")

_FOLDER = re.compile(r"epoch-\d+")
_OWNED_FOLDER = re.compile(r"epoch-\d+(\.tmp)?")
# Temporary files of fixed names that only the trainer writes (each replaced by a rename).
TEMPORARY_FILES = ("checkpoint.json.tmp", "model.safetensors.tmp", "best_model.safetensors.tmp",
                   "metrics.jsonl.tmp", "training_curve.png.tmp")
_STATE_KEYS = ("epoch", "step", "optimizer", "rng", "model_sha256", "args")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """The current checkpoint of a run directory.

    Attributes:
        folder: path of the folder holding ``model.safetensors`` and ``train_state.pt``.
        epoch: completed epochs it holds.
        best: the manifest's ``{"folder", "epoch", "metric", "value"}`` entry of the best epoch
            so far by the validation metric, or None.
    """

    folder: str
    epoch: int
    best: Optional[dict] = None

    @property
    def model_path(self) -> str:
        return os.path.join(self.folder, MODEL_FILE)


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


def _pause_for_crash_tests(stage: str) -> None:
    """With DIFFATTN_CHECKPOINT_PAUSE set (``SECONDS`` or ``STAGE=SECONDS``): announce
    ``stage`` on stderr and sleep."""
    setting = os.environ.get(PAUSE_VARIABLE)
    if not setting:
        return
    only_at, _, seconds = setting.rpartition("=")
    if only_at and only_at != stage:
        return
    print(f"checkpoint stage: {stage}", file=sys.stderr, flush=True)
    time.sleep(float(seconds))


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


# ------------------------------------------------------------------------ the manifest
def _read_manifest(out_dir: str) -> Optional[dict]:
    """The manifest of ``out_dir``, or None when there is none."""
    path = os.path.join(out_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as file:
            manifest = json.load(file)
        last = manifest.get("last")
        if last is not None and not (isinstance(last["folder"], str)
                                     and _FOLDER.fullmatch(last["folder"])
                                     and isinstance(last["epoch"], int)):
            raise ValueError("bad 'last' entry")
        folders = manifest.get("folders", [])
        if not (isinstance(folders, list) and all(isinstance(name, str)
                                                  and _OWNED_FOLDER.fullmatch(name)
                                                  for name in folders)):
            raise ValueError("bad 'folders' entry")
        best = manifest.get("best")
        if best is not None and not (isinstance(best.get("folder"), str)
                                     and _FOLDER.fullmatch(best["folder"])):
            raise ValueError("bad 'best' entry")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{path!r} is not a valid checkpoint manifest ({error}); it is "
                              "written atomically, so it was changed outside of training") from None
    return manifest


def _write_manifest(out_dir: str, manifest: dict) -> None:
    """Replace the manifest with one atomic rename (flushed before and after)."""
    path = os.path.join(out_dir, MANIFEST_FILE)
    temporary = path + ".tmp"
    with writing(path):
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(manifest, file, indent=1, allow_nan=False)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        fsync_path(out_dir)


def _named_folders(manifest: dict) -> set:
    """The folders the manifest names as its last and best checkpoints."""
    return {entry["folder"] for entry in (manifest.get("last"), manifest.get("best")) if entry}


def _owned_folders(manifest: dict) -> set:
    """Every checkpoint folder the run wrote and has not removed (a manifest of an earlier
    version lists none: its named folders)."""
    return set(manifest.get("folders", ())) | _named_folders(manifest)


def holds_run(out_dir: str) -> bool:
    """True when ``out_dir`` holds a run of this trainer (a manifest, or the state file of a
    checkpoint written before manifests existed)."""
    return (os.path.isfile(os.path.join(out_dir, MANIFEST_FILE))
            or os.path.isfile(os.path.join(out_dir, STATE_FILE)))


def foreign_entries(out_dir: str) -> list:
    """The entries of ``out_dir`` that keep a new run from starting there: all but the lock
    file and the temporary of the manifest (a run killed while writing its first manifest)."""
    return sorted(set(os.listdir(out_dir)) - {LOCK_FILE, MANIFEST_FILE + ".tmp"})


def start_run(out_dir: str) -> None:
    """Claim the empty directory ``out_dir`` for a new run: write a manifest with no
    checkpoint yet. Call on one process, holding the run's lock."""
    _remove(os.path.join(out_dir, MANIFEST_FILE + ".tmp"))
    _write_manifest(out_dir, {"format_version": FORMAT_VERSION, "folders": []})


def find_checkpoint(out_dir: str) -> Optional[Checkpoint]:
    """The current checkpoint of run directory ``out_dir``, or None when it holds none.

    A directory written before the manifest existed (``model.safetensors`` and
    ``train_state.pt`` directly in it) is its own checkpoint folder.

    Raises:
        CheckpointError: a damaged manifest, or one naming a folder that is gone.
    """
    manifest = _read_manifest(out_dir)
    if manifest is None:
        if os.path.isfile(os.path.join(out_dir, STATE_FILE)):
            state = load_training_state(out_dir)
            return Checkpoint(out_dir, int(state["epoch"]))
        return None
    if manifest.get("last") is None:
        return None
    folder = os.path.join(out_dir, manifest["last"]["folder"])
    if not os.path.isdir(folder):
        raise CheckpointError(f"the checkpoint folder {folder!r} named by "
                              f"{os.path.join(out_dir, MANIFEST_FILE)!r} is missing")
    return Checkpoint(folder, manifest["last"]["epoch"], manifest.get("best"))


# ------------------------------------------------------------------------ links and cleanup
def _link(target: str, link_path: str) -> None:
    """Make ``link_path`` the file ``target`` (a hard link, or a copy where the file system
    has none), replacing any previous ``link_path`` with one rename."""
    if os.path.isfile(link_path) and os.path.samefile(target, link_path):
        return
    temporary = link_path + ".tmp"
    with writing(link_path):
        _remove(temporary)
        try:
            os.link(target, temporary)
        except OSError:
            shutil.copyfile(target, temporary)
            fsync_path(temporary)
        os.replace(temporary, link_path)


def _update_links(out_dir: str, manifest: dict) -> None:
    """Point model.safetensors and best_model.safetensors at the manifest's folders; drop the
    state file of a pre-manifest checkpoint, which the manifest supersedes."""
    _link(os.path.join(out_dir, manifest["last"]["folder"], MODEL_FILE),
          os.path.join(out_dir, MODEL_FILE))
    best_path = os.path.join(out_dir, BEST_MODEL_FILE)
    if manifest.get("best") is not None:
        _link(os.path.join(out_dir, manifest["best"]["folder"], MODEL_FILE), best_path)
    else:
        _remove(best_path)
    _remove(os.path.join(out_dir, STATE_FILE))
    fsync_path(out_dir)


def _remove_unnamed_folders(out_dir: str, manifest: dict) -> None:
    """Delete the folders the run wrote that the manifest no longer names, then record that
    they are gone."""
    named = _named_folders(manifest)
    listed = _owned_folders(manifest)
    for name in sorted(listed - named):
        _remove(os.path.join(out_dir, name))
    if listed != named or "folders" not in manifest:
        manifest["folders"] = sorted(named)
        _write_manifest(out_dir, manifest)


def clean_run_directory(out_dir: str) -> None:
    """Remove what an interrupted save of this trainer left in the run directory ``out_dir``
    (the folders its manifest lists but no longer names, the trainer's temporary files) and
    repair the model links. Nothing the run did not write is touched; a directory without a
    manifest is left as it is. Call on one process, holding the run's lock, before training
    starts."""
    manifest = _read_manifest(out_dir)
    if manifest is None:
        return
    for name in TEMPORARY_FILES:
        _remove(os.path.join(out_dir, name))
    _remove_unnamed_folders(out_dir, manifest)
    if manifest.get("last") is not None:
        _update_links(out_dir, manifest)


# ------------------------------------------------------------------------ save and load
def _is_better(value: float, best: Optional[dict], metric: str, higher_is_better: bool) -> bool:
    if not math.isfinite(value):
        return False
    if best is None or best.get("metric") != metric:
        return True
    return value > best["value"] if higher_is_better else value < best["value"]


def _kept_note(manifest: dict) -> str:
    """What a failed save leaves current."""
    last = manifest.get("last")
    if last is None:
        return "no checkpoint has been saved yet"
    return f"the checkpoint of epoch {last['epoch']} ({last['folder']}) is kept"


def save_checkpoint(out_dir: str, model, optimizer, *, epoch: int, step: int,
                    rng_states: list, args: dict, metric: Optional[tuple] = None) -> bool:
    """Make a checkpoint of epoch ``epoch`` the current one of ``out_dir`` (see the module
    docstring for the steps); call on one process.

    Args:
        model: the unwrapped CLIP.
        optimizer: its state_dict is saved.
        epoch: completed epochs; step: optimizer steps taken.
        rng_states: ``capture_rng_state()`` of every rank, in rank order.
        args: the training arguments (plain values).
        metric: (name, value, higher_is_better) of the validation metric, or None.

    Returns:
        True when this checkpoint became the best one.
    """
    folder_name = f"epoch-{epoch:04d}"
    folder = os.path.join(out_dir, folder_name)
    temporary = folder + ".tmp"
    manifest = _read_manifest(out_dir) or {"format_version": FORMAT_VERSION}
    owned = _owned_folders(manifest)
    for name, path in ((folder_name, folder), (folder_name + ".tmp", temporary)):
        if os.path.lexists(path) and name not in owned:
            raise CheckpointError(f"{path!r} was not written by this run and is in the way of "
                                  f"the checkpoint of epoch {epoch}; move it out of the run "
                                  "directory")
    # Record the two names before creating them: a cleanup after a kill removes them.
    manifest["folders"] = sorted(owned | {folder_name, folder_name + ".tmp"})
    _write_manifest(out_dir, manifest)
    try:
        _remove(temporary)
        os.makedirs(temporary)
        model_path = os.path.join(temporary, MODEL_FILE)
        with writing(model_path):
            save_pretrained(model, model_path)
        _pause_for_crash_tests(SAVE_STAGES[0])
        state = {
            "format_version": FORMAT_VERSION,
            "epoch": epoch,
            "step": step,
            "optimizer": optimizer.state_dict(),
            "rng": rng_states,
            "model_sha256": _sha256(model_path),
            "args": args,
        }
        state_path = os.path.join(temporary, STATE_FILE)
        with writing(state_path):
            with open(state_path, "wb") as file:  # a file object: a failed write keeps errno
                torch.save(state, file)
                file.flush()
                os.fsync(file.fileno())
        fsync_path(temporary)
        _pause_for_crash_tests(SAVE_STAGES[1])
        if folder_name not in _named_folders(manifest):
            _remove(folder)  # a complete folder of this epoch that was never switched to
        with writing(folder):
            os.replace(temporary, folder)
            fsync_path(out_dir)
    except (RunWriteError, OSError) as error:
        with contextlib.suppress(OSError):
            _remove(temporary)  # free the space the incomplete checkpoint took
        if not isinstance(error, RunWriteError):
            error = RunWriteError(temporary, write_failure_cause(error))
        raise error.with_note(_kept_note(manifest)) from None
    _pause_for_crash_tests(SAVE_STAGES[2])
    switched = dict(manifest)
    switched["last"] = {"folder": folder_name, "epoch": epoch}
    became_best = metric is not None and _is_better(metric[1], manifest.get("best"),
                                                    metric[0], metric[2])
    if became_best:
        switched["best"] = {"folder": folder_name, "epoch": epoch, "metric": metric[0],
                            "value": metric[1]}
    switched["folders"] = sorted(owned | {folder_name})
    try:
        _write_manifest(out_dir, switched)
    except RunWriteError as error:
        raise error.with_note(_kept_note(manifest)) from None
    manifest = switched
    _pause_for_crash_tests(SAVE_STAGES[3])
    _update_links(out_dir, manifest)
    _pause_for_crash_tests(SAVE_STAGES[4])
    _remove_unnamed_folders(out_dir, manifest)
    _pause_for_crash_tests(SAVE_STAGES[5])
    return became_best


def load_training_state(folder: str) -> dict:
    """The state saved in checkpoint folder ``folder`` (``torch.load(weights_only=True)``, on
    the CPU), after checking that the folder's model file is the one it was saved with.

    Raises:
        CheckpointError, naming the file: missing, unreadable or incomplete state file, an
            unknown format version, or a model file that does not match.
    """
    state_path = os.path.join(folder, STATE_FILE)
    model_path = os.path.join(folder, MODEL_FILE)
    for path in (state_path, model_path):
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint file {path!r} is missing")
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged pickle can raise almost anything while being read
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"cannot read the training state {state_path!r} (empty, "
                              f"truncated or corrupt?): {reason}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_path!r} holds a {type(state).__name__}, not a "
                              "training state")
    if state.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise CheckpointError(f"{state_path!r}: unknown training-state format "
                              f"{state.get('format_version')!r} (this version reads "
                              f"{READABLE_FORMAT_VERSIONS})")
    missing = [key for key in _STATE_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{state_path!r} lacks the entries {missing}")
    if _sha256(model_path) != state["model_sha256"]:
        raise CheckpointError(f"{model_path!r} is not the model file {state_path!r} was saved "
                              "with (changed after it was written?)")
    return state
