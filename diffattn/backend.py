"""Which implementation runs: ``"triton"`` (the fused kernels), ``"torch"`` (two SDPA calls) or
``"auto"`` (triton where it can run, else torch).

The fused kernels run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set
before diffattn was imported. Asking for ``"triton"`` where it cannot run raises; ``"auto"``
falls back to torch with one warning per reason, so the backend in use is never a secret.

The warning is a ``BackendFallbackWarning`` (filter it by that category), printed once per
process and reason, and attributed to the first caller outside diffattn, torch and timm: it
names the user's own line, never a line of library source (under diffattn's own command lines,
the program, without a source line).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .user_warnings import warn_at_user_code

BACKENDS = ("auto", "triton", "torch")

from .kernels import INTERPRET, MAX_HEAD_DIM
from .kernels import TRITON_IMPORT_ERROR as _TRITON_IMPORT_ERROR

_warned: set = set()


class BackendFallbackWarning(UserWarning):
    """diffattn ran another implementation than the fused kernels (the reason is in the text)."""


def warn_once(reason: str, message: str) -> None:
    """Issue ``message`` as a BackendFallbackWarning, the first time ``reason`` comes up in
    this process only, attributed to the user's code (see diffattn.user_warnings)."""
    if reason in _warned:
        return
    _warned.add(reason)
    warn_at_user_code(message, BackendFallbackWarning)


def check_backend_name(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def triton_unavailable_reason(device: torch.device, dtype: torch.dtype, head_dim: int,
                              features: tuple = ()) -> str | None:
    """Why the fused kernels cannot run this call, or None when they can.

    features: names of requested features the kernels lack (e.g. "dropout"), each a reason.
    """
    if _TRITON_IMPORT_ERROR is not None:
        return f"triton could not be imported ({_TRITON_IMPORT_ERROR})"
    if device.type == "cuda":
        if INTERPRET:
            return "TRITON_INTERPRET=1 is set, so the kernels only run on CPU tensors"
        if dtype == torch.float64:
            return "float64 is supported by the fused kernels only under TRITON_INTERPRET=1"
    elif device.type == "cpu":
        if not INTERPRET:
            return ("the fused kernels need a CUDA device (or TRITON_INTERPRET=1 set before "
                    "importing diffattn, to run them on CPU through the Triton interpreter)")
    else:
        return f"the fused kernels do not run on {device.type} tensors"
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} is above the fused kernels' maximum of {MAX_HEAD_DIM}"
    if features:
        return f"the fused kernels do not support {', '.join(features)}"
    return None


def unsupported_features(dropout_p: float = 0.0, attn_mask=None) -> tuple:
    """The requested features the fused kernels lack, as names for resolve_backend."""
    return ("dropout",) * (dropout_p > 0) + ("attn_mask",) * (attn_mask is not None)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                    features: tuple = ()) -> str:
    """Return "triton" or "torch" for this call; raise if "triton" was asked for and cannot run."""
    check_backend_name(backend)
    if backend == "torch":
        return "torch"
    reason = triton_unavailable_reason(device, dtype, head_dim, features)
    if reason is None:
        return "triton"
    if backend == "triton":
        raise RuntimeError(f"backend='triton' cannot run here: {reason}. "
                           "Use backend='torch' (or 'auto') for the PyTorch path.")
    warn_once(reason, f"diffattn: using the torch backend because {reason}.")
    return "torch"


def resolve_layer_backend(layer, device: torch.device, dtype: torch.dtype, head_dim: int,
                          features: tuple = ()) -> str:
    """resolve_backend for a layer's forward with the layer's ``backend``; the answer is kept
    in ``layer.last_backend``, written only when it changes (nn.Module.__setattr__ is costly
    on every call of a per-layer hot path)."""
    backend = resolve_backend(layer.backend, device, dtype, head_dim, features)
    if backend != layer.last_backend:
        layer.last_backend = backend
    return backend


@contextlib.contextmanager
def fused_path_on_cpu() -> Iterator[None]:
    """Inside the block, calls on CPU tensors take the fused path as they would on a GPU, with
    no interpreter involved: ``backend="triton"`` is accepted for them, bf16 inputs are not
    widened to fp32 and tile choice runs as for compiled kernels. Only for tools that replace
    every kernel by a stand-in (``diffattn.kernels.launch.kernels_replaced``) to measure the
    host's own work; a real launch on CPU tensors inside would fail. Restored on exit."""
    import importlib
    autograd = importlib.import_module("diffattn.autograd")
    tuning = importlib.import_module("diffattn.kernels.tuning")
    module = importlib.import_module(__name__)
    real_reason = module.triton_unavailable_reason

    def allowed_on_cpu(device, dtype, head_dim, features=()):
        if device.type != "cpu":
            return real_reason(device, dtype, head_dim, features)
        if features:
            return f"the fused kernels do not support {', '.join(features)}"
        return None

    patches = [(module, "triton_unavailable_reason", allowed_on_cpu),
               (tuning, "INTERPRET", False), (autograd, "INTERPRET", False)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
