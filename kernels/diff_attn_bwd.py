"""Fused differential attention backward, FlashAttention-2 style, in three kernels.

1. ``_diff_attn_bwd_preprocess_kernel``, one program per (query tile, batch, head): takes the
   gradient through the epilogue (RMSNorm, weight, out_scale) to dX, and forms the row terms
       D1 = rowsum(dX * O1),  D2 = -lambda_h rowsum(dX * O2),  with O1 = X + lambda_h O2,
   the per-row contribution to dlambda_h = -sum(dX . O2) and the tile's partial sum of
   d(norm weight) = sum(dY * X * rstd * c). Partial sums are reduced afterwards by torch, in a
   fixed order: the backward is deterministic (no atomics).
2. ``_diff_attn_bwd_dkdv_kernel``, one program per (key tile, batch, key/value group): loops
   over the H // Hk differential heads that read the group and over the query tiles, recomputes
   P1, P2 from the saved log-sum-exps and accumulates
       dV += (P1 - lambda P2)^T dX                  (dO1 = dX, dO2 = -lambda dX share V)
       dP1 = dX V^T,  dP2 = -lambda dP1             (one product serves both maps)
       dK_a += scale * (P_a * (dP_a - D_a))^T q_a
   Causal: query tiles entirely above the key tile's diagonal are skipped.
3. ``_diff_attn_bwd_dq_kernel``, one program per (query tile, batch, head): the same
   recomputation over key tiles, dq_a = scale * (P_a * (dP_a - D_a)) K_a.

Layouts as in diff_attn_fwd.py; dX, when stored, is (B, N, H, 2d) contiguous in q's dtype;
DELTA (B, H, 2, N) holds D1, D2.
The math, derived: docs/kernel-math.md in the repository.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import BWD_CANDIDATES, PRE_BLOCK_M, autotune_space, head_block, preprocess_warps
from .diff_attn_fwd import LOG2E, dot_precision
from .tiles import causal_key_end, causal_keep, key_keep, load_head_pair, load_tile


@triton.jit
def _load_row_stats(lse_base, delta_base, rows, row_ok, N):
    """Both maps' log-sum-exp and D terms of a query tile. Rows past N load LSE = +inf, so
    their recomputed probabilities are 0."""
    lse1 = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
    lse2 = tl.load(lse_base + N + rows, mask=row_ok, other=float("inf"))
    d1 = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    d2 = tl.load(delta_base + N + rows, mask=row_ok, other=0.0)
    return lse1, lse2, d1, d2


@triton.jit(do_not_specialize=["N", "H"])
def _diff_attn_bwd_preprocess_kernel(
    DY, X, O2, LAM, W, RSTD, DX, DELTA, DLAM_ROWS, DW_PART,
    stride_dyb, stride_dyn, stride_dyh,
    N, H, out_scale,
    HEAD_DIM: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_NORM: tl.constexpr,
    STORE_DX: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_M: tl.constexpr,
):
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < N
    dv_ok = offs_dv < 2 * HEAD_DIM
    mask = row_ok[:, None] & dv_ok[None, :]

    dy = load_tile(DY + b * stride_dyb + h * stride_dyh, rows, row_ok, stride_dyn, offs_dv,
                   dv_ok).to(acc_dtype)
    off = ((b * N + rows[:, None]) * H + h) * (2 * HEAD_DIM) + offs_dv[None, :]
    x = tl.load(X + off, mask=mask, other=0.0).to(acc_dtype)
    o2 = tl.load(O2 + off, mask=mask, other=0.0).to(acc_dtype)
    lam = tl.load(LAM + h).to(acc_dtype)

    g = dy * out_scale
    if HAS_NORM:
        w = tl.load(W + offs_dv, mask=dv_ok, other=0.0).to(acc_dtype)
        rstd = tl.load(RSTD + (b * H + h) * N + rows, mask=row_ok, other=0.0)
        tl.store(DW_PART + ((pid_m * tl.num_programs(1) + pid_bh) * BLOCK_DV) + offs_dv,
                 tl.sum(g * x * rstd[:, None], 0))
        g = g * w[None, :]
        mean_gx = tl.sum(g * x, 1) / (2 * HEAD_DIM)
        dx = rstd[:, None] * g - x * (rstd * rstd * rstd * mean_gx)[:, None]
    else:
        dx = g
    if STORE_DX:
        tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)

    dx_o2 = tl.sum(dx * o2, 1)
    delta_ptrs = DELTA + ((b * H + h) * 2) * N + rows
    tl.store(delta_ptrs, tl.sum(dx * x, 1) + lam * dx_o2, mask=row_ok)  # rowsum(dX * O1)
    tl.store(delta_ptrs + N, -lam * dx_o2, mask=row_ok)
    tl.store(DLAM_ROWS + (b * H + h) * N + rows, -dx_o2, mask=row_ok)


_BWD_CONFIGS, _BWD_PRUNE = autotune_space(BWD_CANDIDATES)


@triton.autotune(configs=_BWD_CONFIGS, key=["N", "M", "HEAD_DIM", "CAUSAL"],
                 prune_configs_by=_BWD_PRUNE)
@triton.jit(do_not_specialize=["N", "M", "H", "HK", "GROUP", "stride_kpm_b"])
def _diff_attn_bwd_dkdv_kernel(
    Q, K, V, LAM, KPM, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_km, stride_kh,
    stride_vb, stride_vm, stride_vh,
    stride_dob, stride_don, stride_doh,
    stride_kpm_b,
    N, M, H, HK, GROUP,
    qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, ACC_FP64: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    pid_n = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // HK).to(tl.int64)
    g = (pid_bg % HK).to(tl.int64)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = cols < M
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < 2 * HEAD_DIM

    k1, k2 = load_head_pair(K + b * stride_kb + 2 * g * stride_kh, stride_kh,
                            cols, col_ok, stride_km, offs_d, d_ok)
    v = load_tile(V + b * stride_vb + g * stride_vh, cols, col_ok, stride_vm, offs_dv, dv_ok)
    col_keep = key_keep(KPM + b * stride_kpm_b, cols, col_ok, HAS_KPM)

    dk1 = tl.zeros([BLOCK_N, BLOCK_D], dtype=acc_dtype)
    dk2 = tl.zeros([BLOCK_N, BLOCK_D], dtype=acc_dtype)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=acc_dtype)

    # Causal: query rows i see key j when j <= i + (M - N); start at the first query tile that
    # can see this key tile.
    lo = 0
    if CAUSAL:
        lo = tl.maximum(pid_n * BLOCK_N - (M - N), 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    for head in range(0, GROUP):
        h = g * GROUP + head
        lam = tl.load(LAM + h).to(acc_dtype)
        q_base = Q + b * stride_qb + 2 * h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + ((b * H + h) * 2) * N
        delta_base = DELTA + ((b * H + h) * 2) * N
        for start_m in range(lo, N, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            row_ok = rows < N
            q1, q2 = load_head_pair(q_base, stride_qh, rows, row_ok, stride_qn, offs_d, d_ok)
            do = load_tile(do_base, rows, row_ok, stride_don, offs_dv, dv_ok)
            lse1, lse2, d1, d2 = _load_row_stats(lse_base, delta_base, rows, row_ok, N)

            keep = col_keep[:, None] & row_ok[None, :]
            if CAUSAL:
                keep = keep & causal_keep(rows[None, :], cols[:, None], N, M)
            sT1 = tl.dot(k1, tl.trans(q1), input_precision=PRECISION).to(acc_dtype) * qk_scale
            sT2 = tl.dot(k2, tl.trans(q2), input_precision=PRECISION).to(acc_dtype) * qk_scale
            pT1 = tl.where(keep, tl.exp2(sT1 - lse1[None, :]), 0.0)
            pT2 = tl.where(keep, tl.exp2(sT2 - lse2[None, :]), 0.0)

            dv += tl.dot((pT1 - lam * pT2).to(do.dtype), do, input_precision=PRECISION)
            dpT1 = tl.dot(v, tl.trans(do), input_precision=PRECISION).to(acc_dtype)
            dsT1 = pT1 * (dpT1 - d1[None, :])
            dsT2 = pT2 * (-lam * dpT1 - d2[None, :])
            dk1 += tl.dot(dsT1.to(q1.dtype), q1, input_precision=PRECISION)
            dk2 += tl.dot(dsT2.to(q2.dtype), q2, input_precision=PRECISION)

    dk_ptrs = DK + ((b * M + cols[:, None]) * (2 * HK) + 2 * g) * HEAD_DIM + offs_d[None, :]
    k_mask = col_ok[:, None] & d_ok[None, :]
    tl.store(dk_ptrs, (dk1 * sm_scale).to(DK.dtype.element_ty), mask=k_mask)
    tl.store(dk_ptrs + HEAD_DIM, (dk2 * sm_scale).to(DK.dtype.element_ty), mask=k_mask)
    dv_ptrs = DV + ((b * M + cols[:, None]) * HK + g) * (2 * HEAD_DIM) + offs_dv[None, :]
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None] & dv_ok[None, :])


@triton.autotune(configs=_BWD_CONFIGS, key=["N", "M", "HEAD_DIM", "CAUSAL"],
                 prune_configs_by=_BWD_PRUNE)
@triton.jit(do_not_specialize=["N", "M", "H", "GROUP", "stride_kpm_b"])
def _diff_attn_bwd_dq_kernel(
    Q, K, V, LAM, KPM, DO, LSE, DELTA, DQ,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_km, stride_kh,
    stride_vb, stride_vm, stride_vh,
    stride_dob, stride_don, stride_doh,
    stride_kpm_b,
    N, M, H, GROUP,
    qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, ACC_FP64: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    do = load_tile(DO + b * stride_dob + h * stride_doh, rows, row_ok, stride_don, offs_dv,
                   dv_ok)
    lse_base = LSE + ((b * H + h) * 2) * N
    delta_base = DELTA + ((b * H + h) * 2) * N
    lse1, lse2, d1, d2 = _load_row_stats(lse_base, delta_base, rows, row_ok, N)
    lam = tl.load(LAM + h).to(acc_dtype)
    k_base = K + b * stride_kb + 2 * g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh

    dq1 = tl.zeros([BLOCK_M, BLOCK_D], dtype=acc_dtype)
    dq2 = tl.zeros([BLOCK_M, BLOCK_D], dtype=acc_dtype)
    kpm_row = KPM + b * stride_kpm_b
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
        s2 = tl.dot(q2, tl.trans(k2), input_precision=PRECISION).to(acc_dtype) * qk_scale
        p1 = tl.where(keep, tl.exp2(s1 - lse1[:, None]), 0.0)
        p2 = tl.where(keep, tl.exp2(s2 - lse2[:, None]), 0.0)
        dp1 = tl.dot(do, tl.trans(v), input_precision=PRECISION).to(acc_dtype)
        ds1 = p1 * (dp1 - d1[:, None])
        ds2 = p2 * (-lam * dp1 - d2[:, None])
        dq1 += tl.dot(ds1.to(k1.dtype), k1, input_precision=PRECISION)
        dq2 += tl.dot(ds2.to(k2.dtype), k2, input_precision=PRECISION)

    dq_ptrs = DQ + ((b * N + rows[:, None]) * (2 * H) + 2 * h) * HEAD_DIM + offs_d[None, :]
    q_mask = row_ok[:, None] & d_ok[None, :]
    tl.store(dq_ptrs, (dq1 * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)
    tl.store(dq_ptrs + HEAD_DIM, (dq2 * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


def diff_attn_bwd(dout, q, k, v, lam, key_padding_mask, norm_weight, x, o2, lse, rstd,
                  scale, causal, out_scale):
    """Launch the three backward kernels.

    Args: the forward's inputs and saved tensors (see diff_attn_fwd), and dout (B, N, H, 2d)
    with a contiguous last dim (any other strides, stride 0 included).
    Returns dq (B, N, 2H, d), dk (B, M, 2Hk, d), dv (B, M, Hk, 2d) in the inputs' dtype,
    dlam (H,) and dnorm_weight (2d,) (None without the norm) in the accumulation dtype.
    """
    B, N, H2, d = q.shape
    M, Hk = v.shape[1], v.shape[2]
    H = H2 // 2
    acc_dtype = lse.dtype
    has_norm = norm_weight is not None
    store_dx = has_norm or out_scale != 1.0
    block_dv = head_block(2 * d)
    acc_fp64 = acc_dtype == torch.float64
    precision = dot_precision(q.dtype)

    dx = torch.empty(B, N, H, 2 * d, device=q.device, dtype=q.dtype) if store_dx else dout
    delta = torch.empty(B, H, 2, N, device=q.device, dtype=acc_dtype)
    dlam_rows = torch.empty(B, H, N, device=q.device, dtype=acc_dtype)
    n_pre = triton.cdiv(N, PRE_BLOCK_M)
    dw_part = torch.empty(n_pre if has_norm else 0, B * H, block_dv, device=q.device,
                          dtype=acc_dtype)
    w = norm_weight.to(acc_dtype).contiguous() if has_norm else lam
    _diff_attn_bwd_preprocess_kernel[(n_pre, B * H)](
        dout, x, o2, lam, w, rstd, dx, delta, dlam_rows, dw_part,
        dout.stride(0), dout.stride(1), dout.stride(2),
        N, H, out_scale,
        HEAD_DIM=d, BLOCK_DV=block_dv, HAS_NORM=has_norm, STORE_DX=store_dx,
        ACC_FP64=acc_fp64, BLOCK_M=PRE_BLOCK_M, num_warps=preprocess_warps(block_dv),
    )

    if key_padding_mask is not None:
        kpm = key_padding_mask.to(torch.uint8).contiguous()
        stride_kpm_b = kpm.stride(0)
    else:
        kpm, stride_kpm_b = lse, 0  # never read
    common = dict(HEAD_DIM=d, BLOCK_D=head_block(d), BLOCK_DV=block_dv, CAUSAL=causal,
                  HAS_KPM=key_padding_mask is not None, ACC_FP64=acc_fp64, PRECISION=precision)
    strides = (q.stride(0), q.stride(1), q.stride(2),
               k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2),
               dx.stride(0), dx.stride(1), dx.stride(2),
               stride_kpm_b)

    dk = torch.empty(B, M, 2 * Hk, d, device=q.device, dtype=q.dtype)
    dv = torch.empty(B, M, Hk, 2 * d, device=q.device, dtype=q.dtype)
    _diff_attn_bwd_dkdv_kernel[lambda meta: (triton.cdiv(M, meta["BLOCK_N"]), B * Hk)](
        q, k, v, lam, kpm, dx, lse, delta, dk, dv, *strides,
        N, M, H, Hk, H // Hk, scale * LOG2E, scale, **common,
    )
    dq = torch.empty(B, N, 2 * H, d, device=q.device, dtype=q.dtype)
    _diff_attn_bwd_dq_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
        q, k, v, lam, kpm, dx, lse, delta, dq, *strides,
        N, M, H, H // Hk, scale * LOG2E, scale, **common,
    )

    dlam = dlam_rows.sum(dim=(0, 2))
    dw = dw_part.sum(dim=(0, 1))[: 2 * d] if has_norm else None
    return dq, dk, dv, dlam, dw
