"""diff_attention_with_kvcache and diff_attention_v2_with_kvcache (both backends) against
float64 per-sequence references written here from the formulas: ragged cache lengths (0
included), one and several queries, with and without new keys (appended in place, checked),
split-K and one pass, contiguous and paged caches with shuffled pages, grouped keys/values,
fp32 and fp16 (the fused kernels through the Triton interpreter), NaN-poisoned outputs, and
bad input refused with named errors.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from diffattn import diff_attention_v2_with_kvcache, diff_attention_with_kvcache
from helpers import assert_close_rel, poison_empty, requires_interpreter  # noqa: F401


@dataclass
class Case:
    v2: bool = False
    B: int = 3
    Nq: int = 1
    Nnew: int = 1
    capacity: int = 64
    lens: tuple = (5, 0, 40)          # cache lengths before the call
    H: int = 2
    Hk: int = 2
    d: int = 16
    causal: bool = True
    page: int = 0                     # 0: contiguous caches, else paged with this page size
    splits: int = 1
    lam: str = "heads"                # "heads" (H,), "float", "tokens" (V2: (B, Nq, H))
    norm: bool = True                 # V1 only
    dtype: torch.dtype = torch.float32

    def __str__(self):
        return (f"{'v2' if self.v2 else 'v1'}-B{self.B}-Nq{self.Nq}-new{self.Nnew}-"
                f"cap{self.capacity}-H{self.H}-Hk{self.Hk}-d{self.d}-page{self.page}-"
                f"split{self.splits}-{self.lam}-{'causal' if self.causal else 'full'}-"
                f"{str(self.dtype)[6:]}")


CASES = [
    Case(),
    Case(Nq=3, Nnew=3, splits=3),
    Case(Nq=2, Nnew=0, lens=(7, 1, 64), splits=2, page=16),
    Case(Nq=4, Nnew=2, lens=(0, 1, 30), H=4, Hk=1, page=16, splits=4, lam="float"),
    Case(Nnew=5, lens=(0, 0, 59), causal=False, norm=False, splits=0),
    Case(B=2, Nq=1, Nnew=1, lens=(31, 3), capacity=96, page=32, d=32, dtype=torch.float16),
    # 8 heads share one key/value group: 72 (head, query) rows, two row tiles per group
    Case(Nq=9, Nnew=3, lens=(0, 20, 50), H=8, Hk=1, splits=2, lam="float"),
    Case(v2=True),
    Case(v2=True, Nq=3, Nnew=3, lam="tokens", splits=3, page=16, H=4, Hk=2),
    Case(v2=True, Nq=5, Nnew=2, lens=(2, 0, 50), lam="heads", splits=2),  # rows with no key
    Case(v2=True, Nnew=0, lens=(9, 1, 33), lam="float", causal=False, page=16, splits=0),
    Case(v2=True, B=2, lens=(20, 63), Nq=1, Nnew=1, d=32, lam="tokens", dtype=torch.float16),
]


def make(c: Case, seed=0):
    """Logical keys/values (B, capacity, ...) in float64, the caches holding the first
    lens[b] of them (the rest garbage), the new keys, q, lambda, norm weight."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    key_heads = c.Hk if c.v2 else 2 * c.Hk
    dv = c.d if c.v2 else 2 * c.d
    B, cap = c.B, c.capacity
    keys, values = rnd(B, cap, key_heads, c.d), rnd(B, cap, c.Hk, dv)
    q = rnd(B, c.Nq, 2 * c.H, c.d)
    lens = torch.tensor(c.lens, dtype=torch.int32)
    k_new = torch.stack([keys[b, lens[b]:lens[b] + c.Nnew] for b in range(B)])
    v_new = torch.stack([values[b, lens[b]:lens[b] + c.Nnew] for b in range(B)])
    garbage_k, garbage_v = 50 * rnd(*keys.shape), 50 * rnd(*values.shape)
    valid = torch.arange(cap)[None, :] < lens[:, None].long()
    k_logical = torch.where(valid[..., None, None], keys, garbage_k)
    v_logical = torch.where(valid[..., None, None], values, garbage_v)
    if c.lam == "heads":
        lam = 0.2 + 0.6 * torch.rand(c.H, generator=g, dtype=torch.float64)
    elif c.lam == "tokens":
        lam = torch.rand(B, c.Nq, c.H, generator=g, dtype=torch.float64)
    else:
        lam = 0.7
    norm = (1 + 0.3 * rnd(dv)) if (c.norm and not c.v2) else None
    block_table = None
    if c.page:
        max_blocks = cap // c.page
        num_blocks = B * max_blocks + 3
        perm = torch.randperm(num_blocks, generator=g)[:B * max_blocks]
        block_table = perm.view(B, max_blocks).to(torch.int32)
        k_cache = 50 * rnd(num_blocks, c.page, key_heads, c.d)
        v_cache = 50 * rnd(num_blocks, c.page, c.Hk, dv)
        for b in range(B):
            for p in range(cap):
                k_cache[block_table[b, p // c.page], p % c.page] = k_logical[b, p]
                v_cache[block_table[b, p // c.page], p % c.page] = v_logical[b, p]
    else:
        k_cache, v_cache = k_logical.clone(), v_logical.clone()
    return dict(keys=keys, values=values, q=q, lens=lens, k_new=k_new, v_new=v_new, lam=lam,
                norm=norm, block_table=block_table, k_cache=k_cache, v_cache=v_cache,
                k_logical=k_logical, v_logical=v_logical)


def reference(c: Case, t) -> torch.Tensor:
    """float64, one sequence and head at a time: its valid keys, two softmaxes, difference,
    norm."""
    B, H, d = c.B, c.H, c.d
    group = H // c.Hk
    scale = d ** -0.5
    dv = d if c.v2 else 2 * d
    out = torch.zeros(B, c.Nq, H, dv, dtype=torch.float64)
    for b in range(B):
        L = int(t["lens"][b]) + c.Nnew
        K, V = t["keys"][b, :L], t["values"][b, :L]
        for h in range(H):
            g = h // group
            k1 = K[:, g] if c.v2 else K[:, 2 * g]
            k2 = K[:, g] if c.v2 else K[:, 2 * g + 1]
            for i in range(c.Nq):
                visible = L - c.Nq + i + 1 if c.causal else L
                if visible <= 0:
                    continue
                p1 = torch.softmax(scale * (k1[:visible] @ t["q"][b, i, 2 * h]), 0)
                p2 = torch.softmax(scale * (k2[:visible] @ t["q"][b, i, 2 * h + 1]), 0)
                lam = t["lam"]
                lam = (lam if isinstance(lam, float) else
                       lam[b, i, h] if lam.dim() == 3 else lam[h])
                x = p1 @ V[:visible, g] - lam * (p2 @ V[:visible, g])
                if t["norm"] is not None:
                    x = x / torch.sqrt((x * x).mean() + 1e-5) * t["norm"]
                if not c.v2:
                    x = x * 0.75  # out_scale
                out[b, i, h] = x
    return out


def run(c: Case, t, backend, dtype, seqlens_as_int=False):
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    k_cache, v_cache = cast(t["k_cache"]), cast(t["v_cache"])
    lam = t["lam"] if isinstance(t["lam"], float) else t["lam"].float()
    kw = dict(k=cast(t["k_new"]) if c.Nnew else None, v=cast(t["v_new"]) if c.Nnew else None,
              cache_seqlens=t["lens"].clone(), block_table=t["block_table"], causal=c.causal,
              num_splits=c.splits, backend=backend)
    if c.v2:
        out = diff_attention_v2_with_kvcache(cast(t["q"]), k_cache, v_cache, lambda_=lam, **kw)
    else:
        out = diff_attention_with_kvcache(cast(t["q"]), k_cache, v_cache, lambda_=lam,
                                          norm_weight=cast(t["norm"]), out_scale=0.75, **kw)
    return out, k_cache, v_cache


def check_appended(c: Case, t, k_cache, v_cache, dtype):
    """The caches hold the logical keys up to lens + Nnew and their old contents after."""
    kl, vl = t["k_logical"].clone(), t["v_logical"].clone()
    for b in range(c.B):
        s = int(t["lens"][b])
        kl[b, s:s + c.Nnew] = t["k_new"][b]
        vl[b, s:s + c.Nnew] = t["v_new"][b]
    if c.page:
        bt = t["block_table"].long()
        got_k = k_cache[bt].flatten(1, 2)
        got_v = v_cache[bt].flatten(1, 2)
        untouched = torch.ones(k_cache.shape[0], dtype=torch.bool)
        untouched[bt.flatten()] = False
        assert torch.equal(k_cache[untouched], t["k_cache"][untouched].to(dtype))
    else:
        got_k, got_v = k_cache, v_cache
    assert torch.equal(got_k, kl.to(dtype)), "k_cache after the call"
    assert torch.equal(got_v, vl.to(dtype)), "v_cache after the call"


@pytest.mark.parametrize("backend", [
    pytest.param("triton", marks=requires_interpreter), "torch"])
@pytest.mark.parametrize("c", CASES, ids=str)
def test_kvcache_matches_reference(c, backend, poison_empty):  # noqa: F811
    if backend == "torch" and c.dtype == torch.float16:
        pytest.skip("fp16 SDPA on CPU: covered by the fused path")
    t = make(c)
    ref = reference(c, t)
    out, k_cache, v_cache = run(c, t, backend, c.dtype)
    tol = {torch.float32: 5e-5, torch.float16: 5e-3}[c.dtype]
    assert_close_rel("out", out, ref, c.dtype, tol)
    check_appended(c, t, k_cache, v_cache, c.dtype)


@pytest.mark.parametrize("backend", [
    pytest.param("triton", marks=requires_interpreter), "torch"])
@pytest.mark.parametrize("c", [CASES[1], CASES[2], CASES[8]], ids=str)
def test_nan_past_the_cache_length_reaches_no_output(c, backend):
    """Rows past a sequence's length (never written, or stale) may hold anything: NaN there
    changes nothing."""
    t = make(c)
    ref = reference(c, t)
    valid = torch.arange(c.capacity)[None, :] < t["lens"][:, None].long()
    for name in ("k_logical", "v_logical"):
        t[name] = t[name].masked_fill(~valid[..., None, None], float("nan"))
    if c.page:
        for name, logical in (("k_cache", "k_logical"), ("v_cache", "v_logical")):
            t[name] = torch.full_like(t[name], float("nan"))
            for b in range(c.B):
                for p in range(c.capacity):
                    t[name][t["block_table"][b, p // c.page], p % c.page] = t[logical][b, p]
    else:
        t["k_cache"], t["v_cache"] = t["k_logical"].clone(), t["v_logical"].clone()
    out, _, _ = run(c, t, backend, c.dtype)
    assert_close_rel("out", out, ref, c.dtype, 5e-5)


@requires_interpreter
def test_split_counts_agree():
    """Every split count (one pass, more splits than tiles, the automatic choice) gives the
    same output."""
    c = Case(Nq=2, Nnew=1, lens=(3, 0, 62), page=16)
    t = make(c)
    ref = reference(c, t)
    for splits in (1, 2, 5, 16, 0):
        c.splits = splits
        out, _, _ = run(c, make(c), "triton", torch.float32)
        assert_close_rel(f"splits={splits}", out, ref, torch.float32, 5e-5)


@requires_interpreter
def test_int_seqlens_and_full_cache():
    """cache_seqlens as an int, and None (every cache full, nothing appended)."""
    c = Case(lens=(10, 10, 10), Nnew=2, Nq=2, page=16)
    t = make(c)
    out, _, _ = run(c, t, "triton", torch.float32)
    q, kc, vc = t["q"].float(), t["k_cache"].float(), t["v_cache"].float()
    out_int = diff_attention_with_kvcache(
        q, kc, vc, lambda_=t["lam"].float(), k=t["k_new"].float(), v=t["v_new"].float(),
        cache_seqlens=10, block_table=t["block_table"], norm_weight=t["norm"].float(),
        out_scale=0.75, causal=True, backend="triton")
    torch.testing.assert_close(out_int, out)
    c2 = Case(lens=(64, 64, 64), Nnew=0, Nq=3, splits=2)
    t2 = make(c2)
    full = diff_attention_with_kvcache(t2["q"].float(), t2["k_cache"].float(),
                                       t2["v_cache"].float(), lambda_=t2["lam"].float(),
                                       causal=True,
                                       norm_weight=t2["norm"].float(), out_scale=0.75,
                                       num_splits=2, backend="triton")
    assert_close_rel("full", full, reference(c2, t2), torch.float32, 5e-5)


def _good(v2=False):
    B, Nq, H, Hk, d, cap = 2, 1, 2, 1, 16, 32
    kh, dv = (Hk, d) if v2 else (2 * Hk, 2 * d)
    return dict(q=torch.randn(B, Nq, 2 * H, d), k_cache=torch.zeros(B, cap, kh, d),
                v_cache=torch.zeros(B, cap, Hk, dv), lambda_=0.5, k=torch.randn(B, 1, kh, d),
                v=torch.randn(B, 1, Hk, dv), cache_seqlens=torch.tensor([3, 31], dtype=torch.int32))


def _call(args, v2=False):
    args = dict(args)
    fn = diff_attention_v2_with_kvcache if v2 else diff_attention_with_kvcache
    return fn(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"),
              lambda_=args.pop("lambda_"), backend="torch", **args)


@pytest.mark.parametrize("change, error, words", [
    (dict(cache_seqlens=torch.tensor([3, 32], dtype=torch.int32)), ValueError, "capacity"),
    (dict(cache_seqlens=torch.tensor([32, 32], dtype=torch.int32)), ValueError, "capacity"),
    (dict(cache_seqlens=torch.tensor([-1, 3], dtype=torch.int32)), ValueError, "capacity"),
    (dict(cache_seqlens=32), ValueError, "capacity"),
    (dict(cache_seqlens=torch.tensor([3, 3])), TypeError, "int32"),
    (dict(cache_seqlens=torch.tensor([3], dtype=torch.int32)), ValueError, "cache_seqlens"),
    (dict(cache_seqlens=3.0), TypeError, "cache_seqlens"),
    (dict(cache_seqlens=None), ValueError, "cache_seqlens"),
    (dict(k=None), ValueError, "together"),
    (dict(k=torch.randn(2, 1, 2, 8)), ValueError, "k must"),
    (dict(v=torch.randn(2, 2, 1, 32)), ValueError, "seq_new"),
    (dict(k_cache=torch.zeros(2, 32, 2, 16, dtype=torch.float64)), TypeError, "k_cache"),
    (dict(v_cache=torch.zeros(2, 32, 1, 16)), ValueError, "v_cache"),
    (dict(k_cache=torch.zeros(3, 32, 2, 16), v_cache=torch.zeros(3, 32, 1, 32)), ValueError,
     "batch"),
    (dict(k_cache=torch.zeros(2, 32, 16, 2).transpose(-1, -2)), ValueError, "contiguous"),
    (dict(v_cache=torch.zeros(2, 32, 1, 32, dtype=torch.float64)), TypeError,
     "v_cache must have q's dtype"),
    (dict(v_cache=torch.zeros(2, 32, 1, 32, device="meta")), ValueError,
     "v_cache must be on q's device"),
    (dict(k_cache=[0.0]), TypeError, "k_cache must be a torch.Tensor"),
    (dict(k=[0.0]), TypeError, "k must be a tensor or None"),
    (dict(lambda_=torch.ones(2, 1, 2)), ValueError, "lambda_"),
    (dict(num_splits=-1), ValueError, "num_splits"),
    (dict(norm_weight=torch.ones(16)), ValueError, "norm_weight"),
    (dict(q=torch.randn(2, 1, 3, 16)), ValueError, "even"),
])
def test_bad_input_v1(change, error, words):
    with pytest.raises(error, match=words):
        _call({**_good(), **change})


def test_bad_paged_input():
    g = _good()
    pool_k, pool_v = torch.zeros(5, 16, 2, 16), torch.zeros(5, 16, 1, 32)
    paged = dict(g, k_cache=pool_k, v_cache=pool_v,
                 block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32))
    _call(paged)  # fine
    # unused slots may hold anything (sequence 0 uses one page)
    _call(dict(paged, block_table=torch.tensor([[0, -1], [2, 3]], dtype=torch.int32)))
    with pytest.raises(ValueError, match="block_table must point into the pool"):
        _call(dict(paged, block_table=torch.tensor([[0, 1], [2, 5]], dtype=torch.int32)))
    with pytest.raises(ValueError, match="block_table must point into the pool"):
        _call(dict(paged, block_table=torch.tensor([[-1, 1], [2, 3]], dtype=torch.int32)))
    with pytest.raises(TypeError, match="block_table"):
        _call(dict(paged, block_table=torch.tensor([[0, 1], [2, 3]])))
    with pytest.raises(ValueError, match="block_table"):
        _call(dict(paged, block_table=torch.tensor([[0, 1]], dtype=torch.int32)))
    with pytest.raises(ValueError, match="page_size"):
        _call(dict(paged, k_cache=torch.zeros(5, 8, 2, 16), v_cache=torch.zeros(5, 8, 1, 32)))
    with pytest.raises(ValueError, match="capacity"):
        _call(dict(paged, cache_seqlens=torch.tensor([3, 32], dtype=torch.int32)))


def test_bad_input_v2():
    g = _good(v2=True)
    _call(g, v2=True)
    _call(dict(g, lambda_=torch.rand(2, 1, 2)), v2=True)  # per token is fine in V2
    with pytest.raises(ValueError, match="lambda_"):
        _call(dict(g, lambda_=torch.rand(2, 2, 2)), v2=True)
    with pytest.raises(ValueError, match="k_cache"):
        _call(dict(g, k_cache=torch.zeros(2, 32, 2, 16)), v2=True)


@requires_interpreter
def test_fused_path_is_forward_only():
    g = _good()
    g["q"].requires_grad_(True)
    with pytest.raises(RuntimeError, match="no_grad"):
        diff_attention_with_kvcache(g["q"], g["k_cache"], g["v_cache"], lambda_=0.5, k=g["k"],
                                    v=g["v"],
                                    cache_seqlens=g["cache_seqlens"], backend="triton")
    # refused before anything was appended
    assert not g["k_cache"].any() and not g["v_cache"].any()


@requires_interpreter
@pytest.mark.parametrize("v2", [False, True])
def test_a_query_with_a_strided_last_dim_matches_the_torch_path(v2):
    g = _good(v2)
    q = g.pop("q")
    strided_q = q.transpose(2, 3).contiguous().transpose(2, 3)  # same values, stride(-1) != 1
    assert strided_q.stride(-1) != 1
    outs = {}
    for backend, query in (("torch", q), ("triton", strided_q)):
        args = {**g, "k_cache": g["k_cache"].clone(), "v_cache": g["v_cache"].clone()}
        fn = diff_attention_v2_with_kvcache if v2 else diff_attention_with_kvcache
        outs[backend] = fn(query, args.pop("k_cache"), args.pop("v_cache"),
                           lambda_=args.pop("lambda_"), backend=backend, **args)
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=2e-5, atol=2e-5)


@pytest.mark.slow
@requires_interpreter
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_traced_step_appends_and_matches_eager(backend):
    """A decoding step under torch.compile(fullgraph=True) (aot_eager: the interpreter cannot
    run Inductor's kernels) gives the eager output and appends to the caches in place: the
    fused path is a registered operator, and nothing reads a length on the host."""
    torch._dynamo.reset()
    g = _good()
    sl = g["cache_seqlens"]

    def step(q, kc, vc, k, v, sl):
        return diff_attention_with_kvcache(q, kc, vc, lambda_=0.5, k=k, v=v, cache_seqlens=sl,
                                           num_splits=2, backend=backend)

    kc0, vc0 = g["k_cache"].clone(), g["v_cache"].clone()
    want = step(g["q"], kc0, vc0, g["k"], g["v"], sl)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(g["q"], g["k_cache"], g["v_cache"], g["k"], g["v"], sl)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert torch.equal(g["k_cache"], kc0) and torch.equal(g["v_cache"], vc0)


def test_torch_path_reads_no_value_on_meta():
    """On the meta device (no values at all) the torch path and its checks still run."""
    B, H, d, cap = 2, 2, 16, 32
    meta = dict(device="meta")
    out = diff_attention_v2_with_kvcache(
        torch.empty(B, 3, 2 * H, d, **meta), torch.empty(B, cap, H, d, **meta),
        torch.empty(B, cap, H, d, **meta), lambda_=torch.empty(B, 3, H, **meta),
        k=torch.empty(B, 2, H, d, **meta), v=torch.empty(B, 2, H, d, **meta),
        cache_seqlens=torch.empty(B, dtype=torch.int32, **meta), backend="torch")
    assert out.shape == (B, 3, H, d) and out.device.type == "meta"


def test_split_choice_from_static_shapes():
    """Few programs against a long cache are split (at most 64 splits of >= 512 keys); many
    programs, or short caches, run in one pass."""
    from diffattn.kernels.diff_attn_decode import choose_num_splits
    assert choose_num_splits(1, 8, 1, 65536) == 33          # 8 programs -> about 264
    assert choose_num_splits(1, 1, 1, 65536) == 64          # capped
    assert choose_num_splits(1, 8, 1, 1536) == 3            # splits of >= 512 keys
    assert choose_num_splits(64, 8, 1, 65536) == 1          # 512 programs fill the GPU
    assert choose_num_splits(4, 8, 1, 1000) == 1            # short cache


def test_a_cache_of_the_wrong_types_is_refused_by_name():
    from diffattn import DiffKVCache
    k, v = torch.zeros(2, 8, 2, 16), torch.zeros(2, 8, 1, 32)
    with pytest.raises(TypeError, match="k_cache must be a tensor"):
        DiffKVCache(None, v, torch.zeros(2, dtype=torch.int32))
    with pytest.raises(TypeError, match="seqlens must be an int32 tensor"):
        DiffKVCache(k, v, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"seqlens must have shape \(2,\)"):
        DiffKVCache(k, v, torch.zeros(3, dtype=torch.int32))
