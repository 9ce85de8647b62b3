"""Triton merging: one pass over the output rows (merge, merge_source) and one over the inputs
(unmerge, and the merge backward: the transposed gather).

Deterministic without atomics: each output row program finds its own sources by scanning
the r destinations (the inverse destination -> sources map is built on the fly, in rank
order, one block of sources at a time) and reduces them in a fixed order. Offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import large_tiles, launch


@triton.jit
def _merge_kernel(
    x_ptr, s_ptr, out_ptr, out_s_ptr,
    out_idx_ptr, src_idx_ptr, dst_pos_ptr, merged_ptr,
    N_OUT, R, C,
    sxg, sxn, sxc, ssg, ssn, sog, son,
    HAS_MERGED: tl.constexpr, UNION: tl.constexpr, SUM: tl.constexpr, ACC: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Output row o of group g, channels [pid(1) block]: its base token plus its sources.

    UNION=False: size-weighted mean in ACC (and the summed size, written by the first
    channel block); UNION=True: element-wise max of the members (0/1 source maps);
    SUM=True: plain sum of the base row and every member row (the backward of unmerge).
    """
    pid = tl.program_id(0)  # g * N_OUT + o: groups x rows on axis 0 (any batch fits)
    g = (pid // N_OUT).to(tl.int64)
    o = pid % N_OUT
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    base = tl.load(out_idx_ptr + g * N_OUT + o)
    xg = x_ptr + g * sxg
    x_base = tl.load(xg + base * sxn + c * sxc, mask=c_ok, other=0.0).to(ACC)
    if UNION or SUM:
        acc = x_base
    else:
        s_base = tl.load(s_ptr + g * ssg + base * ssn).to(ACC)
        acc = x_base * s_base
        tot = s_base
        got = 0
    for s0 in range(0, R, BLOCK_S):
        p = s0 + tl.arange(0, BLOCK_S)
        hit = (tl.load(dst_pos_ptr + g * R + p, mask=p < R, other=-1) == o)
        if tl.max(hit.to(tl.int32), axis=0) > 0:
            src = tl.load(src_idx_ptr + g * R + p, mask=hit, other=0)
            xs = tl.load(xg + src[:, None] * sxn + c[None, :] * sxc,
                         mask=hit[:, None] & c_ok[None, :], other=0.0).to(ACC)
            if HAS_MERGED:
                w = tl.load(merged_ptr + g * R + p, mask=hit, other=0).to(ACC)
            else:
                w = hit.to(ACC)
            if SUM:
                acc += tl.sum(xs, axis=0)
            elif UNION:
                cand = tl.where(hit[:, None], xs * w[:, None], float("-inf"))
                acc = tl.maximum(acc, tl.max(cand, axis=0))
            else:
                got += tl.sum((w > 0).to(tl.int32), axis=0)
                w = w * tl.load(s_ptr + g * ssg + src * ssn, mask=hit, other=0.0).to(ACC)
                acc += tl.sum(xs * w[:, None], axis=0)
                tot += tl.sum(w, axis=0)
    if not UNION and not SUM:
        acc = tl.where(got > 0, acc / tot, x_base)
        if tl.program_id(1) == 0:
            tl.store(out_s_ptr + g * N_OUT + o, tot.to(out_s_ptr.dtype.element_ty))
    tl.store(out_ptr + g * sog + o * son + c, acc.to(out_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def _scatter_back_kernel(
    y_ptr, out_ptr,
    out_idx_ptr, src_idx_ptr, dst_pos_ptr,
    N, N_OUT, R, C,
    syg, syn, syc, sog, son,
    # merge backward only: the forward's inputs and outputs, the size gradients
    x_ptr, s_ptr, mx_ptr, ms_ptr, gs_ptr, merged_ptr, grad_s_ptr,
    sxg, sxn, sxc, ssg, ssn, smg, smn,
    GRAD: tl.constexpr, HAS_GS: tl.constexpr, HAS_MERGED: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Input token t of group g takes the row of the output it went to.

    Program t < N_OUT is the base token of output row t; program N_OUT + p is source p.
    GRAD=False (unmerge): a plain copy. GRAD=True (merge backward): y is the gradient of
    the merged x, scaled by the token's share s_t / S_row (0 for a discarded source), and
    the size gradient g_S[row] + share-free sum_c y[row, c] (x_t[c] - out[row, c]) / S_row.
    """
    pid = tl.program_id(0)  # g * (N_OUT + R) + t: groups x tokens on axis 0 (any batch fits)
    g = (pid // (N_OUT + R)).to(tl.int64)
    t = pid % (N_OUT + R)
    is_base = t < N_OUT
    p = tl.maximum(t - N_OUT, 0)
    row = tl.where(is_base, t.to(tl.int64), tl.load(dst_pos_ptr + g * R + p, mask=~is_base, other=0))
    tok = tl.where(is_base, tl.load(out_idx_ptr + g * N_OUT + t, mask=is_base, other=0),
                   tl.load(src_idx_ptr + g * R + p, mask=~is_base, other=0))
    keep = 1.0
    if HAS_MERGED:
        keep = tl.where(is_base, 1.0, tl.load(merged_ptr + g * R + p, mask=~is_base, other=0).to(tl.float32))
    yrow = y_ptr + g * syg + row * syn
    orow = out_ptr + g * sog + tok * son
    if GRAD:
        s_tok = tl.load(s_ptr + g * ssg + tok * ssn).to(ACC)
        s_row = tl.load(ms_ptr + g * N_OUT + row).to(ACC)
        share = s_tok * keep.to(ACC) / s_row
        dot = tl.zeros([BLOCK_C], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        yv = tl.load(yrow + c * syc, mask=c_ok, other=0.0)
        if GRAD:
            yv = yv.to(ACC)
            xv = tl.load(x_ptr + g * sxg + tok * sxn + c * sxc, mask=c_ok, other=0.0).to(ACC)
            mv = tl.load(mx_ptr + g * smg + row * smn + c, mask=c_ok, other=0.0).to(ACC)
            dot += yv * (xv - mv)
            yv = yv * share
        tl.store(orow + c, yv.to(out_ptr.dtype.element_ty), mask=c_ok)
    if GRAD:
        gsv = tl.sum(dot, axis=0) / s_row
        if HAS_GS:
            gsv += tl.load(gs_ptr + g * N_OUT + row).to(ACC)
        gsv = gsv * keep.to(ACC)
        tl.store(grad_s_ptr + g * N + tok, gsv.to(grad_s_ptr.dtype.element_ty))


WARPS = 4


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_c(c: int) -> int:
    if large_tiles():
        return max(16, min(1024, triton.next_power_of_2(c)))
    return max(16, min(128, triton.next_power_of_2(c)))


def _block_s(r: int) -> int:
    if large_tiles():
        return max(16, min(1024, triton.next_power_of_2(max(r, 1))))
    return 32


def _gather(x, s, out, out_s, out_idx, src_idx, dst_pos, src_merged, s_strides, union: bool,
            total: bool, acc) -> None:
    """One ``_merge_kernel`` launch: every row of out [G, N', C] from its members' rows of x
    (size-weighted mean, or their union / sum), sizes into out_s when s is a size."""
    g, n_out, c = out.shape
    r = src_idx.shape[1]
    bc = _block_c(c)
    merged = src_merged if src_merged is not None else src_idx  # unused without HAS_MERGED
    launch(_merge_kernel, (g * n_out, triton.cdiv(c, bc)),
           x, s, out, out_s, out_idx, src_idx, dst_pos, merged, n_out, r, c,
           *x.stride(), *s_strides, out.stride(0), out.stride(1),
           HAS_MERGED=src_merged is not None, UNION=union, SUM=total, ACC=acc,
           BLOCK_S=_block_s(r), BLOCK_C=bc, num_warps=WARPS)


def merge_fwd(x, size, out_idx, src_idx, dst_pos, src_merged):
    """(x_out [G, N', C], size_out [G, N', 1]): one launch, float32 (float64) accumulation."""
    g, _, c = x.shape
    n_out = out_idx.shape[1]
    out = torch.empty(g, n_out, c, dtype=x.dtype, device=x.device)
    out_s = torch.empty(g, n_out, 1, dtype=size.dtype, device=x.device)
    _gather(x, size, out, out_s, out_idx, src_idx, dst_pos, src_merged, (size.stride(0), size.stride(1)),
            union=False, total=False, acc=_acc(x.dtype))
    return out, out_s


def merge_source_fwd(source, out_idx, src_idx, dst_pos, src_merged):
    """Union (max) of the members' rows of a 0/1 map [G, N, N0]; one launch."""
    work = source.to(torch.uint8) if source.dtype == torch.bool else source
    g, _, c = work.shape
    out = torch.empty(g, out_idx.shape[1], c, dtype=work.dtype, device=work.device)
    acc = tl.float64 if work.dtype == torch.float64 else tl.float32
    _gather(work, work, out, out, out_idx, src_idx, dst_pos, src_merged, (0, 0), union=True, total=False, acc=acc)
    return out.to(source.dtype)


def unmerge_bwd(grad_full, out_idx, src_idx, dst_pos):
    """Gradient of unmerge: each output row sums its base's and its sources' gradients."""
    grad_full = grad_full.contiguous()
    g, _, c = grad_full.shape
    out = torch.empty(g, out_idx.shape[1], c, dtype=grad_full.dtype, device=grad_full.device)
    _gather(grad_full, grad_full, out, out, out_idx, src_idx, dst_pos, None, (0, 0), union=False, total=True,
            acc=_acc(grad_full.dtype))
    return out


def unmerge_fwd(y, out_idx, src_idx, dst_pos, n: int):
    """Every input position takes its output row: [G, N', C] -> [G, n, C]; one launch."""
    g, n_out, c = y.shape
    r = src_idx.shape[1]
    out = torch.empty(g, n, c, dtype=y.dtype, device=y.device)
    bc = _block_c(c)
    launch(_scatter_back_kernel, (g * (n_out + r),),
           y, out, out_idx, src_idx, dst_pos, n, n_out, r, c,
           *y.stride(), out.stride(0), out.stride(1),
           y, y, y, y, y, src_idx, y, 0, 0, 0, 0, 0, 0, 0,
           GRAD=False, HAS_GS=False, HAS_MERGED=False, ACC=tl.float32, BLOCK_C=bc, num_warps=WARPS)
    return out


def merge_bwd(grad_x, grad_s, x, size, out_x, out_s, out_idx, src_idx, dst_pos, src_merged):
    """(grad of x, grad of size): the transposed gather, one launch."""
    g, n, c = x.shape
    n_out, r = out_idx.shape[1], src_idx.shape[1]
    grad_in = torch.empty(g, n, c, dtype=x.dtype, device=x.device)
    grad_size = torch.empty(g, n, 1, dtype=size.dtype, device=x.device)
    bc = _block_c(c)
    merged = src_merged if src_merged is not None else src_idx
    gs = grad_s if grad_s is not None else out_s
    launch(_scatter_back_kernel, (g * (n_out + r),),
           grad_x, grad_in, out_idx, src_idx, dst_pos, n, n_out, r, c,
           *grad_x.stride(), grad_in.stride(0), grad_in.stride(1),
           x, size, out_x, out_s, gs, merged, grad_size,
           *x.stride(), size.stride(0), size.stride(1), out_x.stride(0), out_x.stride(1),
           GRAD=True, HAS_GS=grad_s is not None, HAS_MERGED=src_merged is not None,
           ACC=_acc(x.dtype), BLOCK_C=bc, num_warps=WARPS)
    return grad_in, grad_size

