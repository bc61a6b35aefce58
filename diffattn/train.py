"""Contrastive training of CLIP / DiffCLIP, in one process or many (torchrun + DDP).

    python -m diffattn.train --data digits --model DiffCLIP-Tiny --epochs 8 --out runs/digits
    torchrun --standalone --nproc_per_node 2 -m diffattn.train \\
        --data digits --model DiffCLIP-Tiny --epochs 8 --out runs/digits

Under torchrun (WORLD_SIZE set) each process joins the process group (NCCL on CUDA, gloo on
CPU) and trains a DistributedDataParallel replica on ``--batch-size / world_size`` pairs per
step; the contrastive loss uses the features of every rank (``diffattn.training.loss``).
After every epoch rank 0 appends a line to ``OUT/metrics.jsonl`` and writes the checkpoint
(``OUT/model.safetensors`` + ``OUT/train_state.pt``); ``--resume`` continues from it.

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
import os
import random
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import BACKENDS
from .models import create_model, list_models
from .training.checkpointing import (MODEL_FILE, CheckpointError, capture_rng_state,
                                     has_checkpoint, load_training_state, restore_rng_state,
                                     save_checkpoint)
from .training.data import DataConfig, DataError, build_train_data
from .training.distributed import (cleanup_distributed, dist_info_from_env, init_distributed,
                                   resolve_device)
from .training.evaluate import zero_shot_top1
from .training.loss import ClipLoss
from .training.metrics import METRICS_FILE, append_metrics, truncate_metrics
from .training.optim import clamp_logit_scale, cosine_schedule, create_optimizer


def build_parser() -> argparse.ArgumentParser:
    """The command line's argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m diffattn.train",
        description="Contrastive (CLIP) training of CLIP / DiffCLIP models; run it under "
                    "torchrun for several processes.")
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True,
                      help="'digits' (scikit-learn's handwritten digits), 'csv:FILE' or "
                           "'wds:PATTERN' (WebDataset shards, brace patterns)")
    data.add_argument("--csv-img-key", default="filepath", help="CSV image-path column")
    data.add_argument("--csv-caption-key", default="caption", help="CSV caption column")
    data.add_argument("--csv-separator", default=",", help="CSV delimiter")
    data.add_argument("--train-num-samples", type=int, default=None,
                      help="samples per epoch (required for wds)")
    data.add_argument("--train-subset", type=int, default=None,
                      help="train on the first N samples only (digits, csv; for quick runs)")
    data.add_argument("--workers", type=int, default=None,
                      help="DataLoader workers per process (default: 0 for digits, which is "
                           "held in memory; else 2)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="DiffCLIP-Tiny", choices=list_models(),
                       help="model config (default DiffCLIP-Tiny)")
    model.add_argument("--backend", default="auto", choices=BACKENDS,
                       help="differential attention implementation (auto: triton on CUDA, "
                            "torch on CPU)")
    model.add_argument("--grad-checkpointing", action="store_true",
                       help="recompute block activations in the backward pass")
    model.add_argument("--compile", action="store_true", help="torch.compile the model")
    optim = parser.add_argument_group("optimization")
    optim.add_argument("--epochs", type=int, default=8)
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
                     help="continue from the checkpoint in --out")
    run.add_argument("--stop-after-epoch", type=int, default=None,
                     help="end this run after that many completed epochs (the schedule still "
                          "spans --epochs; continue with --resume)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default=None,
                     help="cpu, cuda or cuda:N (default: CUDA if available; under torchrun "
                          "cuda:LOCAL_RANK)")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if args.wd < 0 or args.warmup < 0 or args.grad_clip < 0:
        parser.error("--wd, --warmup and --grad-clip must be >= 0")
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if args.stop_after_epoch is not None and args.stop_after_epoch < 1:
        parser.error(f"--stop-after-epoch must be >= 1, got {args.stop_after_epoch}")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _set_threads(local_world_size: int) -> None:
    """Share this machine's cores between its processes."""
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


