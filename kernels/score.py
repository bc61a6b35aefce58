"""The score hook: how a tile of raw products q . k becomes the scores the softmax sees.

Every kernel that forms attention probabilities (the forward, the backward's key-tile and
query-tile programs, the decode kernel) asks :func:`score_visibility` where the scores of a
tile it masks are visible (padding, causal and window masks; from positions alone, once per
tile before the products), passes each tile of raw products through :func:`attention_scores`
(the score options) and takes the gradient back through :func:`attention_scores_grad` in the
backward. Every hook function returns a tensor (Triton 3.6 cannot return None from a device
function).
What the hook does is decided by two kernel arguments that every kernel passes through
unchanged:

    SCORE        ScoreParams, run-time fp32 values (the softmax scale, ...)
    SCORE_FLAGS  ScoreFlags, compile-time switches (a switch that is off costs nothing)

both made on the host by :func:`score_arguments` from the call (kernels/call.py). The kernels
take the probabilities as ``exp2(s * SCORE.qk_scale - m)`` from the hook's scores ``s`` (one
fused multiply-add before the exp2), so the scores stay in the units of q . k: the softmax
scale itself is applied there, and an option that acts on scaled scores converts its own
parameters (see ScoreParams).

Adding a score option (a bias, a cap, ...): a field of AttentionCall, its values in
ScoreParams and its switch in ScoreFlags (score_arguments), its math in attention_scores and
its derivative in attention_scores_grad (a mask: its comparison in score_visibility). No
kernel signature changes.
"""
from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl

from .call import LOG2E
from .common import causal_keep, window_keep


class ScoreParams(NamedTuple):
    """Run-time values of the score hook (fp32 kernel arguments)."""
    scale: float        # the softmax scale: gradients of q and k are scaled by it
    qk_scale: float     # scale * log2(e): probabilities are exp2(s * qk_scale - m)
    softcap_in: float   # scale / softcap: the capped scores are
    softcap_out: float  # softcap_out * tanh(q . k * softcap_in), in q . k units (0: off)


class ScoreFlags(NamedTuple):
    """Compile-time switches of the score hook (one compiled variant per combination)."""
    softcap: bool       # logit soft-capping (AttentionCall.softcap > 0)


def score_arguments(call) -> dict:
    """The hook's kernel arguments for an AttentionCall: {"SCORE": ScoreParams(...),
    "SCORE_FLAGS": ScoreFlags(...)}."""
    scale, softcap = float(call.scale), float(call.softcap)
    capped = softcap > 0.0
    return dict(SCORE=ScoreParams(scale=scale, qk_scale=scale * LOG2E,
                                  softcap_in=scale / softcap if capped else 0.0,
                                  softcap_out=softcap / scale if capped else 0.0),
                SCORE_FLAGS=ScoreFlags(softcap=capped))


@triton.jit
def _tanh(x):
    """tanh(x) as 1 - 2 / (exp(2x) + 1): right for large |x| (the exp overflows to inf, giving
    1, or underflows to 0, giving -1) and the same on the GPU and under the interpreter."""
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def score_visibility(q_idx, k_idx, keep, N, M, window_left, window_right,
                     CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Where the scores of a masked tile are visible (the kernels call it for the tiles they
    mask, and use no mask elsewhere):
    ``keep`` (broadcastable to the tile, False for keys that do not exist or are padding) and,
    with CAUSAL, the keys on or below the bottom-right diagonal of N queries and M keys
    (causal_keep) and, with WINDOW, those in the local window (window_keep). ``q_idx`` and
    ``k_idx``: the query and key positions, broadcast to the tile's shape (queries by keys, or
    keys by queries for a transposed tile).

    It reads positions only, so the kernels compute it once per tile, before the q . k
    products, for both maps (fewer live registers than comparing after the products). The
    caller drops what is not visible where its math wants it: the forward before the running
    max (-inf), the backward after the exp2 (0)."""
    if CAUSAL:
        keep = keep & causal_keep(q_idx, k_idx, N, M)
    if WINDOW:
        keep = keep & window_keep(q_idx, k_idx, N, M, window_left, window_right)
    return keep


@triton.jit
def attention_scores(qk, q_idx, k_idx, SCORE, SCORE_FLAGS: tl.constexpr):
    """The scores of one tile of raw products ``qk`` (q . k in the accumulation dtype), in
    qk's units (the kernels apply the softmax scale in the exp2); ``q_idx`` and ``k_idx`` as
    for score_visibility, for options that depend on the positions.
    SCORE_FLAGS.softcap: the scaled scores scale * qk become softcap * tanh(scale * qk /
    softcap), i.e. s = softcap_out * tanh(qk * softcap_in)."""
    s = qk
    if SCORE_FLAGS.softcap:
        s = SCORE.softcap_out * _tanh(qk * SCORE.softcap_in)
    return s


@triton.jit
def attention_scores_grad(ds, qk, SCORE, SCORE_FLAGS: tl.constexpr):
    """The gradient of the raw products from ``ds``, the gradient of the scores
    attention_scores returned for them (same tile, entries that are not visible with
    ds = 0)."""
    if SCORE_FLAGS.softcap:  # d/dqk softcap_out * tanh(qk * softcap_in) = 1 - tanh^2
        t = _tanh(qk * SCORE.softcap_in)
        ds = ds * (1.0 - t * t)
    return ds
