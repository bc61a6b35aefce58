"""Where the kernels run, and the tile configurations they may use.

``INTERPRET`` is read once, when this module is imported, because Triton itself decides at
decoration time (``@triton.jit``) whether a kernel is compiled or interpreted: set
``TRITON_INTERPRET=1`` before importing diffattn to run the kernels on CPU tensors.

A tile configuration is a tuple of the kernel's tile sizes, then num_warps and num_stages:

    forward   (BLOCK_M, BLOCK_N, num_warps, num_stages)
    backward  (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_warps, num_stages)
              1 = the key-tile (dK, dV) programs, 2 = the query-tile (dq) programs

Candidates come per group of calls, best guess first. Each forward program keeps two
BLOCK_M x DV fp32 accumulators, twice FlashAttention's: at d = 128 (value width 256) only
8 warps with BLOCK_M = 64 hold them without spilling. The backward's key-tile programs keep
dK (one or two BLOCK_N x d) and dV (BLOCK_N x DV). fp32 inputs use exact ("ieee") products,
which run on FMA units and need small tiles. Which candidate runs is decided in
``kernels/tuning.py``.
"""
from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Head dims the kernels accept: the q/k width d is padded to a power of two >= 16 inside the
# kernel (masked), the value width is 2d (V1) or d (V2). Above 128 the accumulators no longer fit.
MAX_HEAD_DIM = 128

FWD_FIELDS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
BWD_FIELDS = ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2", "num_warps", "num_stages")

FWD_CANDIDATES = {
    "narrow": [(64, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 8, 2), (64, 32, 4, 3),
               (64, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 2)],
    "wide": [(64, 32, 8, 3), (64, 32, 8, 2), (64, 64, 8, 2)],
    "fp32": [(32, 16, 8, 1), (16, 16, 4, 1), (16, 32, 4, 1), (32, 32, 4, 2)],
}
BWD_CANDIDATES = {
    "narrow": [(64, 32, 64, 32, 8, 2), (32, 32, 32, 32, 4, 2), (32, 32, 64, 32, 8, 2),
               (32, 64, 64, 32, 8, 2), (32, 64, 64, 64, 8, 2), (32, 128, 64, 64, 8, 2),
               (32, 64, 64, 64, 4, 2)],
    "wide": [(32, 32, 32, 32, 8, 2), (32, 32, 32, 32, 8, 1), (32, 32, 64, 32, 8, 1),
             (64, 32, 64, 32, 8, 2), (32, 64, 64, 32, 8, 2)],
    "fp32": [(16, 16, 16, 16, 8, 1), (16, 32, 32, 16, 8, 2), (16, 16, 16, 16, 4, 1),
             (32, 32, 32, 32, 8, 2)],
}
# Order and choice from compiling every candidate for sm_90 (tools/sm90_resources.py,
# results under benchmarks/results/): the first candidate of each group spills least across
# the V1 and V2 variants; candidates that spilled more than ~1 KB per thread were dropped.

# Under the interpreter one configuration is used: small tiles keep several of them in play
# at the short lengths the CPU tests use (loops, ragged edges, open and masked tiles, causal
# skipping), and the backward's two kinds of program use different tile shapes.
INTERPRET_FWD = (32, 32, 4, 1)
INTERPRET_BWD = (32, 64, 64, 32, 4, 1)

# The backward's row pass: BLOCK_M rows per program, more warps for wide rows.
ROWS_BLOCK_M = 32 if INTERPRET else 64
# The backward's reduction programs: rows and columns of partials summed per step.
RED_ROWS, RED_COLS = 64, 32


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launch grids (triton.cdiv is slower to call from the host)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def head_block(head_dim: int) -> int:
    """Padded tile width of a head dim: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, next_power_of_2(head_dim))


def rows_warps(block_dv: int) -> int:
    """Warps of the backward's row pass: 8 keep a 256-wide row tile from spilling."""
    return 8 if block_dv > 128 else 4


def candidate_group(dtype: torch.dtype, block_dv: int) -> str:
    """The candidate list a call draws from: "fp32" (exact products), "wide" (value tiles
    wider than 128) or "narrow"."""
    if dtype in (torch.float32, torch.float64):
        return "fp32"
    return "wide" if block_dv > 128 else "narrow"
