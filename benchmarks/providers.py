"""What benchmarks/throughput.py runs at op and layer level: the providers of differential
attention, each ready to time.

Op level (the attention core alone, no projections):
    diffattn       the fused Triton kernels, ``diff_attention(..., backend="triton")``.
    sdpa_x2        the fastest unfused code a user would write: two
                   ``F.scaled_dot_product_attention`` calls on strided views of the same
                   (B, N, 2H, d) q, (B, M, 2Hk, d) k and (B, M, Hk, 2d) v tensors (no copies),
                   then one fused multiply-subtract, ``torch.addcmul(o1, lambda, o2, value=-1)``.
    torch_path     the library's own PyTorch path, ``diff_attention(..., backend="torch")``.
    naive          explicit matmul and softmax, materialising both N x M maps, as the DiffCLIP
                   release computes it; memory O(N^2).
    sdpa_plain     plain attention of the same width: 2H heads of d in one SDPA call.
    diffattn_v2    the fused V2 op, ``diff_attention_v2(..., backend="triton")``, lambda per
                   token (B, N, H), as Differential Transformer V2 uses it.
    flash_v2       V2 the reference's way: one SDPA call over the 2H q heads with grouped keys
                   and values (``enable_gqa=True``), then the multiply-subtract of each pair.
    torch_path_v2  the library's PyTorch path of V2, ``diff_attention_v2(..., backend="torch")``.
    diffattn_interpreter, diffattn_v2_interpreter
                   the fused kernels through the Triton interpreter on CPU
                   (TRITON_INTERPRET=1): correct, but their timings say nothing about the
                   kernels' speed.

Layer level (DiffMultiheadAttention-shaped, projections, norm and output projection
included): ``diffattn`` (the module, backend "triton"), ``torch_path`` (backend "torch"),
``sdpa_x2`` (:class:`UnfusedDiffLayer`: the same parameters, two SDPA calls on views,
``addcmul``, ``F.rms_norm``), ``naive`` (:class:`NaiveDiffAttention`) and ``sdpa_plain``
(``nn.MultiheadAttention(E, 2H)``).

A problem is a :class:`Shape`: ``heads`` counts differential heads H (2H softmax maps of width
``head_dim``; V1 value width 2 * head_dim, V2 value width head_dim and H key/value heads);
self-attention, so seq_k == seq_len.

Every builder returns a :class:`Bench`: for each mode a factory that prepares and returns the
callable to time, plus the leaf tensors whose ``.grad`` is reset between timed calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffattn import DiffMultiheadAttention, diff_attention, diff_attention_v2

OP_PROVIDERS = ("diffattn", "sdpa_x2", "torch_path", "naive", "sdpa_plain", "diffattn_v2",
                "flash_v2", "torch_path_v2")
LAYER_PROVIDERS = ("diffattn", "sdpa_x2", "torch_path", "naive", "sdpa_plain")
# The fused kernels through the Triton interpreter: their own names, so no interpreter timing
# is ever read as a kernel measurement.
INTERPRETER_PROVIDERS = {"diffattn_interpreter": "diffattn",
                         "diffattn_v2_interpreter": "diffattn_v2"}
FUSED_PROVIDERS = ("diffattn", "diffattn_v2")
V2_PROVIDERS = ("diffattn_v2", "flash_v2", "torch_path_v2", "diffattn_v2_interpreter")
# The providers that call this library's op (diff_attention, or diff_attention_v2 for the V2
# providers), and the backend they ask for.
_LIBRARY_BACKENDS = {"diffattn": "triton", "torch_path": "torch", "diffattn_v2": "triton",
                     "torch_path_v2": "torch"}
OP_MODES = ("fwd", "bwd", "fwd_bwd")
LAMBDA = 0.8  # a typical lambda (DiffCLIP's lambda_init); any value costs the same


class ProviderUnavailable(RuntimeError):
    """A provider cannot run this problem here (e.g. an optional package is missing)."""


@dataclass(frozen=True)
class Shape:
    """One attention problem. ``heads`` = differential heads; seq_k == seq_len."""
    name: str
    batch: int
    seq_len: int
    heads: int
    head_dim: int
    causal: bool

    @property
    def width(self) -> int:
        """Model width E = 2 * heads * head_dim (nn.MultiheadAttention(E, 2 * heads))."""
        return 2 * self.heads * self.head_dim

    def label(self) -> str:
        causal = " causal" if self.causal else ""
        return (f"{self.name} B={self.batch} N={self.seq_len} H={self.heads} "
                f"d={self.head_dim}{causal}")


@dataclass
class Bench:
    """The timed work of one provider on one problem.

    makers: mode -> a factory that does any preparation (e.g. the forward whose graph a
        ``bwd`` timing walks back through) and returns the callable to time.
    leaves: tensors whose ``.grad`` is set to None before every timed call.
    sdpa_backend: for the SDPA providers, a function naming the SDPA backend that runs.
    """
    makers: Dict[str, Callable[[], Callable[[], object]]]
    leaves: List[Tensor] = field(default_factory=list)
    sdpa_backend: Optional[Callable[[], str]] = None


# ------------------------------------------------------------------------------ math
def sdpa_x2_attention(q: Tensor, k: Tensor, v: Tensor, lam: Tensor,
                      causal: bool = False) -> Tensor:
    """V1 differential attention as two SDPA calls on views, without a copy of any input.

    q (B, N, 2H, d), k (B, M, 2Hk, d), v (B, M, Hk, 2d), lam (H,) -> (B, N, H, 2d), a
    transposed view of the (B, H, N, 2d) result. The maps' q heads 2h / 2h+1 and key heads
    2g / 2g+1 are strided views; grouped keys use ``enable_gqa``. The difference is one
    ``addcmul``: o1 + (-1) * lambda * o2.
    """
    H, Hk = q.shape[2] // 2, v.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, N, d)
    gqa = Hk != H
    o1 = F.scaled_dot_product_attention(qh[:, 0::2], kh[:, 0::2], vh, is_causal=causal,
                                        enable_gqa=gqa)
    o2 = F.scaled_dot_product_attention(qh[:, 1::2], kh[:, 1::2], vh, is_causal=causal,
                                        enable_gqa=gqa)
    x = torch.addcmul(o1, lam.to(o1.dtype).view(1, H, 1, 1), o2, value=-1.0)
    return x.transpose(1, 2)


def flash_v2_attention(q: Tensor, k: Tensor, v: Tensor, lam: Tensor,
                       causal: bool = False) -> Tensor:
    """V2 differential attention the reference's way: one SDPA call over the 2H q heads
    with grouped keys and values, then map 2h minus lambda times map 2h+1.

    q (B, N, 2H, d), k (B, M, Hk, d), v (B, M, Hk, d), lam per token (B, N, H)
    -> (B, N, H, d), a transposed view of the (B, H, N, d) result.
    """
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=causal, enable_gqa=True)  # (B, 2H, N, d)
    lam_maps = lam.transpose(1, 2).unsqueeze(-1).to(o.dtype)              # (B, H, N, 1)
    return torch.addcmul(o[:, 0::2], lam_maps, o[:, 1::2], value=-1.0).transpose(1, 2)


def naive_diff_attention(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, causal: bool = False,
                         scale: Optional[float] = None) -> Tensor:
    """Differential attention the DiffCLIP release's way: both (N x M) maps in memory.

    q (B, N, 2H, d), k (B, M, 2Hk, d), v (B, M, Hk, 2d), lam (H,) or 0-dim -> (B, N, H, 2d).
    Scores in the input dtype, softmax in fp32 cast back, lambda in the maps' dtype. Causal
    masking is bottom-right aligned like diff_attention; unlike it, a query row that sees no key
    gives NaN (the release never has one).
    """
    B, N, H2, d = q.shape
    M, Hk = k.shape[1], v.shape[2]
    H = H2 // 2
    scale = d ** -0.5 if scale is None else scale
    qh = q.transpose(1, 2) * scale                       # (B, 2H, N, d)
    kh = k.transpose(1, 2)                               # (B, 2Hk, M, d)
    vh = v.transpose(1, 2)                               # (B, Hk, M, 2d)
    if Hk != H:  # grouped-query attention: group g serves H // Hk consecutive heads
        kh = kh.unflatten(1, (Hk, 2)).repeat_interleave(H // Hk, dim=1).flatten(1, 2)
        vh = vh.repeat_interleave(H // Hk, dim=1)
    scores = qh @ kh.transpose(-1, -2)                   # (B, 2H, N, M)
    if causal:
        hidden = torch.ones(N, M, dtype=torch.bool, device=q.device).triu(M - N + 1)
        scores = scores.masked_fill(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).type_as(scores)
    probs = probs.unflatten(1, (H, 2))                   # (B, H, 2, N, M)
    lam = lam.to(probs.dtype).reshape(-1, 1, 1).expand(H, 1, 1)
    diff = probs[:, :, 0] - lam * probs[:, :, 1]         # (B, H, N, M)
    return (diff @ vh).transpose(1, 2)                   # (B, N, H, 2d)


def plain_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
    """One SDPA call over (B, N, heads, d) inputs -> (B, N, heads, d)."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                          v.transpose(1, 2), is_causal=causal).transpose(1, 2)


