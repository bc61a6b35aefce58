"""Argument checks of the public ops (functional, packed and KV-cache): each raises a
ValueError/TypeError naming the first bad argument and what was expected. Checks that need
tensor values run as asynchronous device assertions on an accelerator (``check_values``), so
no check waits for the device."""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

from .lambdas import LambdaVectors

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_float_tensor(t, ndim: int) -> bool:
    """Whether t passes check_tensor (a float16/bfloat16/float32/float64 tensor of ndim dims):
    the cheap test, so that a caller builds check_tensor's message only when it fails."""
    return isinstance(t, Tensor) and t.dim() == ndim and t.dtype in _DTYPES


def check_tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_same(q: Tensor, k: Tensor, v: Tensor) -> None:
    """k and v have q's dtype and device."""
    if k.dtype == v.dtype == q.dtype and k.device == q.device and v.device == q.device:
        return
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")


def _check_q(q: Tensor) -> None:
    check_tensor("q", q, 4, "(batch, seq_q, 2 * heads, head_dim)")
    if q.shape[2] < 2 or q.shape[2] % 2:
        raise ValueError(f"q must have a positive even number of heads (two maps per "
                         f"differential head), got q.shape[2] = {q.shape[2]}")
    if q.shape[3] < 1:
        raise ValueError(f"q must have head_dim >= 1, got q.shape[3] = {q.shape[3]}")


def _check_groups(H: int, Hk: int, kv_name: str) -> None:
    if H % Hk:
        raise ValueError(f"the number of differential heads ({H} = q.shape[2] // 2) must be a "
                         f"multiple of the number of key/value groups ({Hk} = {kv_name}), so "
                         f"that both maps of a head pair read the same group")


