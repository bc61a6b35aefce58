"""Fused differential attention backward, FlashAttention-2 style, in two launches.

1. ``diff_attn_bwd_rows_kernel``, one program per (query tile, batch, head): takes the
   gradient through the epilogue (RMSNorm, weight, out_scale) to dX and forms the row terms
       D1 = rowsum(dX * O1),  D2 = -lambda_row rowsum(dX * O2),  with O1 = X + lambda_row O2,
   dlambda_row = -rowsum(dX * O2) (stored per row for per-row lambda, else as the tile's
   partial sum) and the tile's partial sum of d(norm weight) = sum(dY * X * rstd * c).
2. ``diff_attn_bwd_kernel``, three kinds of program in one grid:
   - key-tile programs, one per (key tile, batch, key/value group): loop over the H // Hk
     differential heads that read the group and over the query tiles, recompute P1, P2 from
     the saved log-sum-exps and accumulate
         dV += (P1 - lambda P2)^T dX                  (dO1 = dX, dO2 = -lambda dX share V)
         dP1 = dX V^T,  dP2 = -lambda dP1             (one product serves both maps)
         dK_a += scale * (P_a * (dP_a - D_a))^T q_a   (one dK for both maps without KEY_PAIR)
     Causal: query tiles entirely above the key tile's diagonal are skipped.
   - query-tile programs, one per (query tile, batch, head): the same recomputation over key
     tiles, dq_a = scale * (P_a * (dP_a - D_a)) K_a.
   - reduction programs: the partial sums of dlambda (per head, or of a single scalar lambda)
     and of d(norm weight), summed in a fixed order.
   Grouped-query attention needs no atomics and every sum has a fixed order: the backward is
   deterministic. Tiles every row/key of which is visible run without masks, as in the forward.

Layouts as in diff_attn_fwd.py; dX, when stored, is (B, N, H, DV) contiguous in q's dtype;
DELTA (B, H, 2, N) holds D1, D2. The equations: docs/kernel-math.md.
VARLEN (packed sequences, see diff_attn_fwd.py): every program works on its own sequence's
rows; key-tile and query-tile programs past their sequence's end exit, row-pass programs past
it store zero partial sums, so the fixed-order reductions (and determinism) are unchanged.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import RED_COLS, RED_ROWS, ROWS_BLOCK_M, cdiv, rows_warps
from .call import AttentionCall, call_dims, lambda_strides, packed_strides, variant_flags
from .launch import Launcher
from .common import (band_tiles, key_keep, load_head_pair,
                     load_kept_key_value_tiles, load_key_value_tiles, load_lambda_rows,
                     load_lambda_vectors, load_tile, program_lambda,
                     query_tile_key_ranges, row_offset, sequence_bounds, sequence_rows,
                     sequence_start)
from .score import attention_scores, attention_scores_grad, score_arguments, score_visibility
from .tuning import BWD_TILES

# dlambda reduction modes (DLAM_REDUCE): lambda per row and head (no reduction: the row pass
# writes dlambda), one lambda per head, one lambda for every head, one lambda for every head
# computed from its four vectors (whose gradients are then written).
DLAM_PER_ROW, DLAM_PER_HEAD, DLAM_SCALAR, DLAM_VECTORS = 0, 1, 2, 3


@triton.jit(do_not_specialize=["N", "H", "stride_lb", "stride_ln", "stride_lh"])
def diff_attn_bwd_rows_kernel(
    DY, X, O2, LAM, W, RSTD, DX, DELTA, DLAM, DW_PART, CU_Q,
    stride_dyb, stride_dyn, stride_dyh,
    stride_lb, stride_ln, stride_lh,
    N, H, lam_value, out_scale,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, LAM_MODE: tl.constexpr,
    LAM_DIM: tl.constexpr, BLOCK_LAM: tl.constexpr,
    NEED_DLAM: tl.constexpr, DLAM_REDUCE: tl.constexpr, HAS_NORM: tl.constexpr,
    NEED_DW: tl.constexpr, STORE_DX: tl.constexpr, VARLEN: tl.constexpr,
    ACC_FP64: tl.constexpr, BLOCK_M: tl.constexpr,
):
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    # This program's sequence (N_b rows from q_row0; N is the maximum with VARLEN). Programs
    # past its end run with every row masked: their partial sums are the zeros the fixed-order
    # reduction expects.
    q_row0, N_b, _, _ = sequence_bounds(CU_Q, CU_Q, b, N, N, VARLEN)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < N_b
    mask = row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V)

    dy = load_tile(DY + row_offset(b, q_row0, stride_dyb, stride_dyn, VARLEN) + h * stride_dyh,
                   pid_m * BLOCK_M, N_b, stride_dyn, offs_dv, HEAD_DIM_V, BLOCK_ROWS=BLOCK_M,
                   MASK_ROWS=True, MASK_COLS=HEAD_DIM_V != BLOCK_DV).to(acc_dtype)
    # X, O2, DX: (B, N, H, DV) or packed (total_q, H, DV) contiguous; the tile's first element
    # in int64, the rest int32.
    first = ((sequence_start(b, N, q_row0, VARLEN) + pid_m * BLOCK_M) * H + h) * HEAD_DIM_V
    tile_off = tl.arange(0, BLOCK_M)[:, None] * (H * HEAD_DIM_V) + offs_dv[None, :]
    x = tl.load(X + first + tile_off, mask=mask, other=0.0).to(acc_dtype)
    o2 = tl.load(O2 + first + tile_off, mask=mask, other=0.0).to(acc_dtype)
    lam_scalar = program_lambda(LAM, lam_value, LAM_MODE, LAM_DIM, BLOCK_LAM, acc_dtype)
    lam = load_lambda_rows(sequence_rows(LAM, q_row0, stride_ln, VARLEN), b, rows, N_b, h,
                           stride_lb, stride_ln=stride_ln, stride_lh=stride_lh,
                           lam_scalar=lam_scalar, LAM_MODE=LAM_MODE, ACC_DTYPE=acc_dtype)

    g = dy * out_scale
    if HAS_NORM:
        w = tl.load(W + offs_dv, mask=offs_dv < HEAD_DIM_V, other=0.0).to(acc_dtype)
        rstd = tl.load(RSTD + (b * H + h) * N + rows, mask=row_ok, other=0.0)
        if NEED_DW:
            tl.store(DW_PART + (pid_m * tl.num_programs(1) + pid_bh) * BLOCK_DV + offs_dv,
                     tl.sum(g * x * rstd[:, None], 0))
        g = g * w[None, :]
        mean_gx = tl.sum(g * x, 1) / HEAD_DIM_V
        dx = rstd[:, None] * g - x * (rstd * rstd * rstd * mean_gx)[:, None]
    else:
        dx = g
    dx_o2 = tl.sum(dx * o2, 1)
    # D1, D2 pair with dP = dX V^T of the second launch, which reads dX as stored: they are
    # formed from that rounded dX, so that dP - D stays exact where the row's dP are all equal
    # (dlambda keeps the unrounded dX).
    dx_kept = dx
    if STORE_DX:
        dx_kept = dx.to(DX.dtype.element_ty)
        tl.store(DX + first + tile_off, dx_kept, mask=mask)
        dx_kept = dx_kept.to(acc_dtype)
    kept_o2 = tl.sum(dx_kept * o2, 1)
    delta_ptrs = DELTA + ((b * H + h) * 2) * N + rows
    tl.store(delta_ptrs, tl.sum(dx_kept * x, 1) + lam * kept_o2, mask=row_ok)  # rowsum(dX * O1)
    tl.store(delta_ptrs + N, -lam * kept_o2, mask=row_ok)
    if NEED_DLAM:
        if DLAM_REDUCE == 0:  # per row: DLAM is the (B, N, H) or (total_q, H) gradient itself
            tl.store(DLAM + (sequence_start(b, N, q_row0, VARLEN) + rows) * H + h, -dx_o2,
                     mask=row_ok)
        else:  # the tile's partial sum, (row tiles, B * H)
            tl.store(DLAM + pid_m * tl.num_programs(1) + pid_bh, -tl.sum(dx_o2, 0))


diff_attn_bwd_rows_launch = Launcher(diff_attn_bwd_rows_kernel)


@triton.jit
def _load_row_stats(lse_base, delta_base, rows, N, stride_map, MASKED: tl.constexpr):
    """Both maps' log-sum-exp and D terms of a query tile (the second map's stride_map
    elements after the first's). Rows past N load LSE = +inf, so their recomputed
    probabilities are 0."""
    if MASKED:
        ok = rows < N
        lse1 = tl.load(lse_base + rows, mask=ok, other=float("inf"))
        lse2 = tl.load(lse_base + stride_map + rows, mask=ok, other=float("inf"))
        d1 = tl.load(delta_base + rows, mask=ok, other=0.0)
        d2 = tl.load(delta_base + stride_map + rows, mask=ok, other=0.0)
    else:
        lse1 = tl.load(lse_base + rows)
        lse2 = tl.load(lse_base + stride_map + rows)
        d1 = tl.load(delta_base + rows)
        d2 = tl.load(delta_base + stride_map + rows)
    return lse1, lse2, d1, d2


@triton.jit
def _dkdv_query_tiles(k1, k2, v, dk1, dk2, dv, col_keep, cols, start, end, q_base, do_base,
                      lse_base, delta_base, LAM, b, h, stride_lb, stride_ln, stride_lh,
                      lam_scalar, stride_qh, stride_qn, stride_don, N, M, stride_map,
                      window_left, window_right, SCORE, SCORE_FLAGS: tl.constexpr,
                      HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, KEY_PAIR: tl.constexpr,
                      LAM_MODE: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                      MASKED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    """Accumulate one key tile's dK and dV over the query tiles [start, end) of head h
    (lam_scalar: the program's lambda, see program_lambda; N, M: this sequence's lengths;
    stride_map: the row statistics' distance between the two maps). The tiles are
    transposed (keys by queries); probabilities come from the score hook's visibility and
    scores and the saved log-sum-exps, and the score gradients go back through the hook's
    derivative."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q1, q2 = load_head_pair(q_base, stride_qh, start_m, N, stride_qn, offs_d,
                                n_cols=HEAD_DIM, BLOCK_ROWS=BLOCK_M, PAIR=True, MASK_ROWS=MASKED,
                                MASK_COLS=HEAD_DIM != BLOCK_D)
        do = load_tile(do_base, start_m, N, stride_don, offs_dv, HEAD_DIM_V, BLOCK_ROWS=BLOCK_M,
                       MASK_ROWS=MASKED, MASK_COLS=HEAD_DIM_V != BLOCK_DV)
        lse1, lse2, d1, d2 = _load_row_stats(lse_base, delta_base, rows, N, stride_map, MASKED)
        lam = load_lambda_rows(LAM, b, rows, N, h, stride_lb, stride_ln=stride_ln,
                               stride_lh=stride_lh, lam_scalar=lam_scalar, LAM_MODE=LAM_MODE,
                               ACC_DTYPE=dv.dtype)
        visible = None
        if MASKED:
            visible = score_visibility(rows[None, :], cols[:, None], keep=col_keep[:, None],
                                       N=N, M=M, window_left=window_left,
                                       window_right=window_right, CAUSAL=CAUSAL, WINDOW=WINDOW)
        # One map after the other, so that few (BLOCK_N x BLOCK_M) fp32 tiles are live at once:
        # dP1^T (shared: dP2 = -lambda dP1), P1^T, then P2^T.
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION).to(dv.dtype)
        qkT1 = tl.dot(k1, tl.trans(q1), input_precision=PRECISION).to(dv.dtype)
        sT1 = attention_scores(qkT1, q_idx=rows[None, :], k_idx=cols[:, None], SCORE=SCORE,
                               SCORE_FLAGS=SCORE_FLAGS)
        pT1 = tl.exp2(sT1 * SCORE.qk_scale - lse1[None, :])
        if MASKED:
            pT1 = tl.where(visible, pT1, 0.0)
        dsT1 = attention_scores_grad(pT1 * (dpT - d1[None, :]), qkT1, SCORE, SCORE_FLAGS)
        dk1 += tl.dot(dsT1.to(q1.dtype), q1, input_precision=PRECISION)
        qkT2 = tl.dot(k2, tl.trans(q2), input_precision=PRECISION).to(dv.dtype)
        sT2 = attention_scores(qkT2, q_idx=rows[None, :], k_idx=cols[:, None], SCORE=SCORE,
                               SCORE_FLAGS=SCORE_FLAGS)
        pT2 = tl.exp2(sT2 * SCORE.qk_scale - lse2[None, :])
        if MASKED:
            pT2 = tl.where(visible, pT2, 0.0)
        dv += tl.dot((pT1 - lam[None, :] * pT2).to(do.dtype), do, input_precision=PRECISION)
        dsT2 = attention_scores_grad(pT2 * (-lam[None, :] * dpT - d2[None, :]), qkT2, SCORE,
                                     SCORE_FLAGS).to(q2.dtype)
        if KEY_PAIR:
            dk2 += tl.dot(dsT2, q2, input_precision=PRECISION)
        else:  # one key head serves both maps
            dk1 += tl.dot(dsT2, q2, input_precision=PRECISION)
    return dk1, dk2, dv


