"""What benchmarks/throughput.py runs at the decode level: one decoding step's attention
(one query per sequence) against a KV cache of ``seq_len`` tokens per sequence, forward only.

Providers (a :class:`providers.Shape` with ``seq_len`` = the cached tokens, ``heads`` =
differential heads H, key/value heads as many as H (V1: a key pair and a 2d value per head;
V2: one key and one value of width d per head); every sequence's cache is full):
    diffattn           ``diff_attention_with_kvcache(..., backend="triton")`` on (B, M, ...)
                       caches (num_splits chosen from the shape: flash-decoding for few
                       sequences and long caches).
    diffattn_paged     the same on a paged cache (pages of PAGE_SIZE tokens, shuffled).
    sdpa_x2            two ``F.scaled_dot_product_attention`` calls on views of the same
                       cache tensors and one addcmul (the unfused V1 decode).
    torch_path         ``diff_attention_with_kvcache(..., backend="torch")``.
    diffattn_v2, diffattn_v2_paged, torch_path_v2
                       the same for ``diff_attention_v2_with_kvcache`` (lambda per token).
    flash_v2           V2 the reference's way: one SDPA call over the 2H q heads on the same
                       cache (grouped keys/values), then the subtraction: plain attention's
                       decode plus one multiply-subtract.
    diffattn_interpreter, diffattn_v2_interpreter, diffattn_paged_interpreter
                       the fused paths through the Triton interpreter on CPU (correctness smoke
                       run; their timings say nothing about the kernels).
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from diffattn import diff_attention_v2_with_kvcache, diff_attention_with_kvcache
from providers import LAMBDA, Bench, Shape, flash_v2_attention, sdpa_x2_attention

DECODE_PROVIDERS = ("diffattn", "diffattn_paged", "sdpa_x2", "torch_path", "diffattn_v2",
                    "diffattn_v2_paged", "flash_v2", "torch_path_v2")
DECODE_FUSED = ("diffattn", "diffattn_paged", "diffattn_v2", "diffattn_v2_paged")
DECODE_INTERPRETER_PROVIDERS = {"diffattn_interpreter": "diffattn",
                                "diffattn_v2_interpreter": "diffattn_v2",
                                "diffattn_paged_interpreter": "diffattn_paged"}
DECODE_V2 = ("diffattn_v2", "diffattn_v2_paged", "flash_v2", "torch_path_v2")
PAGE_SIZE = 64
DECODE_INTERPRETER_SHAPE = Shape("decode", 2, 200, 2, 32, False)


def decode_shapes(on_cuda: bool, quick: bool) -> List[Shape]:
    """GPU: batch 1 .. 64 against caches of 1k .. 64k tokens (at most 512k cached tokens per
    shape), 8 differential heads of d = 64 (16 softmax maps, as a 1024-wide model); --quick
    keeps the corners. CPU: tiny caches."""
    if on_cuda:
        pairs = [(1, 1024), (1, 8192), (1, 65536), (8, 1024), (8, 8192), (8, 65536),
                 (64, 1024), (64, 8192)]
        if quick:
            pairs = [(1, 65536), (8, 8192), (64, 1024)]
        return [Shape("decode", b, m, 8, 64, False) for b, m in pairs]
    pairs = [(1, 512), (4, 256)] if quick else [(1, 512), (1, 2048), (4, 256), (4, 1024)]
    return [Shape("decode", b, m, 2, 64, False) for b, m in pairs]


def decode_flop_kind(provider: str) -> str:
    """"v2" (8 M d per head and query) or "diff" (12 M d)."""
    base = DECODE_INTERPRETER_PROVIDERS.get(provider, provider)
    return "v2" if base in DECODE_V2 else "diff"


def paged(cache: Tensor, block_table: Tensor) -> Tensor:
    """The (B, M, ...) cache's rows as pages (num_blocks, PAGE_SIZE, ...) placed where the
    block table (B, M // PAGE_SIZE) says."""
    B, M = cache.shape[:2]
    pages = torch.empty((B * (M // PAGE_SIZE), PAGE_SIZE, *cache.shape[2:]), dtype=cache.dtype,
                        device=cache.device)
    pages[block_table.flatten().long()] = cache.reshape(-1, PAGE_SIZE, *cache.shape[2:])
    return pages


def decode_bench(provider: str, shape: Shape, dtype: torch.dtype,
                 device: torch.device) -> Bench:
    """Mode "fwd" only: one decoding step's attention, under no_grad."""
    base = DECODE_INTERPRETER_PROVIDERS.get(provider, provider)
    if base not in DECODE_PROVIDERS:
        raise ValueError(f"unknown decode-level provider {provider!r}; expected one of "
                         f"{DECODE_PROVIDERS + tuple(DECODE_INTERPRETER_PROVIDERS)}")
    B, M, H, d = shape.batch, shape.seq_len, shape.heads, shape.head_dim
    if M % PAGE_SIZE:
        raise ValueError(f"decode shapes need a cache length that is a multiple of "
                         f"{PAGE_SIZE}, got {M}")
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    v2 = base in DECODE_V2
    q = rnd(B, 1, 2 * H, d)
    k_cache = rnd(B, M, H if v2 else 2 * H, d)
    v_cache = rnd(B, M, H, d if v2 else 2 * d)
    lam = (torch.rand(B, 1, H, generator=g) if v2 else torch.full((H,), LAMBDA)).to(device)
    seqlens = torch.full((B,), M, dtype=torch.int32, device=device)
    block_table = None
    if base.endswith("_paged"):
        blocks = M // PAGE_SIZE
        block_table = torch.randperm(B * blocks, generator=g).view(B, blocks).to(
            device=device, dtype=torch.int32)
        k_cache, v_cache = paged(k_cache, block_table), paged(v_cache, block_table)
    fn = diff_attention_v2_with_kvcache if v2 else diff_attention_with_kvcache
    if base in DECODE_FUSED or base.startswith("torch_path"):
        backend = "torch" if base.startswith("torch_path") else "triton"

        def forward():
            with torch.no_grad():
                return fn(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=block_table,
                          lambda_=lam, causal=True, backend=backend)
    elif base == "sdpa_x2":
        def forward():
            with torch.no_grad():
                return sdpa_x2_attention(q, k_cache, v_cache, lam)
    else:  # flash_v2
        def forward():
            with torch.no_grad():
                return flash_v2_attention(q, k_cache, v_cache, lam)
    return Bench({"fwd": lambda: forward}, [])