def check_diff_attention_args(q, k, v, lambda_, key_padding_mask=None, norm_weight=None,
                              scale=None, causal=False, eps=1e-5, out_scale=1.0,
                              window_size=None) -> None:
    """Raise a ValueError/TypeError naming the first bad argument of diff_attention (V1)."""
    _check_q(q)
    check_tensor("k", k, 4, "(batch, seq_k, 2 * kv_heads, head_dim)")
    check_tensor("v", v, 4, "(batch, seq_k, kv_heads, 2 * head_dim)")
    B, N, H2, d = q.shape
    if k.shape[2] < 2 or k.shape[2] % 2:
        raise ValueError(f"k must have a positive even number of heads (a key pair per "
                         f"group), got k.shape[2] = {k.shape[2]}")
    Hk = k.shape[2] // 2
    if k.shape[0] != B or k.shape[3] != d:
        raise ValueError(f"k must have shape ({B}, seq_k, 2 * kv_heads, {d}) to match q "
                         f"{tuple(q.shape)}, got {tuple(k.shape)}")
    if tuple(v.shape) != (B, k.shape[1], Hk, 2 * d):
        raise ValueError(f"v must have shape {(B, k.shape[1], Hk, 2 * d)} = (batch, seq_k, "
                         f"kv_heads, 2 * head_dim) to match q and k, got {tuple(v.shape)}")
    _check_groups(H2 // 2, Hk, "k.shape[2] // 2")
    _check_same(q, k, v)
    check_lambda(lambda_, q, per_token=False)
    _check_key_padding_mask(key_padding_mask, q, k)
    check_epilogue_args(norm_weight, eps, out_scale, 2 * d, q.device)
    check_scalars(causal, scale)
    check_window_size(window_size)


def check_epilogue_args(norm_weight, eps, out_scale, value_dim: int, device) -> None:
    """Raise a ValueError/TypeError naming the first bad argument of the V1 epilogue:
    norm_weight None or a floating tensor (value_dim,) on ``device``, eps > 0 and out_scale
    finite."""
    if norm_weight is not None:
        if not isinstance(norm_weight, Tensor) or not norm_weight.is_floating_point():
            raise TypeError("norm_weight must be a floating-point tensor of shape (2 * head_dim,)")
        if tuple(norm_weight.shape) != (value_dim,):
            raise ValueError(f"norm_weight must have shape (2 * head_dim,) = ({value_dim},), "
                             f"got {tuple(norm_weight.shape)}")
        if norm_weight.device != device:
            raise ValueError(f"norm_weight must be on q's device {device}, got "
                             f"{norm_weight.device}")
    if not _is_real(eps) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite float, got {eps!r}")
    if not _is_real(out_scale) or not math.isfinite(out_scale):
        raise ValueError(f"out_scale must be a finite float, got {out_scale!r}")


def check_diff_attention_v2_args(q, k, v, lambda_, key_padding_mask=None, scale=None,
                                 causal=False, window_size=None) -> None:
    """Raise a ValueError/TypeError naming the first bad argument of diff_attention_v2."""
    _check_q(q)
    check_tensor("k", k, 4, "(batch, seq_k, kv_heads, head_dim)")
    check_tensor("v", v, 4, "(batch, seq_k, kv_heads, head_dim)")
    B, N, H2, d = q.shape
    if k.shape[0] != B or k.shape[2] < 1 or k.shape[3] != d:
        raise ValueError(f"k must have shape ({B}, seq_k, kv_heads >= 1, {d}) to match q "
                         f"{tuple(q.shape)}, got {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have k's shape {tuple(k.shape)} = (batch, seq_k, kv_heads, "
                         f"head_dim), got {tuple(v.shape)}")
    _check_groups(H2 // 2, k.shape[2], "k.shape[2]")
    _check_same(q, k, v)
    check_lambda(lambda_, q, per_token=True)
    _check_key_padding_mask(key_padding_mask, q, k)
    check_scalars(causal, scale)
    check_window_size(window_size)


def check_window_size(window_size) -> None:
    """Raise a TypeError/ValueError unless window_size is None or a pair of ints >= -1."""
    if window_size is None:
        return
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2 or not all(
            isinstance(w, int) and not isinstance(w, bool) for w in window_size):
        raise TypeError(f"window_size must be a pair of ints (left, right), -1 meaning "
                        f"unbounded, got {window_size!r}")
    if min(window_size) < -1:
        raise ValueError(f"window_size must hold ints >= -1 (-1 = unbounded), got "
                         f"{tuple(window_size)}")


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_scalars(causal, scale) -> None:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__} {causal!r}")
    if scale is not None and not (_is_real(scale) and scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")


def check_softcap(softcap) -> None:
    """softcap: a finite float >= 0 (0: no soft-capping)."""
    if not _is_real(softcap) or not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be a finite float >= 0 (0 = off), got {softcap!r}")


def check_dropout(dropout_p) -> None:
    if not _is_real(dropout_p) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")


def check_lambda(lambda_, q: Tensor, per_token: bool) -> None:
    """lambda_: a finite float, or a floating 0-dim, (H,) or (per_token) (B, N, H) tensor on
    q's device holding no NaN or inf."""
    if isinstance(lambda_, Tensor):
        shape, H = lambda_.shape, q.shape[2] // 2
        if shape != () and shape != (H,) and not (
                per_token and shape == (q.shape[0], q.shape[1], H)):
            shapes = [(), (H,)] + [(q.shape[0], q.shape[1], H)] * per_token
            wanted = "a 0-dim tensor, (H,)" + (" or (B, N, H)" if per_token else "")
            raise ValueError(f"lambda_ must be a float, {wanted} = "
                             f"{' or '.join(str(s) for s in shapes[1:])} tensor, got "
                             f"{tuple(lambda_.shape)}")
        if not lambda_.is_floating_point():
            raise TypeError(f"lambda_ must be a floating-point tensor, got {lambda_.dtype}")
        if lambda_.device != q.device:
            raise ValueError(f"lambda_ must be on q's device {q.device}, got {lambda_.device}")
        _check_lambda_values(lambda_)
    elif not _is_real(lambda_):
        raise TypeError(f"lambda_ must be a float or a tensor, got {type(lambda_).__name__}")
    elif not math.isfinite(lambda_):
        raise ValueError(f"lambda_ must be a finite float, got {lambda_!r}")


_LAMBDA_NOT_FINITE = "lambda_ must be finite: the lambda_ tensor holds NaN or inf"


_HOST_READ_NUMEL = 128  # up to this many values, reading a CPU tensor beats isfinite + all


def _check_lambda_values(lambda_: Tensor) -> None:
    """NaN or inf in a lambda_ tensor: a ValueError for a CPU tensor, an asynchronous device
    assertion on an accelerator (the check never waits for the device). Skipped where values
    do not exist (meta tensors) or cannot be checked (inside torch.func transforms). A small
    CPU tensor (a decoding step's lambda) is read once on the host instead of reduced."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor(lambda_)
    if lambda_.is_cpu and not wrapped and lambda_.numel() <= _HOST_READ_NUMEL and \
            not torch.compiler.is_compiling():
        values = lambda_.tolist() if lambda_.dim() == 1 else lambda_.reshape(-1).tolist()
        if not all(map(math.isfinite, values)):
            raise ValueError(_LAMBDA_NOT_FINITE)
    elif not (lambda_.is_meta or wrapped):
        check_values(torch.isfinite(lambda_).all(), _LAMBDA_NOT_FINITE)


def resolve_lambda_vectors(lambda_, lambda_vectors, lambda_init, q: Tensor):
    """The lambda of a V1 call: ``lambda_`` as given, or with ``lambda_vectors`` (4, d) = lq1,
    lk1, lq2, lk2 the LambdaVectors exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init (vectors in
    the accumulation dtype, differentiable). Exactly one of lambda_ and lambda_vectors;
    lambda_init goes with lambda_vectors only. q must already be checked."""
    if lambda_vectors is None:
        if lambda_init is not None:
            raise ValueError("lambda_init is only used with lambda_vectors (lambda = "
                             "exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init); with lambda_, "
                             "fold it into lambda_")
        if lambda_ is None:
            raise TypeError("lambda_ is required (a float or a tensor), or lambda_vectors with "
                            "lambda_init")
        return lambda_
    if lambda_ is not None:
        raise ValueError("lambda_ and lambda_vectors are mutually exclusive: pass one of them")
    d = q.shape[-1]
    if not isinstance(lambda_vectors, Tensor) or not lambda_vectors.is_floating_point():
        got = lambda_vectors.dtype if isinstance(lambda_vectors, Tensor) \
            else type(lambda_vectors).__name__
        raise TypeError(f"lambda_vectors must be a floating-point tensor (4, head_dim) = "
                        f"(lq1, lk1, lq2, lk2), got {got}")
    if tuple(lambda_vectors.shape) != (4, d):
        raise ValueError(f"lambda_vectors must have shape (4, head_dim) = (4, {d}) (rows lq1, "
                         f"lk1, lq2, lk2), got {tuple(lambda_vectors.shape)}")
    if lambda_vectors.device != q.device:
        raise ValueError(f"lambda_vectors must be on q's device {q.device}, got "
                         f"{lambda_vectors.device}")
    if lambda_init is None:
        raise TypeError("lambda_init is required with lambda_vectors (lambda = exp(lq1 . lk1) "
                        "- exp(lq2 . lk2) + lambda_init)")
    if not _is_real(lambda_init) or not math.isfinite(lambda_init):
        raise ValueError(f"lambda_init must be a finite float, got {lambda_init!r}")
    if lambda_vectors.device.type != "meta" and \
            not torch._C._functorch.is_functorch_wrapped_tensor(lambda_vectors):
        check_values(torch.isfinite(lambda_vectors).all(),
                     "lambda_vectors must be finite: the tensor holds NaN or inf")
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return LambdaVectors(lambda_vectors.to(acc_dtype).contiguous(), float(lambda_init))


def resolve_rms_norm(norm_weight, rms_norm, value_dim: int, q: Tensor):
    """The norm weight of a V1 call: rms_norm None leaves norm_weight as given (a weight
    switches the per-head RMSNorm on); rms_norm=True without a weight is the weightless norm
    (a weight of ones, made here); rms_norm=False with a weight is refused."""
    if rms_norm is None:
        return norm_weight
    if not isinstance(rms_norm, bool):
        raise TypeError(f"rms_norm must be a bool or None, got {type(rms_norm).__name__}")
    if not rms_norm:
        if norm_weight is not None:
            raise ValueError("rms_norm=False contradicts norm_weight, which switches the "
                             "RMSNorm on: leave rms_norm unset, or drop norm_weight")
        return None
    if norm_weight is not None:
        return norm_weight
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.ones(value_dim, dtype=acc_dtype, device=q.device)


def check_return_lse(return_softmax_lse) -> None:
    if not isinstance(return_softmax_lse, bool):
        raise TypeError(f"return_softmax_lse must be a bool, got "
                        f"{type(return_softmax_lse).__name__}")


def check_values(ok: Tensor, message: str) -> None:
    """A check that needs tensor values (``ok``, a bool tensor) without waiting for the
    device: for CPU tensors a ValueError with ``message`` at once (the assertion runs
    synchronously there), on an accelerator (or while torch.compile traces) an asynchronous
    device assertion."""
    if ok.device.type != "cpu" or torch.compiler.is_compiling():
        torch._assert_async(ok, message)
        return
    try:
        torch._assert_async(ok, message)
    except RuntimeError:
        raise ValueError(message) from None


def _check_key_padding_mask(key_padding_mask, q: Tensor, k: Tensor) -> None:
    if key_padding_mask is None:
        return
    if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
        got = key_padding_mask.dtype if isinstance(key_padding_mask, Tensor) \
            else type(key_padding_mask).__name__
        raise TypeError(f"key_padding_mask must be a bool tensor (True = ignore the key), "
                        f"got {got}")
    if tuple(key_padding_mask.shape) != (q.shape[0], k.shape[1]):
        raise ValueError(f"key_padding_mask must have shape (batch, seq_k) = "
                         f"{(q.shape[0], k.shape[1])}, got {tuple(key_padding_mask.shape)}")
    if key_padding_mask.device != q.device:
        raise ValueError(f"key_padding_mask must be on q's device {q.device}, got "
                         f"{key_padding_mask.device}")


def check_attn_mask(attn_mask, q, k) -> None:
    if attn_mask is None:
        return
    B, N, H2, _ = q.shape
    M = k.shape[1]
    if not isinstance(attn_mask, Tensor) or not (attn_mask.dtype == torch.bool
                                                 or attn_mask.is_floating_point()):
        raise TypeError("attn_mask must be a bool (True = masked out) or float (additive) tensor")
    shape = tuple(attn_mask.shape)
    ok = shape == (N, M) or (len(shape) == 4 and shape[0] in (1, B) and shape[1] in (1, H2)
                             and shape[2] in (1, N) and shape[3] == M)
    if not ok:
        raise ValueError(f"attn_mask must have shape (seq_q, seq_k) = {(N, M)} or broadcast "
                         f"to (batch, 2 * heads, seq_q, seq_k) = {(B, H2, N, M)}, got {shape}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask must be on q's device {q.device}, got {attn_mask.device}")




# ------------------------------------------------------------------ packed sequences
def check_packed(name: str, t, heads: str, dim: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (total, {heads}, {dim}), got "
                        f"{type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name} must be packed as (total, {heads}, {dim}) (sequences one "
                         f"after another, see cu_seqlens), got {tuple(t.shape)}")


def check_varlen_args(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                      max_seqlen_k) -> Tuple[Tensor, Tensor]:
    """Raise a ValueError/TypeError naming the first bad packed-sequence argument: cu_seqlens_q
    and cu_seqlens_k int32 1-D (batch + 1,) tensors on q's device, starting at 0, ending at
    q.shape[0] / k.shape[0], non-decreasing, no sequence longer than max_seqlen_q /
    max_seqlen_k (ints >= 0). Checks of values on an accelerator are asynchronous device
    assertions.

    Returns (cu_seqlens_q, cu_seqlens_k) as the kernels read them: contiguous (a strided or
    expanded view is copied; a contiguous tensor is returned as it is). The value checks read
    these."""
    for name, cu, t, t_name in (("cu_seqlens_q", cu_seqlens_q, q, "q"),
                                ("cu_seqlens_k", cu_seqlens_k, k, "k")):
        if not isinstance(cu, Tensor):
            raise TypeError(f"{name} must be an int32 tensor of shape (batch + 1,), got "
                            f"{type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be int32 (cumulative sequence offsets), got "
                            f"{cu.dtype}")
        if cu.dim() != 1 or cu.shape[0] < 1:
            raise ValueError(f"{name} must be 1-D of shape (batch + 1,), got "
                             f"{tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {cu.device}")
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1),"
                         f" got {cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int (the longest sequence), got {value!r}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    if q.device.type == "meta" or torch._C._functorch.is_functorch_wrapped_tensor(q):
        return cu_seqlens_q, cu_seqlens_k
    for name, cu, total, name_max, longest in (
            ("cu_seqlens_q", cu_seqlens_q, q.shape[0], "max_seqlen_q", max_seqlen_q),
            ("cu_seqlens_k", cu_seqlens_k, k.shape[0], "max_seqlen_k", max_seqlen_k)):
        lengths = cu[1:] - cu[:-1]
        check_values(cu[0] == 0, f"{name} must start at 0")
        check_values(cu[-1] == total, f"{name} must end at the packed total {total} (the first "
                     f"dimension of {'q' if name.endswith('q') else 'k'})")
        check_values((lengths >= 0).all(), f"{name} must be non-decreasing (cumulative offsets)")
        check_values((lengths <= longest).all(),
                     f"{name_max} = {longest} is smaller than a sequence of {name}")
    return cu_seqlens_q, cu_seqlens_k
