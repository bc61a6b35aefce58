"""Triton helpers shared by the forward and backward kernels: tile loads, visibility masks, the
key heads of a variant, lambda per row, and the online-softmax step.

Every tensor is addressed as base + index * stride_index + offset (last dimension contiguous).
A tile's first element is addressed in int64 (one batch element may hold more than 2^31
elements) and the offsets within the tile in int32, which keeps the per-element address
arithmetic, and so the registers it takes, small. Out-of-range rows and padded columns load as
zeros. Loads take two compile-time switches, MASK_ROWS and MASK_COLS, so that interior tiles
(all rows in range, head dim a power of two) are read without masks.
"""
import triton
import triton.language as tl


@triton.jit
def sequence_bounds(CU_Q, CU_K, b, N, M, VARLEN: tl.constexpr):
    """(q_row0, N_b, k_row0, M_b): the first query row and the query count of sequence b, and
    the same for its keys. Padded: b * N, N, b * M, M (rows of the (batch * seq) row space).
    VARLEN: read from the int32 cumulative offsets CU_Q, CU_K (batch + 1,) of the packed
    (total, heads, dim) tensors."""
    if VARLEN:
        q_row0 = tl.load(CU_Q + b).to(tl.int64)
        n_b = (tl.load(CU_Q + b + 1) - q_row0).to(tl.int32)
        k_row0 = tl.load(CU_K + b).to(tl.int64)
        m_b = (tl.load(CU_K + b + 1) - k_row0).to(tl.int32)
    else:
        q_row0 = b * N
        n_b = N
        k_row0 = b * M
        m_b = M
    return q_row0, n_b, k_row0, m_b


@triton.jit
def sequence_start(b, N, row0, VARLEN: tl.constexpr):
    """Sequence b's first row in the row space of a (batch, seq, ...) contiguous tensor: b * N,
    or with VARLEN row0 (packed rows). Called where the row is used, so that without VARLEN
    the code is the padded layout's own."""
    if VARLEN:
        start = row0
    else:
        start = b * N
    return start


@triton.jit
def row_offset(b, row0, stride_b, stride_row, VARLEN: tl.constexpr):
    """Element offset of sequence b's first row in a tensor addressed by (batch, row)
    strides: b * stride_b, or with VARLEN (packed rows, no batch axis) row0 * stride_row."""
    if VARLEN:
        off = row0 * stride_row
    else:
        off = b * stride_b
    return off


@triton.jit
def sequence_rows(base, row0, stride_row, VARLEN: tl.constexpr):
    """``base`` moved to sequence row0 with VARLEN (a per-row tensor read through batch, row
    strides, such as lambda per token, whose batch stride is then 0); unchanged otherwise."""
    if VARLEN:
        base = base + row0 * stride_row
    return base


@triton.jit
def load_tile(base, start, n_rows, stride, cols, n_cols, BLOCK_ROWS: tl.constexpr,
              MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """(BLOCK_ROWS, len(cols)) tile of rows start .. start + BLOCK_ROWS - 1 at base; rows >=
    n_rows and cols >= n_cols read as zero when their mask switch is on (and must then be in
    range when it is off)."""
    local = tl.arange(0, BLOCK_ROWS)
    ptrs = (base + tl.cast(start, tl.int64) * stride) + (local[:, None] * stride + cols[None, :])
    rows = start + local
    if MASK_ROWS:
        if MASK_COLS:
            tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols),
                           other=0.0)
        else:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if MASK_COLS:
            tile = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def load_head_pair(base, stride_head, start, n_rows, stride, cols, n_cols,
                   BLOCK_ROWS: tl.constexpr, PAIR: tl.constexpr, MASK_ROWS: tl.constexpr,
                   MASK_COLS: tl.constexpr):
    """The two maps' tiles (rows start .. start + BLOCK_ROWS - 1): heads 2i and 2i+1 (base and
    base + stride_head) with PAIR, or one head shared by both maps without it. q tiles always
    come in pairs; key tiles do in the Differential Transformer V1 (heads 2g, 2g+1 of group g)
    and not in V2 (head g)."""
    t1 = load_tile(base, start, n_rows, stride, cols, n_cols, BLOCK_ROWS=BLOCK_ROWS,
                   MASK_ROWS=MASK_ROWS, MASK_COLS=MASK_COLS)
    if PAIR:
        t2 = load_tile(base + stride_head, start, n_rows, stride, cols, n_cols,
                       BLOCK_ROWS=BLOCK_ROWS, MASK_ROWS=MASK_ROWS, MASK_COLS=MASK_COLS)
    else:
        t2 = t1
    return t1, t2


