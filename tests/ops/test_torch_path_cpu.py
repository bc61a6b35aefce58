"""The torch path's CPU forms agree: the materialised maps (short sequences, no gradient), the
value-halves SDPA calls (no gradient, a mask), the math kernel (with a gradient) and the
float64 reference give the same V1 output,
with and without causal masking, grouped keys and the RMSNorm epilogue; a decoding step over
host-known lengths reads no row past them; V2's decoding step through its materialised maps
gives the reference's output too."""
from __future__ import annotations

import pytest
import torch

from diffattn import (diff_attention, diff_attention_ref, diff_attention_v2,
                      diff_attention_v2_ref, diff_attention_v2_with_kvcache,
                      diff_attention_with_kvcache)
from diffattn import torch_path
from helpers import assert_close_rel


def _inputs(B, N, M, H, Hk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, 2 * H, d, generator=g, dtype=dtype)
    k = torch.randn(B, M, 2 * Hk, d, generator=g, dtype=dtype)
    v = torch.randn(B, M, Hk, 2 * d, generator=g, dtype=dtype)
    lam = (torch.rand(H, generator=g) * 0.8).to(dtype)
    weight = (torch.rand(2 * d, generator=g) + 0.5).to(dtype)
    return q, k, v, lam, weight


@pytest.mark.parametrize("N, M, causal, Hk", [(7, 7, True, 2), (5, 9, False, 2), (6, 6, False, 1),
                                              (1, 12, False, 2), (8, 8, True, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_materialised_maps_and_value_halves_agree(N, M, causal, Hk, dtype):
    q, k, v, lam, weight = _inputs(2, N, M, 2, Hk, 16, dtype)
    kwargs = dict(causal=causal, norm_weight=weight, out_scale=0.3, backend="torch")
    ref = diff_attention_ref(q.double(), k.double(), v.double(), lam.double(), causal=causal,
                             norm_weight=weight.double(), out_scale=0.3)
    with torch.no_grad():
        fast = diff_attention(q, k, v, lambda_=lam, **kwargs)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    halves = diff_attention(*leaves, lambda_=lam, **kwargs)
    assert fast.dtype == halves.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert_close_rel("no grad", fast, ref, dtype, tol)
    assert_close_rel("grad", halves.detach(), ref, dtype, tol)
    with torch.no_grad():  # a mask: SDPA over the value halves
        masked = diff_attention(q, k, v, lambda_=lam, key_padding_mask=torch.zeros(2, M, dtype=torch.bool),
                                **kwargs)
    assert_close_rel("value halves", masked, ref, dtype, tol)


def test_materialise_maps_only_where_it_applies():
    q, k, v, lam, _ = _inputs(1, 8, 8, 2, 2, 16, torch.float32)
    assert torch_path._materialise_maps(q, k, v, lam, 0.0)
    assert not torch_path._materialise_maps(q, k, v, lam, 0.1)                  # dropout
    assert torch_path._materialise_maps(q[:, :1], k, v, lam, 0.0)               # one query
    assert torch_path._materialise_maps(q[:, :1], k[:, :, :2], v[:, :, :1], lam, 0.0)
    two = torch.cat([q, q])[:, :1]
    assert not torch_path._materialise_maps(two, *(torch.cat([t, t]) for t in (k, v)), lam,
                                            0.0)                                # one query, B 2
    assert not torch_path._materialise_maps(q, k[:, :, :2], v[:, :, :1], lam, 0.0)  # groups
    long_q, long_k, long_v, _, _ = _inputs(1, 512, 512, 2, 2, 16, torch.float32)
    assert not torch_path._materialise_maps(long_q, long_k, long_v, lam, 0.0)  # big maps
    with torch.enable_grad():
        assert not torch_path._materialise_maps(q.requires_grad_(), k, v, lam, 0.0)


def test_decoding_over_host_lengths_ignores_rows_past_them():
    """Equal host-known lengths: the cache is read up to them (NaN beyond changes nothing)."""
    q, k, v, lam, weight = _inputs(2, 1, 24, 2, 2, 16, torch.float32)
    ref = diff_attention(q, k[:, :10], v[:, :10], lambda_=lam, norm_weight=weight, backend="torch")
    k[:, 10:], v[:, 10:] = float("nan"), float("nan")
    out = diff_attention_with_kvcache(q, k, v, cache_seqlens=10, lambda_=lam, norm_weight=weight,
                                      backend="torch")
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    lengths = torch.tensor([10, 4], dtype=torch.int32)  # different lengths: masked path
    out = diff_attention_with_kvcache(q, k, v, cache_seqlens=lengths, lambda_=lam,
                                      norm_weight=weight, backend="torch")
    short = diff_attention(q[1:], k[1:, :4], v[1:, :4], lambda_=lam, norm_weight=weight,
                           backend="torch")
    torch.testing.assert_close(out[:1], ref[:1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[1:], short, atol=1e-6, rtol=1e-6)


def test_gradients_under_an_additive_mask_with_fully_masked_rows():
    """transformers' additive masks hold the dtype's minimum, and left padding masks whole query
    rows: the gradients match the float64 computation (the fused CPU kernel's backward does
    not, so the value halves run only without a gradient)."""
    q, k, v, lam, weight = _inputs(2, 8, 8, 2, 1, 16, torch.float32, seed=3)
    keep = torch.ones(8, 8, dtype=torch.bool).tril().expand(2, 1, 8, 8).clone()
    keep[1, :, :, :3] = False
    keep[1, :, :3, :] = False
    grads = []
    for dtype in (torch.float32, torch.float64):
        bias = torch.zeros(2, 1, 8, 8, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = diff_attention(*leaves, lambda_=lam.to(dtype), attn_mask=bias,
                             norm_weight=weight.to(dtype), backend="torch")
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum().backward()
        grads.append([t.grad for t in leaves])
    for name, got, want in zip("qkv", *grads):
        assert_close_rel(f"d{name}", got, want, torch.float32, 1e-5)


@pytest.mark.parametrize("shape", [(), (2,), (3, 1, 2), (80, 1, 2)])  # read on the host or reduced
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_lambda_tensor_is_a_value_error_at_any_size(shape, bad):
    """A decoding step's per-token lambda with a NaN or inf: a ValueError, whether the CPU
    check reads the values on the host (small tensors) or reduces them."""
    B = shape[0] if len(shape) == 3 else 3
    q = torch.randn(B, 1, 4, 8)
    k_cache, v_cache = torch.randn(B, 6, 1, 8), torch.randn(B, 6, 1, 8)
    lam = torch.full(shape, 0.5, dtype=torch.float16)
    lam.view(-1)[-1] = bad
    with pytest.raises(ValueError, match="lambda_ must be finite"):
        diff_attention_v2_with_kvcache(q, k_cache, v_cache, lambda_=lam.float(),
                                       cache_seqlens=6, backend="torch")
    with pytest.raises(ValueError, match="lambda_ must be finite"):
        diff_attention_v2_with_kvcache(q.half(), k_cache.half(), v_cache.half(), lambda_=lam,
                                       cache_seqlens=6, backend="torch")


@pytest.mark.parametrize("H, Hk", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_query_maps_agree_with_the_reference(H, Hk, dtype):
    """One query of one sequence (a decoding step) through the materialised maps, grouped keys
    read as views of a larger cache: the float64 reference's output."""
    q, k, v, lam, weight = _inputs(1, 1, 24, H, Hk, 16, dtype)
    ref = diff_attention_ref(q.double(), k[:, :17].double(), v[:, :17].double(), lam.double(),
                             norm_weight=weight.double(), out_scale=0.3)
    assert torch_path._materialise_maps(q, k, v, lam, 0.0)
    with torch.no_grad():
        out = diff_attention(q, k[:, :17], v[:, :17], lambda_=lam, norm_weight=weight, out_scale=0.3,
                             backend="torch")
        step = diff_attention_with_kvcache(q, k, v, lambda_=lam, cache_seqlens=17,
                                           norm_weight=weight, out_scale=0.3, backend="torch")
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert_close_rel("one query", out, ref, dtype, tol)
    assert_close_rel("kv cache", step, ref, dtype, tol)


@pytest.mark.parametrize("H, Hk", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("lam_form", ["float", "head", "token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_query_maps_agree_with_the_reference_v2(H, Hk, lam_form, dtype, monkeypatch):
    """V2's decoding step through the materialised maps (one GEMV batch per key head), keys
    read as views of a larger cache whose unused rows hold NaN: the float64 reference's
    output, for every lambda form; the same through SDPA when a gradient is needed."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 1, 2 * H, 16, generator=g, dtype=dtype)
    k = torch.randn(1, 24, Hk, 16, generator=g, dtype=dtype)
    v = torch.randn(1, 24, Hk, 16, generator=g, dtype=dtype)
    k[:, 17:], v[:, 17:] = float("nan"), float("nan")
    lam = {"float": 0.35, "head": (torch.rand(H, generator=g) * 0.8).to(dtype),
           "token": (torch.rand(1, 1, H, generator=g) * 0.8).to(dtype)}[lam_form]
    lam64 = lam.double() if isinstance(lam, torch.Tensor) else lam
    ref = diff_attention_v2_ref(q.double(), k[:, :17].double(), v[:, :17].double(), lam64)
    taken = []
    original = torch_path._one_query_difference_v2
    monkeypatch.setattr(torch_path, "_one_query_difference_v2",
                        lambda *args: taken.append(1) or original(*args))
    with torch.no_grad():
        out = diff_attention_v2(q, k[:, :17], v[:, :17], lambda_=lam, backend="torch")
        step = diff_attention_v2_with_kvcache(q, k, v, lambda_=lam, cache_seqlens=17,
                                              backend="torch")
    assert len(taken) == 2
    leaf = q.clone().requires_grad_()
    graph = diff_attention_v2(leaf, k[:, :17], v[:, :17], lambda_=lam, backend="torch")
    assert len(taken) == 2  # a gradient is needed: SDPA
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for name, t in (("one query", out), ("kv cache", step), ("sdpa", graph.detach())):
        assert t.dtype == dtype
        assert_close_rel(name, t, ref, dtype, tol)


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("lengths", ["int", "tensor", "full"])
@pytest.mark.parametrize("n_new, causal", [(0, False), (1, True), (3, True), (3, False)])
def test_a_plain_step_appends_and_reads_views_of_the_caches(v2, lengths, n_new, causal,
                                                            monkeypatch):
    """A step with none of the options whose sequences are equally long (lengths known on the
    host): the new keys appended in place, the attention over the caches' first rows only
    (rows past them hold NaN), causal bottom-right; the float64 reference's output, and the
    masked path is never taken."""
    B, H, Hk, d, start = 2, 4, 2, 16, 9
    g = torch.Generator().manual_seed(5)
    capacity = start + n_new if lengths == "full" else start + n_new + 5
    if lengths == "full" and n_new == 0:
        capacity = start
    key_heads, value_dim = (Hk, d) if v2 else (2 * Hk, 2 * d)
    q = torch.randn(B, max(n_new, 1), 2 * H, d, generator=g)
    k_cache = torch.full((B, capacity, key_heads, d), float("nan"))
    v_cache = torch.full((B, capacity, Hk, value_dim), float("nan"))
    k_cache[:, :start] = torch.randn(B, start, key_heads, d, generator=g)
    v_cache[:, :start] = torch.randn(B, start, Hk, value_dim, generator=g)
    k_new = torch.randn(B, n_new, key_heads, d, generator=g) if n_new else None
    v_new = torch.randn(B, n_new, Hk, value_dim, generator=g) if n_new else None
    lam = torch.rand(B, q.shape[1], H, generator=g) if v2 else torch.rand(H, generator=g)
    seqlens = {"int": start, "tensor": torch.full((B,), start, dtype=torch.int32),
               "full": None if n_new == 0 else start}[lengths]
    end = start + n_new
    keys = torch.cat([k_cache[:, :start], k_new], 1) if n_new else k_cache[:, :start]
    values = torch.cat([v_cache[:, :start], v_new], 1) if n_new else v_cache[:, :start]
    reference = diff_attention_v2_ref if v2 else diff_attention_ref
    ref = reference(q.double(), keys.double(), values.double(), lam.double(), causal=causal)
    monkeypatch.setattr("diffattn.kvcache._torch_attention", None)  # the masked path
    op = diff_attention_v2_with_kvcache if v2 else diff_attention_with_kvcache
    with torch.no_grad():
        out = op(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, lambda_=lam,
                 causal=causal, backend="torch")
    assert_close_rel("step", out, ref, torch.float32, 2e-6)
    torch.testing.assert_close(k_cache[:, :end], keys)
    torch.testing.assert_close(v_cache[:, :end], values)
    assert k_cache[:, end:].isnan().all() and v_cache[:, end:].isnan().all()


@pytest.mark.parametrize("v2", [False, True])
def test_the_torch_path_under_autocast_runs_in_the_autocast_dtype(v2):
    """CPU autocast to bf16: float32 inputs run in bf16 (as SDPA does), the output is bf16,
    the gradients come back in float32, autocast is still on after the call, and the result
    is the float64 reference's within bf16's precision."""
    g = torch.Generator().manual_seed(7)
    H, Hk, d = 2, 1, 16
    q = torch.randn(2, 6, 2 * H, d, generator=g, requires_grad=True)
    k = torch.randn(2, 9, Hk if v2 else 2 * Hk, d, generator=g, requires_grad=True)
    v = torch.randn(2, 9, Hk, d if v2 else 2 * d, generator=g, requires_grad=True)
    lam = torch.rand(H, generator=g) * 0.8
    op, reference = (diff_attention_v2, diff_attention_v2_ref) if v2 else \
        (diff_attention, diff_attention_ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = op(q, k, v, lambda_=lam, causal=True, backend="torch")
        assert torch.is_autocast_enabled("cpu")
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert q.grad.dtype == k.grad.dtype == v.grad.dtype == torch.float32
    ref = reference(*(t.detach().double() for t in (q, k, v)), lam.double(), causal=True)
    assert_close_rel("autocast", out, ref, torch.bfloat16, 3e-2)
