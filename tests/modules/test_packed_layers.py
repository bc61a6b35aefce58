"""Packed sequences in the layers: DiffMultiheadAttention(V2)(x, cu_seqlens=..., max_seqlen=...)
with x (total, E) equals one call per sequence, output and every gradient (input, projections,
lambda vectors or lambda projection, norm weight, out_proj), both backends (the fused kernels
through the Triton interpreter), with zero-length sequences, causal, a window, and grouped
keys; unsupported combinations are refused naming the argument."""
from __future__ import annotations

import pytest
import torch

from diffattn import DiffMultiheadAttention, DiffMultiheadAttentionV2
from helpers import assert_close_rel, requires_interpreter

BACKENDS = [pytest.param("triton", marks=requires_interpreter), "torch"]
LENGTHS = [5, 0, 9, 1]


def offsets(lengths) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def make_layer(v2: bool, backend: str, num_kv_heads=None, seed=0):
    torch.manual_seed(seed)
    if v2:
        layer = DiffMultiheadAttentionV2(32, 2, num_kv_heads=num_kv_heads, backend=backend)
    else:
        layer = DiffMultiheadAttention(32, 4, num_kv_heads=num_kv_heads, backend=backend)
        with torch.no_grad():
            layer.diff_norm.weight.add_(0.1 * torch.randn_like(layer.diff_norm.weight))
    return layer


def grads(layer, x):
    return {"x": x.grad, **{name: p.grad for name, p in layer.named_parameters()}}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v2,causal,window,kv_heads", [
    (False, True, None, None),
    (False, False, (2, 1), 2),
    (True, True, None, None),
    (True, False, (3, -1), 1),
], ids=["v1-causal", "v1-window-gqa", "v2-causal", "v2-window-gqa"])
def test_packed_call_equals_one_call_per_sequence(backend, v2, causal, window, kv_heads):
    layer = make_layer(v2, backend, kv_heads)
    cu = offsets(LENGTHS)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(LENGTHS), 32, generator=g, requires_grad=True)
    dout = torch.randn(sum(LENGTHS), 32, generator=g)

    out, weights = layer(x, cu_seqlens=cu, max_seqlen=max(LENGTHS), is_causal=causal,
                         window_size=window)
    assert weights is None and out.shape == x.shape and layer.last_backend == backend
    (out * dout).sum().backward()
    packed = {name: t.clone() for name, t in grads(layer, x).items()}

    layer.zero_grad()
    x.grad = None
    pieces, loss = [], 0.0
    for b in range(len(LENGTHS)):
        rows = slice(int(cu[b]), int(cu[b + 1]))
        if LENGTHS[b] == 0:
            continue
        piece = layer(x[rows], is_causal=causal, window_size=window)[0]  # unbatched (N, E)
        loss = loss + (piece * dout[rows]).sum()
        pieces.append((rows, piece))
    loss.backward()
    for rows, piece in pieces:
        assert_close_rel("out", out[rows], piece, torch.float32)
    for name, want in grads(layer, x).items():
        assert_close_rel(f"d{name}", packed[name], want, torch.float32, 1e-4)
    # V1's lambda vectors are a parameter of their own; V2's lambda projection is rows
    # 2E .. 2E + h of the packed in_proj_weight.
    lam_grad = packed["in_proj_weight"][64:66] if v2 else packed["lambda_vectors"]
    assert lam_grad.abs().max() > 0


@requires_interpreter
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_packed_backends_agree_in_float64(v2):
    """The fused packed layer against the torch path, float64 (exact through the
    interpreter)."""
    cu = offsets([3, 0, 4])
    x = torch.randn(7, 32, dtype=torch.float64)
    outs = []
    for backend in ("triton", "torch"):
        layer = make_layer(v2, backend).double()
        outs.append(layer(x, cu_seqlens=cu, max_seqlen=4, is_causal=True)[0])
    assert_close_rel("out", outs[0], outs[1], torch.float64)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(key="x"), ValueError, "key"),
    (dict(value="x2"), ValueError, "value"),
    (dict(key_padding_mask=torch.zeros(1, 7, dtype=torch.bool)), ValueError,
     "key_padding_mask"),
    (dict(attn_mask=torch.zeros(7, 7, dtype=torch.bool)), ValueError, "attn_mask"),
    (dict(need_weights=True), ValueError, "need_weights"),
    (dict(kv_cache=object()), ValueError, "kv_cache"),
    (dict(max_seqlen=None), ValueError, "max_seqlen is missing"),
    (dict(cu_seqlens=None), ValueError, "cu_seqlens is missing"),
    (dict(cu_seqlens=torch.tensor([0, 3, 7])), TypeError, "cu_seqlens must be an int32"),
    (dict(max_seqlen=4.0), TypeError, "max_seqlen must be an int"),
    (dict(max_seqlen=-1), ValueError, "max_seqlen must be >= 0"),
    (dict(query="batched"), ValueError, r"query must be packed as \(total, embed_dim\)"),
], ids=["key", "value", "key_padding_mask", "attn_mask", "need_weights", "kv_cache",
        "no-max_seqlen", "no-cu_seqlens", "int64-offsets", "float-max", "negative-max",
        "batched-query"])
def test_unsupported_combinations_are_refused(v2, kwargs, error, match):
    layer = make_layer(v2, "torch").eval()
    x = torch.randn(7, 32)
    args = dict(query=x, cu_seqlens=offsets([3, 4]), max_seqlen=4)
    args.update(kwargs)
    stand_ins = {"x": x.clone(), "x2": x.clone(), "batched": x[None]}
    args = {name: stand_ins[value] if isinstance(value, str) else value
            for name, value in args.items()}
    with pytest.raises(error, match=match):
        layer(**args)


def test_dropout_in_training_is_refused_with_packed_sequences():
    layer = DiffMultiheadAttention(32, 4, dropout=0.1, backend="torch")
    with pytest.raises(ValueError, match="dropout"):
        layer(torch.randn(7, 32), cu_seqlens=offsets([3, 4]), max_seqlen=4)
    out, _ = layer.eval()(torch.randn(7, 32), cu_seqlens=offsets([3, 4]), max_seqlen=4)
    assert out.shape == (7, 32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_packed_layer_reads_no_values_on_the_host(backend, v2):
    from ops.test_host_sync import NoHostReads
    layer = make_layer(v2, backend)
    x = torch.randn(7, 32, requires_grad=True)
    with NoHostReads():
        out, _ = layer(x, cu_seqlens=offsets([3, 0, 4]), max_seqlen=4, is_causal=True)
        out.sum().backward()
