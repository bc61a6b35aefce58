"""``diff_attention`` and ``diff_attention_v2``: the functional API (argument checks, autocast,
backend choice).

    out = diff_attention(q, k, v, lambda_)        # Differential Transformer V1 / DiffCLIP
    out = diff_attention_v2(q, k, v, lambda_)     # Differential Transformer V2

Layouts, batch first like flash-attn; q heads 2h and 2h+1 are the two maps of differential
head h, which reads key/value group g = h // (H // Hk):

    V1  q (B, N, 2H, d), k (B, M, 2Hk, d) (key heads 2g, 2g+1), v (B, M, Hk, 2d) -> (B, N, H, 2d)
    V2  q (B, N, 2H, d), k (B, M, Hk, d) (one key head per group), v (B, M, Hk, d) -> (B, N, H, d)

Any strides work as long as the last dimension is contiguous (views of a fused projection's
output are used without copies; other inputs are made contiguous). Nothing here reads tensor
values, so no call waits for the device.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .backend import check_backend_name, resolve_backend, unsupported_features
from .lambdas import LambdaVectors, expand_lambda
from .softmax_lse import (fused_lse, fused_lse_varlen, lse_dtype, softmax_lse_torch,
                          softmax_lse_varlen_torch)
from .torch_path import (diff_attention_torch, diff_attention_v2_torch,
                         diff_attention_v2_varlen_torch, diff_attention_varlen_torch)

from .kernels import AttentionCall

try:
    from .autograd import fused_attention
except ImportError:  # no triton: resolve_backend never picks "triton"
    fused_attention = None

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ------------------------------------------------------------------ argument checks
def _check_tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_same(q: Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")


def _check_q(q: Tensor) -> None:
    _check_tensor("q", q, 4, "(batch, seq_q, 2 * heads, head_dim)")
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
    _check_tensor("k", k, 4, "(batch, seq_k, 2 * kv_heads, head_dim)")
    _check_tensor("v", v, 4, "(batch, seq_k, kv_heads, 2 * head_dim)")
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
    _check_same(q, k=k, v=v)
    _check_lambda(lambda_, q, per_token=False)
    _check_key_padding_mask(key_padding_mask, q, k)
    check_epilogue_args(norm_weight, eps, out_scale, 2 * d, q.device)
    _check_scalars(causal, scale)
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
    _check_tensor("k", k, 4, "(batch, seq_k, kv_heads, head_dim)")
    _check_tensor("v", v, 4, "(batch, seq_k, kv_heads, head_dim)")
    B, N, H2, d = q.shape
    if k.shape[0] != B or k.shape[2] < 1 or k.shape[3] != d:
        raise ValueError(f"k must have shape ({B}, seq_k, kv_heads >= 1, {d}) to match q "
                         f"{tuple(q.shape)}, got {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have k's shape {tuple(k.shape)} = (batch, seq_k, kv_heads, "
                         f"head_dim), got {tuple(v.shape)}")
    _check_groups(H2 // 2, k.shape[2], "k.shape[2]")
    _check_same(q, k=k, v=v)
    _check_lambda(lambda_, q, per_token=True)
    _check_key_padding_mask(key_padding_mask, q, k)
    _check_scalars(causal, scale)
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


def _check_scalars(causal, scale) -> None:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__} {causal!r}")
    if scale is not None and not (_is_real(scale) and scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")


def check_softcap(softcap) -> None:
    """softcap: a finite float >= 0 (0: no soft-capping)."""
    if not _is_real(softcap) or not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be a finite float >= 0 (0 = off), got {softcap!r}")


def _check_dropout(dropout_p) -> None:
    if not _is_real(dropout_p) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")


def _check_lambda(lambda_, q: Tensor, per_token: bool) -> None:
    B, N, H = q.shape[0], q.shape[1], q.shape[2] // 2
    shapes = [(), (H,)] + [(B, N, H)] * per_token
    if isinstance(lambda_, Tensor):
        if tuple(lambda_.shape) not in shapes:
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


def _check_lambda_values(lambda_: Tensor) -> None:
    """NaN or inf in a lambda_ tensor: a ValueError for a CPU tensor, an asynchronous device
    assertion on an accelerator (the check never waits for the device). Skipped where values
    do not exist (meta tensors) or cannot be checked (inside torch.func transforms)."""
    if lambda_.device.type == "meta" or torch._C._functorch.is_functorch_wrapped_tensor(lambda_):
        return
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


def _check_return_lse(return_softmax_lse) -> None:
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


def _check_attn_mask(attn_mask, q, k) -> None:
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


# ------------------------------------------------------------------ running
def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _autocast(q: Tensor, k: Tensor, v: Tensor):
    """Under autocast, float32 inputs run in the autocast dtype (as SDPA does)."""
    device_type = q.device.type
    if q.dtype == torch.float32 and _autocast_available(device_type) and \
            torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)


_AUTOCAST_AVAILABLE: dict = {}


def _autocast_available(device_type: str) -> bool:
    available = _AUTOCAST_AVAILABLE.get(device_type)
    if available is None:
        available = _AUTOCAST_AVAILABLE[device_type] = \
            torch.amp.is_autocast_available(device_type)
    return available


def _autocast_off(device_type: str):
    """A context without autocast for the torch path's own dtype handling."""
    if _autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _kernel_lambda(lambda_, acc_dtype: torch.dtype, device: torch.device):
    """(lam tensor or None, float value, vectors?) as the kernels take lambda: a float stays a
    kernel argument (except in float64, whose kernel arguments would round it to float32);
    LambdaVectors pass their (4, L) vectors, the kernels computing lambda from them."""
    if isinstance(lambda_, LambdaVectors):
        return lambda_.vectors, float(lambda_.init), True
    if isinstance(lambda_, Tensor):
        return (lambda_ if lambda_.dtype == acc_dtype else lambda_.to(acc_dtype)), 0.0, False
    if acc_dtype == torch.float64:
        return torch.tensor(float(lambda_), dtype=acc_dtype, device=device), 0.0, False
    return None, float(lambda_), False


