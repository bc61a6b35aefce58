"""One description of a differential attention call, from the functional API to the launchers.

:class:`AttentionCall` holds everything about a call that is not a tensor: the softmax scale,
the masks' rules (causal, local window), the lambda mode and the epilogue. The functional API
builds it once (``AttentionCall.create`` normalises the window); ``diffattn.autograd`` passes it
through autograd unchanged, and the registered ops' schemas, their fake implementations and
their saved state derive the option list from its fields (``FIELD_TYPES``, ``as_schema_args``,
``from_schema_args``); the launchers derive every kernel argument from it and the tensors:
the compile-time flags in one place, :func:`variant_flags`, the score hook's arguments in
another, ``score_arguments`` (kernels/score.py).

Visibility rule (FlashAttention's): query i of N sees key j of M when
``i + M - N - left <= j <= i + M - N + right``; -1 means unbounded on that side, and causal is
``right = 0``. A new option of the kernels is one more field here and, for an option that
changes the scores (a cap, a bias), its values and switch in the score hook (kernels/score.py);
one that changes which tiles a program visits or how tensors are laid out is one more flag in
``variant_flags``: packed variable-length sequences are ``max_seqlens`` and ``VARLEN``.

Packed sequences (``max_seqlens`` given): q (total_q, 2H, d), k (total_k, 2Hk or Hk, d),
v (total_k, Hk, DV) hold the sequences one after another; int32 cumulative offsets
cu_seqlens_q / cu_seqlens_k (batch + 1,) say where sequence b starts and ends, and the rule
above holds per sequence with its own N and M. max_seqlens = (max_seqlen_q, max_seqlen_k)
bound every sequence's lengths (the grid is sized from them, as in flash-attn).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Tuple

import torch

from .config import head_block

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class AttentionCall:
    """The non-tensor arguments of one fused call.

    scale: softmax scale (d ** -0.5 by default in the functional API).
    causal: query i sees keys j <= i + (M - N) (bottom-right aligned diagonal).
    window: (left, right) as given by the caller, with right already 0 when causal; -1 is
        unbounded. (-1, -1) is no window.
    lam_value: lambda when no lambda tensor is passed; lambda_init with lam_vectors.
    lam_vectors: the lambda tensor holds the four (4, L) lambda vectors (V1 layers).
    eps, out_scale: the epilogue (RMSNorm with a norm weight, then the output scale).
    max_seqlens: (max_seqlen_q, max_seqlen_k) for packed variable-length sequences (the
        tensors come with cu_seqlens), None for the padded (batch, seq, heads, dim) layout.
    softcap: logit soft-capping: the scaled scores s become softcap * tanh(s / softcap)
        before the softmax; 0 is off (a score option: kernels/score.py).

    The fields are the one list of a call's options: the registered ops' schemas end with
    them (diffattn.autograd.register_call_op), their values travel as :meth:`as_schema_args` /
    :meth:`from_schema_args`. A field's type is float, bool, int, Tuple[int, int] or
    Optional[Tuple[int, int]].
    """
    scale: float
    causal: bool = False
    window: Tuple[int, int] = (-1, -1)
    lam_value: float = 0.0
    lam_vectors: bool = False
    eps: float = 1e-5
    out_scale: float = 1.0
    max_seqlens: Optional[Tuple[int, int]] = None
    softcap: float = 0.0

    @classmethod
    def create(cls, scale: float, *, window_size: Optional[Tuple[int, int]] = None,
               **options) -> "AttentionCall":
        """The call from the functional API's arguments: ``options`` are fields by name
        (converted to their field's type), ``window_size`` the caller's (left, right) window
        (None: no window), normalised into ``window`` with causal folded in (right = 0). The
        window must already be checked (diffattn.checks.check_window_size)."""
        unknown = sorted(set(options) - set(FIELD_TYPES) | ({"window"} & set(options)))
        if unknown:
            raise TypeError(f"AttentionCall.create() got unknown options {unknown}; the "
                            f"options are {sorted(set(FIELD_TYPES) - {'scale', 'window'})} "
                            f"and window_size")
        values = {name: _typed(FIELD_TYPES[name], value) for name, value in options.items()}
        left, right = (-1, -1) if window_size is None else (int(window_size[0]),
                                                              int(window_size[1]))
        if values.get("causal", False):
            right = 0
        return cls(float(scale), window=(left, right), **values)

    @property
    def varlen(self) -> bool:
        """True for packed variable-length sequences (the kernels' VARLEN flag)."""
        return self.max_seqlens is not None

    @property
    def local(self) -> bool:
        """True when a window bound other than the causal diagonal applies (the kernels'
        WINDOW flag; causal alone keeps its own, cheaper CAUSAL flag)."""
        left, right = self.window
        return left >= 0 or (right >= 0 and not self.causal)

    def window_bounds(self, N: int, M: int) -> Tuple[int, int]:
        """(left, right) as the kernels take them: unbounded sides become M and N (which no
        query can reach past), bounded ones are clipped to them."""
        left, right = self.window
        return (M if left < 0 else min(left, M)), (N if right < 0 else min(right, N))

    def stores_difference(self, has_norm: bool) -> bool:
        """True when the output is not the difference X itself (an RMSNorm epilogue or an
        output scale): X is then stored apart from the output for the backward."""
        return has_norm or self.out_scale != 1.0

    def as_schema_args(self) -> tuple:
        """The fields' values in the order of :meth:`schema`."""
        return tuple(getattr(self, name) for name in FIELD_TYPES)

    @classmethod
    def from_schema_args(cls, *args) -> "AttentionCall":
        """The call from the values of :meth:`as_schema_args` (int lists back to tuples)."""
        return cls(*[_typed(ty, value) for ty, value in zip(FIELD_TYPES.values(), args)])


# {field name: its type as written in the class}, in field order (computed once: torch.compile
# traces the methods above, and dataclasses.fields of a class is opaque to it).
FIELD_TYPES = {f.name: f.type for f in fields(AttentionCall)}
def _typed(field_type: str, value):
    """``value`` as the Python type of an AttentionCall field of ``field_type``."""
    if field_type.startswith("Optional[") and value is None:
        return None
    if "Tuple" in field_type:
        return tuple(int(x) for x in value)
    return {"float": float, "bool": bool, "int": int}[field_type](value)


def dot_precision(dtype) -> str:
    """fp32 inputs use exact fp32 products ("ieee"), not TF32; fp16/bf16 ignore this."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def lambda_strides(lam: Optional[torch.Tensor], lam_vectors: bool) -> tuple:
    """(batch, row, head) element strides of a lambda tensor of shape (), (H,), (B, N, H) or
    per packed token (total_q, H); zeros where lambda does not vary (and for no tensor, or
    lambda's vectors)."""
    if lam is None or lam_vectors or lam.dim() == 0:
        return 0, 0, 0
    if lam.dim() == 1:
        return 0, 0, lam.stride(0)
    if lam.dim() == 2:
        return (0,) + tuple(lam.stride())
    return lam.stride()


def packed_strides(name: str, t: torch.Tensor, axes: str) -> dict:
    """strides() of a (batch, seq, heads, dim) tensor, or of a packed (total, heads, dim) one
    with a batch stride of 0 (packed sequences are addressed from their start row)."""
    if t.dim() == len(axes) + 1:
        return strides(name, t, axes)
    return {f"stride_{name}{axes[0]}": 0, **strides(name, t, axes[1:])}


def call_dims(call: "AttentionCall", q: torch.Tensor, v: torch.Tensor,
              cu_seqlens_q: Optional[torch.Tensor]) -> tuple:
    """(B, N, M, H, d, Hk, DV, rows): the batch, the query and key lengths the grid and the
    saved row statistics are sized by (the maxima for packed sequences), the heads, head
    sizes, and the leading shape of per-query tensors ((B, N) or (total_q,))."""
    d, Hk, DV = q.shape[-1], v.shape[-2], v.shape[-1]
    H = q.shape[-2] // 2
    if call.varlen:
        N, M = call.max_seqlens
        return cu_seqlens_q.shape[0] - 1, N, M, H, d, Hk, DV, (q.shape[0],)
    return q.shape[0], q.shape[1], v.shape[1], H, d, Hk, DV, (q.shape[0], q.shape[1])


def lambda_flags(lam: Optional[torch.Tensor], lam_vectors: bool) -> dict:
    """The kernels' lambda switches: LAM_MODE 0 (the float lam_value), 1 (a tensor read
    through strides), 2 (computed from the (4, LAM_DIM) vectors lq1, lk1, lq2, lk2 with
    lam_value = lambda_init)."""
    if lam is None:
        return dict(LAM_MODE=0, LAM_DIM=1, BLOCK_LAM=16)
    if lam_vectors:
        return dict(LAM_MODE=2, LAM_DIM=lam.shape[1], BLOCK_LAM=head_block(lam.shape[1]))
    return dict(LAM_MODE=1, LAM_DIM=1, BLOCK_LAM=16)


def strides(name: str, t: torch.Tensor, axes: str) -> dict:
    """The kernels' stride arguments of tensor ``name`` by keyword: strides("q", q, "bnh") is
    {"stride_qb": q.stride(0), "stride_qn": q.stride(1), "stride_qh": q.stride(2)}."""
    return {f"stride_{name}{axis}": t.stride(i) for i, axis in enumerate(axes)}


def variant_flags(call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  lam: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor]) -> dict:
    """The compile-time flags the forward and backward kernels share, from the call and its
    tensors (layouts in diff_attn_fwd): head sizes and their blocks, the key layout (a key
    pair per group in V1), the masks, lambda's mode, packed sequences, the accumulation and
    dot precision."""
    d, DV = q.shape[-1], v.shape[-1]
    return dict(HEAD_DIM=d, HEAD_DIM_V=DV, BLOCK_D=head_block(d), BLOCK_DV=head_block(DV),
                KEY_PAIR=k.shape[-2] != v.shape[-2], CAUSAL=call.causal and not call.local,
                **lambda_flags(lam, call.lam_vectors), HAS_KPM=key_padding_mask is not None,
                WINDOW=call.local, VARLEN=call.varlen, ACC_FP64=q.dtype == torch.float64,
                PRECISION=dot_precision(q.dtype))