@triton.jit
def _dkdv_program(tile, bg, Q, K, V, LAM, KPM, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
                  stride_qb, stride_qn, stride_qh, stride_kb, stride_km, stride_kh,
                  stride_vb, stride_vm, stride_vh, stride_dob, stride_don, stride_doh,
                  stride_lb, stride_ln, stride_lh, stride_kpm_b,
                  N, M, H, HK, GROUP, window_left, window_right, lam_value, SCORE,
                  SCORE_FLAGS: tl.constexpr,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_DV: tl.constexpr, KEY_PAIR: tl.constexpr, LAM_MODE: tl.constexpr,
                  LAM_DIM: tl.constexpr, BLOCK_LAM: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, WINDOW: tl.constexpr,
                  VARLEN: tl.constexpr, ACC_FP64: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK and dV of one key tile of one key/value group, over every head that reads it."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    b = (bg // HK).to(tl.int64)
    g = (bg % HK).to(tl.int64)
    # This program's sequence; the row statistics (B, H, 2, N) keep the padded N (the maximum).
    q_row0, N_b, k_row0, M_b = sequence_bounds(CU_Q, CU_K, b, N, M, VARLEN)
    if VARLEN:
        if tile * BLOCK_N >= M_b:  # past this sequence's keys
            return
    key_heads = 2 if KEY_PAIR else 1
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    col_keep = key_keep(KPM + b * stride_kpm_b, cols, M_b, HAS_KPM)
    k_base = K + row_offset(b, k_row0, stride_kb, stride_km, VARLEN) + key_heads * g * stride_kh
    v_base = V + row_offset(b, k_row0, stride_vb, stride_vm, VARLEN) + g * stride_vh
    if HAS_KPM:  # padding keys read as 0: no NaN/inf there reaches dK
        k1, k2, v = load_kept_key_value_tiles(
            k_base, v_base, stride_kh, stride_km, stride_vm, tile * BLOCK_N, kept=col_keep,
            HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
            KEY_PAIR=KEY_PAIR, BLOCK_N=BLOCK_N)
    else:
        k1, k2, v = load_key_value_tiles(
            k_base, v_base, stride_kh, stride_km, stride_vm, tile * BLOCK_N, M=M_b,
            HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
            KEY_PAIR=KEY_PAIR, MASKED=True, BLOCK_N=BLOCK_N)
    dk1 = tl.zeros([BLOCK_N, BLOCK_D], dtype=acc_dtype)
    dk2 = tl.zeros([BLOCK_N, BLOCK_D], dtype=acc_dtype)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=acc_dtype)

    # Query tiles [lo, open_lo) cross the causal diagonal and [open_hi, N) hold the ragged
    # last rows: masked. Tiles in between see every key of this tile (a whole tile without
    # padding): no masks. Causal: query rows i see key j when j <= i + (M - N); tiles
    # before lo see none of this key tile. Window: rows i see key j when
    # j - (M - N) - window_right <= i <= j - (M - N) + window_left; rows from hi on see none.
    if WINDOW:
        lo, open_lo, open_hi, hi = band_tiles(tile * BLOCK_N, BLOCK_N,
                                              -(M_b - N_b) - window_right,
                                              -(M_b - N_b) + window_left, N_b, BLOCK_M)
        if HAS_KPM or tile * BLOCK_N + BLOCK_N > M_b:
            open_hi = open_lo
    else:
        hi = N_b
        lo = 0
        open_lo = 0
        if CAUSAL:
            lo = (tl.maximum(tile * BLOCK_N - (M_b - N_b), 0) // BLOCK_M) * BLOCK_M
            first_open = tl.maximum(tile * BLOCK_N + BLOCK_N - 1 - (M_b - N_b), lo)
            open_lo = tl.minimum(tl.cdiv(first_open, BLOCK_M) * BLOCK_M, N_b)
        open_hi = open_lo
        if not HAS_KPM:
            if tile * BLOCK_N + BLOCK_N <= M_b:
                open_hi = tl.maximum(open_lo, (N_b // BLOCK_M) * BLOCK_M)
    lam_scalar = program_lambda(LAM, lam_value, LAM_MODE, LAM_DIM, BLOCK_LAM, acc_dtype)
    lam_rows = sequence_rows(LAM, q_row0, stride_ln, VARLEN)
    for head in range(0, GROUP):
        h = g * GROUP + head
        q_base = Q + row_offset(b, q_row0, stride_qb, stride_qn, VARLEN) + 2 * h * stride_qh
        do_base = DO + row_offset(b, q_row0, stride_dob, stride_don, VARLEN) + h * stride_doh
        lse_base = LSE + ((b * H + h) * 2) * N
        delta_base = DELTA + ((b * H + h) * 2) * N
        dk1, dk2, dv = _dkdv_query_tiles(k1, k2, v, dk1, dk2, dv, col_keep=col_keep, cols=cols,
                                         start=lo, end=open_lo, q_base=q_base, do_base=do_base,
                                         lse_base=lse_base, delta_base=delta_base, LAM=lam_rows,
                                         b=b, h=h, stride_lb=stride_lb, stride_ln=stride_ln,
                                         stride_lh=stride_lh, lam_scalar=lam_scalar,
                                         stride_qh=stride_qh, stride_qn=stride_qn,
                                         stride_don=stride_don, N=N_b, M=M_b, stride_map=N,
                                         window_left=window_left, window_right=window_right,
                                         SCORE=SCORE, SCORE_FLAGS=SCORE_FLAGS, HEAD_DIM=HEAD_DIM,
                                         HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
                                         KEY_PAIR=KEY_PAIR, LAM_MODE=LAM_MODE, CAUSAL=CAUSAL,
                                         WINDOW=WINDOW, MASKED=True, PRECISION=PRECISION,
                                         BLOCK_M=BLOCK_M)
        dk1, dk2, dv = _dkdv_query_tiles(k1, k2, v, dk1, dk2, dv, col_keep=col_keep, cols=cols,
                                         start=open_lo, end=open_hi, q_base=q_base, do_base=do_base,
                                         lse_base=lse_base, delta_base=delta_base, LAM=lam_rows,
                                         b=b, h=h, stride_lb=stride_lb, stride_ln=stride_ln,
                                         stride_lh=stride_lh, lam_scalar=lam_scalar,
                                         stride_qh=stride_qh, stride_qn=stride_qn,
                                         stride_don=stride_don, N=N_b, M=M_b, stride_map=N,
                                         window_left=window_left, window_right=window_right,
                                         SCORE=SCORE, SCORE_FLAGS=SCORE_FLAGS, HEAD_DIM=HEAD_DIM,
                                         HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
                                         KEY_PAIR=KEY_PAIR, LAM_MODE=LAM_MODE, CAUSAL=CAUSAL,
                                         WINDOW=WINDOW, MASKED=False, PRECISION=PRECISION,
                                         BLOCK_M=BLOCK_M)
        dk1, dk2, dv = _dkdv_query_tiles(k1, k2, v, dk1, dk2, dv, col_keep=col_keep, cols=cols,
                                         start=open_hi, end=hi, q_base=q_base, do_base=do_base,
                                         lse_base=lse_base, delta_base=delta_base, LAM=lam_rows,
                                         b=b, h=h, stride_lb=stride_lb, stride_ln=stride_ln,
                                         stride_lh=stride_lh, lam_scalar=lam_scalar,
                                         stride_qh=stride_qh, stride_qn=stride_qn,
                                         stride_don=stride_don, N=N_b, M=M_b, stride_map=N,
                                         window_left=window_left, window_right=window_right,
                                         SCORE=SCORE, SCORE_FLAGS=SCORE_FLAGS, HEAD_DIM=HEAD_DIM,
                                         HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
                                         KEY_PAIR=KEY_PAIR, LAM_MODE=LAM_MODE, CAUSAL=CAUSAL,
                                         WINDOW=WINDOW, MASKED=True, PRECISION=PRECISION,
                                         BLOCK_M=BLOCK_M)

    # DK (B, M, key_heads * HK, d), DV (B, M, HK, DV) or packed (total_k, ...) contiguous: the
    # tile's first element in int64, the rest in int32 offsets.
    col_ok = cols < M_b
    local = tl.arange(0, BLOCK_N)[:, None]
    k_start = sequence_start(b, M, k_row0, VARLEN)
    dk_ptrs = (DK + ((k_start + tile * BLOCK_N) * (key_heads * HK) + key_heads * g) * HEAD_DIM
               + (local * (key_heads * HK * HEAD_DIM) + offs_d[None, :]))
    k_mask = col_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    tl.store(dk_ptrs, (dk1 * SCORE.scale).to(DK.dtype.element_ty), mask=k_mask)
    if KEY_PAIR:
        tl.store(dk_ptrs + HEAD_DIM, (dk2 * SCORE.scale).to(DK.dtype.element_ty), mask=k_mask)
    dv_ptrs = (DV + ((k_start + tile * BLOCK_N) * HK + g) * HEAD_DIM_V
               + (local * (HK * HEAD_DIM_V) + offs_dv[None, :]))
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty),
             mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _dq_key_tiles(q1, q2, do, dq1, dq2, lse1, lse2, d1, d2, lam, rows, start, end, k_base,
                  v_base, kpm_row, stride_kh, stride_km, stride_vm, N, M, window_left,
                  window_right, SCORE, SCORE_FLAGS: tl.constexpr, HEAD_DIM: tl.constexpr,
                  HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  KEY_PAIR: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                  WINDOW: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Accumulate a query tile's dq over the key tiles [start, end)."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kept = None
        if MASKED:
            kept = key_keep(kpm_row, cols, M, HAS_KPM)
        if MASKED and HAS_KPM:  # padding keys read as 0: p = 0 times NaN/inf would be NaN
            k1, k2, v = load_kept_key_value_tiles(
                k_base, v_base, stride_kh, stride_km, stride_vm, start_n, kept=kept,
                HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
                KEY_PAIR=KEY_PAIR, BLOCK_N=BLOCK_N)
        else:
            k1, k2, v = load_key_value_tiles(
                k_base, v_base, stride_kh, stride_km, stride_vm, start_n, M=M,
                HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
                KEY_PAIR=KEY_PAIR, MASKED=MASKED, BLOCK_N=BLOCK_N)
        visible = kept
        if MASKED:
            visible = score_visibility(rows[:, None], cols[None, :], keep=kept, N=N, M=M,
                                       window_left=window_left, window_right=window_right,
                                       CAUSAL=CAUSAL, WINDOW=WINDOW)
        # One map after the other (see _dkdv_query_tiles): dP1 (shared), then each map's P.
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION).to(dq1.dtype)
        qk1 = tl.dot(q1, tl.trans(k1), input_precision=PRECISION).to(dq1.dtype)
        s1 = attention_scores(qk1, q_idx=rows[:, None], k_idx=cols[None, :], SCORE=SCORE,
                              SCORE_FLAGS=SCORE_FLAGS)
        p1 = tl.exp2(s1 * SCORE.qk_scale - lse1[:, None])
        if MASKED:
            p1 = tl.where(visible, p1, 0.0)
        ds1 = attention_scores_grad(p1 * (dp - d1[:, None]), qk1, SCORE, SCORE_FLAGS)
        dq1 += tl.dot(ds1.to(k1.dtype), k1, input_precision=PRECISION)
        qk2 = tl.dot(q2, tl.trans(k2), input_precision=PRECISION).to(dq1.dtype)
        s2 = attention_scores(qk2, q_idx=rows[:, None], k_idx=cols[None, :], SCORE=SCORE,
                              SCORE_FLAGS=SCORE_FLAGS)
        p2 = tl.exp2(s2 * SCORE.qk_scale - lse2[:, None])
        if MASKED:
            p2 = tl.where(visible, p2, 0.0)
        ds2 = attention_scores_grad(p2 * (-lam[:, None] * dp - d2[:, None]), qk2, SCORE,
                                    SCORE_FLAGS)
        dq2 += tl.dot(ds2.to(k2.dtype), k2, input_precision=PRECISION)
    return dq1, dq2


@triton.jit
def _dq_program(tile, bh, Q, K, V, LAM, KPM, DO, LSE, DELTA, DQ, CU_Q, CU_K,
                stride_qb, stride_qn, stride_qh, stride_kb, stride_km, stride_kh,
                stride_vb, stride_vm, stride_vh, stride_dob, stride_don, stride_doh,
                stride_lb, stride_ln, stride_lh, stride_kpm_b,
                N, M, H, GROUP, window_left, window_right, lam_value, SCORE,
                SCORE_FLAGS: tl.constexpr,
                HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DV: tl.constexpr, KEY_PAIR: tl.constexpr, LAM_MODE: tl.constexpr,
                LAM_DIM: tl.constexpr, BLOCK_LAM: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, WINDOW: tl.constexpr,
                VARLEN: tl.constexpr, ACC_FP64: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq of one query tile of one differential head (both maps)."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    g = h // GROUP
    # This program's sequence; the row statistics (B, H, 2, N) keep the padded N (the maximum).
    q_row0, N_b, k_row0, M_b = sequence_bounds(CU_Q, CU_K, b, N, M, VARLEN)
    if VARLEN:
        if tile * BLOCK_M >= N_b:  # past this sequence's queries
            return
    key_heads = 2 if KEY_PAIR else 1
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q1, q2 = load_head_pair(Q + row_offset(b, q_row0, stride_qb, stride_qn, VARLEN)
                            + 2 * h * stride_qh, stride_qh, tile * BLOCK_M, N_b, stride_qn,
                            offs_d, n_cols=HEAD_DIM, BLOCK_ROWS=BLOCK_M, PAIR=True,
                            MASK_ROWS=True, MASK_COLS=HEAD_DIM != BLOCK_D)
    do = load_tile(DO + row_offset(b, q_row0, stride_dob, stride_don, VARLEN) + h * stride_doh,
                   tile * BLOCK_M, N_b, stride_don, offs_dv, HEAD_DIM_V, BLOCK_ROWS=BLOCK_M,
                   MASK_ROWS=True, MASK_COLS=HEAD_DIM_V != BLOCK_DV)
    lse1, lse2, d1, d2 = _load_row_stats(LSE + ((b * H + h) * 2) * N,
                                         DELTA + ((b * H + h) * 2) * N, rows, N_b, N, True)
    lam_scalar = program_lambda(LAM, lam_value, LAM_MODE, LAM_DIM, BLOCK_LAM, acc_dtype)
    lam = load_lambda_rows(sequence_rows(LAM, q_row0, stride_ln, VARLEN), b, rows, N_b, h,
                           stride_lb, stride_ln=stride_ln, stride_lh=stride_lh,
                           lam_scalar=lam_scalar, LAM_MODE=LAM_MODE, ACC_DTYPE=acc_dtype)
    k_base = K + row_offset(b, k_row0, stride_kb, stride_km, VARLEN) + key_heads * g * stride_kh
    v_base = V + row_offset(b, k_row0, stride_vb, stride_vm, VARLEN) + g * stride_vh
    kpm_row = KPM + b * stride_kpm_b
    dq1 = tl.zeros([BLOCK_M, BLOCK_D], dtype=acc_dtype)
    dq2 = tl.zeros([BLOCK_M, BLOCK_D], dtype=acc_dtype)

    start, open_start, open_end, end = query_tile_key_ranges(
         tile * BLOCK_M, N_b, M_b, window_left, window_right, BLOCK_M, BLOCK_N=BLOCK_N,
        CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, WINDOW=WINDOW)
    if WINDOW:  # the band's leading edge (the trailing one is the masked run below)
        dq1, dq2 = _dq_key_tiles(q1, q2, do, dq1, dq2, lse1, lse2=lse2, d1=d1, d2=d2, lam=lam,
                                 rows=rows, start=start, end=open_start, k_base=k_base,
                                 v_base=v_base, kpm_row=kpm_row, stride_kh=stride_kh,
                                 stride_km=stride_km, stride_vm=stride_vm, N=N_b, M=M_b,
                                 window_left=window_left, window_right=window_right, SCORE=SCORE,
                                 SCORE_FLAGS=SCORE_FLAGS, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V,
                                 BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, KEY_PAIR=KEY_PAIR,
                                 CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, WINDOW=WINDOW, MASKED=True,
                                 PRECISION=PRECISION, BLOCK_N=BLOCK_N)
    dq1, dq2 = _dq_key_tiles(q1, q2, do, dq1, dq2, lse1, lse2=lse2, d1=d1, d2=d2, lam=lam,
                             rows=rows, start=open_start, end=open_end, k_base=k_base,
                             v_base=v_base, kpm_row=kpm_row, stride_kh=stride_kh,
                             stride_km=stride_km, stride_vm=stride_vm, N=N_b, M=M_b,
                             window_left=window_left, window_right=window_right, SCORE=SCORE,
                             SCORE_FLAGS=SCORE_FLAGS, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V,
                             BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, KEY_PAIR=KEY_PAIR, CAUSAL=CAUSAL,
                             HAS_KPM=HAS_KPM, WINDOW=WINDOW, MASKED=False, PRECISION=PRECISION,
                             BLOCK_N=BLOCK_N)
    dq1, dq2 = _dq_key_tiles(q1, q2, do, dq1, dq2, lse1, lse2=lse2, d1=d1, d2=d2, lam=lam,
                             rows=rows, start=open_end, end=end, k_base=k_base, v_base=v_base,
                             kpm_row=kpm_row, stride_kh=stride_kh, stride_km=stride_km,
                             stride_vm=stride_vm, N=N_b, M=M_b, window_left=window_left,
                             window_right=window_right, SCORE=SCORE, SCORE_FLAGS=SCORE_FLAGS,
                             HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D,
                             BLOCK_DV=BLOCK_DV, KEY_PAIR=KEY_PAIR, CAUSAL=CAUSAL, HAS_KPM=HAS_KPM,
                             WINDOW=WINDOW, MASKED=True, PRECISION=PRECISION, BLOCK_N=BLOCK_N)

    dq_ptrs = (DQ + ((sequence_start(b, N, q_row0, VARLEN) + tile * BLOCK_M) * (2 * H) + 2 * h)
               * HEAD_DIM
               + (tl.arange(0, BLOCK_M)[:, None] * (2 * H * HEAD_DIM) + offs_d[None, :]))
    q_mask = (rows < N_b)[:, None] & (offs_d[None, :] < HEAD_DIM)
    tl.store(dq_ptrs, (dq1 * SCORE.scale).to(DQ.dtype.element_ty), mask=q_mask)
    tl.store(dq_ptrs + HEAD_DIM, (dq2 * SCORE.scale).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _reduce_program(r, DLAM_PART, DLAM, DW_PART, DW, LAM, n_lam_parts, H, n_dw_rows,
                    n_dlam_progs, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                    DLAM_REDUCE: tl.constexpr, LAM_DIM: tl.constexpr, BLOCK_LAM: tl.constexpr,
                    ACC_FP64: tl.constexpr, RED_ROWS: tl.constexpr, RED_COLS: tl.constexpr):
    """Sum partials in a fixed order: dlambda of head r (per-head lambda) or of the shared
    lambda (r = 0) from DLAM_PART (n_lam_parts, H) (with lambda from vectors, then the four
    vectors' gradients); then d(norm weight) columns from DW_PART (n_dw_rows, BLOCK_DV)."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    if r < n_dlam_progs:
        offs = tl.arange(0, RED_ROWS)
        acc = tl.zeros([RED_ROWS], dtype=acc_dtype)
        if DLAM_REDUCE == 1:  # head r: column r of the (parts, H) partials
            for start in range(0, n_lam_parts, RED_ROWS):
                idx = start + offs
                acc += tl.load(DLAM_PART + idx.to(tl.int64) * H + r, mask=idx < n_lam_parts,
                               other=0.0)
        else:  # one lambda for all heads: every partial
            total = n_lam_parts * H
            for start in range(0, total, RED_ROWS):
                idx = start + offs
                acc += tl.load(DLAM_PART + idx, mask=idx < total, other=0.0)
        dlam = tl.sum(acc, 0)
        if DLAM_REDUCE == 3:  # lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init
            vec, ok, lq1, lk1, lq2, lk2 = load_lambda_vectors(LAM, LAM_DIM, BLOCK_LAM,
                                                              acc_dtype)
            g1 = dlam * tl.exp(tl.sum(lq1 * lk1, 0))
            g2 = -dlam * tl.exp(tl.sum(lq2 * lk2, 0))
            tl.store(DLAM + vec, g1 * lk1, mask=ok)
            tl.store(DLAM + LAM_DIM + vec, g1 * lq1, mask=ok)
            tl.store(DLAM + 2 * LAM_DIM + vec, g2 * lk2, mask=ok)
            tl.store(DLAM + 3 * LAM_DIM + vec, g2 * lq2, mask=ok)
        else:
            tl.store(DLAM + r, dlam)
    else:
        # (a name of its own: a name assigned in both branches of a runtime if must keep one
        # type, which the interpreter does not check)
        cols = (r - n_dlam_progs) * RED_COLS + tl.arange(0, RED_COLS)
        rows = tl.arange(0, RED_ROWS)
        acc_dw = tl.zeros([RED_ROWS, RED_COLS], dtype=acc_dtype)
        for start in range(0, n_dw_rows, RED_ROWS):
            idx = start + rows
            acc_dw += tl.load(DW_PART + idx[:, None].to(tl.int64) * BLOCK_DV + cols[None, :],
                              mask=(idx[:, None] < n_dw_rows) & (cols[None, :] < BLOCK_DV),
                              other=0.0)
        tl.store(DW + cols, tl.sum(acc_dw, 0), mask=cols < HEAD_DIM_V)


@triton.jit(do_not_specialize=["N", "M", "H", "HK", "GROUP", "stride_kpm_b", "stride_lb",
                               "stride_ln", "stride_lh", "window_left", "window_right",
                               "n_kv_tiles", "n_q_tiles",
                               "n_kv_progs", "n_q_progs", "n_lam_parts", "n_dw_rows",
                               "n_dlam_progs"])
def diff_attn_bwd_kernel(
    Q, K, V, LAM, KPM, DO, LSE, DELTA, DQ, DK, DV, DLAM_PART, DLAM, DW_PART, DW, CU_Q, CU_K,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_km, stride_kh,
    stride_vb, stride_vm, stride_vh,
    stride_dob, stride_don, stride_doh,
    stride_lb, stride_ln, stride_lh,
    stride_kpm_b,
    N, M, H, HK, GROUP, window_left, window_right,
    n_kv_tiles, n_q_tiles, n_kv_progs, n_q_progs, n_lam_parts, n_dw_rows, n_dlam_progs,
    lam_value, SCORE,
    SCORE_FLAGS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, KEY_PAIR: tl.constexpr, LAM_MODE: tl.constexpr,
    LAM_DIM: tl.constexpr, BLOCK_LAM: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, WINDOW: tl.constexpr, VARLEN: tl.constexpr,
    DLAM_REDUCE: tl.constexpr,
    ACC_FP64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr,
    BLOCK_N2: tl.constexpr, RED_ROWS: tl.constexpr, RED_COLS: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < n_kv_progs:
        _dkdv_program(pid % n_kv_tiles, pid // n_kv_tiles, Q, K, V, LAM, KPM=KPM, DO=DO, LSE=LSE,
                      DELTA=DELTA, DK=DK, DV=DV, CU_Q=CU_Q, CU_K=CU_K, stride_qb=stride_qb,
                      stride_qn=stride_qn, stride_qh=stride_qh, stride_kb=stride_kb,
                      stride_km=stride_km, stride_kh=stride_kh, stride_vb=stride_vb,
                      stride_vm=stride_vm, stride_vh=stride_vh, stride_dob=stride_dob,
                      stride_don=stride_don, stride_doh=stride_doh, stride_lb=stride_lb,
                      stride_ln=stride_ln, stride_lh=stride_lh, stride_kpm_b=stride_kpm_b, N=N, M=M,
                      H=H, HK=HK, GROUP=GROUP, window_left=window_left, window_right=window_right,
                      lam_value=lam_value, SCORE=SCORE, SCORE_FLAGS=SCORE_FLAGS, HEAD_DIM=HEAD_DIM,
                      HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, KEY_PAIR=KEY_PAIR,
                      LAM_MODE=LAM_MODE, LAM_DIM=LAM_DIM, BLOCK_LAM=BLOCK_LAM, CAUSAL=CAUSAL,
                      HAS_KPM=HAS_KPM, WINDOW=WINDOW, VARLEN=VARLEN, ACC_FP64=ACC_FP64,
                      PRECISION=PRECISION, BLOCK_M=BLOCK_M1, BLOCK_N=BLOCK_N1)
    elif pid < n_kv_progs + n_q_progs:
        pid_q = pid - n_kv_progs
        _dq_program(pid_q % n_q_tiles, pid_q // n_q_tiles, Q, K, V, LAM, KPM=KPM, DO=DO, LSE=LSE,
                    DELTA=DELTA, DQ=DQ, CU_Q=CU_Q, CU_K=CU_K, stride_qb=stride_qb,
                    stride_qn=stride_qn, stride_qh=stride_qh, stride_kb=stride_kb,
                    stride_km=stride_km, stride_kh=stride_kh, stride_vb=stride_vb,
                    stride_vm=stride_vm, stride_vh=stride_vh, stride_dob=stride_dob,
                    stride_don=stride_don, stride_doh=stride_doh, stride_lb=stride_lb,
                    stride_ln=stride_ln, stride_lh=stride_lh, stride_kpm_b=stride_kpm_b, N=N, M=M,
                    H=H, GROUP=GROUP, window_left=window_left, window_right=window_right,
                    lam_value=lam_value, SCORE=SCORE, SCORE_FLAGS=SCORE_FLAGS, HEAD_DIM=HEAD_DIM,
                    HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, KEY_PAIR=KEY_PAIR,
                    LAM_MODE=LAM_MODE, LAM_DIM=LAM_DIM, BLOCK_LAM=BLOCK_LAM, CAUSAL=CAUSAL,
                    HAS_KPM=HAS_KPM, WINDOW=WINDOW, VARLEN=VARLEN, ACC_FP64=ACC_FP64,
                    PRECISION=PRECISION, BLOCK_M=BLOCK_M2, BLOCK_N=BLOCK_N2)
    else:
        _reduce_program(pid - n_kv_progs - n_q_progs, DLAM_PART, DLAM, DW_PART, DW, LAM,
                        n_lam_parts=n_lam_parts, H=H, n_dw_rows=n_dw_rows,
                        n_dlam_progs=n_dlam_progs, HEAD_DIM_V=HEAD_DIM_V, BLOCK_DV=BLOCK_DV,
                        DLAM_REDUCE=DLAM_REDUCE, LAM_DIM=LAM_DIM, BLOCK_LAM=BLOCK_LAM,
                        ACC_FP64=ACC_FP64, RED_ROWS=RED_ROWS, RED_COLS=RED_COLS)


diff_attn_bwd_launch = Launcher(diff_attn_bwd_kernel)


def diff_attn_bwd(dout, q, k, v, lam, key_padding_mask, norm_weight, saved, call: AttentionCall,
                  *, cu_seqlens_q=None, cu_seqlens_k=None, need_dlam=True, need_dw=True,
                  wrap=None):
    """Launch the backward: the row pass, then one launch of key-tile, query-tile and
    reduction programs.

    Args: the forward's inputs and call (see diff_attn_fwd; packed sequences with their
    cu_seqlens_q / cu_seqlens_k), ``saved`` = (x, o2, lse, rstd) as the forward returned them,
    and dout shaped like the output ((B, N, H, DV) or packed (total_q, H, DV)) with a
    contiguous last dim (any other strides, stride 0 included). need_dlam / need_dw: whether
    lambda (a tensor, or its vectors with call.lam_vectors) and the norm weight need
    gradients. wrap: as in diff_attn_fwd.
    Returns dq, dk and dv shaped like q, k and v, contiguous, in the inputs' dtype;
    dlam shaped like lam (the four vectors' gradients with lam_vectors) and dnorm_weight (DV,)
    in the accumulation dtype, or None where not needed.
    """
    x, o2, lse, rstd = saved
    B, N, M, H, d, Hk, DV, rows = call_dims(call, q, v, cu_seqlens_q)
    if call.varlen:  # the kernels read the offsets at stride 1
        cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    device, dtype, acc_dtype = q.device, q.dtype, lse.dtype
    has_norm = norm_weight is not None
    if has_norm and norm_weight.stride(0) != 1:
        norm_weight = norm_weight.contiguous()
    store_dx = call.stores_difference(has_norm)
    need_dlam = need_dlam and lam is not None
    need_dw = need_dw and has_norm
    flags = variant_flags(call, q, k, v, lam, key_padding_mask)
    block_dv = flags["BLOCK_DV"]
    acc_fp64 = flags["ACC_FP64"]
    lam_vectors = call.lam_vectors
    n_row_tiles = cdiv(N, ROWS_BLOCK_M)

    dx = torch.empty((*rows, H, DV), device=device, dtype=dtype) if store_dx else dout
    delta = torch.empty((B, H, 2, N), device=device, dtype=acc_dtype)
    dlam = dlam_part = dw = dw_part = None
    dlam_reduce = DLAM_PER_ROW
    if need_dlam:
        if not lam_vectors and lam.dim() == len(rows) + 1:  # per row (B, N, H) / (total_q, H)
            dlam = dlam_part = torch.empty((*rows, H), device=device, dtype=acc_dtype)
        else:
            dlam_reduce = DLAM_VECTORS if lam_vectors else \
                DLAM_PER_HEAD if lam.dim() == 1 else DLAM_SCALAR
            dlam_part = torch.empty(n_row_tiles * B * H, device=device, dtype=acc_dtype)
            dlam = torch.empty(lam.shape, device=device, dtype=acc_dtype)
    if need_dw:
        dw_part = torch.empty((n_row_tiles * B * H, block_dv), device=device, dtype=acc_dtype)
        dw = torch.empty(DV, device=device, dtype=acc_dtype)
    lam_strides = dict(zip(("stride_lb", "stride_ln", "stride_lh"),
                           lambda_strides(lam, lam_vectors)))
    lam_flags = {name: flags[name] for name in ("LAM_MODE", "LAM_DIM", "BLOCK_LAM")}
    lam_ptr = q if lam is None else lam

    diff_attn_bwd_rows_launch(
        (n_row_tiles, B * H), wrap,
        DY=dout, X=x, O2=o2, LAM=lam_ptr, W=norm_weight if has_norm else q, RSTD=rstd, DX=dx,
        DELTA=delta, DLAM=q if dlam_part is None else dlam_part,
        DW_PART=q if dw_part is None else dw_part,
        CU_Q=q if cu_seqlens_q is None else cu_seqlens_q,
        **packed_strides("dy", dout, "bnh"), **lam_strides, N=N, H=H,
        lam_value=float(call.lam_value), out_scale=float(call.out_scale),
        HEAD_DIM_V=DV, BLOCK_DV=block_dv, **lam_flags, NEED_DLAM=need_dlam,
        DLAM_REDUCE=dlam_reduce, HAS_NORM=has_norm, NEED_DW=need_dw, STORE_DX=store_dx,
        VARLEN=flags["VARLEN"], ACC_FP64=acc_fp64, BLOCK_M=ROWS_BLOCK_M, num_warps=rows_warps(block_dv))

    dq = torch.empty(q.shape, device=device, dtype=dtype)
    dk = torch.empty(k.shape, device=device, dtype=dtype)
    dv = torch.empty(v.shape, device=device, dtype=dtype)
    if key_padding_mask is not None and key_padding_mask.stride(-1) != 1:
        key_padding_mask = key_padding_mask.contiguous()  # its rows are read at stride 1
    kpm = q if key_padding_mask is None else key_padding_mask.view(torch.uint8)
    n_dlam_progs = {DLAM_PER_HEAD: H, DLAM_SCALAR: 1, DLAM_VECTORS: 1}.get(dlam_reduce, 0) \
        if need_dlam else 0
    n_red_progs = n_dlam_progs + (cdiv(DV, RED_COLS) if need_dw else 0)
    window_left, window_right = call.window_bounds(N, M)
    arguments = dict(
        Q=q, K=k, V=v, LAM=lam_ptr, KPM=kpm, DO=dx, LSE=lse, DELTA=delta, DQ=dq, DK=dk, DV=dv,
        DLAM_PART=q if dlam_part is None else dlam_part, DLAM=q if dlam is None else dlam,
        DW_PART=q if dw_part is None else dw_part, DW=q if dw is None else dw,
        CU_Q=q if cu_seqlens_q is None else cu_seqlens_q,
        CU_K=q if cu_seqlens_k is None else cu_seqlens_k,
        **packed_strides("q", q, "bnh"), **packed_strides("k", k, "bmh"),
        **packed_strides("v", v, "bmh"), **packed_strides("do", dx, "bnh"), **lam_strides,
        stride_kpm_b=kpm.stride(0) if key_padding_mask is not None else 0,
        N=N, M=M, H=H, HK=Hk, GROUP=H // Hk, window_left=window_left,
        window_right=window_right)
    reductions = dict(n_lam_parts=n_row_tiles * B, n_dw_rows=n_row_tiles * B * H,
                      n_dlam_progs=n_dlam_progs, lam_value=float(call.lam_value),
                      **score_arguments(call), **flags,
                      DLAM_REDUCE=dlam_reduce, RED_ROWS=RED_ROWS, RED_COLS=RED_COLS)

    def run(config):
        tiles = BWD_TILES.launch_kwargs(config)
        n_kv_tiles = cdiv(M, tiles["BLOCK_N1"])
        n_q_tiles = cdiv(N, tiles["BLOCK_M2"])
        n_kv_progs, n_q_progs = n_kv_tiles * B * Hk, n_q_tiles * B * H
        diff_attn_bwd_launch(
            (n_kv_progs + n_q_progs + n_red_progs,), wrap, **arguments, n_kv_tiles=n_kv_tiles,
            n_q_tiles=n_q_tiles, n_kv_progs=n_kv_progs, n_q_progs=n_q_progs, **reductions,
            **tiles)

    key = BWD_TILES.key(device, dtype, flags["BLOCK_D"], block_dv, flags["KEY_PAIR"],
                        call.causal, N, M)
    run(BWD_TILES.choose(key, device, run if wrap is None else None))
    return dq, dk, dv, dlam, dw
