"""Warnings attributed to the user's code, not to a line of library source.

``warnings.warn(..., stacklevel=n)`` needs a fixed depth, but diffattn warns from calls that
arrive through different paths (the functional op, the module inside torch's module machinery,
a CLIP model, a timm model, ``torch.utils.checkpoint``). ``warn_at_user_code`` walks the stack
instead and names the first frame outside diffattn, torch, timm, runpy and frozen modules, so
the warning prints the user's own line. When there is no such frame (diffattn is the program:
``python -m diffattn.models.zero_shot``), it names the program, without a source line.
"""
from __future__ import annotations

import os
import runpy
import sys
import warnings

_LIBRARY_PACKAGES = ("diffattn", "diffattn.kernels", "diffattn.models", "torch", "timm")


def _library_dirs() -> tuple:
    """Directories of the imported packages whose frames a warning skips (``diffattn.models``
    and ``diffattn.kernels`` may live outside ``diffattn/``: see pyproject.toml's package-dir)."""
    return tuple(os.path.join(os.path.abspath(path), "")
                 for name in _LIBRARY_PACKAGES if name in sys.modules
                 for path in getattr(sys.modules[name], "__path__", ()))


def _user_stacklevel():
    """The stacklevel, for warnings.warn called by this function's caller, of the first frame
    outside the library packages, runpy and frozen modules; None when there is none (a
    diffattn command line, ``python -m diffattn.train``)."""
    skipped = _library_dirs() + (os.path.abspath(runpy.__file__),)
    frame, level = sys._getframe(1), 1
    while frame is not None:
        filename = frame.f_code.co_filename
        if not (filename.startswith("<frozen ") or os.path.abspath(filename).startswith(skipped)):
            return level
        frame, level = frame.f_back, level + 1
    return None


def warn_at_user_code(message: str, category: type = UserWarning) -> None:
    """warnings.warn(message, category) at the first frame of the user's code."""
    level = _user_stacklevel()
    if level is None:
        program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "diffattn"
        warnings.warn_explicit(message, category, filename=program, lineno=0,
                               module="diffattn")
    else:
        warnings.warn(message, category, stacklevel=level)
