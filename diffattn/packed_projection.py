"""One GEMM for the input projections of an attention layer, saved under per-projection names.

The differential attention modules keep their q, k, v (and, in V2, lambda) projections as one
packed parameter, ``in_proj_weight`` (sum of the output widths, E) and ``in_proj_bias``, so a
self-attention forward runs a single matrix multiply (as nn.MultiheadAttention and timm do) and
casts a single weight under autocast. Checkpoints keep the published per-projection names
(``q_proj.weight``, ``q_proj.bias``, ``k_proj.weight``, ...): the state-dict hooks here split
the packed parameters on saving and stack them on loading. Loading also accepts the packed
names themselves (nn.MultiheadAttention's ``in_proj_weight`` / ``in_proj_bias`` layout).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


class ProjectionSlice:
    """Rows [start, stop) of a packed projection, as a view: ``weight`` (out, in) and ``bias``
    (out,) or None are views of the packed parameters (in-place edits such as nn.init reach
    them), and calling it applies F.linear."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor]):
        self.weight, self.bias = weight, bias

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def __repr__(self) -> str:
        return (f"ProjectionSlice(in_features={self.weight.shape[1]}, "
                f"out_features={self.weight.shape[0]}, bias={self.bias is not None})")


def projection_slice(weight: Tensor, bias: Optional[Tensor], start: int,
                     stop: int) -> ProjectionSlice:
    return ProjectionSlice(weight[start:stop], None if bias is None else bias[start:stop])


def save_packed(destination: dict, prefix: str, weights, bias: Optional[Tensor],
                names: Sequence[str], sizes: Sequence[int], keep_vars: bool) -> None:
    """Write ``<prefix><name>.weight`` / ``.bias`` for each projection instead of the packed
    tensors. ``weights``: the packed weight, split here by ``sizes``, or one weight per
    projection. Without keep_vars each piece is its own copy, so the state dict holds no two
    tensors sharing memory (safetensors refuses those)."""
    if isinstance(weights, Tensor):
        weights = weights.split(list(sizes))
    biases = bias.split(list(sizes)) if bias is not None else [None] * len(sizes)
    for name, w, b in zip(names, weights, biases):
        destination[f"{prefix}{name}.weight"] = w if keep_vars else w.detach().clone()
        if b is not None:
            destination[f"{prefix}{name}.bias"] = b if keep_vars else b.detach().clone()


def load_packed(state_dict: dict, prefix: str, names: Sequence[str], sizes: Sequence[int],
                has_bias: bool, error_msgs: list) -> None:
    """Turn ``<prefix><name>.weight`` / ``.bias`` entries into ``<prefix>in_proj_weight`` /
    ``in_proj_bias`` in place, before the module's own loading. Entries already packed are
    left as they are (their shape is checked by the normal loading). A partial set of
    per-projection weights is reported in error_msgs, naming what is missing."""
    for kind, present in (("weight", True), ("bias", has_bias)):
        keys = [f"{prefix}{name}.{kind}" for name in names]
        found = [key in state_dict for key in keys]
        if not any(found):
            continue
        packed_key = f"{prefix}in_proj_{kind}"
        if not all(found):
            missing = [key for key, ok in zip(keys, found) if not ok]
            error_msgs.append(f"{packed_key}: the per-projection tensors are incomplete, "
                              f"missing {missing}")
            for key in keys:
                state_dict.pop(key, None)
            continue
        pieces = [state_dict.pop(key) for key in keys]
        if not present:
            error_msgs.append(f"unexpected {kind} tensors {keys}: this layer has no biases")
            continue
        bad = [(key, tuple(p.shape)) for key, p, size in zip(keys, pieces, sizes)
               if p.shape[0] != size]
        if bad:
            error_msgs.append(f"{packed_key}: per-projection tensors of the wrong size "
                              f"{bad}, expected {dict(zip(keys, sizes))} rows")
            continue
        state_dict[packed_key] = torch.cat(pieces, dim=0)