def train(args: argparse.Namespace) -> list:
    """Run the training described by ``args`` (from ``build_parser``).

    Returns:
        the metrics records written by this run (rank 0; [] on other ranks).

    Raises:
        DataError, CheckpointError: unusable data or run directory.
    """
    info = dist_info_from_env()
    device = resolve_device(args.device, info)
    _set_threads(info.local_world_size)
    backend = "torch" if args.backend == "auto" and device.type == "cpu" else args.backend
    os.makedirs(args.out, exist_ok=True)
    state = load_training_state(args.out) if args.resume else None
    if state is None and (has_checkpoint(args.out)
                          or os.path.isfile(os.path.join(args.out, METRICS_FILE))):
        raise CheckpointError(f"--out {args.out!r} already holds a run; pass --resume to "
                              "continue it, or choose another directory")

    _seed_everything(args.seed)
    pretrained = os.path.join(args.out, MODEL_FILE) if args.resume else None
    try:
        model = create_model(args.model, pretrained, device=device, backend=backend)
    except ValueError as error:  # only a checkpoint can fail here: --model is a known name
        raise CheckpointError(f"--resume: {error}") from None
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    workers = args.workers if args.workers is not None else (0 if args.data == "digits" else 2)
    data = build_train_data(
        DataConfig(spec=args.data, global_batch_size=args.batch_size, seed=args.seed,
                   workers=workers, train_subset=args.train_subset,
                   train_num_samples=args.train_num_samples, csv_img_key=args.csv_img_key,
                   csv_caption_key=args.csv_caption_key, csv_separator=args.csv_separator),
        info, model.preprocess, model.config.text.context_length,
        pin_memory=device.type == "cuda")

    info = init_distributed(device)
    try:
        return _run(args, info, device, model, data, state)
    finally:
        cleanup_distributed(info)


def _run(args, info, device, unwrapped, data, state) -> list:
    """The epoch loop (process group joined, model and data built); ``state`` is the loaded
    training state when resuming, else None."""
    steps_per_epoch = data.steps_per_epoch
    total_steps = steps_per_epoch * args.epochs
    optimizer = create_optimizer(unwrapped, args.lr, args.wd)
    scheduler = cosine_schedule(optimizer, args.warmup, total_steps)
    start_epoch, step = 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
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

    model = unwrapped
    if info.initialized:
        model = DistributedDataParallel(unwrapped, device_ids=[device.index]
                                        if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    autocast = (functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
                if device.type == "cuda" else contextlib.nullcontext)
    loss_fn = ClipLoss()
    records = []
    for epoch in range(start_epoch, args.epochs):
        data.set_epoch(epoch)
        started = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        progress = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}",
                        disable=not info.is_main, dynamic_ncols=True, leave=False)
        for images, tokens in itertools.islice(data.loader, steps_per_epoch):
            lr = optimizer.param_groups[0]["lr"]
            loss = _train_step(model, unwrapped, loss_fn, optimizer, scheduler,
                               images.to(device, non_blocking=True),
                               tokens.to(device, non_blocking=True), autocast, args.grad_clip)
            loss_sum += loss
            step += 1
            progress.update()
            if info.is_main and progress.n % 10 == 0:
                progress.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
        progress.close()
        if info.initialized:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
        seconds = time.perf_counter() - started
        record = {
            "epoch": epoch + 1,
            "step": step,
            "loss": float(loss_sum) / (steps_per_epoch * info.world_size),
            "lr": lr,
            "samples_per_s": steps_per_epoch * args.batch_size / seconds,
            "epoch_time_s": seconds,
            "logit_scale": unwrapped.logit_scale.exp().item(),
        }
        if data.zero_shot is not None:
            record["zero_shot_top1"] = zero_shot_top1(unwrapped, data.zero_shot, info, autocast)
        rng_states = _gather_rng_states(device, info.initialized)
        if info.is_main:
            append_metrics(args.out, record)
            save_checkpoint(args.out, unwrapped, optimizer, scheduler, epoch=epoch + 1,
                            step=step, rng_states=rng_states, args=vars(args))
            records.append(record)
            print(" ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                           for key, value in record.items()), flush=True)
        if info.initialized:
            dist.barrier()
        if args.stop_after_epoch is not None and epoch + 1 >= args.stop_after_epoch:
            break
    return records


def main(argv=None) -> int:
    """Command-line entry point; returns 0, or exits with a message on unusable inputs."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        train(args)
    except (DataError, CheckpointError) as error:
        raise SystemExit(f"diffattn-train: error: {error}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