def _mask_for_kernels(key_padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    return None if key_padding_mask is None else _last_dim_contiguous(key_padding_mask)


def run_diff_attention(q, k, v, lambda_, backend, *, causal=False, key_padding_mask=None,
                       scale=None, norm_weight=None, eps=1e-5, out_scale=1.0, dropout_p=0.0,
                       attn_mask=None, window_size=None, return_lse=False, **score_options):
    """diff_attention without the argument checks: for callers whose inputs are already known
    to be right (DiffMultiheadAttention). ``backend`` is "triton" or "torch" (resolved);
    ``lambda_`` may also be LambdaVectors (a layer's lambda vectors, fp32 contiguous).
    return_lse: (out, lse (B, 2H, N)) as diff_attention's return_softmax_lse.
    ``score_options``: the call's score options by name (AttentionCall fields), for both
    paths."""
    q, k, v = _autocast(q, k, v)
    d = q.shape[3]
    scale = d ** -0.5 if scale is None else float(scale)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if backend == "triton":
        lam, lam_value, vectors = _kernel_lambda(lambda_, acc_dtype, q.device)
        call = AttentionCall.create(scale, causal=causal, window_size=window_size,
                                    lam_value=lam_value, lam_vectors=vectors, eps=eps,
                                    out_scale=out_scale, **score_options)
        result = fused_attention(q, k, v, lam, _mask_for_kernels(key_padding_mask), norm_weight,
                                 call, return_lse=return_lse)
        return (result[0], fused_lse(result[1], lse_dtype(q))) if return_lse else result
    lam = expand_lambda(lambda_, q.shape[2] // 2, acc_dtype, q.device)
    with _autocast_off(q.device.type):
        out = diff_attention_torch(q, k, v, lam, causal=causal,
                                   key_padding_mask=key_padding_mask, scale=scale,
                                   norm_weight=norm_weight, eps=eps, out_scale=out_scale,
                                   dropout_p=dropout_p, attn_bias=attn_mask,
                                   window_size=window_size, **score_options)
        if not return_lse:
            return out
        return out, softmax_lse_torch(q, k, key_pair=True, scale=scale, causal=causal,
                                      key_padding_mask=key_padding_mask, attn_bias=attn_mask,
                                      window_size=window_size, **score_options)


def run_diff_attention_v2(q, k, v, lambda_, backend, *, causal=False, key_padding_mask=None,
                          scale=None, dropout_p=0.0, attn_mask=None, window_size=None,
                          return_lse=False, **score_options):
    """diff_attention_v2 without the argument checks; ``backend`` "triton" or "torch";
    return_lse and ``score_options`` as in run_diff_attention."""
    q, k, v = _autocast(q, k, v)
    scale = q.shape[3] ** -0.5 if scale is None else float(scale)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if backend == "triton":
        lam, lam_value, _ = _kernel_lambda(lambda_, acc_dtype, q.device)
        call = AttentionCall.create(scale, causal=causal, window_size=window_size,
                                    lam_value=lam_value, **score_options)
        result = fused_attention(q, k, v, lam, _mask_for_kernels(key_padding_mask), None, call,
                                 return_lse=return_lse)
        return (result[0], fused_lse(result[1], lse_dtype(q))) if return_lse else result
    with _autocast_off(q.device.type):
        out = diff_attention_v2_torch(q, k, v, lambda_, causal=causal,
                                      key_padding_mask=key_padding_mask, scale=scale,
                                      dropout_p=dropout_p, attn_bias=attn_mask,
                                      window_size=window_size, **score_options)
        if not return_lse:
            return out
        return out, softmax_lse_torch(q, k, key_pair=False, scale=scale, causal=causal,
                                      key_padding_mask=key_padding_mask, attn_bias=attn_mask,
                                      window_size=window_size, **score_options)


# ------------------------------------------------------------------ public API
def diff_attention(q: Tensor, k: Tensor, v: Tensor,
                   lambda_: Optional[Union[float, Tensor]] = None, *,
                   causal: bool = False, key_padding_mask: Optional[Tensor] = None,
                   scale: Optional[float] = None, norm_weight: Optional[Tensor] = None,
                   eps: float = 1e-5, out_scale: float = 1.0, dropout_p: float = 0.0,
                   attn_mask: Optional[Tensor] = None,
                   window_size: Optional[Tuple[int, int]] = None, softcap: float = 0.0,
                   lambda_vectors: Optional[Tensor] = None, lambda_init: Optional[float] = None,
                   rms_norm: Optional[bool] = None, return_softmax_lse: bool = False,
                   backend: str = "auto"):
    """Differential attention (V1 / DiffCLIP), fused:
    softmax(s q1 k1^T) v - lambda softmax(s q2 k2^T) v, then the optional per-head RMSNorm.

    Args:
        q: (B, N, 2H, d). k: (B, M, 2Hk, d). v: (B, M, Hk, 2d). H % Hk == 0.
        lambda_: float, 0-dim tensor or (H,) tensor; differentiable when a tensor; finite.
            Required unless lambda_vectors is given (the two are mutually exclusive).
        causal: query i sees keys j <= i + (M - N): the diagonal is aligned to the bottom-right
            corner (FlashAttention's rule). For N == M this is j <= i; when N > M the first
            N - M queries see no key and give zeros.
        key_padding_mask: (B, M) bool, True = ignore that key (nn.MultiheadAttention's
            convention). A query that sees no key at all gives zeros (and zero gradients).
        scale: softmax scale, default d ** -0.5.
        norm_weight: (2d,) switches on the per-head RMSNorm epilogue of DiffCLIP:
            y = x * rsqrt(mean(x^2) + eps) * norm_weight * out_scale, computed in fp32.
            Without it, y = x * out_scale. eps > 0 and out_scale must be finite.
        dropout_p: attention dropout, applied to both maps before the difference (torch
            backend only: the fused kernels refuse it).
        attn_mask: bool (True = masked out) or additive float mask, (N, M) or 4-D
            broadcastable to (B, 2H, N, M), per q head (torch backend only).
        window_size: (left, right), local attention: query i sees keys j with
            i + (M - N) - left <= j <= i + (M - N) + right (FlashAttention's rule); -1 leaves
            that side unbounded; with causal, right is 0. None or (-1, -1): no window. The
            fused kernels skip the key tiles outside the window.
        softcap: logit soft-capping (flash-attn's softcap): the scaled scores s = scale * q . k
            become softcap * tanh(s / softcap) before the softmax; 0 (default) is off. The
            torch backend computes a capped call from the materialised maps (SDPA cannot cap).
        lambda_vectors: (4, d) floating tensor, the rows lq1, lk1, lq2, lk2 of the
            Differential Transformer's lambda, exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init,
            shared by all heads; computed by the kernels (as DiffMultiheadAttention does),
            differentiable into lambda_vectors. Needs lambda_init (a finite float).
        rms_norm: None (default): the RMSNorm epilogue runs when norm_weight is given.
            True: it runs, weightless (weight 1) unless norm_weight is given. False: no norm
            (a norm_weight is then refused).
        return_softmax_lse: also return each softmax map's log-sum-exp (see Returns).
        backend: "auto" | "triton" | "torch" (see diffattn.backend).
    Returns:
        (B, N, H, 2d) in q's dtype (the autocast dtype under autocast); fp32 accumulation.
        With return_softmax_lse, (out, lse): lse (B, 2H, N) float32 (float64 for float64
        inputs), row 2h + a the natural log-sum-exp of map a of head h's scaled scores over
        the keys its query sees (flash-attn's layout and convention: +inf where a query sees
        no key); not differentiable. attn_mask, where given, is part of the scores.
    """
    check_backend_name(backend)
    lam_check = 0.0 if lambda_ is None or lambda_vectors is not None else lambda_
    check_diff_attention_args(q, k, v, lam_check, key_padding_mask, norm_weight, scale, causal,
                              eps, out_scale, window_size)
    lambda_ = resolve_lambda_vectors(lambda_, lambda_vectors, lambda_init, q)
    norm_weight = resolve_rms_norm(norm_weight, rms_norm, v.shape[3], q)
    _check_return_lse(return_softmax_lse)
    _check_attn_mask(attn_mask, q, k)
    _check_dropout(dropout_p)
    check_softcap(softcap)
    chosen = resolve_backend(backend, q.device, q.dtype, q.shape[3],
                             unsupported_features(dropout_p, attn_mask))
    return run_diff_attention(q, k, v, lambda_, chosen, causal=causal,
                              key_padding_mask=key_padding_mask, scale=scale,
                              norm_weight=norm_weight, eps=eps, out_scale=out_scale,
                              dropout_p=dropout_p, attn_mask=attn_mask,
                              window_size=window_size, return_lse=return_softmax_lse,
                              softcap=softcap)


def diff_attention_v2(q: Tensor, k: Tensor, v: Tensor, lambda_: Union[float, Tensor], *,
                      causal: bool = False, key_padding_mask: Optional[Tensor] = None,
                      scale: Optional[float] = None, dropout_p: float = 0.0,
                      attn_mask: Optional[Tensor] = None,
                      window_size: Optional[Tuple[int, int]] = None, softcap: float = 0.0,
                      return_softmax_lse: bool = False, backend: str = "auto"):
    """Differential attention V2 (Differential Transformer V2), fused:
    out[:, :, h] = softmax(s q_2h k_g^T) v_g - lambda softmax(s q_2h+1 k_g^T) v_g.

    The two maps of differential head h are q heads 2h and 2h+1, which share the key head and
    value head g = h // (H // Hk) of their group; each key and value tile is read once for both
    maps and the pair's two outputs are never materialised.

    Args:
        q: (B, N, 2H, d). k: (B, M, Hk, d). v: (B, M, Hk, d). H % Hk == 0.
        lambda_: float, 0-dim tensor, (H,) or per token (B, N, H); differentiable when a
            tensor. It multiplies directly (DiffMultiheadAttentionV2 applies the sigmoid).
        causal, key_padding_mask, scale, window_size, softcap, backend: as in
            diff_attention.
        dropout_p, attn_mask: as in diff_attention (torch backend only); attn_mask per q head,
            broadcastable to (B, 2H, N, M).
        return_softmax_lse: also return each softmax map's log-sum-exp, as in diff_attention.
    Returns:
        (B, N, H, d) in q's dtype (the autocast dtype under autocast); fp32 accumulation.
        With return_softmax_lse, (out, lse (B, 2H, N)) as in diff_attention.
    """
    check_backend_name(backend)
    check_diff_attention_v2_args(q, k, v, lambda_, key_padding_mask, scale, causal, window_size)
    _check_return_lse(return_softmax_lse)
    _check_attn_mask(attn_mask, q, k)
    _check_dropout(dropout_p)
    check_softcap(softcap)
    chosen = resolve_backend(backend, q.device, q.dtype, q.shape[3],
                             unsupported_features(dropout_p, attn_mask))
    return run_diff_attention_v2(q, k, v, lambda_, chosen, causal=causal,
                                 key_padding_mask=key_padding_mask, scale=scale,
                                 dropout_p=dropout_p, attn_mask=attn_mask,
                                 window_size=window_size, return_lse=return_softmax_lse,
                                 softcap=softcap)


# ------------------------------------------------------------------ packed sequences
def _check_packed(name: str, t, heads: str, dim: str) -> None:
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


def diff_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                          cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                          lambda_: Optional[Union[float, Tensor]] = None, causal: bool = False,
                          window_size: Optional[Tuple[int, int]] = None,
                          scale: Optional[float] = None, norm_weight: Optional[Tensor] = None,
                          eps: float = 1e-5, out_scale: float = 1.0, softcap: float = 0.0,
                          lambda_vectors: Optional[Tensor] = None,
                          lambda_init: Optional[float] = None, rms_norm: Optional[bool] = None,
                          return_softmax_lse: bool = False, backend: str = "auto"):
    """diff_attention (V1 / DiffCLIP) over packed variable-length sequences, as flash-attn's
    varlen functions take them: sequence b is rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1
    of q and rows cu_seqlens_k[b] .. cu_seqlens_k[b + 1] - 1 of k and v.

    Everything after max_seqlen_k is keyword-only (where flash_attn_varlen_func takes
    dropout_p, a positional argument is a TypeError).

    Args:
        q: (total_q, 2H, d). k: (total_k, 2Hk, d). v: (total_k, Hk, 2d). H % Hk == 0.
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) cumulative offsets, from 0 to total_q /
            total_k, non-decreasing; zero-length sequences are allowed. Any layout (a strided
            or expanded view is copied to a contiguous one before it is checked and read).
        max_seqlen_q, max_seqlen_k: ints, the longest query / key sequence (or more): the fused
            grid is sized from them, so the offsets are never read on the host.
        lambda_: float, 0-dim tensor or (H,) tensor; differentiable when a tensor. Required
            unless lambda_vectors is given.
        causal, window_size: per sequence, as in diff_attention: query i of a sequence of Nq
            queries and Nk keys sees keys j <= i + Nk - Nq (bottom-right). A query that sees
            no key gives zeros.
        scale, norm_weight, eps, out_scale, softcap, lambda_vectors, lambda_init, rms_norm,
            backend: as in diff_attention.
        return_softmax_lse: also return each softmax map's log-sum-exp (see Returns).
    Returns:
        (total_q, H, 2d) in q's dtype. With return_softmax_lse, (out, lse): lse (2H, total_q)
        float32 (float64 for float64 inputs), as flash-attn's varlen functions lay it out, with
        diff_attention's convention (+inf where a query sees no key); not differentiable.
    """
    check_backend_name(backend)
    _check_packed("q", q, "2 * heads", "head_dim")
    _check_packed("k", k, "2 * kv_heads", "head_dim")
    _check_packed("v", v, "kv_heads", "2 * head_dim")
    if isinstance(lambda_, Tensor) and lambda_.dim() > 1:
        raise ValueError(f"lambda_ must be a float, a 0-dim tensor or (H,) tensor, got "
                         f"{tuple(lambda_.shape)}")
    lam_check = 0.0 if lambda_ is None or lambda_vectors is not None else lambda_
    check_diff_attention_args(q[None], k[None], v[None], lam_check, None, norm_weight, scale,
                              causal, eps, out_scale, window_size)
    lambda_ = resolve_lambda_vectors(lambda_, lambda_vectors, lambda_init, q)
    norm_weight = resolve_rms_norm(norm_weight, rms_norm, v.shape[2], q)
    _check_return_lse(return_softmax_lse)
    check_softcap(softcap)
    cu_seqlens_q, cu_seqlens_k = check_varlen_args(q, k, cu_seqlens_q, cu_seqlens_k,
                                                   max_seqlen_q, max_seqlen_k)
    return _run_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       lambda_, backend, causal=causal, window_size=window_size, scale=scale,
                       norm_weight=norm_weight, eps=eps, out_scale=out_scale, v2=False,
                       return_lse=return_softmax_lse, softcap=softcap)