@triton.jit
def load_lambda_vectors(LAM, LAM_DIM: tl.constexpr, BLOCK_LAM: tl.constexpr,
                        ACC_DTYPE: tl.constexpr):
    """The Differential Transformer's four lambda vectors, stacked at LAM as (4, LAM_DIM):
    (offsets, in-range mask, lq1, lk1, lq2, lk2), padded to BLOCK_LAM with zeros."""
    offs = tl.arange(0, BLOCK_LAM)
    ok = offs < LAM_DIM
    lq1 = tl.load(LAM + offs, mask=ok, other=0.0).to(ACC_DTYPE)
    lk1 = tl.load(LAM + LAM_DIM + offs, mask=ok, other=0.0).to(ACC_DTYPE)
    lq2 = tl.load(LAM + 2 * LAM_DIM + offs, mask=ok, other=0.0).to(ACC_DTYPE)
    lk2 = tl.load(LAM + 3 * LAM_DIM + offs, mask=ok, other=0.0).to(ACC_DTYPE)
    return offs, ok, lq1, lk1, lq2, lk2


@triton.jit
def lambda_from_vectors(LAM, lambda_init, LAM_DIM: tl.constexpr, BLOCK_LAM: tl.constexpr,
                        ACC_DTYPE: tl.constexpr):
    """exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init from the vectors at LAM."""
    _, _, lq1, lk1, lq2, lk2 = load_lambda_vectors(LAM, LAM_DIM, BLOCK_LAM, ACC_DTYPE)
    return tl.exp(tl.sum(lq1 * lk1, 0)) - tl.exp(tl.sum(lq2 * lk2, 0)) + lambda_init


