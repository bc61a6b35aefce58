"""flash-attn's options of the KV-cache ops (diff_attention_with_kvcache and
diff_attention_v2_with_kvcache, both backends): rotary embedding (interleaved and halves,
full and partial rotary_dim, q at its own positions or at cache_seqlens), cache_leftpad,
cache_batch_idx, window_size and return_softmax_lse, also with softcap, against float64
references written here from the formulas (rotate, gather, mask, cap, two softmaxes); NaN in
every cache row a sequence does not own; greedy decoding of a left-padded batch equal to
recomputation with a key padding mask; the flash-style positional call refused; bad option
values refused by name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch

from diffattn import diff_attention, diff_attention_v2, diff_attention_v2_with_kvcache, \
    diff_attention_with_kvcache
from helpers import assert_close_rel, poison_empty, requires_interpreter  # noqa: F401

BACKENDS = [pytest.param("triton", marks=requires_interpreter), "torch"]


# ------------------------------------------------------------------ float64 references
def rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions,
                     interleaved: bool) -> torch.Tensor:
    """x (N, heads, d) float64, token n rotated at positions[n]: each pair of dims (a, b)
    at frequency i, (2i, 2i + 1) interleaved or (i, i + r/2) in halves, becomes
    (a cos - b sin, b cos + a sin); dims >= r = 2 * cos.shape[1] untouched."""
    half = cos.shape[1]
    out = x.clone()
    for n, p in enumerate(positions):
        for i in range(half):
            a_dim, b_dim = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
            c, s = cos[p, i].double(), sin[p, i].double()
            a, b = x[n, :, a_dim], x[n, :, b_dim]
            out[n, :, a_dim] = a * c - b * s
            out[n, :, b_dim] = b * c + a * s
    return out


def visible_keys(L: int, Nq: int, i: int, first: int, causal: bool, window) -> list:
    diagonal = L - Nq + i
    left, right = (-1, -1) if window is None else window
    if causal:
        right = 0
    return [j for j in range(first, L)
            if (left < 0 or j >= diagonal - left) and (right < 0 or j <= diagonal + right)]


@dataclass
class Case:
    v2: bool = False
    B: int = 2
    Nq: int = 1
    Nnew: int = 1
    capacity: int = 32
    lens: tuple = (5, 20)               # where each sequence's cached keys end, before the call
    leftpad: Optional[tuple] = None
    batch_idx: Optional[tuple] = None   # cache rows (the cache then holds 4 rows)
    rotary_dim: int = 0
    interleaved: bool = True
    causal: bool = True
    window: Optional[Tuple[int, int]] = None
    H: int = 2
    Hk: int = 2
    d: int = 16
    page: int = 0
    splits: int = 1
    dtype: torch.dtype = torch.float32

    def __str__(self):
        return (f"Nq{self.Nq}-new{self.Nnew}-lens{self.lens}-"
                f"pad{self.leftpad}-rows{self.batch_idx}-rot{self.rotary_dim}"
                f"{'i' if self.interleaved else 'h'}-{'causal' if self.causal else 'full'}-"
                f"win{self.window}-H{self.H}k{self.Hk}-page{self.page}-split{self.splits}-"
                f"{str(self.dtype)[6:]}")


CASES = [
    Case(Nq=2, Nnew=2, rotary_dim=16),                                        # full, GPT-J
    Case(Nq=2, Nnew=2, rotary_dim=8, interleaved=False, causal=False, page=16,
         splits=2),                                                           # q at lens
    Case(lens=(9, 30), Nnew=1, leftpad=(4, 17), batch_idx=(3, 0), rotary_dim=8,
         splits=3),
    Case(Nq=3, Nnew=3, lens=(2, 25), leftpad=(1, 16), window=(4, -1), H=4, Hk=2, page=16,
         splits=2),
    Case(Nq=2, Nnew=1, lens=(7, 12), window=(3, 1), causal=False, rotary_dim=16,
         interleaved=False, batch_idx=(1, 2)),                                # q per row
    Case(Nq=3, Nnew=0, lens=(6, 14), leftpad=(6, 2), window=(5, 0), causal=False,
         splits=2),                                                           # empty rows
    Case(Nq=2, Nnew=2, lens=(10, 3), leftpad=(3, 0), rotary_dim=16, interleaved=False,
         page=16, dtype=torch.float16),
]


def make(c: Case, seed=0):
    """float64 data: q, new keys/values, the caches (every row a sequence does not own is
    NaN: before its left pad, past its end, rows no sequence reads), cos/sin."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    key_heads = c.Hk if c.v2 else 2 * c.Hk
    dv = c.d if c.v2 else 2 * c.d
    B, cap = c.B, c.capacity
    lens = torch.tensor(c.lens, dtype=torch.int32)
    pad = torch.tensor(c.leftpad or (0,) * B, dtype=torch.int32)
    keys, values = rnd(B, cap, key_heads, c.d), rnd(B, cap, c.Hk, dv)
    owned = (torch.arange(cap)[None] < lens[:, None].long()) & \
        (torch.arange(cap)[None] >= pad[:, None].long())
    keys = keys.masked_fill(~owned[..., None, None], float("nan"))
    values = values.masked_fill(~owned[..., None, None], float("nan"))
    t = dict(q=rnd(B, c.Nq, 2 * c.H, c.d), k_new=rnd(B, c.Nnew, key_heads, c.d),
             v_new=rnd(B, c.Nnew, c.Hk, dv), lens=lens, keys=keys, values=values,
             lam=(torch.rand(B, c.Nq, c.H, generator=g, dtype=torch.float64) if c.v2 else
                  0.2 + 0.6 * torch.rand(c.H, generator=g, dtype=torch.float64)),
             norm=None if c.v2 else 1 + 0.3 * rnd(dv), cos=None, sin=None, block_table=None,
             leftpad=None if c.leftpad is None else pad, batch_idx=None)
    if c.rotary_dim:
        angle = 2 * math.pi * torch.rand(cap, c.rotary_dim // 2, generator=g,
                                         dtype=torch.float64)
        t["cos"], t["sin"] = angle.cos(), angle.sin()
    if c.page:
        blocks = cap // c.page
        num_blocks = B * blocks + 2
        table = torch.randperm(num_blocks, generator=g)[:B * blocks].view(B, blocks)
        k_cache = torch.full((num_blocks, c.page, key_heads, c.d), float("nan"),
                             dtype=torch.float64)
        v_cache = torch.full((num_blocks, c.page, c.Hk, dv), float("nan"), dtype=torch.float64)
        for b in range(B):
            for p in range(cap):
                k_cache[table[b, p // c.page], p % c.page] = keys[b, p]
                v_cache[table[b, p // c.page], p % c.page] = values[b, p]
        t["block_table"] = table.to(torch.int32)
    elif c.batch_idx is not None:
        k_cache = torch.full((4, cap, key_heads, c.d), float("nan"), dtype=torch.float64)
        v_cache = torch.full((4, cap, c.Hk, dv), float("nan"), dtype=torch.float64)
        for b, row in enumerate(c.batch_idx):
            k_cache[row], v_cache[row] = keys[b], values[b]
        t["batch_idx"] = torch.tensor(c.batch_idx, dtype=torch.int32)
    else:
        k_cache, v_cache = keys.clone(), values.clone()
    t["k_cache"], t["v_cache"] = k_cache, v_cache
    return t


def appended_keys(c: Case, t) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's logical keys and values after the call: the new keys rotated at
    lens[b] + i (with rotary), appended at lens[b]."""
    keys, values = t["keys"].clone(), t["values"].clone()
    for b in range(c.B):
        s = int(t["lens"][b])
        k_new = t["k_new"][b]
        if c.rotary_dim:
            k_new = rotate_reference(k_new, t["cos"], t["sin"], range(s, s + c.Nnew),
                                     c.interleaved)
        keys[b, s:s + c.Nnew] = k_new
        values[b, s:s + c.Nnew] = t["v_new"][b]
    return keys, values


def reference(c: Case, t, softcap: float = 0.0):
    """float64 output (B, Nq, H, dv) and log-sum-exp (B, 2H, Nq), one sequence, head and
    query at a time; softcap > 0 caps the scaled scores s: softcap * tanh(s / softcap)."""
    keys, values = appended_keys(c, t)
    B, H, d = c.B, c.H, c.d
    group = H // c.Hk
    scale = d ** -0.5
    dv = d if c.v2 else 2 * d
    out = torch.zeros(B, c.Nq, H, dv, dtype=torch.float64)
    lse = torch.full((B, 2 * H, c.Nq), float("-inf"), dtype=torch.float64)
    per_row = c.causal or c.window is not None
    for b in range(B):
        s = int(t["lens"][b])
        L = s + c.Nnew
        first = 0 if t["leftpad"] is None else int(t["leftpad"][b])
        q = t["q"][b]
        if c.rotary_dim:
            positions = [s + i if per_row else s for i in range(c.Nq)]
            q = rotate_reference(q, t["cos"], t["sin"], positions, c.interleaved)
        for h in range(H):
            g = h // group
            k1 = keys[b, :, g] if c.v2 else keys[b, :, 2 * g]
            k2 = keys[b, :, g] if c.v2 else keys[b, :, 2 * g + 1]
            for i in range(c.Nq):
                seen = visible_keys(L, c.Nq, i, first, c.causal, c.window)
                if not seen:
                    continue
                s1 = scale * (k1[seen] @ q[i, 2 * h])
                s2 = scale * (k2[seen] @ q[i, 2 * h + 1])
                if softcap > 0:
                    s1, s2 = softcap * torch.tanh(s1 / softcap), softcap * torch.tanh(s2 / softcap)
                lse[b, 2 * h, i], lse[b, 2 * h + 1, i] = s1.logsumexp(0), s2.logsumexp(0)
                lam = t["lam"][b, i, h] if c.v2 else t["lam"][h]
                x = torch.softmax(s1, 0) @ values[b, seen, g] - \
                    lam * (torch.softmax(s2, 0) @ values[b, seen, g])
                if not c.v2:
                    x = x / torch.sqrt((x * x).mean() + 1e-5) * t["norm"] * 0.75
                out[b, i, h] = x
    return out, lse


def run(c: Case, t, backend, **extra):
    cast = lambda x: None if x is None else x.to(c.dtype)  # noqa: E731
    k_cache, v_cache = cast(t["k_cache"]), cast(t["v_cache"])
    kw = dict(k=cast(t["k_new"]) if c.Nnew else None, v=cast(t["v_new"]) if c.Nnew else None,
              rotary_cos=cast(t["cos"]), rotary_sin=cast(t["sin"]),
              cache_seqlens=t["lens"].clone(), cache_batch_idx=t["batch_idx"],
              cache_leftpad=t["leftpad"], block_table=t["block_table"], causal=c.causal,
              window_size=c.window, rotary_interleaved=c.interleaved, num_splits=c.splits,
              return_softmax_lse=True, backend=backend, **extra)
    with torch.no_grad():
        if c.v2:
            out, lse = diff_attention_v2_with_kvcache(cast(t["q"]), k_cache, v_cache,
                                                      lambda_=t["lam"].float(), **kw)
        else:
            out, lse = diff_attention_with_kvcache(cast(t["q"]), k_cache, v_cache,
                                                   lambda_=t["lam"].float(),
                                                   norm_weight=cast(t["norm"]),
                                                   out_scale=0.75, **kw)
    return out, lse, k_cache, v_cache


def assert_lse_close(got, ref, tol):
    assert got.dtype == torch.float32 and got.shape == ref.shape, (got.dtype, got.shape)
    empty = torch.isneginf(ref)
    assert torch.equal(torch.isposinf(got), empty), "rows that see no key: lse = +inf"
    err = (got.double() - ref).abs()[~empty].max().item() if (~empty).any() else 0.0
    assert err <= tol, f"lse: error {err:.2e} > {tol:.0e}"


def check_caches(c: Case, t, k_cache, v_cache):
    """The new keys (rotated) and values sit at lens[b] .. in each sequence's cache row or
    pages; every other row is as it was."""
    keys, values = appended_keys(c, t)
    want_k, want_v = t["k_cache"].clone(), t["v_cache"].clone()
    for b in range(c.B):
        for p in range(int(t["lens"][b]), int(t["lens"][b]) + c.Nnew):
            if c.page:
                row = (t["block_table"][b, p // c.page], p % c.page)
            else:
                row = (b if t["batch_idx"] is None else t["batch_idx"][b], p)
            want_k[row], want_v[row] = keys[b, p], values[b, p]
    tol = {torch.float32: 1e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}[c.dtype]
    k_cache, v_cache = k_cache.cpu(), v_cache.cpu()
    torch.testing.assert_close(k_cache.double(), want_k.to(c.dtype).double(), atol=tol,
                               rtol=tol, equal_nan=True)
    torch.testing.assert_close(v_cache.double(), want_v.to(c.dtype).double(), atol=0,
                               rtol=0, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("c", CASES, ids=str)
def test_options_match_reference(c, v2, backend, poison_empty):  # noqa: F811
    if backend == "torch" and c.dtype == torch.float16:
        pytest.skip("fp16 SDPA on CPU: covered by the fused path")
    c = Case(**{**c.__dict__, "v2": v2})
    t = make(c)
    ref, ref_lse = reference(c, t)
    out, lse, k_cache, v_cache = run(c, t, backend)
    tol = {torch.float32: 5e-5, torch.float16: 5e-3}[c.dtype]
    assert_close_rel("out", out, ref, c.dtype, tol)
    assert_lse_close(lse, ref_lse, 1e-4 if c.dtype == torch.float32 else 2e-2)
    check_caches(c, t, k_cache, v_cache)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("c", [CASES[2], CASES[3], CASES[4]], ids=str)
def test_options_with_softcap(c, v2, backend, poison_empty):  # noqa: F811
    """softcap with rotary, cache_leftpad, cache_batch_idx, window_size, paged caches, splits
    and return_softmax_lse: the output and the lse of the capped scores."""
    c = Case(**{**c.__dict__, "v2": v2})
    t = make(c, seed=1)
    t["q"] = 3 * t["q"]  # scores of a few units: the cap changes every map
    ref, ref_lse = reference(c, t, softcap=2.0)
    out, lse, _, _ = run(c, t, backend, softcap=2.0)
    assert_close_rel("out", out, ref, c.dtype, 5e-5)
    assert_lse_close(lse, ref_lse, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_tensors_are_read_as_laid_out(backend):
    """Strided cache_leftpad and cache_batch_idx (views of a longer tensor) give the
    contiguous result."""
    c = CASES[2]
    t = make(c)
    ref, _ = reference(c, t)
    wide = lambda x: torch.stack([x, x + 100]).t().reshape(-1)[::2]  # noqa: E731
    t["leftpad"], t["batch_idx"] = wide(t["leftpad"]), wide(t["batch_idx"])
    assert t["leftpad"].stride(0) == 2
    out, _, _, _ = run(c, t, backend)
    assert_close_rel("out", out, ref, c.dtype, 5e-5)


@requires_interpreter
@pytest.mark.parametrize("splits", [1, 4])
def test_lse_merges_split_results(splits):
    """The log-sum-exp of two calls over the two halves of the keys merges into the call over
    all of them (the use of lse: ring attention, speculative decoding)."""
    c = Case(v2=True, Nq=1, Nnew=0, lens=(24, 30), causal=False, capacity=32)
    t = make(c)
    q, kc, vc = t["q"].float(), t["k_cache"].float(), t["v_cache"].float()
    lam = 0.0  # one map's output is the plain softmax average: merging it is exact
    kw = dict(lambda_=lam, return_softmax_lse=True, backend="triton", num_splits=splits)
    full, lse = diff_attention_v2_with_kvcache(q, kc, vc, cache_seqlens=t["lens"], **kw)
    half = torch.tensor([12, 12], dtype=torch.int32)
    o1, l1 = diff_attention_v2_with_kvcache(q, kc, vc, cache_seqlens=half, **kw)
    o2, l2 = diff_attention_v2_with_kvcache(q, kc, vc, cache_seqlens=t["lens"],
                                            cache_leftpad=half, **kw)
    merged_lse = torch.logaddexp(l1, l2)
    torch.testing.assert_close(merged_lse, lse, atol=1e-5, rtol=1e-5)
    w1 = (l1 - merged_lse).exp()[:, 0::2].transpose(1, 2)[..., None]     # map 1 of each head
    w2 = (l2 - merged_lse).exp()[:, 0::2].transpose(1, 2)[..., None]
    torch.testing.assert_close(w1 * o1 + w2 * o2, full, atol=1e-5, rtol=1e-5)


def test_causal_defaults_to_false_as_in_flash_attn():
    c = Case(Nq=3, Nnew=3, causal=False)
    t = make(c)
    kw = dict(lambda_=0.5, cache_seqlens=t["lens"], backend="torch")
    caches = lambda: (t["k_cache"].clone(), t["v_cache"].clone())  # noqa: E731
    default = diff_attention_with_kvcache(t["q"], *caches(), t["k_new"], t["v_new"], **kw)
    full = diff_attention_with_kvcache(t["q"], *caches(), t["k_new"], t["v_new"],
                                       causal=False, **kw)
    causal = diff_attention_with_kvcache(t["q"], *caches(), t["k_new"], t["v_new"],
                                         causal=True, **kw)
    assert torch.equal(default, full) and not torch.allclose(default, causal)


@pytest.mark.parametrize("fn", [diff_attention_with_kvcache, diff_attention_v2_with_kvcache])
def test_flash_style_positional_call_is_a_type_error(fn):
    """flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos, ...): lambda_ is
    keyword-only, so no positional argument is ever taken as lambda."""
    q, kc, vc = torch.randn(1, 1, 4, 16), torch.zeros(1, 8, 2, 16), torch.zeros(1, 8, 2, 16)
    if fn is diff_attention_with_kvcache:
        kc, vc = torch.zeros(1, 8, 2, 16), torch.zeros(1, 8, 1, 32)
    k, v = kc[:, :1].clone(), vc[:, :1].clone()
    with pytest.raises(TypeError, match="lambda_"):
        fn(q, kc, vc, k, v, None, None, 0)                     # flash's order, no lambda
    with pytest.raises(TypeError, match="lambda_"):
        fn(q, kc, vc, 0.0)                                     # lambda where k goes
    with pytest.raises(TypeError):
        fn(q, kc, vc, k, v, None, None, 0, None, None, None, 0.5)  # past block_table


def _good():
    B, H, Hk, d, cap = 2, 2, 1, 16, 32
    return dict(q=torch.randn(B, 1, 2 * H, d), k_cache=torch.zeros(B, cap, 2 * Hk, d),
                v_cache=torch.zeros(B, cap, Hk, 2 * d), k=torch.randn(B, 1, 2 * Hk, d),
                v=torch.randn(B, 1, Hk, 2 * d), lambda_=0.5,
                cache_seqlens=torch.tensor([3, 30], dtype=torch.int32), backend="torch")


I32 = dict(dtype=torch.int32)


@pytest.mark.parametrize("change, error, words", [
    (dict(cache_batch_idx=torch.tensor([0, 2], **I32)), ValueError, "cache_batch_idx must hold"),
    (dict(cache_batch_idx=torch.tensor([-1, 0], **I32)), ValueError, "cache_batch_idx must hold"),
    (dict(cache_batch_idx=torch.tensor([0, 1])), TypeError, "cache_batch_idx must be an int32"),
    (dict(cache_batch_idx=torch.tensor([0], **I32)), ValueError, "cache_batch_idx must have"),
    (dict(cache_leftpad=torch.tensor([5, 0], **I32)), ValueError, "cache_leftpad must be"),
    (dict(cache_leftpad=torch.tensor([-1, 0], **I32)), ValueError, "cache_leftpad must be"),
    (dict(cache_leftpad=torch.tensor([0, 0]).float()), TypeError, "cache_leftpad"),
    (dict(rotary_cos=torch.ones(32, 8)), ValueError, "together"),
    (dict(rotary_cos=torch.ones(30, 8), rotary_sin=torch.zeros(30, 8)), ValueError,
     "seqlen_ro 30"),
    (dict(rotary_cos=torch.ones(32, 9), rotary_sin=torch.zeros(32, 9)), ValueError,
     "rotary_dim"),
    (dict(rotary_cos=torch.ones(32, 8), rotary_sin=torch.zeros(32, 4)), ValueError,
     "rotary_sin must have"),
    (dict(rotary_cos=torch.ones(32, 8, dtype=torch.int32),
          rotary_sin=torch.zeros(32, 8, dtype=torch.int32)), TypeError, "floating"),
    (dict(rotary_cos=torch.ones(32, 8), rotary_sin=torch.zeros(32, 8), k=None, v=None),
     ValueError, "need the new keys"),
    (dict(rotary_cos=torch.ones(32, 8), rotary_sin=torch.zeros(32, 8),
          rotary_interleaved=1), TypeError, "rotary_interleaved"),
    (dict(window_size=(2,)), TypeError, "window_size"),
    (dict(window_size=(-2, 0)), ValueError, "window_size"),
    (dict(return_softmax_lse=1), TypeError, "return_softmax_lse"),
])
def test_bad_options(change, error, words):
    args = {**_good(), **change}
    q, kc, vc = args.pop("q"), args.pop("k_cache"), args.pop("v_cache")
    with pytest.raises(error, match=words):
        diff_attention_with_kvcache(q, kc, vc, **args)


def test_bad_option_combinations():
    args = _good()
    q, kc, vc = args.pop("q"), args.pop("k_cache"), args.pop("v_cache")
    pool_k, pool_v = torch.zeros(4, 16, 2, 16), torch.zeros(4, 16, 1, 32)
    table = torch.tensor([[0, 1], [2, 3]], **I32)
    with pytest.raises(ValueError, match="cache_batch_idx applies to contiguous caches"):
        diff_attention_with_kvcache(q, pool_k, pool_v, block_table=table,
                                    cache_batch_idx=torch.tensor([0, 1], **I32), **args)
    # a cache with more rows than the batch needs cache_batch_idx
    with pytest.raises(ValueError, match="cache_batch_idx"):
        diff_attention_with_kvcache(q, torch.zeros(3, 32, 2, 16), torch.zeros(3, 32, 1, 32),
                                    **args)
    # with a left pad, pages before it are never read and may hold anything
    diff_attention_with_kvcache(q, pool_k, pool_v, block_table=torch.tensor(
        [[0, 1], [-1, 3]], **I32), cache_leftpad=torch.tensor([0, 16], **I32), **args)
    # the rotary table must cover the queries' positions when they sit at their own
    rot = dict(rotary_cos=torch.ones(33, 8), rotary_sin=torch.zeros(33, 8))
    q3 = torch.randn(2, 4, 4, 16)
    diff_attention_with_kvcache(q3, kc.clone(), vc.clone(), causal=False, **rot, **args)
    with pytest.raises(ValueError, match="seqlen_ro 33"):
        diff_attention_with_kvcache(q3, kc.clone(), vc.clone(), causal=True, **rot, **args)


# ------------------------------------------------------------------ greedy decoding
class TinyLM:
    """Embedding, one differential attention layer with rotary embedding (GPT-NeoX halves),
    a residual, the vocabulary projection: enough for greedy decoding to depend on every
    attention output."""

    def __init__(self, v2: bool, vocab=11, H=2, d=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        w = lambda *s: torch.randn(*s, generator=g) * 0.5  # noqa: E731
        self.v2, self.H, self.d = v2, H, d
        E = 2 * H * d
        self.embed, self.out = w(vocab, E), w(E, vocab)
        self.wq, self.wk = w(E, 2 * H * d), w(E, (H if v2 else 2 * H) * d)
        self.wv, self.wo = w(E, H * (d if v2 else 2 * d)), w(H * (d if v2 else 2 * d), E)
        angle = torch.arange(64)[:, None] * 10.0 ** (-torch.arange(d // 2) / (d // 2))
        self.cos, self.sin = angle.cos(), angle.sin()

    def project(self, tokens):
        x = self.embed[tokens]                                          # (B, N, E)
        B, N, _ = x.shape
        q = (x @ self.wq).view(B, N, 2 * self.H, self.d)
        k = (x @ self.wk).view(B, N, -1, self.d)
        v = (x @ self.wv).view(B, N, self.H, -1)
        return x, q, k, v

    def logits(self, x, attended):
        return (x + attended.flatten(2) @ self.wo) @ self.out

    def rotate(self, t, positions):
        half = self.cos.shape[1]
        c, s = self.cos[positions][None, :, None], self.sin[positions][None, :, None]
        a, b = t[..., :half], t[..., half:2 * half]
        return torch.cat((a * c - b * s, b * c + a * s, t[..., 2 * half:]), -1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_greedy_decoding_of_a_left_padded_batch_matches_recomputation(v2, backend):
    """Prompts of different lengths, left-padded (what generate makes): prefill and one token
    per step through the KV-cache op with cache_leftpad and the rotary tables give the tokens
    of recomputing the whole sequence each step (rotary at the same positions, pads masked
    by key_padding_mask)."""
    torch.manual_seed(0)
    lm = TinyLM(v2)
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    P = max(map(len, prompts))
    pads = torch.tensor([P - len(p) for p in prompts], dtype=torch.int32)
    tokens = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    steps, cap = 4, 16
    lam = 0.3
    dense = diff_attention_v2 if v2 else diff_attention
    step_fn = diff_attention_v2_with_kvcache if v2 else diff_attention_with_kvcache

    # recomputation: the whole padded sequence each step
    recomputed = tokens.clone()
    for _ in range(steps):
        T = recomputed.shape[1]
        x, q, k, v = lm.project(recomputed)
        q, k = lm.rotate(q, torch.arange(T)), lm.rotate(k, torch.arange(T))
        padding = torch.arange(T)[None] < pads[:, None].long()
        att = dense(q, k, v, lambda_=lam, causal=True, key_padding_mask=padding, backend="torch")
        nxt = lm.logits(x, att)[:, -1].argmax(-1)
        recomputed = torch.cat((recomputed, nxt[:, None]), 1)

    # cached: prefill the padded prompts, then one token per step
    _, _, k0, v0 = lm.project(tokens[:, :1])
    k_cache = torch.zeros(2, cap, k0.shape[2], lm.d)
    v_cache = torch.zeros(2, cap, v0.shape[2], v0.shape[3])
    seqlens = torch.zeros(2, dtype=torch.int32)
    decoded, feed = tokens.clone(), tokens
    with torch.no_grad():
        for _ in range(steps):
            x, q, k, v = lm.project(feed)
            att = step_fn(q, k_cache, v_cache, k, v, lm.cos, lm.sin, seqlens,
                          cache_leftpad=pads, lambda_=lam, causal=True,
                          rotary_interleaved=False, backend=backend)
            seqlens += feed.shape[1]
            nxt = lm.logits(x, att)[:, -1].argmax(-1)
            decoded = torch.cat((decoded, nxt[:, None]), 1)
            feed = nxt[:, None]
    assert torch.equal(decoded, recomputed), (decoded, recomputed)


@pytest.mark.slow
@requires_interpreter
def test_traced_step_with_options_matches_eager():
    """A step with rotary, left padding, a window and the log-sum-exp under
    torch.compile(fullgraph=True) (aot_eager) gives the eager results: the options go through
    the registered operator."""
    torch._dynamo.reset()
    c = CASES[3]
    t = make(c)
    rot = make(CASES[0])

    def step(q, kc, vc, k, v, cos, sin, sl, pad):
        return diff_attention_with_kvcache(q, kc, vc, k, v, cos, sin, sl, cache_leftpad=pad,
                                           block_table=t["block_table"], lambda_=0.5,
                                           causal=True, window_size=(4, -1), num_splits=2,
                                           return_softmax_lse=True, backend="triton")

    args = lambda: (t["q"].float(), t["k_cache"].float(), t["v_cache"].float(),  # noqa: E731
                    t["k_new"].float(), t["v_new"].float(), rot["cos"].float(),
                    rot["sin"].float(), t["lens"], t["leftpad"])
    with torch.no_grad():
        want = step(*args())
        got = torch.compile(step, backend="aot_eager", fullgraph=True)(*args())
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, equal_nan=True)
