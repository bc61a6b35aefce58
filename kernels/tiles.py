"""Tile loads and visibility masks shared by the forward and backward kernels.

Every tensor is addressed as base + index * stride_index + offset (last dimension contiguous),
with the index product in int64: one batch element may hold more than 2^31 elements.
Out-of-range rows and padded columns load as zeros.
"""
import triton
import triton.language as tl


@triton.jit
def load_tile(base, idx, idx_ok, stride_idx, offs, offs_ok):
    """(len(idx), len(offs)) tile at base, zero where idx or offs is out of range."""
    return tl.load(base + idx[:, None].to(tl.int64) * stride_idx + offs[None, :],
                   mask=idx_ok[:, None] & offs_ok[None, :], other=0.0)


@triton.jit
def load_head_pair(base, stride_head, idx, idx_ok, stride_idx, offs, offs_ok):
    """The tiles of heads 2g and 2g+1 (at base and base + stride_head): a map pair's q or k."""
    ptrs = base + idx[:, None].to(tl.int64) * stride_idx + offs[None, :]
    mask = idx_ok[:, None] & offs_ok[None, :]
    return tl.load(ptrs, mask=mask, other=0.0), tl.load(ptrs + stride_head, mask=mask, other=0.0)


@triton.jit
def key_keep(kpm_row, cols, col_ok, HAS_KPM: tl.constexpr):
    """(len(cols),) True for keys that exist and are not padding (kpm_row: uint8, 1 = ignore)."""
    keep = col_ok
    if HAS_KPM:
        ignored = tl.load(kpm_row + cols, mask=col_ok, other=1)
        keep = keep & (ignored == 0)
    return keep


@triton.jit
def causal_keep(q_idx, k_idx, N, M):
    """Query q_idx sees key k_idx (broadcast shapes): k <= q + (M - N), bottom-right diagonal."""
    return k_idx <= q_idx + (M - N)


@triton.jit
def causal_key_end(q_end, N, M):
    """End of the keys that queries below q_end can see: key tiles past it are skipped."""
    return tl.minimum(M, tl.maximum(q_end + (M - N), 0))
