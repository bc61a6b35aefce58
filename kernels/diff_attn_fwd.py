"""Fused differential attention forward: both softmax maps, the lambda difference and the
optional per-head RMSNorm epilogue in one FlashAttention-style pass.

One program owns BLOCK_M query rows of one differential head h of one batch element. It loads
its two q tiles (q heads 2h and 2h+1) once, then streams the key/value group
g = h // (H // Hk) tile by tile: the maps' key tiles and the shared value tile are read once and
feed two online softmaxes (running max m, running sum l and a BLOCK_M x DV accumulator each,
fp32, exp2 domain with the softmax scale folded into one multiply-add). Key tiles that every
row of the program sees in full run without masks; only the ragged last tile, the tiles on the
causal diagonal and, with a key padding mask, every tile are masked. Nothing of size N x M is
stored.

Scores: the score hook (kernels/score.py, with the SCORE and SCORE_FLAGS arguments) says where
a tile is visible (score_visibility: masks and window) and turns each tile of raw products
q . k into scores (attention_scores: the score options of the call); the softmax scale is
folded into the exp2.

Variants are compile-time flags of this one kernel:

=============  ==========================================  =================================
flag           Differential Transformer V1 / DiffCLIP       Differential Transformer V2
=============  ==========================================  =================================
KEY_PAIR       True: key heads 2g, 2g+1 (K is B,M,2Hk,d)    False: one key head g (B,M,Hk,d)
value width    DV = 2d (V is B,M,Hk,2d)                     DV = d (V is B,M,Hk,d)
lambda         per head (strides 0, 0, 1) or one scalar     per row and head (B,N,H strides)
HAS_NORM       RMSNorm * weight * out_scale                 False (y = x)
=============  ==========================================  =================================

Epilogue, per row:  O_a = acc_a / l_a,   X = O1 - lambda_row O2,
                    Y = X * rsqrt(mean(X^2) + eps) * w * c   (HAS_NORM)
                    Y = X * c                                 (otherwise)
Saved for backward (skipped for inference, SAVE_FOR_BWD=False): X (only when it differs from
Y), O2 (both in the accumulation dtype with the norm, see diff_attn_fwd), the base-2
log-sum-exp of each map's scaled scores (+inf for a row that sees no key, so recomputed
probabilities are 0) and, with the norm, the row's rsqrt.

Layouts (element strides, last dimension contiguous):
    Q (B, N, 2H, d), K (B, M, 2Hk or Hk, d), V (B, M, Hk, DV), KPM (B, M) bool (True = ignore)
    OUT, X, O2 (B, N, H, DV) contiguous; LSE (B, H, 2, N); RSTD (B, H, N)
Causal rule: query i sees keys j <= i + (M - N) (diagonal aligned bottom-right).
VARLEN (packed variable-length sequences): Q (total_q, 2H, d), K, V (total_k, ...), OUT, X,
O2 (total_q, H, DV); CU_Q, CU_K int32 (B + 1,) cumulative offsets. Program (m, b, h) reads
sequence b's first rows and lengths N_b, M_b from them (sequence_bounds) and exits when its
query tile starts past N_b; N and M are then the maxima (the grid and LSE, RSTD are sized by
them) and every mask and loop bound uses N_b, M_b. Without VARLEN the same helpers give b * N,
N, b * M, M where they are used: the padded layout reads no offsets.
USE_TMA (Hopper, DIFFATTN_TMA=1, kernels/tma.py): the key and value tiles come through tensor
descriptors made on the device instead of pointer loads; everything else is the same.
The equations: docs/kernel-math.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tma
from .call import AttentionCall, call_dims, lambda_strides, packed_strides, variant_flags
from .config import cdiv
from .launch import Launcher
from .common import (key_keep, load_head_pair, load_key_value_tiles, load_lambda_rows,
                     online_softmax_step, program_lambda, query_tile_key_ranges, row_offset,
                     sequence_bounds, sequence_rows, sequence_start)
from .score import attention_scores, score_arguments, score_visibility
from .tuning import FWD_TILES


@triton.jit
def _attend_key_tiles(q1, q2, k_base, v_base, k1_desc, k2_desc, v_desc, kpm_row, rows, start,
                      end, skip_from, skip, m1, l1, acc1, m2, l2, acc2, stride_kh, stride_km,
                      stride_vm, N, M, window_left, window_right, SCORE,
                      SCORE_FLAGS: tl.constexpr, HEAD_DIM: tl.constexpr,
                      HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                      KEY_PAIR: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                      WINDOW: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    """Both online softmaxes over the key tiles [start, end) (with WINDOW and MASKED, the
    tiles from skip_from on are shifted by ``skip``: the band's two edges in one loop). MASKED
    applies the ragged-edge, padding, causal and window masks (score_visibility); without it
    every key of every tile is visible to every row.
    USE_TMA reads the key and value tiles through the tensor descriptors (rows past M read
    as zero) instead of the pointers."""
    for loop_n in range(start, end, BLOCK_N):
        start_n = loop_n
        if WINDOW and MASKED:  # one loop over both edges of the band: jump over its middle
            start_n = tl.where(loop_n >= skip_from, loop_n + skip, loop_n)
        cols = start_n + tl.arange(0, BLOCK_N)
        if USE_TMA:
            k1 = k1_desc.load([start_n, 0])
            k2 = k1
            if KEY_PAIR:
                k2 = k2_desc.load([start_n, 0])
            v = v_desc.load([start_n, 0])
        else:
            k1, k2, v = load_key_value_tiles(
                k_base, v_base, stride_kh, stride_km, stride_vm, start_n, M=M,
                HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
                KEY_PAIR=KEY_PAIR, MASKED=MASKED, BLOCK_N=BLOCK_N)
        kept = None
        if MASKED:
            kept = key_keep(kpm_row, cols, M, HAS_KPM)
            if HAS_KPM:  # padding keys' values read as 0: p = 0 times a NaN/inf value is NaN
                v = tl.where(kept[:, None], v, 0.0)
        visible = kept
        if MASKED:
            visible = score_visibility(rows[:, None], cols[None, :], keep=kept, N=N, M=M,
                                       window_left=window_left, window_right=window_right,
                                       CAUSAL=CAUSAL, WINDOW=WINDOW)
        s1 = attention_scores(tl.dot(q1, tl.trans(k1), input_precision=PRECISION).to(acc1.dtype),
                              q_idx=rows[:, None], k_idx=cols[None, :], SCORE=SCORE,
                              SCORE_FLAGS=SCORE_FLAGS)
        m1, l1, acc1 = online_softmax_step(s1, visible, m1, l1, acc1, v,
                                           qk_scale=SCORE.qk_scale, MASKED=MASKED,
                                           PRECISION=PRECISION)
        s2 = attention_scores(tl.dot(q2, tl.trans(k2), input_precision=PRECISION).to(acc2.dtype),
                              q_idx=rows[:, None], k_idx=cols[None, :], SCORE=SCORE,
                              SCORE_FLAGS=SCORE_FLAGS)
        m2, l2, acc2 = online_softmax_step(s2, visible, m2, l2, acc2, v,
                                           qk_scale=SCORE.qk_scale, MASKED=MASKED,
                                           PRECISION=PRECISION)
    return m1, l1, acc1, m2, l2, acc2


# Sizes are not specialised on == 1 (N = 1 would otherwise compile a second copy of each
# variant); the kernels mask ragged edges and need no divisibility hints.
@triton.jit(do_not_specialize=["N", "M", "H", "GROUP", "stride_kpm_b", "stride_lb",
                               "stride_ln", "stride_lh", "window_left", "window_right"])
def diff_attn_fwd_kernel(
    Q, K, V, LAM, KPM, W, OUT, X, O2, LSE, RSTD, CU_Q, CU_K,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_km, stride_kh,
    stride_vb, stride_vm, stride_vh,
    stride_lb, stride_ln, stride_lh,
    stride_kpm_b,
    N, M, H, GROUP, window_left, window_right,
    lam_value, eps, out_scale, SCORE,
    SCORE_FLAGS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, KEY_PAIR: tl.constexpr, LAM_MODE: tl.constexpr,
    LAM_DIM: tl.constexpr, BLOCK_LAM: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, WINDOW: tl.constexpr, VARLEN: tl.constexpr,
    HAS_NORM: tl.constexpr, SAVE_FOR_BWD: tl.constexpr, STORE_X: tl.constexpr,
    ACC_FP64: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    g = h // GROUP
    # This program's sequence (see sequence_bounds): padded, sequence b of lengths N and M;
    # VARLEN, from the cumulative offsets, with N and M the maxima (they size the grid and
    # the saved row statistics).
    q_row0, N_b, k_row0, M_b = sequence_bounds(CU_Q, CU_K, b, N, M, VARLEN)
    if VARLEN:
        if pid_m * BLOCK_M >= N_b:  # past this sequence's queries
            return

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q1, q2 = load_head_pair(Q + row_offset(b, q_row0, stride_qb, stride_qn, VARLEN)
                            + 2 * h * stride_qh, stride_qh, pid_m * BLOCK_M, N_b, stride_qn,
                            offs_d, n_cols=HEAD_DIM, BLOCK_ROWS=BLOCK_M, PAIR=True,
                            MASK_ROWS=True, MASK_COLS=HEAD_DIM != BLOCK_D)
    key_heads = 2 if KEY_PAIR else 1
    k_base = K + row_offset(b, k_row0, stride_kb, stride_km, VARLEN) + key_heads * g * stride_kh
    v_base = V + row_offset(b, k_row0, stride_vb, stride_vm, VARLEN) + g * stride_vh
    kpm_row = KPM + b * stride_kpm_b
    k1_desc = k_base  # the descriptors are unused without USE_TMA
    k2_desc = k_base
    v_desc = v_base
    if USE_TMA:  # Hopper's tensor memory accelerator: (M, d) views of this group's heads
        k1_desc = tl.make_tensor_descriptor(k_base, shape=[M_b, HEAD_DIM], strides=[stride_km, 1],
                                            block_shape=[BLOCK_N, BLOCK_D])
        k2_desc = k1_desc
        if KEY_PAIR:
            k2_desc = tl.make_tensor_descriptor(k_base + stride_kh, shape=[M_b, HEAD_DIM],
                                                strides=[stride_km, 1],
                                                block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[M_b, HEAD_DIM_V], strides=[stride_vm, 1],
                                           block_shape=[BLOCK_N, BLOCK_DV])

    m1 = tl.full([BLOCK_M], float("-inf"), dtype=acc_dtype)
    m2 = tl.full([BLOCK_M], float("-inf"), dtype=acc_dtype)
    l1 = tl.zeros([BLOCK_M], dtype=acc_dtype)
    l2 = tl.zeros([BLOCK_M], dtype=acc_dtype)
    acc1 = tl.zeros([BLOCK_M, BLOCK_DV], dtype=acc_dtype)
    acc2 = tl.zeros([BLOCK_M, BLOCK_DV], dtype=acc_dtype)

    # Key tiles [open_start, open_end) are whole and seen by every row of this program; the
    # tiles from there to `end` (and, with a window, from `start` to open_start) need masks.
    # Causal or windowed: tiles outside the rows' band are never visited.
    start, open_start, open_end, end = query_tile_key_ranges(
         pid_m * BLOCK_M, N_b, M_b, window_left, window_right, BLOCK_M, BLOCK_N=BLOCK_N,
        CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, WINDOW=WINDOW)
    if WINDOW:  # the band's edges [start, open_start) and [open_end, end) in one masked loop
        masked_start, masked_end = start, end - (open_end - open_start)
    else:
        masked_start, masked_end = open_end, end
    m1, l1, acc1, m2, l2, acc2 = _attend_key_tiles(
        q1, q2, m1=m1, l1=l1, acc1=acc1, m2=m2, l2=l2, acc2=acc2, start=open_start,
        end=open_end, skip_from=0, skip=0, MASKED=False,
        k_base=k_base, v_base=v_base, k1_desc=k1_desc, k2_desc=k2_desc,
        v_desc=v_desc, kpm_row=kpm_row, rows=rows, stride_kh=stride_kh, stride_km=stride_km,
        stride_vm=stride_vm, N=N_b, M=M_b, window_left=window_left, window_right=window_right,
        SCORE=SCORE, SCORE_FLAGS=SCORE_FLAGS, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V,
        BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, KEY_PAIR=KEY_PAIR, CAUSAL=CAUSAL, HAS_KPM=HAS_KPM,
        WINDOW=WINDOW, PRECISION=PRECISION, BLOCK_N=BLOCK_N, USE_TMA=USE_TMA)
    m1, l1, acc1, m2, l2, acc2 = _attend_key_tiles(
        q1, q2, m1=m1, l1=l1, acc1=acc1, m2=m2, l2=l2, acc2=acc2, start=masked_start,
        end=masked_end, skip_from=open_start, skip=open_end - open_start, MASKED=True,
        k_base=k_base, v_base=v_base, k1_desc=k1_desc, k2_desc=k2_desc,
        v_desc=v_desc, kpm_row=kpm_row, rows=rows, stride_kh=stride_kh, stride_km=stride_km,
        stride_vm=stride_vm, N=N_b, M=M_b, window_left=window_left, window_right=window_right,
        SCORE=SCORE, SCORE_FLAGS=SCORE_FLAGS, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V,
        BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, KEY_PAIR=KEY_PAIR, CAUSAL=CAUSAL, HAS_KPM=HAS_KPM,
        WINDOW=WINDOW, PRECISION=PRECISION, BLOCK_N=BLOCK_N, USE_TMA=USE_TMA)

    # A row that saw no key: O = 0 and LSE = +inf, so backward recomputes P = 0 there.
    l1_safe = tl.where(l1 > 0, l1, 1.0)
    l2_safe = tl.where(l2 > 0, l2, 1.0)
    inv_l1 = tl.where(l1 > 0, 1.0 / l1_safe, 0.0)
    inv_l2 = tl.where(l2 > 0, 1.0 / l2_safe, 0.0)
    lam_scalar = program_lambda(LAM, lam_value, LAM_MODE, LAM_DIM, BLOCK_LAM, acc_dtype)
    lam = load_lambda_rows(sequence_rows(LAM, q_row0, stride_ln, VARLEN), b, rows, N_b, h,
                           stride_lb, stride_ln=stride_ln, stride_lh=stride_lh,
                           lam_scalar=lam_scalar, LAM_MODE=LAM_MODE, ACC_DTYPE=acc_dtype)
    o2 = acc2 * inv_l2[:, None]
    x = acc1 * inv_l1[:, None] - lam[:, None] * o2

    row_ok = rows < N_b
    # (B, N, H, DV) or packed (total_q, H, DV) contiguous: the tile's first element in int64,
    # the rest in int32 offsets (added to the pointer after it: OUT + first + tile_off).
    first = ((sequence_start(b, N, q_row0, VARLEN) + pid_m * BLOCK_M) * H + h) * HEAD_DIM_V
    tile_off = tl.arange(0, BLOCK_M)[:, None] * (H * HEAD_DIM_V) + offs_dv[None, :]
    out_mask = row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
    y = x * out_scale
    if HAS_NORM:
        w = tl.load(W + offs_dv, mask=offs_dv < HEAD_DIM_V, other=0.0).to(acc_dtype)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / HEAD_DIM_V + eps)
        y = y * rstd[:, None] * w[None, :]
        if SAVE_FOR_BWD:
            tl.store(RSTD + (b * H + h) * N + rows, rstd, mask=row_ok)
    tl.store(OUT + first + tile_off, y.to(OUT.dtype.element_ty), mask=out_mask)
    if SAVE_FOR_BWD:  # inference writes the output alone
        if STORE_X:
            tl.store(X + first + tile_off, x.to(X.dtype.element_ty), mask=out_mask)
        tl.store(O2 + first + tile_off, o2.to(O2.dtype.element_ty), mask=out_mask)
        lse1 = tl.where(l1 > 0, m1 + tl.log2(l1_safe), float("inf"))
        lse2 = tl.where(l2 > 0, m2 + tl.log2(l2_safe), float("inf"))
        lse_ptrs = LSE + ((b * H + h) * 2) * N + rows
        tl.store(lse_ptrs, lse1, mask=row_ok)
        tl.store(lse_ptrs + N, lse2, mask=row_ok)


diff_attn_fwd_launch = Launcher(diff_attn_fwd_kernel)


def diff_attn_fwd(q, k, v, lam, key_padding_mask, norm_weight, call: AttentionCall, *,
                  cu_seqlens_q=None, cu_seqlens_k=None, save_for_backward=True, wrap=None):
    """Launch the forward kernel.

    Args (already validated by diffattn.functional):
        q (B, N, 2H, d); k (B, M, 2Hk, d) (a key pair per group, V1) or (B, M, Hk, d) (one key
            per group, V2); v (B, M, Hk, DV). Same dtype and device, last dim contiguous (any
            other strides).
        lam: lambda as a tensor of shape (), (H,) or (B, N, H) in the accumulation dtype (fp32,
            fp64 for fp64 inputs), any strides; or None to use the float ``call.lam_value``;
            or, with ``call.lam_vectors``, the Differential Transformer's four lambda vectors
            stacked (4, L) contiguous (lq1, lk1, lq2, lk2), lambda = exp(lq1 . lk1) -
            exp(lq2 . lk2) + lam_value computed in the kernel.
        key_padding_mask (B, M) bool (True = ignore) or None.
        norm_weight (DV,) in any float dtype, or None: switches on the RMSNorm epilogue.
        call: the call's scale, masks (causal, window), lambda mode and epilogue
            (kernels/call.py).
        cu_seqlens_q, cu_seqlens_k: with ``call.max_seqlens`` (packed sequences), int32
            (batch + 1,) cumulative offsets of the packed q (total_q, 2H, d), k (total_k, ...)
            and v (total_k, Hk, DV); the per-query outputs are then (total_q, H, DV) and lse,
            rstd are sized by batch and max_seqlen_q (0 past each sequence's end).
        save_for_backward: False (inference) writes the output only; x, o2, lse and rstd are
            then None.
        wrap: torch.library.wrap_triton inside a registered op (torch.compile traces the
            launch); None launches directly (and may time the tile candidates on a first call).
    Returns:
        out (B, N, H, DV) in q's dtype; x (the pre-epilogue difference, ``out`` itself when the
        epilogue is the identity); o2 (B, N, H, DV); x and o2 in the accumulation dtype with
        the norm, else in q's dtype; lse (B, H, 2, N) base-2 log-sum-exp of the scaled scores;
        rstd (B, H, N) with the norm, else an empty (B, H, 0) tensor.
    """
    B, N, M, H, d, Hk, DV, rows = call_dims(call, q, v, cu_seqlens_q)
    if call.varlen:  # the kernels read the offsets at stride 1
        cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    device, dtype = q.device, q.dtype
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.empty((*rows, H, DV), device=device, dtype=dtype)
    has_norm = norm_weight is not None
    if has_norm and norm_weight.stride(0) != 1:
        norm_weight = norm_weight.contiguous()
    store_x = call.stores_difference(has_norm)
    if save_for_backward:
        # The norm's backward takes dY's part along X out of dX, so the lambda gradient
        # -rowsum(dX * O2) is a small remainder of large terms wherever O2 lies near X's
        # direction: X and O2 rounded to 16 bits apart would leave their rounding times rstd
        # there. With the norm both are kept in the accumulation dtype (for fp16/bf16 inputs
        # 4 more bytes per output element: twice the output's size).
        kept = acc_dtype if has_norm else dtype
        x = torch.empty_like(out, dtype=kept) if store_x else out
        o2 = torch.empty_like(out, dtype=kept)
        # Packed sequences: rows past a sequence's end are no query's and stay 0.
        stats = torch.zeros if call.varlen else torch.empty
        lse = stats((B, H, 2, N), device=device, dtype=acc_dtype)
        rstd = stats((B, H, N if has_norm else 0), device=device, dtype=acc_dtype)
    else:
        x = o2 = lse = rstd = out  # not written
    if key_padding_mask is not None and key_padding_mask.stride(-1) != 1:
        key_padding_mask = key_padding_mask.contiguous()  # its rows are read at stride 1
    kpm = q if key_padding_mask is None else key_padding_mask.view(torch.uint8)
    window_left, window_right = call.window_bounds(N, M)
    arguments = dict(
        Q=q, K=k, V=v, LAM=q if lam is None else lam, KPM=kpm,
        W=norm_weight if has_norm else q, OUT=out, X=x, O2=o2, LSE=lse, RSTD=rstd,
        CU_Q=q if cu_seqlens_q is None else cu_seqlens_q,
        CU_K=q if cu_seqlens_k is None else cu_seqlens_k,
        **packed_strides("q", q, "bnh"), **packed_strides("k", k, "bmh"),
        **packed_strides("v", v, "bmh"),
        **dict(zip(("stride_lb", "stride_ln", "stride_lh"),
                   lambda_strides(lam, call.lam_vectors))),
        stride_kpm_b=kpm.stride(0) if key_padding_mask is not None else 0,
        N=N, M=M, H=H, GROUP=H // Hk, window_left=window_left, window_right=window_right,
        lam_value=float(call.lam_value), eps=float(call.eps), out_scale=float(call.out_scale),
        **score_arguments(call),
        **variant_flags(call, q, k, v, lam, key_padding_mask), HAS_NORM=has_norm,
        SAVE_FOR_BWD=save_for_backward, STORE_X=store_x,
        USE_TMA=wrap is None and not call.varlen and tma.tma_loads(k, v))

    def run(config):
        tiles = FWD_TILES.launch_kwargs(config)
        grid = (cdiv(N, tiles["BLOCK_M"]), B * H)
        diff_attn_fwd_launch(grid, wrap, **arguments, **tiles)

    key = FWD_TILES.key(device, dtype, arguments["BLOCK_D"], arguments["BLOCK_DV"],
                        arguments["KEY_PAIR"], call.causal, N, M)
    run(FWD_TILES.choose(key, device, run if wrap is None else None))
    if not save_for_backward:
        return out, None, None, None, None
    return out, x, o2, lse, rstd
