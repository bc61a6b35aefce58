"""Differential attention against a KV cache (decoding), forward only, with split-K
(flash-decoding) and paged caches.

The caches hold each sequence's keys and values at logical positions 0 .. capacity - 1;
sequence b has ``seqlens[b]`` valid keys (the cache length after this call's append). The Nq
query rows of sequence b are its last Nq positions: with CAUSAL, query i sees keys
j <= seqlens[b] - Nq + i (the bottom-right diagonal); without, every valid key.

Two layouts of the caches, a compile-time flag:

- contiguous: K (B, Mmax, 2Hk or Hk, d), V (B, Mmax, Hk, DV); position p of sequence b is
  row p of batch element b;
- PAGED: K (num_blocks, PAGE, 2Hk or Hk, d), V (num_blocks, PAGE, Hk, DV) and a block table
  BT (B, max_blocks) int32; position p of sequence b is row p % PAGE of page BT[b, p // PAGE].

Launch 1, ``diff_attn_decode_kernel``: one program per (row tile, batch * key/value group,
split). Its rows are (head, query) pairs of the group's GROUP = H // Hk differential heads
(row r: query r % Nq of head g * GROUP + r // Nq), so each key and value tile is read once
for every head that shares it (grouped-query attention, as flash-decoding packs it). Split s
streams the key tiles of logical positions [s * SPLIT_LEN, (s + 1) * SPLIT_LEN) that its
rows can see, with the same two online softmaxes as the forward kernel (one key tile pair and
one value tile per step for both maps, fp32 statistics, exp2 domain). With one split it
applies the difference and the epilogue and writes the output; with several it writes each
map's normalised partial output O_s (BLOCK_M x DV) and base-2 log-sum-exp lse_s (-inf for a
split that saw no key) to a workspace.

Launch 2, ``diff_attn_decode_combine_kernel`` (only with several splits): one program per
(row tile, batch * key/value group) merges the splits of each map, O = sum_s 2^(lse_s - L) O_s /
sum_s 2^(lse_s - L) with L = max_s lse_s, then applies X = O1 - lambda O2 and the epilogue
(RMSNorm * weight * out_scale, or * out_scale). A row that saw no key gives zeros.

No value of seqlens or the block table is read on the host: the grid comes from the static
shapes, and splits past a sequence's length do nothing but record lse = -inf.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .call import AttentionCall, dot_precision, lambda_flags, lambda_strides, strides
from .config import INTERPRET, cdiv, head_block
from .launch import Launcher
from .common import load_head_pair, load_tile, online_softmax_step, program_lambda
from .score import attention_scores, score_arguments


@triton.jit
def _tile_start(BT, b, start_n, stride_bt, stride_page, stride_row, PAGED: tl.constexpr,
                PAGE: tl.constexpr):
    """int64 element offset of the cache row holding logical position start_n of sequence b.
    A key tile (BLOCK_N <= PAGE rows, starting at a multiple of BLOCK_N) never crosses a page,
    so its rows follow this one at stride_row."""
    if PAGED:
        page = tl.load(BT + b * stride_bt + start_n // PAGE).to(tl.int64)
        off = page * stride_page + tl.cast(start_n % PAGE, tl.int64) * stride_row
    else:
        off = b * stride_page + tl.cast(start_n, tl.int64) * stride_row
    return off


@triton.jit
def _row_heads(g, rows, Nq, GROUP):
    """Rows are (head of the group, query) pairs, head-major: row r is query r % Nq of
    differential head g * GROUP + r // Nq. Returns (row in range, query index, head)."""
    row_ok = rows < GROUP * Nq
    qi = rows % Nq
    h = g * GROUP + (rows // Nq).to(tl.int64)
    return row_ok, qi, h


@triton.jit
def _row_lambda(LAM, b, qi, h, row_ok, stride_lb, stride_ln, stride_lh, lam_value,
                LAM_MODE: tl.constexpr, LAM_DIM: tl.constexpr, BLOCK_LAM: tl.constexpr,
                ACC_DTYPE: tl.constexpr):
    """lambda of each row: read through (batch, query, head) strides (LAM_MODE 1), else the
    program's value (the float, or computed from the four vectors)."""
    if LAM_MODE == 1:
        lam = tl.load(LAM + b * stride_lb + qi.to(tl.int64) * stride_ln + h * stride_lh,
                      mask=row_ok, other=0.0).to(ACC_DTYPE)
    else:
        lam = tl.zeros(qi.shape, ACC_DTYPE) + program_lambda(LAM, lam_value, LAM_MODE, LAM_DIM,
                                                             BLOCK_LAM, ACC_DTYPE)
    return lam


@triton.jit
def _store_output(o1, o2, lam, W, OUT, b, qi, h, row_ok, offs_dv, Nq, H, eps, out_scale,
                  HEAD_DIM_V: tl.constexpr, HAS_NORM: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """X = O1 - lambda O2, the epilogue, and the store into OUT (B, Nq, H, DV) contiguous."""
    x = o1 - lam[:, None] * o2
    y = x * out_scale
    if HAS_NORM:
        w = tl.load(W + offs_dv, mask=offs_dv < HEAD_DIM_V, other=0.0).to(ACC_DTYPE)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / HEAD_DIM_V + eps)
        y = y * rstd[:, None] * w[None, :]
    ptrs = OUT + (((b * Nq + qi.to(tl.int64)) * H + h) * HEAD_DIM_V)[:, None] + offs_dv[None, :]
    mask = row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
    tl.store(ptrs, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["Nq", "H", "GROUP", "SPLIT_LEN", "stride_lb", "stride_ln",
                               "stride_lh"])
def diff_attn_decode_kernel(
    Q, K, V, SEQLENS, BT, LAM, W, OUT, PART_O, PART_LSE,
    stride_qb, stride_qn, stride_qh,
    stride_kpage, stride_krow, stride_kh,
    stride_vpage, stride_vrow, stride_vh,
    stride_bt,
    stride_lb, stride_ln, stride_lh,
    Nq, H, GROUP, SPLIT_LEN,
    lam_value, eps, out_scale, SCORE,
    SCORE_FLAGS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, KEY_PAIR: tl.constexpr, LAM_MODE: tl.constexpr,
    LAM_DIM: tl.constexpr, BLOCK_LAM: tl.constexpr, CAUSAL: tl.constexpr,
    PAGED: tl.constexpr, PAGE: tl.constexpr, HAS_NORM: tl.constexpr, SPLIT: tl.constexpr,
    ACC_FP64: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    pid_m = tl.program_id(0)
    pid_bg = tl.program_id(1)
    split = tl.program_id(2)
    n_groups = H // GROUP
    b = (pid_bg // n_groups).to(tl.int64)
    g = (pid_bg % n_groups).to(tl.int64)

    # rows: the (head, query) pairs of key/value group g, so its key and value tiles are read
    # once for all the heads that share them
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok, qi, h = _row_heads(g, rows, Nq, GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_rows = Q + b * stride_qb + qi.to(tl.int64) * stride_qn + 2 * h * stride_qh
    q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q1 = tl.load(q_rows[:, None] + offs_d[None, :], mask=q_mask, other=0.0)
    q2 = tl.load(q_rows[:, None] + stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
    key_heads = 2 if KEY_PAIR else 1
    k_head = K + key_heads * g * stride_kh
    v_head = V + g * stride_vh

    L = tl.load(SEQLENS + b).to(tl.int32)      # valid keys of this sequence, after the append
    start = split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, L)
    if CAUSAL:  # the tile's last query sees keys < L - Nq + its index + 1
        end = tl.minimum(end, L - Nq + tl.max(tl.where(row_ok, qi, 0), 0) + 1)

    m1 = tl.full([BLOCK_M], float("-inf"), dtype=acc_dtype)
    m2 = tl.full([BLOCK_M], float("-inf"), dtype=acc_dtype)
    l1 = tl.zeros([BLOCK_M], dtype=acc_dtype)
    l2 = tl.zeros([BLOCK_M], dtype=acc_dtype)
    acc1 = tl.zeros([BLOCK_M, BLOCK_DV], dtype=acc_dtype)
    acc2 = tl.zeros([BLOCK_M, BLOCK_DV], dtype=acc_dtype)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k_tile = k_head + _tile_start(BT, b, start_n, stride_bt, stride_kpage, stride_krow,
                                      PAGED=PAGED, PAGE=PAGE)
        v_tile = v_head + _tile_start(BT, b, start_n, stride_bt, stride_vpage, stride_vrow,
                                      PAGED=PAGED, PAGE=PAGE)
        k1, k2 = load_head_pair(k_tile, stride_kh, 0, end - start_n, stride_krow, offs_d,
                                n_cols=HEAD_DIM, BLOCK_ROWS=BLOCK_N, PAIR=KEY_PAIR, MASK_ROWS=True,
                                MASK_COLS=HEAD_DIM != BLOCK_D)
        v = load_tile(v_tile, 0, end - start_n, stride_vrow, offs_dv, HEAD_DIM_V,
                      BLOCK_ROWS=BLOCK_N, MASK_ROWS=True, MASK_COLS=HEAD_DIM_V != BLOCK_DV)
        # the keys exist for rows in range; with CAUSAL, query qi of Nq sees keys
        # j <= L - Nq + qi (the bottom-right diagonal of Nq queries and L keys)
        keep = (cols < end)[None, :] & row_ok[:, None]
        s1, visible = attention_scores(
            tl.dot(q1, tl.trans(k1), input_precision=PRECISION).to(acc_dtype),
            q_idx=qi[:, None], k_idx=cols[None, :], keep=keep, N=Nq, M=L, window_left=0,
            window_right=0, SCORE=SCORE, SCORE_FLAGS=SCORE_FLAGS, CAUSAL=CAUSAL, WINDOW=False,
            MASKED=True)
        m1, l1, acc1 = online_softmax_step(s1, visible, m1, l1, acc1, v,
                                           qk_scale=SCORE.qk_scale, MASKED=True,
                                           PRECISION=PRECISION)
        s2, visible = attention_scores(
            tl.dot(q2, tl.trans(k2), input_precision=PRECISION).to(acc_dtype),
            q_idx=qi[:, None], k_idx=cols[None, :], keep=keep, N=Nq, M=L, window_left=0,
            window_right=0, SCORE=SCORE, SCORE_FLAGS=SCORE_FLAGS, CAUSAL=CAUSAL, WINDOW=False,
            MASKED=True)
        m2, l2, acc2 = online_softmax_step(s2, visible, m2, l2, acc2, v,
                                           qk_scale=SCORE.qk_scale, MASKED=True,
                                           PRECISION=PRECISION)

    l1_safe = tl.where(l1 > 0, l1, 1.0)
    l2_safe = tl.where(l2 > 0, l2, 1.0)
    o1 = acc1 * tl.where(l1 > 0, 1.0 / l1_safe, 0.0)[:, None]
    o2 = acc2 * tl.where(l2 > 0, 1.0 / l2_safe, 0.0)[:, None]
    if SPLIT:
        # workspace PART_O (B, Hk, S, 2, GROUP * Nq, DV), PART_LSE (B, Hk, S, 2, GROUP * Nq)
        R = GROUP * Nq
        part = (pid_bg.to(tl.int64) * tl.num_programs(2) + split) * 2
        lse_ptrs = PART_LSE + part * R + rows
        tl.store(lse_ptrs, tl.where(l1 > 0, m1 + tl.log2(l1_safe), float("-inf")), mask=row_ok)
        tl.store(lse_ptrs + R, tl.where(l2 > 0, m2 + tl.log2(l2_safe), float("-inf")),
                 mask=row_ok)
        o_ptrs = PART_O + (part * R + rows.to(tl.int64)[:, None]) * HEAD_DIM_V \
            + offs_dv[None, :]
        o_mask = row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
        tl.store(o_ptrs, o1, mask=o_mask)
        tl.store(o_ptrs + R * HEAD_DIM_V, o2, mask=o_mask)
    else:
        lam = _row_lambda(LAM, b, qi, h, row_ok, stride_lb, stride_ln=stride_ln,
                          stride_lh=stride_lh, lam_value=lam_value, LAM_MODE=LAM_MODE,
                          LAM_DIM=LAM_DIM, BLOCK_LAM=BLOCK_LAM, ACC_DTYPE=acc_dtype)
        _store_output(o1, o2, lam, W, OUT, b, qi=qi, h=h, row_ok=row_ok, offs_dv=offs_dv, Nq=Nq,
                      H=H, eps=eps, out_scale=out_scale, HEAD_DIM_V=HEAD_DIM_V, HAS_NORM=HAS_NORM,
                      ACC_DTYPE=acc_dtype)


@triton.jit
def _merge_map(PART_O, PART_LSE, base, rows, row_ok, offs_dv, R, n_splits,
               HEAD_DIM_V: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_DV: tl.constexpr):
    """One map's output merged over the splits (parts at base + s * 2, s < n_splits; R rows
    per part)."""
    o_mask = row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
    top = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    total = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC_DTYPE)
    for s in range(0, n_splits):
        part = base + s * 2
        lse = tl.load(PART_LSE + part * R + rows, mask=row_ok, other=float("-inf"))
        o = tl.load(PART_O + (part * R + rows.to(tl.int64)[:, None]) * HEAD_DIM_V
                    + offs_dv[None, :], mask=o_mask, other=0.0)
        new_top = tl.maximum(top, lse)
        shift = tl.where(new_top == float("-inf"), 0.0, new_top)
        alpha = tl.exp2(top - shift)
        w = tl.exp2(lse - shift)
        total = total * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o
        top = new_top
    return acc * tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)[:, None]


@triton.jit(do_not_specialize=["Nq", "H", "GROUP", "n_splits", "stride_lb", "stride_ln",
                               "stride_lh"])
def diff_attn_decode_combine_kernel(
    PART_O, PART_LSE, LAM, W, OUT,
    stride_lb, stride_ln, stride_lh,
    Nq, H, GROUP, n_splits,
    lam_value, eps, out_scale,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, LAM_MODE: tl.constexpr,
    LAM_DIM: tl.constexpr, BLOCK_LAM: tl.constexpr, HAS_NORM: tl.constexpr,
    ACC_FP64: tl.constexpr, BLOCK_M: tl.constexpr,
):
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    pid_m = tl.program_id(0)
    pid_bg = tl.program_id(1)
    n_groups = H // GROUP
    b = (pid_bg // n_groups).to(tl.int64)
    g = (pid_bg % n_groups).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok, qi, h = _row_heads(g, rows, Nq, GROUP)
    offs_dv = tl.arange(0, BLOCK_DV)
    R = GROUP * Nq
    base = pid_bg.to(tl.int64) * n_splits * 2
    o1 = _merge_map(PART_O, PART_LSE, base, rows, row_ok, offs_dv, R=R, n_splits=n_splits,
                    HEAD_DIM_V=HEAD_DIM_V, ACC_DTYPE=acc_dtype, BLOCK_M=BLOCK_M, BLOCK_DV=BLOCK_DV)
    o2 = _merge_map(PART_O, PART_LSE, base + 1, rows, row_ok, offs_dv, R=R, n_splits=n_splits,
                    HEAD_DIM_V=HEAD_DIM_V, ACC_DTYPE=acc_dtype, BLOCK_M=BLOCK_M, BLOCK_DV=BLOCK_DV)
    lam = _row_lambda(LAM, b, qi, h, row_ok, stride_lb, stride_ln=stride_ln, stride_lh=stride_lh,
                      lam_value=lam_value, LAM_MODE=LAM_MODE, LAM_DIM=LAM_DIM, BLOCK_LAM=BLOCK_LAM,
                      ACC_DTYPE=acc_dtype)
    _store_output(o1, o2, lam, W, OUT, b, qi=qi, h=h, row_ok=row_ok, offs_dv=offs_dv, Nq=Nq, H=H,
                  eps=eps, out_scale=out_scale, HEAD_DIM_V=HEAD_DIM_V, HAS_NORM=HAS_NORM,
                  ACC_DTYPE=acc_dtype)


diff_attn_decode_launch = Launcher(diff_attn_decode_kernel)
diff_attn_decode_combine_launch = Launcher(diff_attn_decode_combine_kernel)

# Launch options of the decode kernel (interpreter: small key tiles, to exercise several
# tiles per split at test sizes).
def decode_warps(block_m: int) -> int:
    """4 warps for up to 16 rows (a decoding step), 8 for more (their accumulators)."""
    return 4 if block_m <= 16 else 8


DECODE_STAGES = 1 if INTERPRET else 2
# Target number of programs for the split heuristic (about two waves on a 132-SM GPU).
TARGET_PROGRAMS = 264
MIN_SPLIT_KEYS = 512


def decode_row_block(rows: int) -> int:
    """Rows per program: the (head, query) pairs of a key/value group, at least 16 (tl.dot's
    minimum), at most 64."""
    return min(64, max(16, triton.next_power_of_2(rows)))


def choose_num_splits(batch: int, kv_heads: int, rows: int, capacity: int) -> int:
    """Splits of the key range when the call has too few programs to fill the GPU: enough to
    reach about TARGET_PROGRAMS programs, each split at least MIN_SPLIT_KEYS keys long, at
    most 64 splits. From static shapes only (rows: heads per group times queries)."""
    programs = batch * kv_heads * cdiv(rows, decode_row_block(rows))
    if programs >= TARGET_PROGRAMS or capacity < 2 * MIN_SPLIT_KEYS:
        return 1
    return max(1, min(cdiv(TARGET_PROGRAMS, programs), capacity // MIN_SPLIT_KEYS, 64))


def decode_block_n(value_dim: int, page: int) -> int:
    """Keys per tile: 64 (32 for value widths above 128, whose value tiles are twice as
    wide; 16 under the interpreter), never more than a page, so that a tile lies in one."""
    block = 16 if INTERPRET else (64 if value_dim <= 128 else 32)
    return min(block, page) if page > 1 else block


def split_length(capacity: int, num_splits: int, block_n: int) -> int:
    """Logical keys per split: capacity / num_splits rounded up to whole key tiles."""
    return cdiv(cdiv(capacity, num_splits), block_n) * block_n


def diff_attn_decode(q, k_cache, v_cache, seqlens, block_table, lam, norm_weight,
                     call: AttentionCall, num_splits, wrap=None):
    """Launch the decode kernels.

    Args (validated by diffattn.kvcache):
        q (B, Nq, 2H, d); k_cache (B or num_blocks, Mmax or PAGE, 2Hk or Hk, d); v_cache
            (..., Hk, DV), last dims contiguous; seqlens (B,) int32, each sequence's valid
            keys (after any append); block_table (B, max_blocks) int32 or None.
        lam: lambda tensor (), (H,) or (B, Nq, H) in the accumulation dtype, or None to use
            the float call.lam_value; with call.lam_vectors, the (4, L) lambda vectors
            (lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lam_value, computed in the kernels).
        norm_weight (DV,) or None (the RMSNorm epilogue).
        call: the scale, causal mask, lambda mode and epilogue (kernels/call.py); the
            decode kernels take neither packed sequences nor a window.
        num_splits: the number of key splits (1: one launch, no workspace; 0: chosen from
            the shapes by choose_num_splits).
    Returns (B, Nq, H, DV) in q's dtype.
    """
    B, Nq, H2, d = q.shape
    Hk, DV = v_cache.shape[2], v_cache.shape[3]
    H = H2 // 2
    key_pair = k_cache.shape[2] != Hk
    paged = block_table is not None
    page = k_cache.shape[1] if paged else 1
    capacity = block_table.shape[1] * page if paged else k_cache.shape[1]
    device, dtype = q.device, q.dtype
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.empty((B, Nq, H, DV), device=device, dtype=dtype)
    has_norm = norm_weight is not None
    if has_norm and norm_weight.stride(0) != 1:
        norm_weight = norm_weight.contiguous()
    group = H // Hk
    rows = group * Nq                 # (head, query) pairs of one key/value group
    block_m = decode_row_block(rows)
    block_n = decode_block_n(DV, page)
    if num_splits == 0:
        num_splits = choose_num_splits(B, Hk, rows, capacity)
    split_len = split_length(capacity, num_splits, block_n)
    num_splits = cdiv(capacity, split_len)
    split = num_splits > 1
    if split:
        part_o = torch.empty((B, Hk, num_splits, 2, rows, DV), device=device, dtype=acc_dtype)
        part_lse = torch.empty((B, Hk, num_splits, 2, rows), device=device, dtype=acc_dtype)
    else:
        part_o = part_lse = out  # not written
    lam_vectors = call.lam_vectors
    lam_flags = lambda_flags(lam, lam_vectors)
    lam_str = dict(zip(("stride_lb", "stride_ln", "stride_lh"), lambda_strides(lam, lam_vectors)))
    lam_value, eps, out_scale = call.lam_value, call.eps, call.out_scale
    lam_t = q if lam is None else lam
    w_t = norm_weight if has_norm else q
    bt = block_table if paged else seqlens
    acc_fp64 = acc_dtype == torch.float64
    grid = (cdiv(rows, block_m), B * Hk, num_splits)
    diff_attn_decode_launch(
        grid, wrap, Q=q, K=k_cache, V=v_cache, SEQLENS=seqlens, BT=bt, LAM=lam_t, W=w_t,
        OUT=out, PART_O=part_o, PART_LSE=part_lse, **strides("q", q, "bnh"),
        **strides("k", k_cache, ("page", "row", "h")), **strides("v", v_cache, ("page", "row", "h")),
        stride_bt=bt.stride(0) if paged else 0, **lam_str, Nq=Nq, H=H, GROUP=group,
        SPLIT_LEN=split_len, lam_value=float(lam_value), eps=float(eps),
        out_scale=float(out_scale), **score_arguments(call), HEAD_DIM=d, HEAD_DIM_V=DV,
        BLOCK_D=head_block(d), BLOCK_DV=head_block(DV), KEY_PAIR=key_pair, **lam_flags,
        CAUSAL=call.causal, PAGED=paged, PAGE=page, HAS_NORM=has_norm, SPLIT=split,
        ACC_FP64=acc_fp64, PRECISION=dot_precision(dtype), BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=decode_warps(block_m), num_stages=DECODE_STAGES)
    if split:
        diff_attn_decode_combine_launch(
            (cdiv(rows, block_m), B * Hk), wrap, PART_O=part_o, PART_LSE=part_lse, LAM=lam_t,
            W=w_t, OUT=out, **lam_str, Nq=Nq, H=H, GROUP=group, n_splits=num_splits,
            lam_value=float(lam_value), eps=float(eps), out_scale=float(out_scale),
            HEAD_DIM_V=DV, BLOCK_DV=head_block(DV), **lam_flags, HAS_NORM=has_norm,
            ACC_FP64=acc_fp64, BLOCK_M=block_m, num_warps=decode_warps(block_m), num_stages=1)
    return out
