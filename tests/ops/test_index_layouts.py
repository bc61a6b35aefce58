"""Index tensors in any memory layout: cu_seqlens_q / cu_seqlens_k of the packed ops and
cache_seqlens / block_table of the KV-cache ops, passed as strided views (every other element
of a buffer whose other elements are garbage), stride-0 views (``expand``) and transposed or
column-strided block tables, hold the same values as their contiguous copies and give bitwise
the same output, on both backends, V1 and V2, close to a float64 reference. The value checks
read what the kernels read: a block table whose garbage lies between its valid columns passes,
one whose valid columns point outside the page pool is refused. A strided-offset call runs in
a subprocess too, so that a crash (an out-of-bounds read) fails the test instead of the run.
Also: a layer's DiffKVCache with strided lengths, and the launchers given a key padding mask
with a strided last dimension.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from diffattn import (DiffKVCache, DiffMultiheadAttention, DiffMultiheadAttentionV2,
                      diff_attention_v2_varlen, diff_attention_v2_with_kvcache,
                      diff_attention_varlen, diff_attention_with_kvcache)
from diffattn.reference import diff_attention_ref, diff_attention_v2_ref
from helpers import assert_close_rel, poison_empty, requires_interpreter  # noqa: F401

BACKENDS = [pytest.param("triton", marks=requires_interpreter), "torch"]
H, HK, D = 2, 1, 16
GARBAGE = 1 << 20  # between the valid elements of a strided view: far out of every range


def every_other(t: torch.Tensor, garbage: int = GARBAGE) -> torch.Tensor:
    """A view of t's values with its last dimension at stride 2, garbage in between."""
    buffer = torch.stack([t, torch.full_like(t, garbage)], -1)
    view = buffer[..., 0]
    assert torch.equal(view, t) and view.stride(-1) == 2
    return view


def offsets(lengths) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


# ------------------------------------------------------------------ packed sequences
def _packed_inputs(v2: bool, lengths_q, lengths_k, seed=0):
    g = torch.Generator().manual_seed(seed)
    key_heads, dv = (HK, D) if v2 else (2 * HK, 2 * D)
    total_q, total_k = sum(lengths_q), sum(lengths_k)
    q = torch.randn(total_q, 2 * H, D, generator=g)
    k = torch.randn(total_k, key_heads, D, generator=g)
    v = torch.randn(total_k, HK, dv, generator=g)
    lam = 0.2 + 0.6 * torch.rand(H, generator=g)
    norm = None if v2 else 1 + 0.3 * torch.randn(dv, generator=g)
    return q, k, v, lam, norm


def _packed(v2, q, k, v, cu_q, cu_k, max_q, max_k, lam, norm, backend):
    if v2:
        return diff_attention_v2_varlen(q, k, v, cu_q, cu_k, max_q, max_k, lambda_=lam,
                                        causal=True, backend=backend)
    return diff_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, lambda_=lam, causal=True,
                                 norm_weight=norm, backend=backend)


