"""lambda, the weight of the second softmax map, in the forms the runtime takes it: a float, a
(), (H,) or per-token (B, N, H) tensor, or a layer's four lambda vectors (LambdaVectors)."""
from __future__ import annotations

from typing import NamedTuple

import torch


class LambdaVectors(NamedTuple):
    """The Differential Transformer's (V1, DiffCLIP) lambda, shared by all heads of a layer:
    exp(lq1 . lk1) - exp(lq2 . lk2) + init, from its four vectors stacked as ``vectors``
    (4, L) = (lq1, lk1, lq2, lk2). The fused kernels compute it, and the vectors' gradients,
    themselves; ``value()`` is the same in PyTorch ops."""
    vectors: torch.Tensor
    init: float

    def value(self) -> torch.Tensor:
        """0-dim tensor in the vectors' dtype."""
        return lambda_from_vectors(*self.vectors, self.init)


def lambda_from_vectors(lq1: torch.Tensor, lk1: torch.Tensor, lq2: torch.Tensor,
                        lk2: torch.Tensor, init: float) -> torch.Tensor:
    """exp(lq1 . lk1) - exp(lq2 . lk2) + init from the four (L,) vectors: a 0-dim tensor in
    their dtype (LambdaVectors.value without stacking them)."""
    return torch.exp(torch.dot(lq1, lk1)) - torch.exp(torch.dot(lq2, lk2)) + init


def expand_lambda(lambda_, num_heads: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Return a per-head lambda (float, () or (H,) tensor, or LambdaVectors) as a (H,) tensor of
    ``dtype`` (differentiable when lambda_ is a tensor)."""
    if isinstance(lambda_, LambdaVectors):
        lambda_ = lambda_.value()
    if isinstance(lambda_, torch.Tensor):
        return lambda_.to(device=device, dtype=dtype).reshape(-1).expand(num_heads)
    return torch.full((num_heads,), float(lambda_), dtype=dtype, device=device)


def lambda_for_maps(lambda_, num_heads: int, dtype: torch.dtype, device) -> torch.Tensor:
    """lambda broadcastable against (B, H, N, ...) maps: a float, (), (H,) or per-token
    (B, N, H) lambda as a (1 or B, H, 1 or N, 1) tensor of ``dtype``."""
    if isinstance(lambda_, torch.Tensor) and lambda_.dim() == 3:
        return lambda_.to(device=device, dtype=dtype).permute(0, 2, 1)[..., None]
    return expand_lambda(lambda_, num_heads, dtype, device)[None, :, None, None]
