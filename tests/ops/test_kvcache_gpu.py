"""GPU-only checks of KV-cache decoding (skipped without CUDA): the compiled kernels in fp16
and bf16 against the float64 per-sequence references of test_kvcache.py at decode sizes (long
caches, automatic split-K, paged), flash-attn's options (rotary, left padding, cache rows,
window, log-sum-exp) against test_kvcache_options.py's references, no host synchronisation in
a fused step, and a layer's
decoding step under torch.compile(fullgraph=True, mode="reduce-overhead") (CUDA graphs)
equal to eager."""
from __future__ import annotations

import os

import pytest
import torch

from diffattn import DiffKVCache, DiffMultiheadAttention, DiffMultiheadAttentionV2
from helpers import assert_close_rel
from test_kvcache import Case, make, reference
from test_kvcache_options import Case as OptionCase, assert_lse_close, check_caches
from test_kvcache_options import make as make_options, reference as reference_options
from test_kvcache_options import run as run_options

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU (compiled Triton kernels)")

GPU_CASES = [
    Case(B=2, capacity=4096, lens=(4000, 17), Nq=1, Nnew=1, H=4, Hk=2, d=64, splits=0,
         dtype=torch.bfloat16),
    Case(B=2, capacity=4096, lens=(3000, 0), Nq=4, Nnew=4, H=4, Hk=4, d=128, page=64,
         splits=0, dtype=torch.float16),
    Case(v2=True, B=2, capacity=4096, lens=(4094, 1), Nq=1, Nnew=1, H=4, Hk=1, d=64, page=256,
         splits=0, lam="tokens", dtype=torch.bfloat16),
    Case(v2=True, B=3, capacity=1024, lens=(5, 900, 0), Nq=3, Nnew=2, H=2, Hk=2, d=128,
         splits=1, lam="heads", dtype=torch.float16),
]


def _to(t, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}


@pytest.mark.parametrize("c", GPU_CASES, ids=str)
def test_kernels_match_reference(c):
    t = make(c)
    ref = reference(c, t)
    g = _to(t, "cuda")
    cast = lambda x: None if x is None else x.to(c.dtype)  # noqa: E731
    k_cache, v_cache = cast(g["k_cache"]), cast(g["v_cache"])
    lam = g["lam"] if isinstance(g["lam"], float) else g["lam"].float()
    kw = dict(k=cast(g["k_new"]) if c.Nnew else None, v=cast(g["v_new"]) if c.Nnew else None,
              cache_seqlens=g["lens"], block_table=g["block_table"], causal=c.causal,
              num_splits=c.splits, backend="triton")
    from diffattn import diff_attention_v2_with_kvcache, diff_attention_with_kvcache
    with torch.no_grad():
        if c.v2:
            out = diff_attention_v2_with_kvcache(cast(g["q"]), k_cache, v_cache, lambda_=lam,
                                                 **kw)
        else:
            out = diff_attention_with_kvcache(cast(g["q"]), k_cache, v_cache, lambda_=lam,
                                              norm_weight=cast(g["norm"]), out_scale=0.75, **kw)
    tol = 2e-2 if c.dtype == torch.bfloat16 else 4e-3
    assert_close_rel("out", out.cpu(), ref, c.dtype, tol)


def test_fused_step_does_not_synchronise():
    c = GPU_CASES[0]
    g = _to(make(c), "cuda")
    from diffattn import diff_attention_with_kvcache
    args = (g["q"].bfloat16(), g["k_cache"].bfloat16(), g["v_cache"].bfloat16())
    kw = dict(k=g["k_new"].bfloat16(), v=g["v_new"].bfloat16(), cache_seqlens=g["lens"],
              lambda_=0.5, causal=True, backend="triton")
    with torch.no_grad():
        diff_attention_with_kvcache(*args, **kw)  # compile first
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            diff_attention_with_kvcache(*args, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("layer_cls", [DiffMultiheadAttention, DiffMultiheadAttentionV2])
def test_compiled_decode_step_with_cuda_graphs(layer_cls):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    heads = 8 if layer_cls is DiffMultiheadAttention else 4
    layer = layer_cls(256, heads, batch_first=True, device="cuda", dtype=torch.bfloat16).eval()
    eager_cache = DiffKVCache.empty(2, 128, layer)
    graph_cache = DiffKVCache.empty(2, 128, layer)
    step = torch.compile(lambda x, cache: layer(x, kv_cache=cache)[0], fullgraph=True,
                         mode="reduce-overhead")
    with torch.no_grad():
        prompt = torch.randn(2, 7, 256, device="cuda", dtype=torch.bfloat16)
        layer(prompt, kv_cache=eager_cache)
        layer(prompt, kv_cache=graph_cache)
        for _ in range(5):
            x = torch.randn(2, 1, 256, device="cuda", dtype=torch.bfloat16)
            want = layer(x, kv_cache=eager_cache)[0]
            got = step(x, graph_cache).clone()
            torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert graph_cache.seqlens.tolist() == eager_cache.seqlens.tolist() == [12, 12]
    torch.testing.assert_close(graph_cache.k_cache, eager_cache.k_cache)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


GPU_OPTION_CASES = [
    OptionCase(B=2, capacity=2048, lens=(1900, 40), leftpad=(100, 0), batch_idx=(2, 0),
               rotary_dim=64, H=4, Hk=2, d=64, splits=0, dtype=torch.bfloat16),
    OptionCase(B=2, capacity=2048, lens=(1500, 3), leftpad=(700, 0), Nq=4, Nnew=4,
               rotary_dim=32, interleaved=False, window=(300, -1), H=4, Hk=4, d=128, page=256,
               splits=0, dtype=torch.float16),
]


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("c", GPU_OPTION_CASES, ids=str)
def test_kernels_with_options_match_reference(c, v2):
    """Rotary q in the kernel, left padding, cache rows, window and the log-sum-exp at decode
    sizes (split-K chosen from the shapes)."""
    c = OptionCase(**{**c.__dict__, "v2": v2})
    t = make_options(c)
    ref, ref_lse = reference_options(c, t)
    out, lse, k_cache, v_cache = run_options(c, _to(t, "cuda"), "triton")
    tol = 2e-2 if c.dtype == torch.bfloat16 else 4e-3
    assert_close_rel("out", out.cpu(), ref, c.dtype, tol)
    assert_lse_close(lse.cpu(), ref_lse, 1e-1 if c.dtype == torch.bfloat16 else 2e-2)
    check_caches(c, t, k_cache, v_cache)


def test_fused_step_with_options_does_not_synchronise():
    c = OptionCase(**{**GPU_OPTION_CASES[0].__dict__, "window": (500, -1)})
    g = _to(make_options(c), "cuda")
    with torch.no_grad():
        run_options(c, g, "triton")  # compile first
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            run_options(c, g, "triton")
        finally:
            torch.cuda.set_sync_debug_mode("default")
