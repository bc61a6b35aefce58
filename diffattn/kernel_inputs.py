"""Inputs as the fused kernels read them: tensors whose last dimension is contiguous, and
lambda in the kernels' forms."""
from __future__ import annotations

import torch
from torch import Tensor

from .lambdas import LambdaVectors


def last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def kernel_lambda(lambda_, acc_dtype: torch.dtype, device: torch.device):
    """(lam tensor or None, float value, vectors?) as the kernels take lambda: a float stays a
    kernel argument (except in float64, whose kernel arguments would round it to float32);
    LambdaVectors pass their (4, L) vectors, the kernels computing lambda from them."""
    if isinstance(lambda_, LambdaVectors):
        return lambda_.vectors, float(lambda_.init), True
    if isinstance(lambda_, Tensor):
        return (lambda_ if lambda_.dtype == acc_dtype else lambda_.to(acc_dtype)), 0.0, False
    if acc_dtype == torch.float64:
        return torch.tensor(float(lambda_), dtype=acc_dtype, device=device), 0.0, False
    return None, float(lambda_), False
