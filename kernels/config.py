"""Where the kernels run and with which tile sizes.

``INTERPRET`` is read once, when this module is imported, because Triton itself decides at
decoration time (``@triton.jit``) whether a kernel is compiled or interpreted: set
``TRITON_INTERPRET=1`` before importing diffattn to run the kernels on CPU tensors.

On a GPU the kernels are autotuned over a few configurations keyed on the sequence lengths
and head dim; under the interpreter ``@triton.autotune`` with several configurations does not
work, so a single configuration is used there.
"""
from __future__ import annotations

import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Head dims the kernels accept: the q/k width d is padded to a power of two >= 16 inside the
# kernel (masked), the value width is 2d. Above 128 the two accumulators no longer fit.
MAX_HEAD_DIM = 128

# Tile sizes used under the interpreter (and as a fallback). 32 keeps several tiles in play at
# the small sequence lengths the CPU tests use, so loops, ragged edges and causal skipping are
# all exercised.
INTERPRET_BLOCK_M = 32
INTERPRET_BLOCK_N = 32


def _configs(pairs):
    if INTERPRET:
        return [triton.Config({"BLOCK_M": INTERPRET_BLOCK_M, "BLOCK_N": INTERPRET_BLOCK_N},
                              num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in pairs]


# (BLOCK_M, BLOCK_N, num_warps, num_stages). Each forward program keeps two (BLOCK_M x 2d)
# fp32 accumulators, twice FlashAttention's, which is why BLOCK_M stays at 64/128.
FWD_CONFIGS = _configs([
    (64, 64, 4, 2),
    (64, 64, 4, 3),
    (128, 64, 8, 2),
    (128, 32, 8, 3),
    (64, 32, 4, 3),
])
# Backward: the key-block pass keeps dk1, dk2 (BLOCK_N x d) and dv (BLOCK_N x 2d); the
# query-block pass dq1, dq2. Small tiles keep both under the register budget.
BWD_CONFIGS = _configs([
    (32, 64, 4, 2),
    (64, 64, 4, 2),
    (64, 32, 4, 3),
    (32, 32, 4, 2),
])
PRE_BLOCK_M = 32 if INTERPRET else 64


def head_block(head_dim: int) -> int:
    """Padded q/k tile width: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))
