"""Fused differential attention forward: both softmax maps, the lambda difference and the
optional per-head RMSNorm epilogue in one FlashAttention-style pass.

One program owns one tile of BLOCK_M query rows of one differential head h of one batch
element. It loads its two q tiles (q heads 2h and 2h+1) once, then streams the key/value group
g = h // (H // Hk) tile by tile: the two K tiles (k heads 2g, 2g+1) and the shared V tile are
read once and feed two independent online softmaxes (running max m, running sum l and a
BLOCK_M x 2d accumulator each, all in fp32, scores in the exp2 domain with the softmax scale
times log2(e) folded in). Nothing of size N x M is ever stored.

Epilogue, per row:  O_a = acc_a / l_a,   X = O1 - lambda_h * O2,
                    Y = X * rsqrt(mean(X^2) + eps) * w * c   (with the norm)
                    Y = X * c                                 (without)
Saved for backward (skipped for inference, SAVE_FOR_BWD=False): X (only when it differs from
Y), O2, the base-2 log-sum-exp of each map's scaled scores (+inf for a row that sees no key, so
recomputed probabilities are 0) and, with the norm, the row's rsqrt.

Layouts (element strides, last dimension contiguous):
    Q (B, N, 2H, d), K (B, M, 2Hk, d), V (B, M, Hk, 2d), KPM (B, M) uint8 (1 = ignore key)
    OUT, X, O2 (B, N, H, 2d) contiguous; LSE (B, H, 2, N); RSTD (B, H, N)
Causal rule: query i sees keys j <= i + (M - N) (diagonal aligned bottom-right).
The math, derived: docs/kernel-math.md in the repository.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import FWD_CANDIDATES, autotune_space, head_block
from .tiles import causal_key_end, causal_keep, key_keep, load_head_pair, load_tile

LOG2E = 1.4426950408889634


@triton.jit
def _online_softmax_step(s, keep, m, l, acc, v, PRECISION: tl.constexpr):
    """Fold one tile of (already exp2-scaled) scores into a running softmax state."""
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    # A row that has seen no key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_shift)
    p = tl.exp2(s - m_shift[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l, acc


_FWD_CONFIGS, _FWD_PRUNE = autotune_space(FWD_CANDIDATES)


# Sizes are not specialised on == 1 (N = 1 would otherwise compile a second copy of each
# variant); the kernels mask ragged edges and need no divisibility hints.
@triton.autotune(configs=_FWD_CONFIGS, key=["N", "M", "HEAD_DIM", "CAUSAL"],
                 prune_configs_by=_FWD_PRUNE)
@triton.jit(do_not_specialize=["N", "M", "H", "GROUP", "stride_kpm_b"])
def _diff_attn_fwd_kernel(
    Q, K, V, LAM, KPM, W, OUT, X, O2, LSE, RSTD,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_km, stride_kh,
    stride_vb, stride_vm, stride_vh,
    stride_kpm_b,
    N, M, H, GROUP,
    qk_scale, eps, out_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_NORM: tl.constexpr,
    SAVE_FOR_BWD: tl.constexpr, STORE_X: tl.constexpr,
    ACC_FP64: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    g = h // GROUP

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < N
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < 2 * HEAD_DIM

    q1, q2 = load_head_pair(Q + b * stride_qb + 2 * h * stride_qh, stride_qh,
                            rows, row_ok, stride_qn, offs_d, d_ok)
    k_base = K + b * stride_kb + 2 * g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh
    kpm_row = KPM + b * stride_kpm_b
    lam = tl.load(LAM + h).to(acc_dtype)

    m1 = tl.full([BLOCK_M], float("-inf"), dtype=acc_dtype)
    m2 = tl.full([BLOCK_M], float("-inf"), dtype=acc_dtype)
    l1 = tl.zeros([BLOCK_M], dtype=acc_dtype)
    l2 = tl.zeros([BLOCK_M], dtype=acc_dtype)
    acc1 = tl.zeros([BLOCK_M, BLOCK_DV], dtype=acc_dtype)
    acc2 = tl.zeros([BLOCK_M, BLOCK_DV], dtype=acc_dtype)

    # Causal: key tiles entirely above this query tile's diagonal are never visited.
    hi = M
    if CAUSAL:
        hi = causal_key_end((pid_m + 1) * BLOCK_M, N, M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        k1, k2 = load_head_pair(k_base, stride_kh, cols, col_ok, stride_km, offs_d, d_ok)
        v = load_tile(v_base, cols, col_ok, stride_vm, offs_dv, dv_ok)
        keep = row_ok[:, None] & key_keep(kpm_row, cols, col_ok, HAS_KPM)[None, :]
        if CAUSAL:
            keep = keep & causal_keep(rows[:, None], cols[None, :], N, M)

        s1 = tl.dot(q1, tl.trans(k1), input_precision=PRECISION).to(acc_dtype) * qk_scale
        m1, l1, acc1 = _online_softmax_step(s1, keep, m1, l1, acc1, v, PRECISION)
        s2 = tl.dot(q2, tl.trans(k2), input_precision=PRECISION).to(acc_dtype) * qk_scale
        m2, l2, acc2 = _online_softmax_step(s2, keep, m2, l2, acc2, v, PRECISION)

    # A row that saw no key: O = 0 and LSE = +inf, so backward recomputes P = 0 there.
    l1_safe = tl.where(l1 > 0, l1, 1.0)
    l2_safe = tl.where(l2 > 0, l2, 1.0)
    inv_l1 = tl.where(l1 > 0, 1.0 / l1_safe, 0.0)
    inv_l2 = tl.where(l2 > 0, 1.0 / l2_safe, 0.0)
    o2 = acc2 * inv_l2[:, None]
    x = acc1 * inv_l1[:, None] - lam * o2

    out_off = ((b * N + rows[:, None]) * H + h) * (2 * HEAD_DIM) + offs_dv[None, :]
    out_mask = row_ok[:, None] & dv_ok[None, :]
    y = x * out_scale
    if HAS_NORM:
        w = tl.load(W + offs_dv, mask=dv_ok, other=0.0).to(acc_dtype)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / (2 * HEAD_DIM) + eps)
        y = y * rstd[:, None] * w[None, :]
        if SAVE_FOR_BWD:
            tl.store(RSTD + (b * H + h) * N + rows, rstd, mask=row_ok)
    tl.store(OUT + out_off, y.to(OUT.dtype.element_ty), mask=out_mask)
    if SAVE_FOR_BWD:  # inference writes the output alone
        if STORE_X:
            tl.store(X + out_off, x.to(X.dtype.element_ty), mask=out_mask)
        tl.store(O2 + out_off, o2.to(O2.dtype.element_ty), mask=out_mask)
        lse1 = tl.where(l1 > 0, m1 + tl.log2(l1_safe), float("inf"))
        lse2 = tl.where(l2 > 0, m2 + tl.log2(l2_safe), float("inf"))
        lse_ptrs = LSE + ((b * H + h) * 2) * N + rows
        tl.store(lse_ptrs, lse1, mask=row_ok)
        tl.store(lse_ptrs + N, lse2, mask=row_ok)


def dot_precision(dtype) -> str:
    """fp32 inputs use exact fp32 products ("ieee"), not TF32; fp16/bf16 ignore this."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def diff_attn_fwd(q, k, v, lam, key_padding_mask, norm_weight, scale, causal, eps, out_scale,
                  save_for_backward=True):
    """Launch the forward kernel.

    Args (already validated by diffattn.functional):
        q (B, N, 2H, d), k (B, M, 2Hk, d), v (B, M, Hk, 2d): same dtype and device, last dim
            contiguous (any other strides).
        lam (H,) float32 (float64 for float64 inputs), contiguous.
        key_padding_mask (B, M) bool (True = ignore) or None.
        norm_weight (2d,) or None: switches on the RMSNorm epilogue.
        save_for_backward: False (inference) writes the output only; x, o2, lse and rstd are
            then empty.
    Returns:
        out (B, N, H, 2d) in q's dtype; x (the pre-epilogue difference, ``out`` itself when the
        epilogue is the identity); o2 (B, N, H, 2d); lse (B, H, 2, N) base-2 log-sum-exp of the
        scaled scores; rstd (B, H, N) with the norm, else an empty tensor.
    """
    B, N, H2, d = q.shape
    M, Hk = v.shape[1], v.shape[2]
    H = H2 // 2
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(B, N, H, 2 * d, device=q.device, dtype=q.dtype)
    has_norm = norm_weight is not None
    store_x = has_norm or out_scale != 1.0
    if save_for_backward:
        x = torch.empty_like(out) if store_x else out
        o2 = torch.empty_like(out)
        lse = torch.empty(B, H, 2, N, device=q.device, dtype=acc_dtype)
        rstd = torch.empty(B, H, N if has_norm else 0, device=q.device, dtype=acc_dtype)
    else:
        x = out
        o2 = out.new_empty(0)
        lse = torch.empty(0, device=q.device, dtype=acc_dtype)
        rstd = torch.empty(0, device=q.device, dtype=acc_dtype)
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(torch.uint8).contiguous()
        stride_kpm_b = kpm.stride(0)
    else:
        kpm, stride_kpm_b = lse, 0  # never read
    w = norm_weight.to(acc_dtype).contiguous() if has_norm else lam

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]), B * H)

    _diff_attn_fwd_kernel[grid](
        q, k, v, lam, kpm, w, out, x, o2, lse, rstd,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        stride_kpm_b,
        N, M, H, H // Hk,
        scale * LOG2E, eps, out_scale,
        HEAD_DIM=d, BLOCK_D=head_block(d), BLOCK_DV=head_block(2 * d),
        CAUSAL=causal, HAS_KPM=key_padding_mask is not None, HAS_NORM=has_norm,
        SAVE_FOR_BWD=save_for_backward, STORE_X=store_x, ACC_FP64=acc_dtype == torch.float64,
        PRECISION=dot_precision(q.dtype),
    )
    return out, x, o2, lse, rstd