# ------------------------------------------------------------------------------ layers
def _split_heads(m: DiffMultiheadAttention, query: Tensor, key: Tensor, value: Tensor):
    """The projections of a DiffMultiheadAttention as (B, heads, L, width) views."""
    B, N, _ = query.shape
    M = key.shape[1]
    d = m.head_dim
    q = m.q_proj(query).view(B, N, m.num_heads, d).transpose(1, 2)            # (B, 2H, N, d)
    k = m.k_proj(key).view(B, M, m.num_kv_heads, d).transpose(1, 2)           # (B, 2Hk, M, d)
    v = m.v_proj(value).view(B, M, m.num_kv_heads // 2, 2 * d).transpose(1, 2)  # (B, Hk, M, 2d)
    return q, k, v


def _mha_inputs(m: DiffMultiheadAttention, query, key, value):
    key = query if key is None else key
    value = key if value is None else value
    if not m.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    return query, key, value


def _packed_projection(m: nn.Module, query: Tensor):
    """Self-attention q, k, v as (B, heads, N, width) views of one GEMM, when the layer holds a
    packed ``in_proj_weight`` (E + 2 Ekv, E); None otherwise."""
    weight = getattr(m, "in_proj_weight", None)
    if weight is None:
        return None
    B, N, _ = query.shape
    d, kv = m.head_dim, m.num_kv_heads * m.head_dim
    q, k, v = F.linear(query, weight, getattr(m, "in_proj_bias", None)).split(
        [m.embed_dim, kv, kv], -1)
    return (q.view(B, N, m.num_heads, d).transpose(1, 2),
            k.view(B, N, m.num_kv_heads, d).transpose(1, 2),
            v.view(B, N, m.num_kv_heads // 2, 2 * d).transpose(1, 2))


class _LayerProvider(nn.Module):
    """A DiffMultiheadAttention layer's parameters computed another way, with
    nn.MultiheadAttention's call contract, so it can replace the layer inside a model
    (``need_weights=True`` is not supported: a benchmark provider).

    Subclasses give ``attend(m, query, key, value, key_padding_mask, attn_mask, is_causal)``:
    batch-first (B, N, E), (B, M, Ekv) inputs -> (B, N, 2 * H * d), the input of the output
    projection.
    """

    def __init__(self, layer: DiffMultiheadAttention):
        super().__init__()
        self.layer = layer

    def forward(self, query: Tensor, key: Optional[Tensor] = None,
                value: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = False, attn_mask: Optional[Tensor] = None,
                average_attn_weights: bool = True, is_causal: bool = False):
        if need_weights:
            raise NotImplementedError(f"{type(self).__name__} is a benchmark provider: "
                                      "need_weights=True is not supported")
        m = self.layer
        query, key, value = _mha_inputs(m, query, key, value)
        out = m.out_proj(self.attend(m, query, key, value, key_padding_mask, attn_mask,
                                     is_causal))
        return (out if m.batch_first else out.transpose(0, 1)), None


class UnfusedDiffLayer(_LayerProvider):
    """A DiffMultiheadAttention layer written with stock ops, the fastest unfused way: one GEMM
    for q, k, v where the layer holds them packed (else its three projections), two SDPA
    calls on strided views of the projections, one ``addcmul`` for the difference,
    ``F.rms_norm`` with the weight pre-scaled by (1 - lambda_init), the output projection.

    Masks other than ``is_causal`` are not supported.
    """

    def attend(self, m, query, key, value, key_padding_mask, attn_mask, is_causal):
        if key_padding_mask is not None or attn_mask is not None:
            raise NotImplementedError("UnfusedDiffLayer is a benchmark provider: masks other "
                                      "than is_causal are not supported")
        B, N, _ = query.shape
        packed = _packed_projection(m, query) if key is query and value is query else None
        q, k, v = packed if packed is not None else _split_heads(m, query, key, value)
        H, gqa = m.num_heads // 2, m.num_kv_heads != m.num_heads
        o1 = F.scaled_dot_product_attention(q[:, 0::2], k[:, 0::2], v, is_causal=is_causal,
                                            enable_gqa=gqa)
        o2 = F.scaled_dot_product_attention(q[:, 1::2], k[:, 1::2], v, is_causal=is_causal,
                                            enable_gqa=gqa)
        x = torch.addcmul(o1, m.compute_lambda().to(o1.dtype), o2, value=-1.0)  # (B, H, N, 2d)
        weight = m.diff_norm.weight * (1.0 - m.lambda_init)
        x = F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), m.diff_norm.eps)
        return x.transpose(1, 2).reshape(B, N, 2 * H * m.head_dim)


class NaiveDiffAttention(_LayerProvider):
    """A DiffMultiheadAttention layer computed the DiffCLIP release's way (explicit maps), on
    the wrapped layer's parameters (projections, lambda vectors, norm weight)."""

    def attend(self, m, query, key, value, key_padding_mask, attn_mask, is_causal):
        B, N, _ = query.shape
        M = key.shape[1]
        d, H2, Hk2 = m.head_dim, m.num_heads, m.num_kv_heads
        H, Hk = H2 // 2, Hk2 // 2
        q, k, v = _split_heads(m, query, key, value)
        q = q * d ** -0.5
        if Hk != H:
            k = k.unflatten(1, (Hk, 2)).repeat_interleave(H // Hk, dim=1).flatten(1, 2)
            v = v.repeat_interleave(H // Hk, dim=1)
        scores = q @ k.transpose(-1, -2)                 # (B, 2H, N, M)
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(N, M, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.view(B, H2, N, M)
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(attn_mask, float("-inf"))
            else:
                scores = scores + attn_mask.to(scores.dtype)
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask.bool()[:, None, None, :],
                                        float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).type_as(scores)
        probs = probs.view(B, H, 2, N, M)
        lam = m.compute_lambda().to(probs.dtype)
        x = (probs[:, :, 0] - lam * probs[:, :, 1]) @ v  # (B, H, N, 2d)
        xf = x.float()
        x = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + m.diff_norm.eps)
             * m.diff_norm.weight.float()).type_as(x) * (1.0 - m.lambda_init)
        return x.transpose(1, 2).reshape(B, N, H2 * d)


# ------------------------------------------------------------------------------ SDPA backend
_SDPA_NAMES = {int(value): name for name, value in
               torch.nn.attention.SDPBackend.__members__.items()}


def sdpa_backend_name(q: Tensor, k: Tensor, v: Tensor, causal: bool,
                      enable_gqa: bool = False) -> str:
    """The SDPA backend PyTorch dispatches to for (B, heads, N, d) inputs: FLASH_ATTENTION,
    EFFICIENT_ATTENTION, CUDNN_ATTENTION or MATH (as torch._fused_sdp_choice reports it;
    where that private helper is missing, the first backend that accepts the call, probed in
    PyTorch's default priority order)."""
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is not None:
        try:
            index = int(choose(q, k, v, None, 0.0, causal, enable_gqa=enable_gqa))
        except (RuntimeError, TypeError):
            pass
        else:
            return _SDPA_NAMES.get(index, f"backend #{index}")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
        try:
            with torch.no_grad(), sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=enable_gqa)
        except RuntimeError:
            continue
        return f"{backend.name} (probed)"
    return "none found"


