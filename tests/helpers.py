"""Shared test helpers: random inputs, float64 comparisons, NaN-poisoned allocations."""
from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
requires_interpreter = pytest.mark.skipif(
    not INTERPRET, reason="Triton kernels on CPU tensors need TRITON_INTERPRET=1")

# Largest allowed error max|got - ref| / max(max|ref|, 1) against the float64 reference
# (relative for the O(1)-and-larger values the tests use; absolute where the exact value is 0,
# as the gradient of q when a row sees a single key).
REL_TOL = {torch.float64: 1e-7, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    scale = ref.abs().max().clamp_min(1.0)
    return ((got - ref).abs().max() / scale).item()


def assert_close_rel(name: str, got, ref, dtype, tol: float | None = None) -> None:
    assert got is not None, f"{name}: no gradient"
    assert tuple(got.shape) == tuple(ref.shape), f"{name}: shape {got.shape} vs {ref.shape}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    tol = REL_TOL[dtype] if tol is None else tol
    err = rel_err(got, ref)
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


@pytest.fixture
def poison_empty(monkeypatch):
    """Make every uninitialised float allocation made from Python NaN-filled, so an output
    element a kernel forgot to write shows up as NaN."""
    real_empty, real_empty_like = torch.empty, torch.empty_like
    real_new_empty = torch.Tensor.new_empty

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty",
                        lambda self, *a, **k: poison(real_new_empty(self, *a, **k)))