def _packed_reference(v2, q, k, v, cu_q, cu_k, lam, norm):
    out = []
    for b in range(len(cu_q) - 1):
        qs = q[cu_q[b]:cu_q[b + 1]].double()[None]
        ks, vs = k[cu_k[b]:cu_k[b + 1]].double()[None], v[cu_k[b]:cu_k[b + 1]].double()[None]
        if v2:
            o = diff_attention_v2_ref(qs, ks, vs, lam.double(), causal=True)
        else:
            o = diff_attention_ref(qs, ks, vs, lam.double(), causal=True,
                                   norm_weight=norm.double())
        out.append(o[0])
    return torch.cat(out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("which", ["q", "k", "both"])
def test_strided_cu_seqlens(which, v2, backend, poison_empty):  # noqa: F811
    lengths_q, lengths_k = [5, 0, 37, 3], [7, 4, 40, 2]
    q, k, v, lam, norm = _packed_inputs(v2, lengths_q, lengths_k)
    cu_q, cu_k = offsets(lengths_q), offsets(lengths_k)
    strided_q = every_other(cu_q) if which in ("q", "both") else cu_q
    strided_k = every_other(cu_k, -GARBAGE) if which in ("k", "both") else cu_k
    want = _packed(v2, q, k, v, cu_q, cu_k, 37, 40, lam, norm, backend)
    got = _packed(v2, q, k, v, strided_q, strided_k, 37, 40, lam, norm, backend)
    assert torch.equal(got, want)
    assert_close_rel("out", got, _packed_reference(v2, q, k, v, cu_q, cu_k, lam, norm),
                     torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_strided_cu_seqlens_gradients(v2, backend):
    """The backward reads the offsets too: every gradient as with contiguous offsets."""
    lengths_q, lengths_k = [3, 0, 34], [5, 2, 33]
    inputs = _packed_inputs(v2, lengths_q, lengths_k, seed=1)
    cu_q, cu_k = offsets(lengths_q), offsets(lengths_k)
    grads = []
    for a, b in ((cu_q, cu_k), (every_other(cu_q), every_other(cu_k, -GARBAGE))):
        leaves = [t.clone().requires_grad_() for t in inputs if t is not None]
        q, k, v, lam = leaves[:4]
        out = _packed(v2, q, k, v, a, b, 34, 33, lam, leaves[4] if not v2 else None, backend)
        grads.append(torch.autograd.grad(out, leaves, torch.ones_like(out)))
    for name, want, got in zip(("q", "k", "v", "lambda", "norm_weight"), *grads):
        assert torch.equal(got, want), f"d{name}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_stride0_cu_seqlens_of_empty_sequences(backend):
    """Offsets that are all 0 (every query sequence empty) as a stride-0 view of one element:
    an empty result, nothing read past that element."""
    lengths_k = [3, 4]
    q, k, v, lam, norm = _packed_inputs(False, [0, 0], lengths_k)
    cu_q = torch.zeros(1, dtype=torch.int32).expand(3)
    out = _packed(False, q, k, v, cu_q, offsets(lengths_k), 0, 4, lam, norm, backend)
    assert out.shape == (0, H, 2 * D)


_CRASH_PROBE = """
import torch
from diffattn import diff_attention_varlen
g = torch.Generator().manual_seed(0)
lengths_q, lengths_k = [5, 0, 37, 3], [7, 4, 33, 2]
cu_q = torch.tensor([0, 5, 5, 42, 45], dtype=torch.int32)
cu_k = torch.tensor([0, 7, 11, 44, 46], dtype=torch.int32)
q, k = torch.randn(45, 4, 16, generator=g), torch.randn(46, 2, 16, generator=g)
v = torch.randn(46, 1, 32, generator=g)
want = diff_attention_varlen(q, k, v, cu_q, cu_k, 37, 33, lambda_=0.3, backend="triton")
strided = lambda t: torch.stack([t, torch.full_like(t, 1 << 20)], -1)[..., 0]
got = diff_attention_varlen(q, k, v, strided(cu_q), strided(cu_k), 37, 33, lambda_=0.3,
                            backend="triton")
assert torch.equal(got, want)
print("ok")
"""


@requires_interpreter
def test_strided_cu_seqlens_in_a_subprocess():
    """The call that once read the offsets as if contiguous (and could abort the process):
    run apart, so an abort is a failure here rather than the end of the test run."""
    result = subprocess.run([sys.executable, "-c", _CRASH_PROBE], capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), \
        f"exit {result.returncode}: {result.stderr[-2000:]}"


# ------------------------------------------------------------------ KV cache
B, CAPACITY, PAGE = 3, 64, 16
LENGTHS = [5, 20, 40]


def _cache_inputs(v2: bool, paged: bool, seed=0):
    """q, the logical caches (B, CAPACITY, ...) and, paged, the pool and a shuffled block
    table (B, CAPACITY // PAGE) with spare pages."""
    g = torch.Generator().manual_seed(seed)
    key_heads, dv = (HK, D) if v2 else (2 * HK, 2 * D)
    q = torch.randn(B, 2, 2 * H, D, generator=g)
    keys = torch.randn(B, CAPACITY, key_heads, D, generator=g)
    values = torch.randn(B, CAPACITY, HK, dv, generator=g)
    lam = 0.2 + 0.6 * torch.rand(H, generator=g)
    norm = None if v2 else 1 + 0.3 * torch.randn(dv, generator=g)
    if not paged:
        return q, keys, values, None, keys, values, lam, norm
    blocks = CAPACITY // PAGE
    pool = B * blocks + 2
    block_table = torch.randperm(pool, generator=g)[:B * blocks].view(B, blocks).int()
    k_pool = torch.randn(pool, PAGE, key_heads, D, generator=g)
    v_pool = torch.randn(pool, PAGE, HK, dv, generator=g)
    k_pool[block_table.long()] = keys.unflatten(1, (blocks, PAGE))
    v_pool[block_table.long()] = values.unflatten(1, (blocks, PAGE))
    return q, k_pool, v_pool, block_table, keys, values, lam, norm


def _decode(v2, q, k_cache, v_cache, lam, norm, seqlens, block_table, backend, splits=2):
    with torch.no_grad():
        if v2:
            return diff_attention_v2_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens,
                                                  block_table=block_table, lambda_=lam,
                                                  causal=True, num_splits=splits,
                                                  backend=backend)
        return diff_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens,
                                           block_table=block_table, lambda_=lam, causal=True,
                                           norm_weight=norm, num_splits=splits, backend=backend)


