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
same arguments in the same order. The shortcut is used for eager launches on a GPU with
triton >= 3.4 (``triton.knobs``); not under the interpreter, not for launches traced by
torch.compile (those go through ``wrap_triton``), not while a Triton stage-inspection hook is
installed, and not with ``DIFFATTN_FAST_LAUNCH=0``.

Arguments come in the order of the kernels' signatures: pointers, then integers, then floats,
then the compile-time constants (``tl.constexpr``) and the options ``num_warps`` /
``num_stages`` by keyword. Python floats are always 32-bit float arguments; callers pass
``float(x)`` for them.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

from .config import INTERPRET

ENABLED = os.environ.get("DIFFATTN_FAST_LAUNCH", "1") != "0"

try:  # triton >= 3.4: launch hooks live in triton.knobs
    from triton import knobs as _knobs
except ImportError:  # older triton: every launch goes through kernel[grid]
    _knobs = None

# Keys remembered per kernel before the dictionary starts over.
MAX_REMEMBERED = 4096


class Launcher:
    """Launches one ``@triton.jit`` kernel: ``launcher(grid, pointers, integers, floats,
    constexprs)`` is ``kernel[grid](*pointers, *integers, *floats, **constexprs)``.

    ``pointers`` are tensors (never None), ``integers`` Python ints >= 0, ``floats`` Python
    floats; ``constexprs`` holds every ``tl.constexpr`` parameter (and num_warps /
    num_stages), built in the same key order on every call. ``wrap`` (torch.library's
    ``wrap_triton`` while torch.compile traces) launches ``wrap(kernel)[grid](...)`` instead.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled: Dict[tuple, Tuple[Any, tuple]] = {}
        params = list(inspect.signature(getattr(kernel, "fn", kernel)).parameters.values())
        constant = ["constexpr" in str(p.annotation) for p in params]
        first = constant.index(True) if True in constant else len(params)
        # the launch passes the constants last, in signature order
        self.constexpr_names = [p.name for p in params[first:]]
        self.defaults = {p.name: p.default for p in params[first:]
                         if p.default is not inspect.Parameter.empty}
        self.fast = (ENABLED and not INTERPRET and _knobs is not None
                     and all(constant[first:]))
        self._device: Optional[Callable[[], int]] = None
        self._stream: Optional[Callable[[int], int]] = None

    def __call__(self, grid: Tuple[int, ...], pointers: Sequence, integers: Sequence[int],
                 floats: Sequence[float], constexprs: Dict[str, Any], wrap=None) -> None:
        if wrap is not None or not self.fast or \
                getattr(_knobs.runtime, "add_stages_inspection_hook", None) is not None:
            kernel = self.kernel if wrap is None else wrap(self.kernel)
            kernel[grid](*pointers, *integers, *floats, **constexprs)
            return
        if self._device is None:
            from triton.runtime import driver
            self._device = driver.active.get_current_device
            self._stream = driver.active.get_current_stream
        device = self._device()
        key = (device, tuple(constexprs.values()), tuple([t.dtype for t in pointers]),
               tuple([t.data_ptr() & 15 for t in pointers]), tuple(integers))
        entry = self.compiled.get(key)
        if entry is None:
            if len(self.compiled) >= MAX_REMEMBERED:  # e.g. a length that grows every call
                self.compiled.clear()
            self._launch_and_remember(key, grid, pointers, integers, floats, constexprs)
            return
        compiled, constants = entry
        args = (*pointers, *integers, *floats, *constants)
        stream = self._stream(device)
        runtime = _knobs.runtime
        n = len(grid)
        compiled.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream,
                     compiled.function, compiled.packed_metadata,
                     compiled.launch_metadata(grid, stream, *args),
                     runtime.launch_enter_hook, runtime.launch_exit_hook, *args)

    def _launch_and_remember(self, key, grid, pointers, integers, floats, constexprs) -> None:
        compiled = self.kernel[grid](*pointers, *integers, *floats, **constexprs)
        if all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata",
                                                     "launch_metadata")):
            constants = tuple(constexprs[name] if name in constexprs else self.defaults[name]
                              for name in self.constexpr_names)
            self.compiled[key] = (compiled, constants)

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