# ------------------------------------------------------------------------------ modes
def forward_modes(forward: Callable[[], Tensor], modes: Sequence[str]) -> Dict[str, Callable]:
    """Mode factories for a differentiable forward.

    fwd: the forward alone (autograd on, as in training). fwd_bwd: forward, then backward of a
    fixed random output gradient. bwd: the backward alone, walking back through one retained
    forward graph (``retain_graph=True``), timed directly rather than as fwd_bwd minus fwd.
    """
    grad: List[Tensor] = []

    def output_grad(out: Tensor) -> Tensor:
        if not grad:
            grad.append(torch.randn_like(out))
        return grad[0]

    def make_fwd():
        return forward

    def make_fwd_bwd():
        def step():
            out = forward()
            out.backward(output_grad(out))
        return step

    def make_bwd():
        out = forward()
        g = output_grad(out)
        return lambda: out.backward(g, retain_graph=True)

    makers = {"fwd": make_fwd, "bwd": make_bwd, "fwd_bwd": make_fwd_bwd}
    return {mode: makers[mode] for mode in modes}


def _randn(shape, dtype, device, requires_grad=True) -> Tensor:
    return torch.randn(shape, dtype=dtype, device=device).requires_grad_(requires_grad)


def v1_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> List[Tensor]:
    """[q (B, N, 2H, d), k (B, N, 2H, d), v (B, N, H, 2d), lam (H,) fp32], all leaves."""
    B, N, H, d = shape.batch, shape.seq_len, shape.heads, shape.head_dim
    return [_randn((B, N, 2 * H, d), dtype, device), _randn((B, N, 2 * H, d), dtype, device),
            _randn((B, N, H, 2 * d), dtype, device),
            torch.full((H,), LAMBDA, device=device, requires_grad=True)]


