"""What benchmarks/throughput.py runs at the varlen level: attention over a batch of sequences
of different lengths, packed (diff_attention_varlen) against padded to the longest one with a
key padding mask (diff_attention), on the same sequences: the same real tokens.

A :class:`providers.Shape` here is ``batch`` sequences of at most ``seq_len`` tokens
(queries and keys alike), ``heads`` differential heads of width ``head_dim`` (V1: a key pair
and a 2d value per head; V2: one key and a d-wide value per head, lambda per token). Its name
says the lengths (``sequence_lengths``): ``varlen_equal`` every sequence ``seq_len`` long
(packing then only drops the batch axis), ``varlen_varied`` lengths spread evenly from
``seq_len / batch`` to ``seq_len`` (about half the padded tokens are padding).

Providers:
    diffattn_packed, diffattn_v2_packed     the fused kernels over packed sequences: one launch,
                                            the grid sized by the longest sequence, programs
                                            past a sequence's end exit at once.
    diffattn_padded, diffattn_v2_padded     the fused kernels over the padded batch, padding
                                            keys masked (padding queries computed and thrown
                                            away).
    torch_path_packed, torch_path_v2_packed, torch_path_padded, torch_path_v2_padded
                                            the same through ``backend="torch"``.
    *_interpreter                           the fused providers through the Triton interpreter
                                            on CPU (correctness smoke run; their timings say
                                            nothing about the kernels).
FLOPs count the real tokens' work only (sum over sequences of N_b^2), for packed and padded
alike, so TFLOP/s compare useful work.
"""
from __future__ import annotations

from typing import List

import torch

from diffattn import diff_attention, diff_attention_v2, diff_attention_v2_varlen, \
    diff_attention_varlen
from providers import LAMBDA, Bench, Shape, forward_modes

VARLEN_PROVIDERS = ("diffattn_packed", "diffattn_padded", "torch_path_packed",
                    "torch_path_padded", "diffattn_v2_packed", "diffattn_v2_padded",
                    "torch_path_v2_packed", "torch_path_v2_padded")
VARLEN_FUSED = ("diffattn_packed", "diffattn_padded", "diffattn_v2_packed",
                "diffattn_v2_padded")
VARLEN_INTERPRETER_PROVIDERS = {f"{p}_interpreter": p for p in VARLEN_FUSED}
VARLEN_INTERPRETER_SHAPE = Shape("varlen_varied", 3, 40, 2, 32, True)


def varlen_shapes(on_cuda: bool, quick: bool) -> List[Shape]:
    """GPU: 16 sequences of up to 1024 or 2048 tokens (8 heads of d = 64), equal and varied
    lengths, causal (and, without --quick, not causal). CPU: a few short sequences."""
    if on_cuda:
        shapes = [Shape("varlen_equal", 16, 1024, 8, 64, True),
                  Shape("varlen_varied", 16, 2048, 8, 64, True)]
        if not quick:
            shapes += [Shape("varlen_equal", 16, 1024, 8, 64, False),
                       Shape("varlen_varied", 16, 2048, 8, 64, False),
                       Shape("varlen_varied", 64, 1024, 8, 128, True)]
        return shapes
    return [Shape("varlen_equal", 4, 128, 2, 64, True), Shape("varlen_varied", 4, 256, 2, 64,
                                                              True)]


def sequence_lengths(shape: Shape) -> List[int]:
    """The shape's sequence lengths (see the module docstring)."""
    if shape.name == "varlen_equal":
        return [shape.seq_len] * shape.batch
    return [max(1, (shape.seq_len * (i + 1)) // shape.batch) for i in range(shape.batch)]


def varlen_flop_kind(provider: str) -> str:
    """"v2" (8 N M d per head) or "diff" (12 N M d)."""
    return "v2" if "_v2" in VARLEN_INTERPRETER_PROVIDERS.get(provider, provider) else "diff"


def varlen_bench(provider: str, shape: Shape, dtype: torch.dtype, device: torch.device,
                 modes=("fwd", "fwd_bwd")) -> Bench:
    """The provider's forward (and backward) over the shape's sequences."""
    base = VARLEN_INTERPRETER_PROVIDERS.get(provider, provider)
    if base not in VARLEN_PROVIDERS:
        raise ValueError(f"unknown varlen-level provider {provider!r}; expected one of "
                         f"{VARLEN_PROVIDERS + tuple(VARLEN_INTERPRETER_PROVIDERS)}")
    lengths = sequence_lengths(shape)
    B, N, H, d = len(lengths), max(lengths), shape.heads, shape.head_dim
    total = sum(lengths)
    v2 = "_v2" in base
    backend = "torch" if base.startswith("torch_path") else "triton"
    g = torch.Generator().manual_seed(0)

    def leaf(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_()

    k_heads, v_width = (H, d) if v2 else (2 * H, 2 * d)
    if base.endswith("_packed"):
        q, k, v = leaf(total, 2 * H, d), leaf(total, k_heads, d), leaf(total, H, v_width)
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32,
                          device=device)
        lam = (torch.rand(total, H, generator=g) if v2 else torch.full((H,), LAMBDA)).to(
            device).requires_grad_()
        fn = diff_attention_v2_varlen if v2 else diff_attention_varlen

        def forward():
            return fn(q, k, v, cu, cu, N, N, lambda_=lam, causal=shape.causal, backend=backend)
    else:
        q, k, v = leaf(B, N, 2 * H, d), leaf(B, N, k_heads, d), leaf(B, N, H, v_width)
        mask = torch.arange(N)[None, :] >= torch.tensor(lengths)[:, None]  # True = padding
        mask = mask.to(device) if bool(mask.any()) else None
        lam = (torch.rand(B, N, H, generator=g) if v2 else torch.full((H,), LAMBDA)).to(
            device).requires_grad_()
        fn = diff_attention_v2 if v2 else diff_attention

        def forward():
            return fn(q, k, v, lambda_=lam, causal=shape.causal, key_padding_mask=mask,
                      backend=backend)
    return Bench(forward_modes(forward, modes), [q, k, v, lam])
