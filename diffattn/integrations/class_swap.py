"""Which layers of a model an integration's ``fuse_diff_attention`` turns into its fused class
(the layer object is kept and only its class changes)."""
from __future__ import annotations

from typing import List

from torch import nn


def layers_to_swap(model: nn.Module, original: type, fused: type, refusal: str) -> List[nn.Module]:
    """The layers of ``model`` whose class is exactly ``original``, in ``named_modules`` order
    (layers already of the ``fused`` class are left out). A subclass of ``original`` with its
    own code is a TypeError naming the layer, raised before any layer is changed (its own
    forward would be lost); ``refusal`` ends that message (what the user can do)."""
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, fused) or not isinstance(module, original):
            continue
        if type(module) is not original:
            raise TypeError(f"layer {name or '<model>'!r} is a {type(module).__qualname__}, a "
                            f"{refusal}")
        layers.append(module)
    return layers