def v2_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> List[Tensor]:
    """[q (B, N, 2H, d), k (B, N, H, d), v (B, N, H, d), lam per token (B, N, H) fp32 in
    (0, 1) like a sigmoid's], all leaves."""
    B, N, H, d = shape.batch, shape.seq_len, shape.heads, shape.head_dim
    lam = torch.rand((B, N, H), device=device).requires_grad_(True)
    return [_randn((B, N, 2 * H, d), dtype, device), _randn((B, N, H, d), dtype, device),
            _randn((B, N, H, d), dtype, device), lam]


def op_forward(provider: str, shape: Shape, dtype: torch.dtype,
               device: torch.device) -> tuple:
    """(forward callable, leaf tensors, SDPA-backend probe or None) of an op-level provider."""
    causal = shape.causal
    if provider == "sdpa_plain":
        B, N, H, d = shape.batch, shape.seq_len, shape.heads, shape.head_dim
        q, k, v = (_randn((B, N, 2 * H, d), dtype, device) for _ in range(3))
        probe = lambda: sdpa_backend_name(*(t.transpose(1, 2) for t in (q, k, v)), causal)
        return (lambda: plain_attention(q, k, v, causal)), [q, k, v], probe
    kernel = INTERPRETER_PROVIDERS.get(provider, provider)
    v2 = kernel in V2_PROVIDERS
    q, k, v, lam = leaves = (v2_inputs if v2 else v1_inputs)(shape, dtype, device)
    if kernel in _LIBRARY_BACKENDS:
        op, backend = diff_attention_v2 if v2 else diff_attention, _LIBRARY_BACKENDS[kernel]
        return (lambda: op(q, k, v, lambda_=lam, causal=causal, backend=backend)), leaves, None
    if v2:
        probe = lambda: sdpa_backend_name(q.transpose(1, 2), k.transpose(1, 2),
                                          v.transpose(1, 2), causal, enable_gqa=True)
        return (lambda: flash_v2_attention(q, k, v, lam, causal)), leaves, probe
    if kernel == "naive":
        return (lambda: naive_diff_attention(q, k, v, lam, causal)), leaves, None
    if kernel == "sdpa_x2":
        probe = lambda: sdpa_backend_name(q.transpose(1, 2)[:, 0::2], k.transpose(1, 2)[:, 0::2],
                                          v.transpose(1, 2), causal)
        return (lambda: sdpa_x2_attention(q, k, v, lam, causal)), leaves, probe
    raise ValueError(f"unknown op-level provider {provider!r}; expected one of "
                     f"{OP_PROVIDERS + tuple(INTERPRETER_PROVIDERS)}")


