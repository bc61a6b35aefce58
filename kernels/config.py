"""Where the kernels run and with which tile sizes.

``INTERPRET`` is read once, when this module is imported, because Triton itself decides at
decoration time (``@triton.jit``) whether a kernel is compiled or interpreted: set
``TRITON_INTERPRET=1`` before importing diffattn to run the kernels on CPU tensors.

On a GPU the kernels are autotuned over a few configurations keyed on the sequence lengths,
head dim and dtypes; under the interpreter ``@triton.autotune`` with several configurations
does not work, so a single configuration is used there.
"""
from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Head dims the kernels accept: the q/k width d is padded to a power of two >= 16 inside the
# kernel (masked), the value width is 2d. Above 128 the two accumulators no longer fit.
MAX_HEAD_DIM = 128

# DIFFATTN_AUTOTUNE=0 skips autotuning on GPU: each kernel takes the first candidate of its
# class below (what the GPU tests use, to keep compile time down).
AUTOTUNE = os.environ.get("DIFFATTN_AUTOTUNE", "1") != "0"

# Tile sizes used under the interpreter. 32 keeps several tiles in play at the small sequence
# lengths the CPU tests use, so loops, ragged edges and causal skipping are all exercised.
INTERPRET_BLOCK_M = 32
INTERPRET_BLOCK_N = 32

# Candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) per class of call, best guess first.
# Each forward program keeps two BLOCK_M x 2d fp32 accumulators, twice FlashAttention's: at
# d = 128 (value width 256) only 8 warps with BLOCK_M = 64 hold them without spilling. The
# backward's key-tile pass keeps dk1, dk2 (BLOCK_N x d) and dv (BLOCK_N x 2d) and spills with 4
# warps from d = 64 on. fp32 inputs use exact ("ieee") products, which run on FMA units and
# need small tiles. (Register and shared-memory use read off sm_90 compiles with triton 3.6.)
FWD_CANDIDATES = {
    "narrow": [(64, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 8, 3), (64, 32, 4, 3)],
    "wide": [(64, 32, 8, 3), (64, 64, 8, 2)],
    "fp32": [(64, 32, 8, 2), (32, 32, 4, 2)],
}
BWD_CANDIDATES = {
    "narrow": [(64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2)],
    "wide": [(64, 32, 8, 2), (32, 32, 8, 2)],
    "fp32": [(32, 32, 8, 2), (32, 32, 4, 2)],
}
PRE_BLOCK_M = 32 if INTERPRET else 64


def _call_class(named_args: dict, kwargs: dict) -> str:
    if named_args["Q"].dtype == torch.float32:
        return "fp32"
    return "wide" if kwargs["HEAD_DIM"] > 64 else "narrow"


def autotune_space(candidates: dict):
    """(configs, prune_configs_by) for @triton.autotune: every candidate is a config, and the
    pruner keeps those of the call's class (only the first one when AUTOTUNE is off)."""
    if INTERPRET:  # the interpreter supports a single configuration only
        return [triton.Config({"BLOCK_M": INTERPRET_BLOCK_M, "BLOCK_N": INTERPRET_BLOCK_N},
                              num_warps=4, num_stages=1)], None
    shapes = list(dict.fromkeys(shape for group in candidates.values() for shape in group))
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
               for bm, bn, w, s in shapes]

    def prune(configs, named_args, **kwargs):
        wanted = candidates[_call_class(named_args, kwargs)]
        wanted = wanted if AUTOTUNE else wanted[:1]
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                       c.num_stages) in wanted]

    return configs, {"early_config_prune": prune}


def head_block(head_dim: int) -> int:
    """Padded q/k tile width: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def preprocess_warps(block_dv: int) -> int:
    """Warps of the backward's row pass: 8 keep a 256-wide row tile from spilling."""
    return 8 if block_dv > 128 else 4