def _run_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, lambda_,
                backend, *, causal, window_size, scale, norm_weight, eps, out_scale,
                v2: bool, return_lse: bool = False, **score_options):
    """The packed call after its checks: the backend, autocast, then the fused kernels (one
    launch over every sequence) or the torch path (V1 or V2 by ``v2``); with return_lse,
    (out, lse (2H, total_q)); ``score_options`` as in run_diff_attention."""
    chosen = resolve_backend(backend, q.device, q.dtype, q.shape[2], unsupported_features(0.0,
                                                                                         None))
    q, k, v = _autocast(q, k, v)
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if chosen == "triton":
        lam, lam_value, vectors = _kernel_lambda(lambda_, acc_dtype, q.device)
        call = AttentionCall.create(scale, causal=causal, window_size=window_size,
                                    lam_value=lam_value, lam_vectors=vectors, eps=eps,
                                    out_scale=out_scale, max_seqlens=(max_seqlen_q, max_seqlen_k),
                                    **score_options)
        result = fused_attention(q, k, v, lam, None, norm_weight, call, cu_seqlens_q,
                                 cu_seqlens_k, return_lse=return_lse)
        if not return_lse:
            return result
        return result[0], fused_lse_varlen(result[1], cu_seqlens_q, q.shape[0], lse_dtype(q))
    with _autocast_off(q.device.type):
        if v2:
            out = diff_attention_v2_varlen_torch(q, k, v, lambda_, cu_seqlens_q, cu_seqlens_k,
                                                 max_seqlen_q, max_seqlen_k, causal=causal,
                                                 scale=scale, window_size=window_size,
                                                 **score_options)
        else:
            lam = expand_lambda(lambda_, q.shape[1] // 2, acc_dtype, q.device)
            out = diff_attention_varlen_torch(q, k, v, lam, cu_seqlens_q, cu_seqlens_k,
                                              max_seqlen_q, max_seqlen_k, causal=causal,
                                              scale=scale, norm_weight=norm_weight, eps=eps,
                                              out_scale=out_scale, window_size=window_size,
                                              **score_options)
        if not return_lse:
            return out
        return out, softmax_lse_varlen_torch(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                             max_seqlen_k, key_pair=not v2, scale=scale,
                                             causal=causal, window_size=window_size,
                                             **score_options)


def diff_attention_v2_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                             cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                             lambda_: Union[float, Tensor], causal: bool = False,
                             window_size: Optional[Tuple[int, int]] = None,
                             scale: Optional[float] = None, softcap: float = 0.0,
                             return_softmax_lse: bool = False, backend: str = "auto"):
    """diff_attention_v2 over packed variable-length sequences (see diff_attention_varlen;
    everything after max_seqlen_k is keyword-only).

    Args:
        q: (total_q, 2H, d). k, v: (total_k, Hk, d). H % Hk == 0.
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k: as in diff_attention_varlen.
        lambda_: float, 0-dim tensor, (H,) or per token (total_q, H); differentiable when a
            tensor. Keyword-only, required.
        causal, window_size, scale, softcap, return_softmax_lse, backend: as in
            diff_attention_varlen.
    Returns:
        (total_q, H, d) in q's dtype; with return_softmax_lse, (out, lse (2H, total_q)) as in
        diff_attention_varlen.
    """
    check_backend_name(backend)
    _check_packed("q", q, "2 * heads", "head_dim")
    _check_packed("k", k, "kv_heads", "head_dim")
    _check_packed("v", v, "kv_heads", "head_dim")
    lam_check = lambda_
    if isinstance(lambda_, Tensor) and lambda_.dim() > 2:
        raise ValueError(f"lambda_ must be a float, a 0-dim tensor, (H,) or per token "
                         f"(total_q, H), got shape {tuple(lambda_.shape)}")
    if isinstance(lambda_, Tensor) and lambda_.dim() == 2:
        if isinstance(q, Tensor) and tuple(lambda_.shape) != (q.shape[0], q.shape[1] // 2):
            raise ValueError(f"lambda_ per token must have shape (total_q, H) = "
                             f"{(q.shape[0], q.shape[1] // 2)}, got {tuple(lambda_.shape)}")
        lam_check = lambda_[None]
    check_diff_attention_v2_args(q[None], k[None], v[None], lam_check, None, scale, causal,
                                 window_size)
    _check_return_lse(return_softmax_lse)
    check_softcap(softcap)
    cu_seqlens_q, cu_seqlens_k = check_varlen_args(q, k, cu_seqlens_q, cu_seqlens_k,
                                                   max_seqlen_q, max_seqlen_k)
    return _run_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       lambda_, backend, causal=causal, window_size=window_size, scale=scale,
                       norm_weight=None, eps=1e-5, out_scale=1.0, v2=True,
                       return_lse=return_softmax_lse, softcap=softcap)