# ------------------------------------------------------------------------------ op level
def op_bench(provider: str, shape: Shape, dtype: torch.dtype, device: torch.device,
             modes: Sequence[str]) -> Bench:
    """The attention core alone on (B, N, heads, d) tensors, no norm, no projections."""
    forward, leaves, probe = op_forward(provider, shape, dtype, device)
    return Bench(forward_modes(forward, modes), leaves, probe)


# ------------------------------------------------------------------------------ layer level
def layer_bench(provider: str, shape: Shape, dtype: torch.dtype, device: torch.device,
                modes: Sequence[str]) -> Bench:
    """A whole attention layer on (B, N, E) input: projections, core, norm, output projection."""
    B, N, E, causal = shape.batch, shape.seq_len, shape.width, shape.causal
    factory = {"device": device, "dtype": dtype}
    x = _randn((B, N, E), dtype, device)
    if provider == "sdpa_plain":
        mha = nn.MultiheadAttention(E, 2 * shape.heads, batch_first=True, **factory)
        mask = torch.ones(N, N, dtype=torch.bool, device=device).triu(1) if causal else None
        forward = lambda: mha(x, x, x, need_weights=False, attn_mask=mask, is_causal=causal)[0]
        return Bench(forward_modes(forward, modes), [x, *mha.parameters()])
    backends = {"diffattn": "triton", "diffattn_interpreter": "triton", "torch_path": "torch",
                "sdpa_x2": "torch", "naive": "torch"}
    if provider not in backends:
        raise ValueError(f"unknown layer-level provider {provider!r}; expected one of "
                         f"{LAYER_PROVIDERS}")
    layer = DiffMultiheadAttention(E, 2 * shape.heads, batch_first=True,
                                   backend=backends[provider], **factory)
    wrappers = {"naive": NaiveDiffAttention, "sdpa_x2": UnfusedDiffLayer}
    run = wrappers[provider](layer) if provider in wrappers else layer
    forward = lambda: run(x, is_causal=causal)[0]
    return Bench(forward_modes(forward, modes), [x, *layer.parameters()])
