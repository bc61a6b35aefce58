"""Visibility masks shared by the runtime paths (the torch path, the layers' mask handling)."""
from __future__ import annotations

import torch


def causal_keep_mask(seq_q: int, seq_k: int, device=None) -> torch.Tensor:
    """Bool (N, M) mask, True where query i may see key j under diffattn's causal rule.

    The diagonal is aligned to the bottom-right corner (FlashAttention's convention): query i
    sees keys j <= i + (M - N). For N == M that is the usual j <= i. When N > M the first
    N - M queries see no key at all and their output is zero.
    """
    rows = torch.arange(seq_q, device=device)[:, None]
    cols = torch.arange(seq_k, device=device)[None, :]
    return cols <= rows + (seq_k - seq_q)
