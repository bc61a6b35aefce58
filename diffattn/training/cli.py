"""The training command line: contrastive training of CLIP / DiffCLIP, in one process or many
(torchrun + DDP). ``python -m diffattn.train`` and the ``diffattn-train`` script run ``main``.

    python -m diffattn.train --data digits --model DiffCLIP-Tiny --epochs 8 --out runs/digits
    torchrun --standalone --nproc_per_node 2 -m diffattn.train \\
        --data digits --model DiffCLIP-Tiny --epochs 8 --out runs/digits

Under torchrun (WORLD_SIZE set) each process joins the process group (NCCL on CUDA, gloo on
CPU) and trains a DistributedDataParallel replica on ``--batch-size / world_size`` pairs per
step; the contrastive loss uses the features of every rank (``loss``).
``--pretrained FILE`` starts from a weights file and ``--attention diff|diff2`` makes the
model's attention differential (a plain CLIP warm-starting DiffCLIP); the checkpoints hold the
model's config and these arguments, so ``--resume`` and ``python -m diffattn.eval`` need
neither again. With ``--val-fraction`` the held-out pairs' loss and retrieval recall@1/5/10,
with ``--val-zeroshot ROOT`` a labelled folder's zero-shot accuracy, are computed every epoch
by ``diffattn.evaluation``'s functions.
After every epoch rank 0 appends a line to ``OUT/metrics.jsonl``, switches the run's
checkpoint to the new epoch with one atomic rename (``checkpointing``: a kill at any
moment leaves the previous or the new checkpoint, complete), keeps the best epoch by the
validation metric, and redraws ``OUT/training_curve.png``. ``--resume`` continues from the
checkpoint, or starts afresh when there is none; it refuses changed optimisation arguments
unless ``--allow-changed-args``. Errors the user can fix (data, checkpoints, run directories)
end the command with one ``error:`` line and exit status 1; argument errors with one
``error:`` line and exit status 2.

The run owns ``--out``: a new run starts only in a new or empty directory, deletes only what
its manifest records that it wrote, and holds ``OUT/train.lock`` while it trains, so that a
second run or resume in the same directory stops at once (``run_directory``). A
failed write (no space left, a file-size limit, a read-only directory) is one ``error:`` line
naming the file; the previous checkpoint stays current. A loss that is not finite (or weights
that are not, after an epoch) ends the run with an ``error:`` line naming the step: the last
finite checkpoint stays the checkpoint and the best one. The check costs no host
synchronisation per step: the first bad step is kept on the device and read where the loop
reads values anyway (the progress bar's lagged loss in one process, the end of every epoch).

Precision: bf16 autocast on CUDA, float32 on the CPU (bf16 needs no gradient scaler, so there
is none). The logit scale is the log-temperature parameter, clamped in place to
[0, ln 100] after every optimizer step. ``--backend auto`` means the fused Triton kernels on
CUDA and the PyTorch path on the CPU (the Triton interpreter is far too slow to train with;
``--backend triton`` forces it).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .. import BACKENDS
from ..unreadable import UnreadableImages
from ..user_messages import CommandLineParser, print_error, print_warning
from ..evaluation.datasets import TEMPLATE_SETS, read_image_folder, read_templates
from ..models import create_model, list_models
from ..models.checkpoint import CheckpointError
from .checkpointing import (BEST_MODEL_FILE, MODEL_FILE, Checkpoint, capture_rng_state,
                                     clean_run_directory, find_checkpoint, foreign_entries,
                                     holds_run, load_training_state, restore_rng_state,
                                     save_checkpoint, start_run)
from .data import (MAX_READ_ATTEMPTS, DataConfig, DataError, TrainData, build_train_data,
                   check_images)
from .distributed import (DEFAULT_TIMEOUT_S, DistributedJobError, cleanup_distributed,
                                   dist_info_from_env, init_distributed, resolve_device)
from .evaluate import FolderZeroShotTask, folder_zero_shot, validate_pairs, zero_shot_top1
from .loss import ClipLoss
from .metrics import METRICS_FILE, append_metrics, read_metrics, truncate_metrics
from .optim import (clamp_logit_scale, cosine_schedule, create_optimizer,
                             set_peak_lr_and_weight_decay)
from .plots import CURVE_FILE, save_training_curve
from .run_directory import RunLock, check_writable, writing

# Arguments whose change alters what a resumed run optimises: --resume refuses a change of any
# of them unless --allow-changed-args. (--epochs may grow.)
OPTIMISATION_ARGS = ("model", "pretrained", "attention", "data", "templates", "csv_img_key",
                     "csv_caption_key", "csv_separator", "train_subset", "train_num_samples",
                     "val_fraction", "batch_size", "lr", "wd", "warmup", "grad_clip", "seed")
# Arguments that say which model is trained: --resume takes the saved run's value when one is
# not given (the checkpoint holds the model), and refuses a different one.
MODEL_ARGS = ("model", "pretrained", "attention")
DEFAULT_MODEL = "DiffCLIP-Tiny"
# DataLoader workers per process on a CUDA device when --workers is not given (at most the
# process's share of the cores). On the CPU the default is 0: the model needs the cores.
CUDA_WORKERS = 4
# The device-side "first step whose loss was not finite" while none was.
_NO_BAD_STEP = 2 ** 62


class TrainingDiverged(RuntimeError):
    """The loss or the weights stopped being finite; the message names the step."""


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help gives every option's default: "(default: X)" after each help text that does not
    already say it (options whose default is None say in words what happens without them;
    flags are off by default)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command line's argument parser."""
    parser = CommandLineParser(
        prog="python -m diffattn.train", formatter_class=_HelpWithDefaults,
        description="Contrastive (CLIP) training of CLIP / DiffCLIP models; run it under "
                    "torchrun for several processes.")
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True,
                      help="'digits' (scikit-learn's handwritten digits), 'csv:FILE', "
                           "'folder:ROOT' (one folder of images per class, captions from the "
                           "class names and --templates; a caption file beside an image, "
                           "img.jpg + img.txt, takes precedence) or 'wds:PATTERN' (WebDataset "
                           "shards, brace patterns)")
    data.add_argument("--templates", default="simple", metavar="simple|imagenet|FILE",
                      help="caption templates for folder data's class names and --val-zeroshot: "
                           "OpenAI's 7 simple ImageNet templates (simple, the default), their 80 "
                           "(imagenet), or a file with one template per line, the class name as "
                           "'{}' or '{c}'")
    data.add_argument("--csv-img-key", default="filepath", help="CSV image-path column")
    data.add_argument("--csv-caption-key", default="caption", help="CSV caption column")
    data.add_argument("--csv-separator", default=",", help="CSV delimiter")
    data.add_argument("--train-num-samples", type=int, default=None,
                      help="samples per epoch (required for wds)")
    data.add_argument("--train-subset", type=int, default=None,
                      help="train on the first N samples only (digits, csv; for quick runs)")
    data.add_argument("--workers", type=int, default=None,
                      help="DataLoader workers per process (default: 0 on the CPU, where the "
                           "model needs the cores, and for digits, which is held in memory; "
                           f"on CUDA {CUDA_WORKERS}, at most the process's share of the cores)")
    data.add_argument("--val-fraction", type=float, default=None,
                      help="hold out this fraction of csv rows, folder images or wds shards as "
                           "validation pairs: their loss and retrieval recall@1/5/10 are "
                           "recorded every epoch, and their loss picks the best checkpoint")
    data.add_argument("--val-zeroshot", metavar="ROOT", default=None,
                      help="a labelled folder (one folder of images per class) whose zero-shot "
                           "accuracy (acc1, acc5, mean per-class recall; the classes' prompts "
                           "from --templates) is recorded every epoch; its acc1 picks the best "
                           "checkpoint")
    data.add_argument("--check-data", action="store_true",
                      help="before training, open every image of a csv or folder dataset and list "
                           "the unreadable ones")
    data.add_argument("--max-unreadable-fraction", type=float, default=0.01,
                      help="unreadable images are skipped with a warning; stop when more than "
                           "this fraction of the image files read in an epoch cannot be read "
                           "(default 0.01)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None, choices=list_models(),
                       help=f"model config (default {DEFAULT_MODEL}, or the config saved in a "
                            "diffattn --pretrained file; with --resume the saved run's)")
    model.add_argument("--pretrained", metavar="FILE", default=None,
                       help="start from these weights (fine-tuning): a diffattn .safetensors "
                            "file, an open_clip state dict or a DiffCLIP release checkpoint "
                            "(the format is detected); with --attention a plain model's weights "
                            "warm-start a differential one")
    model.add_argument("--attention", choices=("diff", "diff2"), default=None,
                       help="make the model's attention differential (diff: DiffCLIP's, diff2: "
                            "Differential Transformer V2) whatever the config or file says; "
                            "the checkpoints record it, so --resume and evaluation need no "
                            "flag")
    model.add_argument("--backend", default="auto", choices=BACKENDS,
                       help="differential attention implementation (auto: triton on CUDA, "
                            "torch on CPU)")
    model.add_argument("--grad-checkpointing", action="store_true",
                       help="recompute block activations in the backward pass")
    model.add_argument("--compile", action="store_true",
                       help="torch.compile the model (the attention compiles without graph "
                            "breaks; see --compile-mode)")
    model.add_argument("--compile-mode", default="default",
                       choices=("default", "reduce-overhead", "max-autotune",
                                "max-autotune-no-cudagraphs"),
                       help="torch.compile mode with --compile (reduce-overhead: CUDA graphs, "
                            "one process only)")
    optim = parser.add_argument_group("optimization")
    optim.add_argument("--epochs", type=int, default=8, help="epochs of the schedule")
    optim.add_argument("--batch-size", type=int, default=16,
                       help="GLOBAL batch: pairs per step over all processes (default 16)")
    optim.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    optim.add_argument("--wd", type=float, default=0.1, help="AdamW weight decay")
    optim.add_argument("--warmup", type=int, default=20, help="linear warm-up steps")
    optim.add_argument("--grad-clip", type=float, default=1.0,
                       help="clip the gradient norm to this value (0: off)")
    run = parser.add_argument_group("run")
    run.add_argument("--out", required=True, help="run directory (metrics and checkpoints)")
    run.add_argument("--resume", action="store_true",
                     help="continue from the checkpoint in --out (start afresh when it holds "
                          "none)")
    run.add_argument("--allow-changed-args", action="store_true",
                     help="with --resume: accept optimisation arguments (lr, batch size, weight "
                          "decay, warm-up, grad clip, seed, data, templates) that differ from "
                          "the saved run's; the learning-rate schedule is recomputed for them")
    run.add_argument("--stop-after-epoch", type=int, default=None,
                     help="end this run after that many completed epochs (the schedule still "
                          "spans --epochs; continue with --resume)")
    run.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                     help="under torchrun: end the job with an error when a collective "
                          "operation waits longer than this for another process (a stalled "
                          f"or dead rank; default {DEFAULT_TIMEOUT_S:g})")
    run.add_argument("--seed", type=int, default=0, help="seed of the initialisation, the data "
                     "order and the validation split's draw")
    run.add_argument("--device", default=None,
                     help="cpu, cuda or cuda:N (default: CUDA if available; under torchrun "
                          "cuda:LOCAL_RANK)")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.out.strip():
        parser.error(f"--out must name the run's directory, got {args.out!r}")
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error(f"--lr must be positive and finite, got {args.lr}")
    if not (args.wd >= 0 and args.grad_clip >= 0 and math.isfinite(args.wd + args.grad_clip)
            and args.warmup >= 0):
        parser.error("--wd, --warmup and --grad-clip must be >= 0 and finite")
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if not 0 <= args.max_unreadable_fraction < 1:
        parser.error(f"--max-unreadable-fraction must be in [0, 1), got "
                     f"{args.max_unreadable_fraction}")
    if args.templates not in TEMPLATE_SETS:
        try:
            read_templates(args.templates)
        except ValueError as error:
            parser.error(str(error))
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if not (args.dist_timeout > 0 and math.isfinite(args.dist_timeout)):
        parser.error(f"--dist-timeout must be a positive number of seconds, got "
                     f"{args.dist_timeout}")
    if args.stop_after_epoch is not None and args.stop_after_epoch < 1:
        parser.error(f"--stop-after-epoch must be >= 1, got {args.stop_after_epoch}")
    if args.compile_mode != "default" and not args.compile:
        parser.error(f"--compile-mode {args.compile_mode} needs --compile")
    if args.compile_mode == "reduce-overhead" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        parser.error("--compile-mode reduce-overhead (CUDA graphs) runs in one process only; "
                     "under torchrun use --compile-mode default")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _set_threads(local_world_size: int) -> None:
    """Share this machine's cores between its processes, unless OMP_NUM_THREADS says how many
    threads to use (torch then already uses that many)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // local_world_size))


def _gather_rng_states(device: torch.device, initialized: bool) -> list:
    """Every rank's RNG states, in rank order."""
    state = capture_rng_state(device)
    if not initialized:
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def _train_step(model, unwrapped, loss_fn, optimizer, scheduler, images, tokens, autocast,
                grad_clip: float) -> torch.Tensor:
    """One optimizer step on this rank's batch; returns the detached loss."""
    with autocast():
        image_features, text_features, logit_scale = model(images, tokens, normalize=True)
    loss = loss_fn(image_features, text_features, logit_scale)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(unwrapped.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    clamp_logit_scale(unwrapped)
    return loss.detach()


def _shown(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _changed_arguments(saved: dict, args: argparse.Namespace) -> list:
    """'--name NEW (the run was saved with OLD)' for every optimisation argument that differs
    from the saved run's (arguments the saved run predates count as their defaults), and for
    an --epochs below the saved one."""
    defaults = build_parser()
    changes = []
    for name in OPTIMISATION_ARGS:
        old, new = saved.get(name, defaults.get_default(name)), getattr(args, name)
        if old != new:
            changes.append(f"--{name.replace('_', '-')} {_shown(new)} (the run was saved with "
                           f"{_shown(old)})")
    if isinstance(saved.get("epochs"), int) and args.epochs < saved["epochs"]:
        changes.append(f"--epochs {args.epochs} (the run was saved with {saved['epochs']}; "
                       "--epochs may grow)")
    return changes


def _check_resume(args: argparse.Namespace, state: dict, is_main: bool) -> None:
    """Refuse (CheckpointError) a resume with nothing left to train, or with changed
    optimisation arguments unless --allow-changed-args."""
    if state["epoch"] >= args.epochs:
        raise CheckpointError(f"--resume: the run in {args.out!r} has completed {state['epoch']} "
                              f"epoch(s) and --epochs is {args.epochs}: nothing is left to train; "
                              "pass a larger --epochs to train it further")
    saved = state["args"] if isinstance(state["args"], dict) else {}
    changes = _changed_arguments(saved, args)
    fixed = [change for change in changes if change.startswith(("--model ", "--attention "))]
    if fixed and args.allow_changed_args:
        raise CheckpointError(
            "--resume continues the model of the checkpoint, which cannot be changed: "
            + "; ".join(fixed) + ". Leave --model and --attention out (the saved values are "
            "used), or start a new run with --pretrained on the run's model.safetensors")
    if changes and not args.allow_changed_args:
        raise CheckpointError(
            "--resume: arguments differ from the saved run's: " + "; ".join(changes)
            + ". Resume with the saved values, or pass --allow-changed-args to continue with "
            "the new ones (the learning-rate schedule is recomputed for them)")
    if changes and is_main:
        print_warning("resuming with changed arguments: " + "; ".join(changes))


def _refuse_new_run_over_a_run(out: str) -> None:
    """A new run (no --resume) refuses a directory whose run saved a checkpoint or metrics."""
    if find_checkpoint(out) is not None or os.path.isfile(os.path.join(out, METRICS_FILE)):
        raise CheckpointError(f"--out {out!r} already holds a run; pass --resume to "
                              "continue it, or choose another directory")


def _refuse_foreign_directory(out: str) -> None:
    """CheckpointError when ``out`` holds files but no run of ours."""
    if holds_run(out):
        return
    foreign = foreign_entries(out)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise CheckpointError(
            f"--out {out!r} holds files that no training run wrote ({shown}): a run starts "
            "only in a new or empty directory, so that it never deletes or overwrites files "
            "of yours; choose another directory")


def _prepare_run_directory(args: argparse.Namespace, is_main: bool,
                           stack: contextlib.ExitStack) -> Optional[Checkpoint]:
    """Create --out, lock it for this run (rank 0, until ``stack`` closes), check that files
    can be written in it, clean what an interrupted save of a run of ours left there (rank 0),
    and return the checkpoint to resume from: None for a new run.

    Raises:
        CheckpointError: --out is a file, holds files that no run of ours wrote, holds a run
            (a new run), or is locked by a live run; a damaged checkpoint.
        RunWriteError: --out cannot be created or written in.
    """
    out = args.out
    if os.path.lexists(out) and not os.path.isdir(out):
        raise CheckpointError(f"--out {out!r} is a file; --out names the run's directory")
    with writing(out):
        os.makedirs(out, exist_ok=True)
    if is_main:
        _refuse_foreign_directory(out)  # before creating the lock file in it
        stack.enter_context(RunLock(out))
        check_writable(out)
        if holds_run(out):
            if not args.resume:  # refused before the cleanup changes anything
                _refuse_new_run_over_a_run(out)
            clean_run_directory(out)
        else:
            _refuse_foreign_directory(out)  # again, holding the lock
            start_run(out)
    checkpoint = find_checkpoint(out)
    if not args.resume:
        _refuse_new_run_over_a_run(out)
        return None
    if checkpoint is None and is_main:
        print(f"--resume: no complete checkpoint in {out!r}, starting a new run", flush=True)
        truncate_metrics(out, 0)
    return checkpoint


def _check_data(args: argparse.Namespace, data: TrainData, is_main: bool) -> set:
    """--check-data: open every image of the CSV file or folder (rank 0), warn of each
    unreadable one, and stop when they are more than --max-unreadable-fraction. Returns their
    paths."""
    if data.csv_paths is None:
        raise DataError("--check-data applies to csv and folder data")
    if not is_main:
        return set()
    unreadable = check_images(data.csv_paths, progress=True)
    for path, reason in unreadable:
        print_warning(f"unreadable image {path}: {reason}")
    fraction = len(unreadable) / len(data.csv_paths)
    print(f"--check-data: {len(unreadable)} of {len(data.csv_paths)} images cannot be read",
          flush=True)
    if fraction > args.max_unreadable_fraction:
        raise DataError(f"--check-data: {len(unreadable)} of {len(data.csv_paths)} images "
                        f"({fraction:.2%}) cannot be read, more than --max-unreadable-fraction "
                        f"{args.max_unreadable_fraction:g}, e.g. "
                        + "; ".join(f"{path} ({reason})" for path, reason in unreadable[:10]))
    return {path for path, _ in unreadable}


def train(args: argparse.Namespace) -> list:
    """Run the training described by ``args`` (from ``build_parser``).

    Returns:
        the metrics records written by this run (rank 0; [] on other ranks).

    Raises:
        DataError, CheckpointError: unusable data, arguments or run directory.
    """
    info = dist_info_from_env()
    device = resolve_device(args.device, info)
    _set_threads(info.local_world_size)
    backend = "torch" if args.backend == "auto" and device.type == "cpu" else args.backend
    with contextlib.ExitStack() as stack:
        checkpoint = _prepare_run_directory(args, info.is_main, stack)
        return _train_in(args, info, device, backend, checkpoint)


def default_workers(device: torch.device, data_spec: str, local_world_size: int = 1) -> int:
    """DataLoader workers per process when --workers is not given: 0 on the CPU (workers
    would take cores from the model: a small CSV run was several times slower with 2 on a
    2-core machine) and for digits (held in memory); on CUDA, CUDA_WORKERS, at most the
    process's share of the cores."""
    if device.type != "cuda" or data_spec == "digits":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(CUDA_WORKERS, (cores or 1) // local_world_size - 1))


def _build_model(args, checkpoint, device, backend, is_main: bool):
    """The model: the checkpoint's when resuming, else --model / --pretrained / --attention
    (a warm start's warning printed as one ``warning:`` line). On a new run, records the model
    as built in ``args`` (the default config's name, the attention), which the checkpoints
    save."""
    if checkpoint is not None:
        return create_model(args.model, checkpoint.model_path, attention=args.attention,
                            device=device, backend=backend)
    if args.model is None and args.pretrained is None:
        args.model = DEFAULT_MODEL
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = create_model(args.model, args.pretrained, attention=args.attention,
                                 device=device, backend=backend)
        except CheckpointError as error:
            if args.model is None and "holds no config" in str(error):
                raise CheckpointError(f"--pretrained: {error} (with --model NAME)") from None
            raise
    for warning in caught:
        if is_main and not issubclass(warning.category, DeprecationWarning):
            print_warning(warning.message)
    args.attention = model.config.attention
    return model


def _data_config(args, workers: int) -> DataConfig:
    return DataConfig(spec=args.data, global_batch_size=args.batch_size, seed=args.seed,
                      workers=workers, train_subset=args.train_subset,
                      train_num_samples=args.train_num_samples, csv_img_key=args.csv_img_key,
                      csv_caption_key=args.csv_caption_key, csv_separator=args.csv_separator,
                      val_fraction=args.val_fraction, templates=tuple(read_templates(
                          args.templates)))


def _train_in(args, info, device, backend, checkpoint) -> list:
    """``train`` once the run directory is prepared (and locked)."""
    state = None
    if checkpoint is not None:
        state = load_training_state(checkpoint.folder)
        saved = state["args"] if isinstance(state["args"], dict) else {}
        for name in MODEL_ARGS:  # not given: the saved run's
            if getattr(args, name) is None and saved.get(name) is not None:
                setattr(args, name, saved[name])
        _check_resume(args, state, info.is_main)

    _seed_everything(args.seed)
    model = _build_model(args, checkpoint, device, backend, info.is_main)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    workers = (args.workers if args.workers is not None
               else default_workers(device, args.data, info.local_world_size))
    data = build_train_data(_data_config(args, workers), info, model.preprocess,
                            model.config.text.context_length, pin_memory=device.type == "cuda")
    zero_shot_folder = None
    if args.val_zeroshot is not None:
        zero_shot_folder = FolderZeroShotTask(read_image_folder(args.val_zeroshot,
                                                                "--val-zeroshot"),
                                              tuple(read_templates(args.templates)))
    reported = _check_data(args, data, info.is_main) if args.check_data else set()

    info = init_distributed(device, timeout_s=args.dist_timeout)
    try:
        return _run(args, info, device, model, data, state,
                    None if checkpoint is None else checkpoint.best, reported,
                    zero_shot_folder, workers)
    except DistributedJobError:
        raise
    except RuntimeError as error:
        if info.initialized and DistributedJobError.describes(error):
            raise DistributedJobError.from_error(error, args.dist_timeout) from None
        raise
    finally:
        cleanup_distributed(info)


def _validation_metric(data: TrainData, zero_shot_folder) -> Optional[tuple]:
    """(record key, higher is better) of the metric that picks the best checkpoint, or None."""
    if data.zero_shot is not None:
        return "zero_shot_top1", True
    if zero_shot_folder is not None:
        return "val_zeroshot_acc1", True
    if data.validation is not None:
        return "val_loss", False
    return None


def _warn_about_the_schedule(args: argparse.Namespace, data: TrainData,
                             total_steps: int) -> None:
    if args.warmup >= total_steps:
        print_warning(f"--warmup {args.warmup} is not below the run's {total_steps} optimizer "
                      f"steps ({args.epochs} epochs of {data.steps_per_epoch}): the learning "
                      f"rate never reaches --lr {args.lr:g}")
    if data.unused_per_epoch:
        available = data.samples_per_epoch + data.unused_per_epoch
        print_warning(f"{data.unused_per_epoch} of {available} samples are left out of every "
                      f"epoch: {available} is not a multiple of the global batch "
                      f"{args.batch_size} (only whole batches are trained on)")


def _weights_are_finite(model: torch.nn.Module) -> bool:
    """True when every parameter of ``model`` is finite (one host synchronisation)."""
    flags = [parameter.isfinite().all() for parameter in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def _stop_if_diverged(bad_step: int, epoch: int, epoch_first_step: int, args, saved_epoch,
                      what: str = "loss") -> None:
    """Raise TrainingDiverged naming ``bad_step`` (global, 1-based) unless it is _NO_BAD_STEP.
    ``saved_epoch``: the epoch of the run's current checkpoint, or None."""
    if bad_step == _NO_BAD_STEP:
        return
    where = (f"at step {bad_step} (epoch {epoch + 1}, its step {bad_step - epoch_first_step + 1})"
             if what == "loss" else f"after step {bad_step} (the last of epoch {epoch + 1})")
    kept = ("no checkpoint had been saved" if saved_epoch is None else
            f"the checkpoint of epoch {saved_epoch}, the last with finite weights, is kept in "
            f"{args.out!r}")
    raise TrainingDiverged(
        f"training diverged: the {what} stopped being finite {where}; nothing of this epoch "
        f"is saved and {kept}. Lower --lr, keep --grad-clip on or lengthen --warmup (then "
        "--resume --allow-changed-args)")


def _summary(args, records: list, best: Optional[dict], seconds: float, stopped: bool) -> str:
    """The closing line of a run."""
    last = records[-1]
    what = [f"loss {last['loss']:.4g}"] + [
        f"{key} {last[key]:.4g}" for key in ("val_loss", "val_image_retrieval_recall@1",
                                             "val_text_retrieval_recall@1", "zero_shot_top1",
                                             "val_zeroshot_acc1") if last.get(key) is not None]
    files = [MODEL_FILE] + ([BEST_MODEL_FILE] if best else []) + [METRICS_FILE]
    if os.path.isfile(os.path.join(args.out, CURVE_FILE)):
        files.append(CURVE_FILE)
    text = (f"finished epochs {records[0]['epoch']}-{last['epoch']} of {args.epochs} in "
            f"{seconds:.1f} s: {', '.join(what)}")
    if best:
        text += f"; best {best['metric']} {best['value']:.4g} at epoch {best['epoch']}"
    text += f"; in {args.out}: {', '.join(files)}"
    if stopped:
        text += "; stopped by --stop-after-epoch, continue with --resume"
    return text


def _run(args, info, device, unwrapped, data, state, best, reported, zero_shot_folder=None,
         workers: int = 0) -> list:
    """The epoch loop (process group joined, model and data built); ``state`` is the loaded
    training state when resuming, else None; ``best`` the manifest's best entry; ``reported``
    the unreadable images --check-data already named; ``zero_shot_folder`` the
    --val-zeroshot task or None; ``workers`` the DataLoader workers of its images."""
    started = time.perf_counter()
    steps_per_epoch = data.steps_per_epoch
    total_steps = steps_per_epoch * args.epochs
    optimizer = create_optimizer(unwrapped, args.lr, args.wd)
    start_epoch, step = 0, 0
    if state is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"--resume: the saved optimizer state does not fit the model "
                                  f"({error})") from None
        set_peak_lr_and_weight_decay(optimizer, args.lr, args.wd)
        start_epoch, step = state["epoch"], state["step"]
        if info.is_main:
            truncate_metrics(args.out, start_epoch)
        if len(state["rng"]) == info.world_size:
            restore_rng_state(state["rng"][info.rank], device)
        elif info.is_main:
            warnings.warn(f"the checkpoint was saved by {len(state['rng'])} process(es), this run "
                          f"has {info.world_size}: RNG states are not restored", stacklevel=2)
    else:
        _seed_everything(args.seed + info.rank)
    # The schedule's position follows the completed epochs, so that changed arguments
    # (--allow-changed-args) get the schedule they imply.
    scheduler = cosine_schedule(optimizer, args.warmup, total_steps,
                                start_step=start_epoch * steps_per_epoch)
    if info.is_main:
        _warn_about_the_schedule(args, data, total_steps)

    model = unwrapped
    if info.initialized:
        model = DistributedDataParallel(unwrapped, device_ids=[device.index]
                                        if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model, mode=None if args.compile_mode == "default"
                              else args.compile_mode)
    autocast = (functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
                if device.type == "cuda" else contextlib.nullcontext)
    loss_fn = ClipLoss()
    unreadable = UnreadableImages(args.max_unreadable_fraction, data.samples_per_epoch,
                                  max_read_attempts=MAX_READ_ATTEMPTS, error=DataError)
    unreadable.warned.update(reported)
    metric = _validation_metric(data, zero_shot_folder)
    records, curve_skipped, stopped = [], False, False
    saved_epoch = start_epoch if state is not None else None
    for epoch in range(start_epoch, args.epochs):
        data.set_epoch(epoch)
        epoch_started = time.perf_counter()
        epoch_first_step = step + 1
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        # The first step of the epoch whose loss is not finite (_NO_BAD_STEP: none), on the
        # device: updating it needs no host synchronisation.
        bad_step = torch.full((), _NO_BAD_STEP, dtype=torch.int64, device=device)
        shown_loss = None  # the loss the progress bar shows, read 10 steps after its step
        shown_bad_step = None  # bad_step as it was then, read at the same time
        # The with block clears the progress bar before an error message is printed.
        with tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}",
                  disable=not info.is_main, dynamic_ncols=True, leave=False) as progress:
            for batch in itertools.islice(data.loader, steps_per_epoch):
                unreadable.add(batch.unreadable, batch.gave_up, epoch + 1)
                lr = optimizer.param_groups[0]["lr"]
                loss = _train_step(model, unwrapped, loss_fn, optimizer, scheduler,
                                   batch.images.to(device, non_blocking=True),
                                   batch.tokens.to(device, non_blocking=True), autocast,
                                   args.grad_clip)
                loss_sum += loss
                step += 1
                bad_step = torch.where(loss.isfinite(), bad_step, bad_step.clamp(max=step))
                progress.update()
                if info.is_main and progress.n % 10 == 0:
                    # Reading a loss waits for its step; reading the one of 10 steps ago does
                    # not stall the queue of steps the GPU has in hand.
                    if shown_loss is not None:
                        progress.set_postfix(loss=f"{shown_loss.item():.3f}", lr=f"{lr:.2e}")
                        if not info.initialized:  # ranks stop together, at the epoch's end
                            _stop_if_diverged(int(shown_bad_step), epoch, epoch_first_step,
                                              args, saved_epoch)
                    shown_loss, shown_bad_step = loss.detach(), bad_step
        if info.initialized:
            dist.all_reduce(bad_step, op=dist.ReduceOp.MIN)
        _stop_if_diverged(int(bad_step), epoch, epoch_first_step, args, saved_epoch)
        if not _weights_are_finite(unwrapped):
            _stop_if_diverged(step, epoch, epoch_first_step, args, saved_epoch, what="weights")
        if info.initialized:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
        seconds = time.perf_counter() - epoch_started
        record = {
            "epoch": epoch + 1,
            "step": step,
            "loss": float(loss_sum) / (steps_per_epoch * info.world_size),
            "lr": lr,
            "samples_per_s": steps_per_epoch * args.batch_size / seconds,
            "epoch_time_s": seconds,
            "logit_scale": unwrapped.logit_scale.exp().item(),
        }
        skipped = unreadable.end_epoch(epoch + 1, info.initialized)
        if skipped:
            record["unreadable_images"] = skipped
        if data.zero_shot is not None:
            record["zero_shot_top1"] = zero_shot_top1(unwrapped, data.zero_shot, info, autocast)
        if data.validation is not None and info.is_main:
            record["val_loss"], recall, val_unreadable = validate_pairs(
                unwrapped, data.validation, autocast)
            record.update((f"val_{key}", value) for key, value in recall.items())
            unreadable.warn(val_unreadable)
        if zero_shot_folder is not None and info.is_main:
            scores = folder_zero_shot(unwrapped, zero_shot_folder, batch_size=args.batch_size,
                                      workers=workers, autocast=autocast,
                                      max_unreadable_fraction=args.max_unreadable_fraction)
            record.update((f"val_zeroshot_{key}", value) for key, value in scores.items())
        rng_states = _gather_rng_states(device, info.initialized)
        if info.is_main:
            append_metrics(args.out, record)
            became_best = save_checkpoint(
                args.out, unwrapped, optimizer, epoch=epoch + 1, step=step,
                rng_states=rng_states, args=vars(args),
                metric=None if metric is None else (metric[0], record[metric[0]], metric[1]))
            saved_epoch = epoch + 1
            if became_best:
                best = {"metric": metric[0], "value": record[metric[0]], "epoch": epoch + 1}
            records.append(record)
            if not save_training_curve(read_metrics(args.out), os.path.join(args.out, CURVE_FILE)):
                if not curve_skipped:
                    print(f"matplotlib is not installed: no {CURVE_FILE} is drawn", flush=True)
                curve_skipped = True
            print(" ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                           for key, value in record.items())
                  + (" (best so far)" if became_best else ""), flush=True)
        if info.initialized:
            dist.barrier()
        if args.stop_after_epoch is not None and epoch + 1 >= args.stop_after_epoch:
            stopped = epoch + 1 < args.epochs
            break
    if info.is_main and records:
        print(_summary(args, records, best, time.perf_counter() - started, stopped), flush=True)
    return records


def main(argv=None) -> int:
    """Command-line entry point; returns 0, or 1 after printing one ``error:`` line for
    unusable data, checkpoints, run directories, files or settings (e.g. an unavailable
    --device); argument errors exit with 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    with _file_size_limit_raises():
        try:
            train(args)
        # DataError and CheckpointError are ValueErrors; RunWriteError is an OSError
        except (ValueError, OSError, TrainingDiverged, DistributedJobError) as error:
            print_error(error)
            return 1
    return 0


@contextlib.contextmanager
def _file_size_limit_raises():
    """Ignore SIGXFSZ while training (in the main thread), so that a write beyond a file-size
    limit (ulimit -f) raises EFBIG, reported with its path, instead of killing the process."""
    if not hasattr(signal, "SIGXFSZ") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGXFSZ, previous)


if __name__ == "__main__":
    sys.exit(main())
