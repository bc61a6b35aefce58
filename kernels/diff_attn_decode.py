"""Differential attention against a KV cache (decoding), forward only, with split-K
(flash-decoding) and paged caches.

The caches hold each sequence's keys and values at logical positions 0 .. capacity - 1;
sequence b has ``seqlens[b]`` valid keys (the cache length after this call's append). The Nq
query rows of sequence b are its last Nq positions; which keys a query sees is the score
hook's rule (kernels/score.py: score_visibility, with N = Nq queries and M = seqlens[b] keys):
with CAUSAL, query i sees keys j <= seqlens[b] - Nq + i (the bottom-right diagonal); with
WINDOW, the keys of its local window (AttentionCall.window, causal folded in); without
either, every valid key. The hook also applies the call's score options (softcap).

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

Options of a decoding step (flash-attn's ``flash_attn_with_kvcache``), each a compile-time
flag that leaves the kernel as above when off:

- ROTARY_DIM > 0: q is rotated on load (rotary embedding of its first ROTARY_DIM dims, GPT-J
  interleaved pairs with ROTARY_INTERLEAVED, else GPT-NeoX halves) by the rows of COS, SIN
  (seqlen_ro, ROTARY_DIM / 2) at position seqlens[b] - n_new + i for query i
  (ROTARY_PER_ROW: causal or windowed), else at seqlens[b] - n_new for every query;
- HAS_LEFTPAD: sequence b's keys start at logical position LEFTPAD[b] (earlier ones do not
  exist for it: never visible, read as 0);
- HAS_CACHE_ROWS: sequence b reads cache row CACHE_ROWS[b] (contiguous caches only);
- RETURN_LSE: LSE (B, 2H, Nq) float32, each map's natural-log log-sum-exp of its scaled
  (and soft-capped) scores (q head 2h: map 1 of head h, 2h + 1: map 2), +inf for a row that
  saw no key.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .call import AttentionCall, dot_precision, lambda_flags, lambda_strides, strides
from .config import INTERPRET, cdiv, head_block
from .launch import Launcher
from .common import load_head_pair, load_tile, online_softmax_step, program_lambda
from .score import attention_scores, score_arguments, score_visibility


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


@triton.jit
def _rotary_q_tile(q, q_map, offs_d, q_mask, COS, SIN, pos, stride_ro, ROTARY_DIM: tl.constexpr,
                   INTERLEAVED: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """q (BLOCK_M, BLOCK_D), read at q_map[:, None] + offs_d, with its first ROTARY_DIM dims
    rotated at positions pos (BLOCK_M,): each dim pairs with its partner (dim ^ 1 interleaved,
    dim +- ROTARY_DIM / 2 in halves), x * cos -+ partner * sin. Returned in q's dtype."""
    if INTERLEAVED:
        partner = offs_d ^ 1
        freq = offs_d // 2
        first = offs_d % 2 == 0
    else:
        first = offs_d < ROTARY_DIM // 2
        partner = tl.where(first, offs_d + ROTARY_DIM // 2, offs_d - ROTARY_DIM // 2)
        freq = tl.where(first, offs_d, offs_d - ROTARY_DIM // 2)
    rotated = (offs_d < ROTARY_DIM)[None, :] & q_mask
    q_partner = tl.load(q_map[:, None] + partner[None, :], mask=rotated, other=0.0)
    cs = pos.to(tl.int64)[:, None] * stride_ro + freq[None, :]
    cos = tl.load(COS + cs, mask=rotated, other=1.0).to(ACC_DTYPE)
    sin = tl.load(SIN + cs, mask=rotated, other=0.0).to(ACC_DTYPE)
    sin = tl.where(first[None, :], -sin, sin)
    x = q.to(ACC_DTYPE)
    return tl.where(rotated, x * cos + q_partner.to(ACC_DTYPE) * sin, x).to(q.dtype)


@triton.jit
def _store_lse(LSE, lse2, b, h, map_index, qi, row_ok, Nq, H):
    """Store one map's base-2 log-sum-exp lse2 (BLOCK_M,) as natural-log float32 into LSE
    (B, 2H, Nq) at q head 2h + map_index; +inf (flash-attn's value) for a row that sees no key."""
    lse = tl.where(lse2 == float("-inf"), float("inf"), lse2 * 0.6931471805599453)
    ptrs = LSE + ((b * 2 * H + 2 * h + map_index) * Nq + qi.to(tl.int64))
    tl.store(ptrs, lse.to(tl.float32), mask=row_ok)


@triton.jit
def _merged_lse(PART_LSE, base, rows, row_ok, R, n_splits, ACC_DTYPE: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """One map's base-2 log-sum-exp over the splits (parts at base + s * 2), -inf when no
    split saw a key."""
    top = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    total = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    for s in range(0, n_splits):
        lse = tl.load(PART_LSE + (base + s * 2) * R + rows, mask=row_ok, other=float("-inf"))
        new_top = tl.maximum(top, lse)
        shift = tl.where(new_top == float("-inf"), 0.0, new_top)
        total = total * tl.exp2(top - shift) + tl.exp2(lse - shift)
        top = new_top
    return tl.where(total > 0, top + tl.log2(tl.where(total > 0, total, 1.0)), float("-inf"))


@triton.jit(do_not_specialize=["Nq", "H", "GROUP", "SPLIT_LEN", "stride_lb", "stride_ln",
                               "stride_lh", "stride_ro", "n_new", "window_left",
                               "window_right"])
def diff_attn_decode_kernel(
    Q, K, V, SEQLENS, BT, LAM, W, OUT, PART_O, PART_LSE,
    stride_qb, stride_qn, stride_qh,
    stride_kpage, stride_krow, stride_kh,
    stride_vpage, stride_vrow, stride_vh,
    stride_bt,
    stride_lb, stride_ln, stride_lh,
    Nq, H, GROUP, SPLIT_LEN,
    lam_value, eps, out_scale, window_left, window_right, SCORE,
    SCORE_FLAGS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, KEY_PAIR: tl.constexpr, LAM_MODE: tl.constexpr,
    LAM_DIM: tl.constexpr, BLOCK_LAM: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    PAGED: tl.constexpr, PAGE: tl.constexpr, HAS_NORM: tl.constexpr, SPLIT: tl.constexpr,
    ACC_FP64: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    # the step's options (see the module docstring); unused pointers may be any tensor
    COS, SIN, LEFTPAD, CACHE_ROWS, LSE, stride_ro, n_new,
    ROTARY_DIM: tl.constexpr, ROTARY_INTERLEAVED: tl.constexpr, ROTARY_PER_ROW: tl.constexpr,
    HAS_LEFTPAD: tl.constexpr, HAS_CACHE_ROWS: tl.constexpr, RETURN_LSE: tl.constexpr,
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
    if WINDOW:  # the key range of the tile's windows (window_keep's band; the bounds are
        # never negative: the host passes the capacity and Nq for unbounded sides)
        diagonal = L - Nq + qi                                              # (BLOCK_M,)
        band_start = tl.min(tl.where(row_ok, diagonal, L), 0) - window_left
        end = tl.minimum(end, tl.max(tl.where(row_ok, diagonal, 0), 0) + window_right + 1)
        start = tl.maximum(start, (tl.maximum(band_start, 0) // BLOCK_N) * BLOCK_N)
    # ---- the step's options: rotary q, cache rows, left padding
    if ROTARY_DIM > 0:
        pos = L - n_new + 0 * qi
        if ROTARY_PER_ROW:
            pos = pos + qi
        q1 = _rotary_q_tile(q=q1, q_map=q_rows, offs_d=offs_d, q_mask=q_mask, COS=COS, SIN=SIN,
                            pos=pos, stride_ro=stride_ro, ROTARY_DIM=ROTARY_DIM,
                            INTERLEAVED=ROTARY_INTERLEAVED, ACC_DTYPE=acc_dtype)
        q2 = _rotary_q_tile(q=q2, q_map=q_rows + stride_qh, offs_d=offs_d, q_mask=q_mask,
                            COS=COS, SIN=SIN, pos=pos, stride_ro=stride_ro,
                            ROTARY_DIM=ROTARY_DIM, INTERLEAVED=ROTARY_INTERLEAVED,
                            ACC_DTYPE=acc_dtype)
    kv_b = b  # the cache row (contiguous caches) or the block table's row (paged: always b)
    if HAS_CACHE_ROWS:
        kv_b = tl.load(CACHE_ROWS + b).to(tl.int64)
    first_key = L * 0  # the sequence's keys are first_key .. L - 1
    if HAS_LEFTPAD:     # whole key tiles before the first key are skipped
        first_key = tl.load(LEFTPAD + b).to(tl.int32)
        start = tl.maximum(start, (tl.maximum(first_key, 0) // BLOCK_N) * BLOCK_N)
    # ----

    m1 = tl.full([BLOCK_M], float("-inf"), dtype=acc_dtype)
    m2 = tl.full([BLOCK_M], float("-inf"), dtype=acc_dtype)
    l1 = tl.zeros([BLOCK_M], dtype=acc_dtype)
    l2 = tl.zeros([BLOCK_M], dtype=acc_dtype)
    acc1 = tl.zeros([BLOCK_M, BLOCK_DV], dtype=acc_dtype)
    acc2 = tl.zeros([BLOCK_M, BLOCK_DV], dtype=acc_dtype)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k_tile = k_head + _tile_start(BT, kv_b, start_n, stride_bt, stride_kpage, stride_krow,
                                      PAGED=PAGED, PAGE=PAGE)
        v_tile = v_head + _tile_start(BT, kv_b, start_n, stride_bt, stride_vpage, stride_vrow,
                                      PAGED=PAGED, PAGE=PAGE)
        k1, k2 = load_head_pair(k_tile, stride_kh, 0, end - start_n, stride_krow, offs_d,
                                n_cols=HEAD_DIM, BLOCK_ROWS=BLOCK_N, PAIR=KEY_PAIR, MASK_ROWS=True,
                                MASK_COLS=HEAD_DIM != BLOCK_D)
        v = load_tile(v_tile, 0, end - start_n, stride_vrow, offs_dv, HEAD_DIM_V,
                      BLOCK_ROWS=BLOCK_N, MASK_ROWS=True, MASK_COLS=HEAD_DIM_V != BLOCK_DV)
        # the sequence's keys: first_key <= j < L (the rows before a left pad were never
        # written: their values are read as 0); the score hook adds the causal diagonal and
        # the window of query qi of Nq over L keys
        keep = (cols < end)[None, :] & row_ok[:, None]
        if HAS_LEFTPAD:
            keep = keep & (cols >= first_key)[None, :]
            v = tl.where((cols >= first_key)[:, None], v, 0.0)
        visible = score_visibility(qi[:, None], cols[None, :], keep=keep, N=Nq, M=L,
                                   window_left=window_left, window_right=window_right,
                                   CAUSAL=CAUSAL, WINDOW=WINDOW)
        s1 = attention_scores(tl.dot(q1, tl.trans(k1), input_precision=PRECISION).to(acc_dtype),
                              q_idx=qi[:, None], k_idx=cols[None, :], SCORE=SCORE,
                              SCORE_FLAGS=SCORE_FLAGS)
        m1, l1, acc1 = online_softmax_step(s1, visible, m1, l1, acc1, v,
                                           qk_scale=SCORE.qk_scale, MASKED=True,
                                           PRECISION=PRECISION)
        s2 = attention_scores(tl.dot(q2, tl.trans(k2), input_precision=PRECISION).to(acc_dtype),
                              q_idx=qi[:, None], k_idx=cols[None, :], SCORE=SCORE,
                              SCORE_FLAGS=SCORE_FLAGS)
        m2, l2, acc2 = online_softmax_step(s2, visible, m2, l2, acc2, v,
                                           qk_scale=SCORE.qk_scale, MASKED=True,
                                           PRECISION=PRECISION)

    l1_safe = tl.where(l1 > 0, l1, 1.0)
    l2_safe = tl.where(l2 > 0, l2, 1.0)
    o1 = acc1 * tl.where(l1 > 0, 1.0 / l1_safe, 0.0)[:, None]
    o2 = acc2 * tl.where(l2 > 0, 1.0 / l2_safe, 0.0)[:, None]
    if RETURN_LSE and not SPLIT:
        _store_lse(LSE=LSE, lse2=tl.where(l1 > 0, m1 + tl.log2(l1_safe), float("-inf")), b=b,
                   h=h, map_index=0, qi=qi, row_ok=row_ok, Nq=Nq, H=H)
        _store_lse(LSE=LSE, lse2=tl.where(l2 > 0, m2 + tl.log2(l2_safe), float("-inf")), b=b,
                   h=h, map_index=1, qi=qi, row_ok=row_ok, Nq=Nq, H=H)
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
    LSE, RETURN_LSE: tl.constexpr,  # each map's merged log-sum-exp (B, 2H, Nq) float32
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
    if RETURN_LSE:
        for map_index in tl.static_range(2):
            lse2 = _merged_lse(PART_LSE=PART_LSE, base=base + map_index, rows=rows,
                               row_ok=row_ok, R=R, n_splits=n_splits, ACC_DTYPE=acc_dtype,
                               BLOCK_M=BLOCK_M)
            _store_lse(LSE=LSE, lse2=lse2, b=b, h=h, map_index=map_index, qi=qi,
                       row_ok=row_ok, Nq=Nq, H=H)


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
                     call: AttentionCall, num_splits, wrap=None, *, rotary_cos=None,
                     rotary_sin=None, rotary_interleaved=True, rotary_per_row=False, n_new=0,
                     cache_leftpad=None, cache_batch_idx=None, return_lse=False):
    """Launch the decode kernels.

    Args (validated by diffattn.kvcache):
        q (B, Nq, 2H, d); k_cache (B or num_blocks, Mmax or PAGE, 2Hk or Hk, d); v_cache
            (..., Hk, DV), last dims contiguous; seqlens (B,) int32, each sequence's valid
            keys (after any append); block_table (B, max_blocks) int32 or None.
        lam: lambda tensor (), (H,) or (B, Nq, H) in the accumulation dtype, or None to use
            the float call.lam_value; with call.lam_vectors, the (4, L) lambda vectors
            (lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lam_value, computed in the kernels).
        norm_weight (DV,) or None (the RMSNorm epilogue).
        call: the scale, causal mask, window, score options, lambda mode and epilogue
            (kernels/call.py); the decode kernels take no packed sequences.
        num_splits: the number of key splits (1: one launch, no workspace; 0: chosen from
            the shapes by choose_num_splits).
        rotary_cos, rotary_sin (seqlen_ro, rotary_dim / 2), last dim contiguous, or None:
            q is rotated on load (rotary_interleaved: GPT-J pairs, else GPT-NeoX halves) at
            position seqlens[b] - n_new + i (rotary_per_row) or seqlens[b] - n_new.
        cache_leftpad (B,) int32 contiguous or None: the first key of each sequence.
        cache_batch_idx (B,) int32 contiguous or None: the cache row of each sequence
            (contiguous caches only).
        return_lse: also return each map's log-sum-exp (B, 2H, Nq) float32.
    Returns (B, Nq, H, DV) in q's dtype, and the log-sum-exp with return_lse.
    """
    B, Nq, H2, d = q.shape
    Hk, DV = v_cache.shape[2], v_cache.shape[3]
    H = H2 // 2
    key_pair = k_cache.shape[2] != Hk
    paged = block_table is not None
    seqlens = seqlens.contiguous()  # read at stride 1, as is a block table's row
    if paged:
        block_table = block_table.contiguous()
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
    # the step's options
    rotary_dim = 0 if rotary_cos is None else 2 * rotary_cos.shape[1]
    window_left, window_right = call.window_bounds(Nq, capacity)
    lse = torch.empty((B, H2, Nq), device=device, dtype=torch.float32) if return_lse else out
    options = dict(
        COS=q if rotary_cos is None else rotary_cos, SIN=q if rotary_sin is None else rotary_sin,
        LEFTPAD=seqlens if cache_leftpad is None else cache_leftpad,
        CACHE_ROWS=seqlens if cache_batch_idx is None else cache_batch_idx, LSE=lse,
        stride_ro=0 if rotary_cos is None else rotary_cos.stride(0), n_new=int(n_new),
        ROTARY_DIM=rotary_dim, ROTARY_INTERLEAVED=bool(rotary_interleaved),
        ROTARY_PER_ROW=bool(rotary_per_row), HAS_LEFTPAD=cache_leftpad is not None,
        HAS_CACHE_ROWS=cache_batch_idx is not None, RETURN_LSE=bool(return_lse))
    grid = (cdiv(rows, block_m), B * Hk, num_splits)
    diff_attn_decode_launch(
        grid, wrap, Q=q, K=k_cache, V=v_cache, SEQLENS=seqlens, BT=bt, LAM=lam_t, W=w_t,
        OUT=out, PART_O=part_o, PART_LSE=part_lse, **strides("q", q, "bnh"),
        **strides("k", k_cache, ("page", "row", "h")), **strides("v", v_cache, ("page", "row", "h")),
        stride_bt=bt.stride(0) if paged else 0, **lam_str, Nq=Nq, H=H, GROUP=group,
        SPLIT_LEN=split_len, lam_value=float(lam_value), eps=float(eps),
        out_scale=float(out_scale), window_left=window_left, window_right=window_right,
        **score_arguments(call), HEAD_DIM=d, HEAD_DIM_V=DV, BLOCK_D=head_block(d),
        BLOCK_DV=head_block(DV), KEY_PAIR=key_pair, **lam_flags,
        CAUSAL=call.causal and not call.local, WINDOW=call.local, PAGED=paged, PAGE=page,
        HAS_NORM=has_norm, SPLIT=split, ACC_FP64=acc_fp64, PRECISION=dot_precision(dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, **options,
        num_warps=decode_warps(block_m), num_stages=DECODE_STAGES)
    if split:
        diff_attn_decode_combine_launch(
            (cdiv(rows, block_m), B * Hk), wrap, PART_O=part_o, PART_LSE=part_lse, LAM=lam_t,
            W=w_t, OUT=out, **lam_str, Nq=Nq, H=H, GROUP=group, n_splits=num_splits,
            lam_value=float(lam_value), eps=float(eps), out_scale=float(out_scale),
            HEAD_DIM_V=DV, BLOCK_DV=head_block(DV), **lam_flags, HAS_NORM=has_norm,
            ACC_FP64=acc_fp64, BLOCK_M=block_m, LSE=lse, RETURN_LSE=bool(return_lse),
            num_warps=decode_warps(block_m), num_stages=1)
    return (out, lse) if return_lse else out
