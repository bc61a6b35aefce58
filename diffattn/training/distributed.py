"""Process-group setup from torchrun's environment, and an all-gather that carries gradients.

``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and the rendezvous address in
the environment. When WORLD_SIZE is set, ``init_distributed`` joins the process group (NCCL for
CUDA devices, gloo for CPU); without it the run is one process and no group is created.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import re
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..user_messages import parse_device


# Seconds a collective operation may wait for the other processes (--dist-timeout).
DEFAULT_TIMEOUT_S = 300.0


class DistributedJobError(RuntimeError):
    """A collective operation failed: another process stalled past the timeout, or died."""

    # What gloo's and NCCL's errors say when a peer stalls or is gone (gloo raises plain
    # RuntimeErrors).
    _PEER_FAILURES = ("timed out", "timeout", "connection closed", "connection reset",
                      "broken pipe", "connection refused")

    @classmethod
    def describes(cls, error: BaseException) -> bool:
        """True for an error of a collective operation whose peer stalled or is gone."""
        text = str(error).lower()
        return isinstance(error, dist.DistError) or any(part in text
                                                        for part in cls._PEER_FAILURES)

    @classmethod
    def from_error(cls, error: BaseException, timeout_s: float) -> "DistributedJobError":
        lines = str(error).strip().splitlines()
        detail = lines[0] if lines else type(error).__name__
        detail = re.sub(r"^\[[^\]]*\] *", "", detail)  # the C++ source position
        if "timed out" in str(error).lower() or "timeout" in str(error).lower():
            return cls(f"another process of the job did not respond within --dist-timeout "
                       f"{timeout_s:g} s (stalled or dead): {detail}")
        return cls(f"a collective operation failed (another process of the job ended?): "
                   f"{detail}")


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job.

    Attributes:
        rank, world_size: global rank and number of processes.
        local_rank, local_world_size: the same within this machine.
        initialized: True when a torch.distributed process group was created.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that logs, evaluates and writes files."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def dist_info_from_env() -> DistInfo:
    """The job layout torchrun describes in the environment (one process when WORLD_SIZE is
    unset). Creates no process group: ``initialized`` is False."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad torch.distributed environment: RANK={rank}, WORLD_SIZE={world_size}")
    return DistInfo(rank, world_size, local_rank, local_world_size, initialized=False)


def resolve_device(requested: Optional[str], info: DistInfo) -> torch.device:
    """The device of this process: ``requested`` (e.g. "cpu", "cuda", "cuda:1") or, when None,
    CUDA if available else the CPU. A bare "cuda" becomes "cuda:LOCAL_RANK". ValueError
    (naming --device) for a name that is no device or one this machine lacks."""
    name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    device = parse_device(name)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    return device


def init_distributed(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Join the process group when WORLD_SIZE is set (NCCL on CUDA, gloo otherwise, addresses
    from the environment); otherwise return the single-process layout. A collective operation
    (and the rendezvous) that waits more than ``timeout_s`` seconds for another process fails
    (NCCL's watchdog then ends the process)."""
    info = dist_info_from_env()
    if "WORLD_SIZE" not in os.environ:
        return info
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend=backend, init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    except dist.DistError as error:
        raise DistributedJobError.from_error(error, timeout_s) from None
    return dataclasses.replace(info, rank=dist.get_rank(), world_size=dist.get_world_size(),
                               initialized=True)


def cleanup_distributed(info: DistInfo) -> None:
    """Leave the process group, if one was joined."""
    if info.initialized and dist.is_initialized():
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns this rank's slice of the gradient summed
    over all ranks (each rank's loss depends on every rank's rows)."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        world_size = dist.get_world_size()
        ctx.rank, ctx.world_size = dist.get_rank(), world_size
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.chunk(ctx.world_size)[ctx.rank]


def gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` (n, ...) from every rank in rank order -> (world_size * n, ...),
    differentiable: gradients flow back to the rank that produced each row. Every rank must
    pass the same shape. Without a process group (or with one process) returns ``tensor``."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)