def _decode_reference(v2, q, keys, values, lam, norm, lengths):
    out = []
    for b, length in enumerate(lengths):
        qs, ks, vs = q[b:b + 1].double(), keys[b:b + 1, :length].double(), \
            values[b:b + 1, :length].double()
        if v2:
            out.append(diff_attention_v2_ref(qs, ks, vs, lam.double(), causal=True))
        else:
            out.append(diff_attention_ref(qs, ks, vs, lam.double(), causal=True,
                                          norm_weight=norm.double()))
    return torch.cat(out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("layout", ["every_other", "expand"])
def test_cache_seqlens_layouts(layout, paged, v2, backend, poison_empty):  # noqa: F811
    q, k_cache, v_cache, block_table, keys, values, lam, norm = _cache_inputs(v2, paged)
    seqlens = torch.tensor(LENGTHS, dtype=torch.int32)
    if layout == "expand":  # stride 0: one length for every sequence
        seqlens = seqlens[1:2]
        view = seqlens.expand(B)
    else:
        view = every_other(seqlens)
    want = _decode(v2, q, k_cache, v_cache, lam, norm, seqlens.expand(B).contiguous(),
                   block_table, backend)
    got = _decode(v2, q, k_cache, v_cache, lam, norm, view, block_table, backend)
    assert torch.equal(got, want)
    lengths = view.tolist()
    assert_close_rel("out", got, _decode_reference(v2, q, keys, values, lam, norm, lengths),
                     torch.float32, 5e-5)


def _block_table_views(block_table: torch.Tensor) -> dict:
    return {
        "transposed": block_table.t().contiguous().t(),
        "every_other_column": every_other(block_table),
        "row_stride0": block_table[1:2].expand(B, -1),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("layout", ["transposed", "every_other_column", "row_stride0"])
def test_block_table_layouts(layout, v2, backend, poison_empty):  # noqa: F811
    q, k_pool, v_pool, block_table, keys, values, lam, norm = _cache_inputs(v2, True)
    view = _block_table_views(block_table)[layout]
    assert not view.is_contiguous()
    seqlens = torch.tensor(LENGTHS, dtype=torch.int32)
    want = _decode(v2, q, k_pool, v_pool, lam, norm, seqlens, view.contiguous(), backend)
    got = _decode(v2, q, k_pool, v_pool, lam, norm, seqlens, view, backend)
    assert torch.equal(got, want)
    if layout == "row_stride0":  # every sequence reads sequence 1's pages
        keys, values = keys[1:2].expand(B, -1, -1, -1), values[1:2].expand(B, -1, -1, -1)
    assert_close_rel("out", got, _decode_reference(v2, q, keys, values, lam, norm, LENGTHS),
                     torch.float32, 5e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_index_tensors_append_in_place(backend):
    """New keys go into the caller's caches (in place) through a strided block table at
    strided lengths, where contiguous ones put them."""
    q, k_pool, v_pool, block_table, *_ = _cache_inputs(False, True)
    k_new = torch.randn(B, 2, 2 * HK, D)
    v_new = torch.randn(B, 2, HK, 2 * D)
    seqlens = torch.tensor(LENGTHS, dtype=torch.int32)
    pools = []
    for lengths, table in ((seqlens, block_table),
                           (every_other(seqlens), block_table.t().contiguous().t())):
        k_cache, v_cache = k_pool.clone(), v_pool.clone()
        with torch.no_grad():
            out = diff_attention_with_kvcache(q, k_cache, v_cache, k_new, v_new,
                                              cache_seqlens=lengths, block_table=table,
                                              lambda_=0.4, causal=True, backend=backend)
        pools.append((out, k_cache, v_cache))
        assert torch.equal(lengths, seqlens), "cache_seqlens is not advanced by the call"
    for name, want, got in zip(("out", "k_cache", "v_cache"), *pools):
        assert torch.equal(got, want), name
    assert not torch.equal(pools[0][1], k_pool), "the append wrote nothing"


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_table_range_check_reads_the_used_entries(backend):
    """Garbage between the valid columns of a strided block table is not an entry; a used
    entry outside the pool is refused, whatever the table's layout."""
    q, k_pool, v_pool, block_table, _, _, lam, norm = _cache_inputs(False, True)
    seqlens = torch.tensor(LENGTHS, dtype=torch.int32)
    _decode(False, q, k_pool, v_pool, lam, norm, seqlens, every_other(block_table), backend)
    bad = block_table.clone()
    bad[2, 0] = k_pool.shape[0]
    with pytest.raises(ValueError, match="block_table must point into the pool"):
        _decode(False, q, k_pool, v_pool, lam, norm, seqlens, bad.t().contiguous().t(),
                backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_layer_cache_with_strided_lengths(v2, backend):
    """A DiffKVCache whose seqlens is a strided view: the decoding steps give what contiguous
    lengths give, and the view advances in place."""
    torch.manual_seed(0)
    layer = (DiffMultiheadAttentionV2 if v2 else DiffMultiheadAttention)(
        64, 2, batch_first=True, num_kv_heads=2, backend=backend)
    start = torch.tensor([1, 3, 0], dtype=torch.int32)
    contiguous = DiffKVCache.empty(3, 8, layer)
    contiguous.seqlens.copy_(start)
    strided = DiffKVCache.empty(3, 8, layer)
    strided = DiffKVCache(strided.k_cache, strided.v_cache, every_other(start.clone()))
    prompt, step = torch.randn(3, 2, 64), torch.randn(3, 1, 64)
    with torch.no_grad():
        for x in (prompt, step):
            assert torch.equal(layer(x, kv_cache=strided)[0], layer(x, kv_cache=contiguous)[0])
    assert strided.seqlens.tolist() == contiguous.seqlens.tolist() == [4, 6, 3]
    assert torch.equal(strided.k_cache, contiguous.k_cache)


@requires_interpreter
def test_launchers_read_a_strided_key_padding_mask_as_laid_out():
    """The launchers themselves (below the API's checks) take a key padding mask whose last
    dimension is strided: forward and gradients as with a contiguous one."""
    from diffattn import autograd
    from diffattn.kernels import AttentionCall
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 5, 4, 16, generator=g), torch.randn(2, 7, 4, 16, generator=g)
    v = torch.randn(2, 7, 2, 32, generator=g)
    mask = torch.rand(2, 7, generator=g) < 0.3
    strided = torch.stack([mask, ~mask], -1)[..., 0]
    results = []
    for m in (mask, strided):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = autograd.fused_attention(*leaves, None, m, None, AttentionCall(0.25))
        results.append([out, *torch.autograd.grad(out, leaves, torch.ones_like(out))])
    for name, want, got in zip(("out", "dq", "dk", "dv"), *results):
        assert torch.equal(got, want), name
