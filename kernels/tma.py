"""Whether the forward reads its key and value tiles through tensor descriptors (TMA).

Hopper GPUs (sm_90) and newer copy tiles from global to shared memory with the tensor memory
accelerator: one instruction per tile instead of per-thread address arithmetic and masks
(rows past the end read as zero). The forward kernel does so with ``USE_TMA``, through
descriptors it creates on the device for its key/value group (``tl.make_tensor_descriptor``);
the backward and every other GPU keep the pointer loads.

Off unless ``DIFFATTN_TMA=1``: whether it pays has not been measured yet (benchmarks run the
same shapes with and without it). With the switch on it is used where all of these hold:

- the installed triton has ``tl.make_tensor_descriptor`` (3.4 and newer);
- the tensors are on a GPU of compute capability 9.0 or higher (or on the CPU under
  ``TRITON_INTERPRET=1``, which runs the same kernel code);
- TMA's alignment rule: the address of every (batch, head) tile origin and the row stride
  of K and V are multiples of 16 bytes;
- the head widths of K and V are powers of two (tiles as wide as the rows).

Descriptors made on the device take a small scratch allocation per launch: the first use in
a thread installs an allocator that takes it from PyTorch's caching allocator, unless a
Triton allocator is already set there.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator

import torch
import triton.language as tl

from .config import INTERPRET

ENABLED = os.environ.get("DIFFATTN_TMA", "0") == "1"
AVAILABLE = hasattr(tl, "make_tensor_descriptor")

_capable: Dict[int, bool] = {}
_everywhere = False


@contextlib.contextmanager
def tma_loads_wherever_they_fit() -> Iterator[None]:
    """Inside the block the forward takes TMA loads wherever the tensors allow them
    (:func:`fits`), on any device and whatever ``DIFFATTN_TMA`` says: the launches a Hopper
    GPU makes with ``DIFFATTN_TMA=1``, for tools that record launches without one."""
    global _everywhere
    saved, _everywhere = _everywhere, True
    try:
        yield
    finally:
        _everywhere = saved


def tma_loads(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the forward should read k (B, M, *, d) and v (B, M, Hk, DV) with TMA."""
    if _everywhere:
        return AVAILABLE and fits(k) and fits(v)
    if not (ENABLED and AVAILABLE) or not (fits(k) and fits(v)):
        return False
    if k.device.type != "cuda":
        return INTERPRET
    index = k.device.index if k.device.index is not None else torch.cuda.current_device()
    capable = _capable.get(index)
    if capable is None:
        capable = _capable[index] = torch.cuda.get_device_capability(index)[0] >= 9
    if capable:
        _install_allocator()
    return capable


def fits(t: torch.Tensor) -> bool:
    """A (B, M, heads, width) tensor TMA can read: base address and batch, row and head
    strides multiples of 16 bytes (the last dimension is contiguous), width a power of two of
    at least 16."""
    size, width = t.element_size(), t.shape[-1]
    return (width >= 16 and width & (width - 1) == 0 and t.data_ptr() % 16 == 0
            and all(s * size % 16 == 0 for s in t.stride()[:3]))


def _torch_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _install_allocator() -> None:
    import triton
    from triton.runtime import _allocation
    current = getattr(_allocation, "_allocator", None)
    null = getattr(_allocation, "NullAllocator", None)
    if current is not None and null is not None and not isinstance(current.get(), null):
        return  # the caller's allocator stays
    triton.set_allocator(_torch_scratch)
