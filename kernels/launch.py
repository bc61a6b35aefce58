"""Kernel launches with Triton's per-call host work done once per specialisation.

``kernel[grid](*args, **constexprs)`` makes Triton bind every argument to the signature,
specialise each one (dtype, 16-byte alignment of pointers, integers equal to 1 or divisible
by 16, 32- or 64-bit), format a cache key and look the compiled kernel up: tens of
microseconds of Python for kernels with as many arguments as these, on every call.
:class:`Launcher` keeps, per kernel, a dictionary from a cheaper key that determines all of
those facts to the compiled kernel Triton chose for them, and calls its launcher directly:

    key = (current device, constexpr values, tensor dtypes, pointer addresses mod 16,
           the integer arguments themselves)

The integers (sizes, strides) are keyed by value, which costs nothing per call; a model
calls with a handful of shapes, so a handful of keys. Past ``MAX_REMEMBERED`` keys per kernel
(a length that grows on every call, say) the dictionary starts over.

The first call of a key (and every call where this shortcut does not apply) goes through
``kernel[grid]`` itself, which compiles if needed and returns the compiled kernel that is then
remembered; so a key maps to exactly the kernel Triton would pick, and the launch receives the
same arguments in the same order. The shortcut uses Triton internals (``compiled.run``,
``packed_metadata``, ``triton.knobs``), so it is on only for the Triton versions it was tested
with (``TESTED_TRITON``) and for eager launches on a GPU: not under the interpreter, not for
launches traced by torch.compile (those go through ``wrap_triton``), not while a Triton
stage-inspection hook is installed, and not with ``DIFFATTN_FAST_LAUNCH=0``.
:func:`launch_path` says which path launches take here, and why.

Launches are by keyword: ``launcher(grid, **arguments)`` with every kernel parameter by name
(and the options ``num_warps`` / ``num_stages``). The shortcut binds the names to the
kernel's parameter order once per key. Python floats are always 32-bit float arguments;
callers pass ``float(x)`` for them.

Tools reach the kernels through :func:`registered_launchers` (every launcher by kernel name) and
:func:`kernels_replaced` (stand-ins that record or skip the launches), not through module
globals.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from .config import INTERPRET

ENABLED = os.environ.get("DIFFATTN_FAST_LAUNCH", "1") != "0"
# [lowest, past highest) Triton (major, minor) versions the shortcut was checked against
# (tests/ops/test_launch.py): 3.6 on the GPU image, 3.9 in CI.
TESTED_TRITON = ((3, 4), (3, 10))

try:  # triton >= 3.4: launch hooks live in triton.knobs
    from triton import knobs as _knobs
except ImportError:  # older triton: every launch goes through kernel[grid]
    _knobs = None

# Keys remembered per kernel before the dictionary starts over.
MAX_REMEMBERED = 4096
# Every Launcher by its kernel's name (diff_attn_fwd_kernel, ...).
LAUNCHERS: Dict[str, "Launcher"] = {}


def _triton_version() -> Tuple[int, int]:
    import triton
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def shortcut_unavailable_reason() -> Optional[str]:
    """Why eager launches go through Triton's own ``kernel[grid]`` path here, or None when
    they take the shortcut (per-call hooks and torch.compile's traced launches aside)."""
    if not ENABLED:
        return "DIFFATTN_FAST_LAUNCH=0"
    if INTERPRET:
        return "TRITON_INTERPRET=1 (the interpreter launches every call)"
    version = _triton_version()
    lowest, past = TESTED_TRITON
    if not lowest <= version < past or _knobs is None:
        return (f"triton {'.'.join(map(str, version))} is outside the versions the shortcut "
                f"was tested with ({lowest[0]}.{lowest[1]} <= version < {past[0]}.{past[1]})")
    return None


def launch_path() -> str:
    """"shortcut" or "triton (<reason>)": how eager kernel launches are made here."""
    reason = shortcut_unavailable_reason()
    return "shortcut" if reason is None else f"triton ({reason})"


def _fact(value):
    """What of an argument decides Triton's specialisation: a tensor's dtype and pointer
    alignment, an integer's value, a tuple's elements' facts, the type of anything else
    (floats are always fp32)."""
    if isinstance(value, int):
        return value
    if isinstance(value, tuple):  # the score hook's arguments (kernels/score.py)
        return tuple([_fact(v) for v in value])
    data_ptr = getattr(value, "data_ptr", None)
    if data_ptr is not None:
        return value.dtype, data_ptr() & 15
    return value if isinstance(value, (str, type(None))) else type(value)


class Launcher:
    """Launches one ``@triton.jit`` kernel: ``launcher(grid, **arguments)`` is
    ``kernel[grid](**arguments)``, every parameter by name (tensors never None, integers
    Python ints >= 0, floats Python floats, compile-time constants and num_warps /
    num_stages), built in the same key order on every call. ``wrap`` (torch.library's
    ``wrap_triton`` while torch.compile traces) launches ``wrap(kernel)[grid](...)`` instead.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled: Dict[tuple, Tuple[Any, tuple, tuple]] = {}
        fn = getattr(kernel, "fn", kernel)
        params = list(inspect.signature(fn).parameters.values())
        constant = ["constexpr" in str(p.annotation) for p in params]
        first = constant.index(True) if True in constant else len(params)
        # the runtime parameters come first, then the constants, in signature order
        self.runtime_names = [p.name for p in params[:first]]
        self.constexpr_names = [p.name for p in params[first:]]
        self.defaults = {p.name: p.default for p in params[first:]
                         if p.default is not inspect.Parameter.empty}
        self.fast = shortcut_unavailable_reason() is None and all(constant[first:])
        self._device: Optional[Callable[[], int]] = None
        self._stream: Optional[Callable[[int], int]] = None
        LAUNCHERS[fn.__name__] = self

    def __call__(self, grid: Tuple[int, ...], wrap=None, **arguments) -> None:
        if wrap is not None or not self.fast or \
                getattr(_knobs.runtime, "add_stages_inspection_hook", None) is not None:
            kernel = self.kernel if wrap is None else wrap(self.kernel)
            kernel[grid](**arguments)
            return
        if self._device is None:
            from triton.runtime import driver
            self._device = driver.active.get_current_device
            self._stream = driver.active.get_current_stream
        device = self._device()
        values = tuple(arguments.values())
        key = (device, tuple(arguments), tuple([_fact(v) for v in values]))
        entry = self.compiled.get(key)
        if entry is None:
            if len(self.compiled) >= MAX_REMEMBERED:  # e.g. a length that grows every call
                self.compiled.clear()
            self._launch_and_remember(key, grid, arguments)
            return
        compiled, order, constants = entry
        args = (*[values[i] for i in order], *constants)
        stream = self._stream(device)
        runtime = _knobs.runtime
        n = len(grid)
        compiled.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream,
                     compiled.function, compiled.packed_metadata,
                     compiled.launch_metadata(grid, stream, *args),
                     runtime.launch_enter_hook, runtime.launch_exit_hook, *args)

    def _launch_and_remember(self, key, grid, arguments) -> None:
        compiled = self.kernel[grid](**arguments)
        if all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata",
                                                     "launch_metadata")):
            names = list(arguments)
            order = tuple(names.index(name) for name in self.runtime_names)
            constants = tuple(arguments[name] if name in arguments else self.defaults[name]
                              for name in self.constexpr_names)
            self.compiled[key] = (compiled, order, constants)

    @contextlib.contextmanager
    def replaced(self, kernel, *, fast: bool) -> Iterator[None]:
        """Inside the block, launch ``kernel`` instead: a stand-in whose ``kernel[grid](...)``
        records or skips the launch (and may return a compiled-kernel stand-in to remember).
        fast=True takes the shortcut after a key's first call, with device 0 and stream 0 (no
        driver needed); fast=False sends every call to the stand-in. For tools that record
        launches or measure the host side without a GPU; everything is restored on exit."""
        saved = (self.kernel, self.compiled, self.fast, self._device, self._stream)
        self.kernel, self.compiled = kernel, {}
        self.fast = fast and _knobs is not None
        self._device, self._stream = (lambda: 0), (lambda device: 0)
        try:
            yield
        finally:
            self.kernel, self.compiled, self.fast, self._device, self._stream = saved


def registered_launchers() -> Dict[str, "Launcher"]:
    """:data:`LAUNCHERS` with every kernel module imported (a launcher registers itself when
    its module is imported): {kernel name: Launcher}; ``launcher.kernel`` is the
    ``@triton.jit`` kernel (outside :meth:`Launcher.replaced`)."""
    import importlib
    for module in ("diff_attn_fwd", "diff_attn_bwd", "diff_attn_decode"):
        importlib.import_module(f"{__package__}.{module}")
    return LAUNCHERS


@contextlib.contextmanager
def kernels_replaced(stand_ins: Dict[str, Any], *, fast: bool) -> Iterator[None]:
    """``Launcher.replaced`` for several kernels at once, by kernel name (keys of
    :func:`registered_launchers`). An unknown name is a KeyError naming the known ones."""
    registered_launchers()
    unknown = [name for name in stand_ins if name not in LAUNCHERS]
    if unknown:
        raise KeyError(f"no launcher for {unknown}; known kernels: {sorted(LAUNCHERS)}")
    with contextlib.ExitStack() as stack:
        for name, stand_in in stand_ins.items():
            stack.enter_context(LAUNCHERS[name].replaced(stand_in, fast=fast))
        yield