@triton.jit
def program_lambda(LAM, lam_value, LAM_MODE: tl.constexpr, LAM_DIM: tl.constexpr,
                   BLOCK_LAM: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """The program's lambda when it does not vary by row: ``lam_value`` (LAM_MODE 0), or
    computed once from the four vectors at LAM with lam_value = lambda_init (LAM_MODE 2).
    Meaningless (and unused) for LAM_MODE 1, where lambda is read per row."""
    if LAM_MODE == 2:
        lam = lambda_from_vectors(LAM, lam_value, LAM_DIM, BLOCK_LAM, ACC_DTYPE)
    else:
        lam = lam_value
    return lam


@triton.jit
def load_lambda_rows(LAM, b, rows, n_rows, h, stride_lb, stride_ln, stride_lh, lam_scalar,
                     LAM_MODE: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """lambda for each of ``rows`` of head h of batch b: read through (batch, row, head)
    strides with LAM_MODE 1 (0 where lambda does not vary: one per head, or one for all),
    otherwise the program's ``lam_scalar`` (see program_lambda) broadcast."""
    if LAM_MODE == 1:
        lam = tl.load(LAM + b * stride_lb + rows.to(tl.int64) * stride_ln + h * stride_lh,
                      mask=rows < n_rows, other=0.0).to(ACC_DTYPE)
    else:
        lam = tl.zeros(rows.shape, ACC_DTYPE) + lam_scalar
    return lam


@triton.jit
def load_key_value_tiles(k_base, v_base, stride_kh, stride_km, stride_vm, start, M,
                         HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, KEY_PAIR: tl.constexpr,
                         MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    """The two maps' key tiles (see load_head_pair) and the shared value tile of key rows
    start .. start + BLOCK_N - 1; masked loads (ragged last tile) with MASKED."""
    k1, k2 = load_head_pair(k_base, stride_kh, start, M, stride_km, tl.arange(0, BLOCK_D),
                            n_cols=HEAD_DIM, BLOCK_ROWS=BLOCK_N, PAIR=KEY_PAIR, MASK_ROWS=MASKED,
                            MASK_COLS=HEAD_DIM != BLOCK_D)
    v = load_tile(v_base, start, M, stride_vm, tl.arange(0, BLOCK_DV), HEAD_DIM_V,
                  BLOCK_ROWS=BLOCK_N, MASK_ROWS=MASKED, MASK_COLS=HEAD_DIM_V != BLOCK_DV)
    return k1, k2, v


@triton.jit
def load_kept_key_value_tiles(k_base, v_base, stride_kh, stride_km, stride_vm, start, kept,
                              HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                              KEY_PAIR: tl.constexpr, BLOCK_N: tl.constexpr):
    """load_key_value_tiles for key rows start .. start + BLOCK_N - 1 where only the rows with
    ``kept`` (BLOCK_N,) True are read (see key_keep: in range and not padding); the others
    read as zero, so that a NaN or inf in a padding key's row never meets a zero probability
    (0 times NaN is NaN)."""
    local = tl.arange(0, BLOCK_N)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    offs_dv = tl.arange(0, BLOCK_DV)[None, :]
    k_ptrs = (k_base + tl.cast(start, tl.int64) * stride_km) + (local * stride_km + offs_d)
    k_mask = kept[:, None] & (offs_d < HEAD_DIM)
    k1 = tl.load(k_ptrs, mask=k_mask, other=0.0)
    k2 = k1
    if KEY_PAIR:
        k2 = tl.load(k_ptrs + stride_kh, mask=k_mask, other=0.0)
    v_ptrs = (v_base + tl.cast(start, tl.int64) * stride_vm) + (local * stride_vm + offs_dv)
    v = tl.load(v_ptrs, mask=kept[:, None] & (offs_dv < HEAD_DIM_V), other=0.0)
    return k1, k2, v


@triton.jit
def key_keep(kpm_row, cols, n_cols, HAS_KPM: tl.constexpr):
    """(len(cols),) True for keys that exist and are not padding (kpm_row: bool/uint8,
    nonzero = ignore the key)."""
    keep = cols < n_cols
    if HAS_KPM:
        ignored = tl.load(kpm_row + cols, mask=keep, other=1)
        keep = keep & (ignored == 0)
    return keep


@triton.jit
def causal_keep(q_idx, k_idx, N, M):
    """Query q_idx sees key k_idx (broadcast shapes): k <= q + (M - N), bottom-right diagonal."""
    return k_idx <= q_idx + (M - N)


@triton.jit
def window_keep(q_idx, k_idx, N, M, window_left, window_right):
    """Query q_idx sees key k_idx (broadcast shapes) inside the local window around its
    bottom-right-aligned diagonal: q + (M - N) - window_left <= k <= q + (M - N) + window_right
    (the host passes M and N for unbounded sides)."""
    diagonal = q_idx + (M - N)
    return (k_idx >= diagonal - window_left) & (k_idx <= diagonal + window_right)


@triton.jit
def band_tiles(start, BLOCK: tl.constexpr, lo_offset, hi_offset, limit, TILE: tl.constexpr):
    """Loop bounds over the other axis for the items [start, start + BLOCK) of a band: item x
    sees the indices y in [0, limit) with x + lo_offset <= y <= x + hi_offset. Returns
    (first, open_first, open_end, end), multiples of TILE except end: the tiles in
    [first, open_first) and [open_end, end) hold the band's edges (masked), those in
    [open_first, open_end) are seen whole by every item (no mask); tiles outside
    [first, end) are seen by none and skipped. An empty band gives empty ranges."""
    end = tl.minimum(tl.maximum(start + BLOCK + hi_offset, 0), limit)
    first = (tl.maximum(start + lo_offset, 0) // TILE) * TILE
    open_first = tl.cdiv(tl.maximum(start + BLOCK - 1 + lo_offset, 0), TILE) * TILE
    open_end = (tl.minimum(tl.maximum(start + hi_offset + 1, 0), limit) // TILE) * TILE
    open_first = tl.minimum(tl.maximum(open_first, first), end)
    open_end = tl.maximum(tl.minimum(open_end, end), open_first)
    return first, open_first, open_end, end


@triton.jit
def causal_key_end(q_end, N, M):
    """End of the keys that queries below q_end can see: key tiles past it are skipped."""
    return tl.minimum(M, tl.maximum(q_end + (M - N), 0))


@triton.jit
def full_tiles_end(first_hidden, limit, BLOCK: tl.constexpr):
    """End of the run of whole BLOCK-wide tiles starting at 0 that lie entirely before
    ``first_hidden`` and within ``limit``: the tiles that need no mask."""
    end = tl.minimum(tl.maximum(first_hidden, 0), limit)
    return (end // BLOCK) * BLOCK


@triton.jit
def query_tile_key_ranges(row0, N, M, window_left, window_right, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                          WINDOW: tl.constexpr):
    """The key tiles of query rows [row0, row0 + BLOCK_M) (forward and dq): (start,
    open_start, open_end, end). Tiles in [open_start, open_end) are whole and seen by every
    row (no mask); those in [start, open_start) (a window's leading edge) and
    [open_end, end) need masks; tiles outside [start, end) are never visited. Key padding
    leaves no tile unmasked."""
    if WINDOW:
        start, open_start, open_end, end = band_tiles(
            row0, BLOCK_M, (M - N) - window_left, (M - N) + window_right, M, BLOCK_N)
        if HAS_KPM:
            open_end = open_start
    else:
        start = 0
        open_start = 0
        end = M
        first_hidden = M
        if CAUSAL:
            end = causal_key_end(row0 + BLOCK_M, N, M)
            first_hidden = row0 + (M - N) + 1
        open_end = 0
        if not HAS_KPM:
            open_end = full_tiles_end(first_hidden, M, BLOCK_N)
    return start, open_start, open_end, end


@triton.jit
def online_softmax_step(s, keep, m, l, acc, v, qk_scale, MASKED: tl.constexpr,
                        PRECISION: tl.constexpr):
    """Fold one tile of scores s (kernels/score.py: attention_scores) into a running softmax
    state (m, l, acc).

    The state is kept in the exp2 domain: m is the running max of s * qk_scale (qk_scale =
    softmax scale * log2 e > 0), so each probability is one fused multiply-add and an exp2.
    With MASKED, scores where ``keep`` is False are dropped, and a row that has seen no key
    yet keeps m = -inf (shifted by 0 so that exp2 gives 0, not NaN).
    """
    if MASKED:
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1) * qk_scale)
    if MASKED:
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new_safe = m_new
    alpha = tl.exp2(m - m_new_safe)
    p = tl.exp2(s * qk_scale - m_new_safe[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l, acc
