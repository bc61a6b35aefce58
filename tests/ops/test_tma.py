"""The forward with tensor-descriptor (TMA) loads (kernels/tma.py, DIFFATTN_TMA=1) against the
float64 references, and when it is used.

The interpreter runs the descriptor loads too, so the same cases as the pointer path run here
with the switch on: V1 (norm, causal, padding, GQA, packed strided views) and V2 (per-token
lambda), every gradient, outputs NaN-poisoned. Each case also checks that the forward did
take the descriptor path.
"""
from __future__ import annotations

import pytest
import torch

from diffattn.kernels import tma
from test_diff_attention import CASES, _check
from helpers import poison_empty, requires_interpreter  # noqa: F401

pytestmark = pytest.mark.skipif(not tma.AVAILABLE,
                                reason="this triton has no tl.make_tensor_descriptor")

# Power-of-two head widths (TMA's condition here); the others are covered by the fallback test.
TMA_CASES = [c for c in CASES if c.d in (16, 32, 64, 128)]


@pytest.fixture
def tma_on(monkeypatch):
    """DIFFATTN_TMA=1 for the test; yields the list of tma_loads answers of its forwards."""
    monkeypatch.setattr(tma, "ENABLED", True)
    answers = []
    real = tma.tma_loads

    def recording(k, v):
        answers.append(real(k, v))
        return answers[-1]
    monkeypatch.setattr(tma, "tma_loads", recording)
    return answers


@requires_interpreter
@pytest.mark.parametrize("case", TMA_CASES, ids=str)
def test_with_tma_loads_matches_float64_reference(case, tma_on, poison_empty):
    """V1 and V2 cases of test_diff_attention.py's harness with the descriptor loads on."""
    _check(case, "triton")
    assert tma_on and all(tma_on)


def test_off_by_default_and_where_tma_cannot_read(monkeypatch):
    k = torch.randn(2, 40, 4, 64)
    v = torch.randn(2, 40, 2, 128)
    monkeypatch.setattr(tma, "ENABLED", False)
    assert not tma.tma_loads(k, v)
    monkeypatch.setattr(tma, "ENABLED", True)
    monkeypatch.setattr(tma, "INTERPRET", True)
    assert tma.tma_loads(k, v)
    shifted = torch.randn(2 * 40 * 4 * 64 + 1)[1:].view(2, 40, 4, 64)   # address 4 bytes off
    assert not tma.tma_loads(shifted, v)
    odd_rows = torch.randn(2, 40, 3, 20)[..., :16]                      # row stride 60 * 4 bytes
    assert tma.fits(odd_rows)
    odd_rows = torch.randn(2, 40, 3, 19)[..., :16]                      # 76 bytes: not 16
    assert not tma.fits(odd_rows)
    assert not tma.fits(torch.randn(2, 40, 4, 24))                      # width not a power of 2
    assert not tma.fits(torch.randn(2, 40, 4, 8))                       # narrower than 16
    monkeypatch.setattr(tma, "INTERPRET", False)
    assert not tma.tma_loads(k, v)                                      # CPU, compiled kernels


@requires_interpreter
def test_a_width_tma_cannot_read_takes_the_pointer_loads(tma_on):
    case = next(c for c in CASES if c.variant == "v1" and c.d == 24)
    _check(case, "triton")
    assert tma_on and not any(tma_on)
