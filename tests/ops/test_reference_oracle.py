"""The float64 references are an oracle: they import nothing from the runtime they check, so a
bug in a shared helper cannot hide from the tests that compare the two."""
from __future__ import annotations

import ast
from pathlib import Path

import diffattn

REFERENCE = Path(diffattn.__file__).parent / "reference.py"


def _imported_modules(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield "." * node.level + (node.module or "")


def test_reference_imports_nothing_from_the_runtime():
    modules = list(_imported_modules(ast.parse(REFERENCE.read_text())))
    ours = [m for m in modules if m.startswith(".") or m.split(".")[0] in ("diffattn", "kernels")]
    assert not ours, f"reference.py imports runtime modules: {ours}"
    assert set(modules) <= {"__future__", "math", "torch"}, modules


def test_causal_keep_mask_is_exported_from_the_runtime():
    from diffattn.masks import causal_keep_mask
    assert diffattn.causal_keep_mask is causal_keep_mask
