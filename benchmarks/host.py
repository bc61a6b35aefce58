"""Host level: what one tiny call costs the host (Python, autograd, tile choice, allocations,
launches), measured as the wall time per call of a back-to-back loop.

The problem is :data:`HOST_SHAPE` (batch 1, seq_len 16, one differential head, head_dim 64):
the device's own work is negligible, so on a GPU the loop runs at the pace of the host.

Providers:
    diffattn, diffattn_v2       the fused ops (``backend="triton"``) on the benchmark device.
    sdpa_x2, flash_v2           their unfused baselines (benchmarks/providers.py).
    diffattn_no_launch, diffattn_v2_no_launch
                                the fused ops on CPU tensors with the Triton kernels replaced
                                by no-ops (:func:`kernels_not_launched`): everything the
                                library does on the host around the kernels runs for real
                                (argument checks, autograd, output allocations, tile choice,
                                the launch shortcut's key), the launches do not. Their rows
                                carry the device :data:`NO_LAUNCH_DEVICE`, on any machine.
                                They leave out the compiled launcher's own cost (packing the
                                arguments, the driver call), which only a GPU shows.

Modes: ``fwd`` (forward under ``torch.no_grad``) and ``fwd_bwd`` (forward with autograd, then
``torch.autograd.grad`` of a fixed output gradient into every input, lambda included).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

from providers import Shape, op_forward

HOST_SHAPE = Shape("host_tiny", 1, 16, 1, 64, False)
HOST_MODES = ("fwd", "fwd_bwd")
HOST_PROVIDERS = ("diffattn", "sdpa_x2", "diffattn_v2", "flash_v2")
NO_LAUNCH_PROVIDERS: Dict[str, str] = {"diffattn_no_launch": "diffattn",
                                       "diffattn_v2_no_launch": "diffattn_v2"}
NO_LAUNCH_DEVICE = "cpu (kernels not launched)"
# A GPU architecture name with no entry in kernels/tuned_configs.json: tile choice takes the
# path of an untuned GPU (first candidate, remembered per key).
NO_LAUNCH_ARCH = "sm_no_launch"
# every kernel the fused ops launch, by name (kernels/launch.py: registered_launchers)
KERNEL_NAMES = ("diff_attn_fwd_kernel", "diff_attn_bwd_rows_kernel", "diff_attn_bwd_kernel")


class NoLaunchKernel:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` does nothing,
    counts the launch and returns a compiled-kernel stand-in whose launches do nothing and
    count too (the launchers remember it and call it directly, as they would a compiled
    kernel, so their own per-call work is measured)."""

    def __init__(self, name: str):
        self.name = name
        self.launches = 0
        self.function = self.packed_metadata = None

    def __getitem__(self, grid) -> Callable[..., "NoLaunchKernel"]:
        def launch(*args, **kwargs) -> "NoLaunchKernel":
            self.launches += 1
            return self
        return launch

    def run(self, *args) -> None:
        self.launches += 1

    def launch_metadata(self, grid, stream, *args) -> None:
        return None


@contextlib.contextmanager
def kernels_not_launched() -> Iterator[Dict[str, NoLaunchKernel]]:
    """Run the fused ops on CPU tensors with every kernel launch a no-op.

    Inside the block: each kernel's launcher (kernels/launch.py) launches a
    :class:`NoLaunchKernel` instead, taking its shortcut after a key's first call as on a GPU;
    ``backend="triton"`` is allowed on CPU tensors;
    tile choice runs as on a GPU with no tuned-table entry and autotuning off (the first call
    of a key picks the first candidate, later calls are a dictionary hit); the interpreter's
    bf16 detour is off, as on a GPU. Everything is restored on exit, the tile choices made
    inside included. Yields {kernel name: its NoLaunchKernel}.
    """
    from diffattn.backend import fused_path_on_cpu
    from diffattn.kernels.launch import kernels_replaced
    from diffattn.kernels.tuning import untuned_tile_choice
    stubs = {name: NoLaunchKernel(name) for name in KERNEL_NAMES}
    with contextlib.ExitStack() as stack:
        stack.enter_context(kernels_replaced(stubs, fast=True))
        stack.enter_context(untuned_tile_choice(NO_LAUNCH_ARCH))
        stack.enter_context(fused_path_on_cpu())
        yield stubs


def host_call(provider: str, mode: str, dtype: torch.dtype,
              device: torch.device) -> Tuple[Callable[[], object], bool]:
    """(one call of ``provider`` in ``mode`` on HOST_SHAPE, whether it runs without grad).

    A ``*_no_launch`` provider builds CPU tensors and must be called inside
    :func:`kernels_not_launched`.
    """
    if mode not in HOST_MODES:
        raise ValueError(f"mode must be one of {HOST_MODES}, got {mode!r}")
    op = NO_LAUNCH_PROVIDERS.get(provider, provider)
    if op not in HOST_PROVIDERS:
        raise ValueError(f"unknown host-level provider {provider!r}; expected one of "
                         f"{HOST_PROVIDERS + tuple(NO_LAUNCH_PROVIDERS)}")
    if provider in NO_LAUNCH_PROVIDERS:
        device = torch.device("cpu")
    forward, leaves, _ = op_forward(op, HOST_SHAPE, dtype, device)
    if mode == "fwd":
        return forward, True
    grad = torch.randn_like(forward())

    def fwd_bwd():
        return torch.autograd.grad(forward(), leaves, grad)
    return fwd_bwd, False


def host_device_label(provider: str, device_name: str) -> str:
    """The CSV device of a host-level row."""
    return NO_LAUNCH_DEVICE if provider in NO_LAUNCH_PROVIDERS else device_name


def host_context(provider: str):
    """The context a host-level provider runs in: kernels_not_launched() for the
    ``*_no_launch`` providers, nothing for the others."""
    return kernels_not_launched() if provider in NO_LAUNCH_PROVIDERS else contextlib.nullcontext()


def run_host_case(provider: str, mode: str, dtype: torch.dtype, device: torch.device,
                  timer: Callable, peak: Optional[Callable] = None) -> tuple:
    """([p50, p20, p80] ms per call, peak MiB or NaN) of one host-level provider and mode.

    timer(call, device) -> [p50, p20, p80] (e.g. timing.time_back_to_back with its counts
    bound); peak(call) -> MiB, used for CUDA providers only.
    """
    with host_context(provider):
        call, no_grad = host_call(provider, mode, dtype, device)
        run_device = torch.device("cpu") if provider in NO_LAUNCH_PROVIDERS else device
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            times = timer(call, run_device)
            mem = peak(call) if peak is not None and run_device.type == "cuda" else float("nan")
    return times, mem
