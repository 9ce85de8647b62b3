"""Triton matching: fused normalise + A·Bᵀ + row max/argmax, then the ranking (two launches).

``match`` is bit-for-bit the reference's matching in float32: every score is accumulated
over k = 0..d-1 one step at a time with a separate multiply and add (the kernels are
compiled with ``enable_fp_fusion=False``, so no FMA contraction), the norms use IEEE
``sqrt_rn`` / ``div_rn`` exactly like ``reference.normalize``. The score matrix is never
written: each program keeps only its rows' running maximum and lowest-index argmax.

The ranking kernel gives every A token its position in the stable descending order of row
maxima by counting (position of i = #{j: m_j > m_i or (m_j == m_i and j < i)}) and writes
the output layout of ``reference._layout`` directly; one launch, many programs per group
(each first finds the weakest source by bisection, so no program waits for another).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting, launch


@triton.jit
def _match_kernel(
    m_ptr, max_ptr, idx_ptr,
    NA, NB, D,
    stride_g, stride_n, stride_d,
    CLS: tl.constexpr, DIST: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
    DOT: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Row max and argmax of the cosine scores of A rows [pid_a block] against every B token.

    DOT="" is the exact path (one k at a time, separate multiply and add); DOT="tf32" uses
    tl.dot on [block, BLOCK_D] tiles (tensor cores) and divides by the norms afterwards:
    faster, but tf32 rounding and the summation order can give identical tokens different
    scores, so ties and near-ties may break differently from the reference.
    """
    g = tl.program_id(0).to(tl.int64)
    pid_a = tl.program_id(1)
    base = m_ptr + g * stride_g
    a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    a_ok = a < NA
    a_off = (2 * a).to(tl.int64) * stride_n
    # Norms of the A rows: sum of squares in order k = 0..d-1, IEEE sqrt, clamped.
    sq_a = tl.zeros([BLOCK_A], dtype=tl.float32)
    for k in range(D):
        v = tl.load(base + a_off + k * stride_d, mask=a_ok, other=0.0).to(tl.float32)
        sq_a = sq_a + v * v
    nrm_a = tl.maximum(tl.sqrt_rn(sq_a), 1e-12)

    run_max = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)
    run_idx = tl.zeros([BLOCK_A], dtype=tl.int32)
    for b0 in range(0, NB, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        b_ok = b < NB
        b_off = (2 * b + 1).to(tl.int64) * stride_n
        sq_b = tl.zeros([BLOCK_B], dtype=tl.float32)
        for k in range(D):
            v = tl.load(base + b_off + k * stride_d, mask=b_ok, other=0.0).to(tl.float32)
            sq_b = sq_b + v * v
        nrm_b = tl.maximum(tl.sqrt_rn(sq_b), 1e-12)
        if DOT == "":
            acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
            for k in range(D):
                va = tl.load(base + a_off + k * stride_d, mask=a_ok, other=0.0).to(tl.float32)
                vb = tl.load(base + b_off + k * stride_d, mask=b_ok, other=0.0).to(tl.float32)
                va = tl.div_rn(va, nrm_a)
                vb = tl.div_rn(vb, nrm_b)
                acc = acc + va[:, None] * vb[None, :]
        else:
            kk = tl.arange(0, BLOCK_D)
            acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
            for k0 in range(0, D, BLOCK_D):
                k_ok = (k0 + kk) < D
                ta = tl.load(base + a_off[:, None] + (k0 + kk)[None, :] * stride_d,
                             mask=a_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                tb = tl.load(base + b_off[:, None] + (k0 + kk)[None, :] * stride_d,
                             mask=b_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                acc = tl.dot(ta, tl.trans(tb), acc, input_precision=DOT)
            acc = acc * (1.0 / nrm_a)[:, None] * (1.0 / nrm_b)[None, :]  # cosine of raw dots
        masked = ~b_ok[None, :]
        if CLS:
            masked = masked | (a[:, None] == 0)
        if DIST:
            masked = masked | (b[None, :] == 0)
        acc = tl.where(masked, float("-inf"), acc)
        t_max = tl.max(acc, axis=1)
        hit = (acc == t_max[:, None]) & b_ok[None, :]
        t_idx = tl.min(tl.where(hit, b[None, :], NB), axis=1)
        better = t_max > run_max  # equal maxima keep the earlier (lower) column
        run_idx = tl.where(better, t_idx, run_idx)
        run_max = tl.where(better, t_max, run_max)
    out = g * NA + a
    tl.store(max_ptr + out, run_max, mask=a_ok)
    tl.store(idx_ptr + out, run_idx, mask=a_ok)


@triton.jit
def _count_ge(mrow, NA, key, BLOCK_J: tl.constexpr):
    """#{j: key(m_j) >= key} over one group's row maxima."""
    n = 0
    for j0 in range(0, NA, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        kj = _key(tl.load(mrow + j, mask=j < NA, other=0.0))
        n += tl.sum(((kj >= key) & (j < NA)).to(tl.int32), axis=0)
    return n


@triton.jit
def _key(m):
    """float32 -> int32 with the same order (-0.0 counts as +0.0, as float comparison does)."""
    bits = (m + 0.0).to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _rank_kernel(
    max_ptr, idx_ptr, out_idx_ptr, src_idx_ptr, dst_pos_ptr, score_ptr,
    NA, NB, R, SEARCH,
    CLS: tl.constexpr, DIST: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Ranking and output layout of A tokens [pid block] of one matching group.

    Every program first finds the weakest source (the R-th key in descending row-max order,
    equal maxima by ascending index) by a bisection on the order-preserving integer key and
    one on the index, then gives each of its tokens its position by counting:
    pos_i = #{j: m_j > m_i or (m_j == m_i and j < i)}, and with a class token the ascending
    position among the unmerged u_i = #{j < i: j unmerged}.
    """
    g = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    n_unm = NA - R
    n_out = n_unm + NB
    mrow = max_ptr + g * NA
    out_row = out_idx_ptr + g * n_out
    # Largest key K with #{key >= K} >= R (bisection over the int32 range).
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483647, tl.int64)
    for _ in range(32):
        mid = (lo + hi + 1) >> 1
        ok = _count_ge(mrow, NA, mid.to(tl.int32), BLOCK_J) >= R
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    k_last = lo.to(tl.int32)
    need = R - _count_ge(mrow, NA, k_last + 1, BLOCK_J)  # K <= key(+inf) < 2**31 - 1
    # The need-th lowest index with key == K is the weakest source.
    lo_i = tl.full([], 0, tl.int32)
    hi_i = NA - 1
    for _ in range(SEARCH):
        mid = (lo_i + hi_i) >> 1
        n = 0
        for j0 in range(0, NA, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            kj = _key(tl.load(mrow + j, mask=j < NA, other=0.0))
            n += tl.sum(((kj == k_last) & (j <= mid) & (j < NA)).to(tl.int32), axis=0)
        ok = n >= need
        hi_i = tl.where(ok, mid, hi_i)
        lo_i = tl.where(ok, lo_i, mid + 1)
    last = lo_i

    i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = i < NA
    mi = tl.load(mrow + i, mask=i_ok, other=0.0)
    ki = _key(mi)
    src = ((ki > k_last) | ((ki == k_last) & (i <= last))) & i_ok
    pos = tl.zeros([BLOCK_I], dtype=tl.int32)
    u = tl.zeros([BLOCK_I], dtype=tl.int32)
    for j0 in range(0, NA, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_ok = j < NA
        kj = _key(tl.load(mrow + j, mask=j_ok, other=0.0))
        before = (kj[None, :] > ki[:, None]) | ((kj[None, :] == ki[:, None]) & (j[None, :] < i[:, None]))
        pos += tl.sum((before & j_ok[None, :]).to(tl.int32), axis=1)
        if CLS:
            src_j = (kj > k_last) | ((kj == k_last) & (j <= last))
            earlier = (~src_j[None, :]) & j_ok[None, :] & (j[None, :] < i[:, None])
            u += tl.sum(earlier.to(tl.int32), axis=1)
    dst_b = tl.load(idx_ptr + g * NA + i, mask=src, other=0)
    dst = n_unm + dst_b
    if DIST:
        dst = tl.where(dst_b == 0, 1, dst)
    rank = g * R + pos
    tl.store(src_idx_ptr + rank, (2 * i).to(tl.int64), mask=src)
    tl.store(dst_pos_ptr + rank, dst.to(tl.int64), mask=src)
    tl.store(score_ptr + rank, mi, mask=src)
    if CLS:  # unmerged tokens back in ascending order
        row = u
        if DIST:  # [cls, dist, other unmerged A, other B]
            row = tl.where(u == 0, 0, u + 1)
    else:  # unmerged tokens stay in descending-score order
        row = pos - R
    tl.store(out_row + row, (2 * i).to(tl.int64), mask=i_ok & ~src)
    b = i  # this program's share of the B tokens, in order after the unmerged A tokens
    row_b = n_unm + b
    if DIST:
        row_b = tl.where(b == 0, 1, row_b)
    tl.store(out_row + row_b, (2 * b + 1).to(tl.int64), mask=b < NB)


MATCH_WARPS = 4
RANK_WARPS = 4


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def match_blocks(na: int, nb: int):
    """Tiles of the match kernel: large under the interpreter (fewer Python-level steps)."""
    if interpreting():
        return _pow2(na, 16, 256), _pow2(nb, 16, 256)
    return 64, 64


def match_block_d(d: int) -> int:
    """k-tile of the tl.dot option (unused by the exact path); 16 keeps sm_80/90 spill-free."""
    return 16


def rank_blocks(na: int):
    """(BLOCK_I, BLOCK_J): tokens per program, tokens per counting step."""
    if interpreting():
        return _pow2(na, 16, 1024), _pow2(na, 16, 1024)
    return 32, 128


PRECISIONS = ("exact", "tf32")


def row_max(metric: torch.Tensor, class_token: bool, distill_token: bool, precision: str = "exact"):
    """(node_max [G, |A|] float32, node_idx [G, |A|] int32): one launch, no score matrix."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    g, n, d = metric.shape
    na, nb = (n + 1) // 2, n // 2
    node_max = torch.empty(g, na, dtype=torch.float32, device=metric.device)
    node_idx = torch.empty(g, na, dtype=torch.int32, device=metric.device)
    ba, bb = match_blocks(na, nb)
    launch(_match_kernel, (g, triton.cdiv(na, ba)),
           metric, node_max, node_idx, na, nb, d, *metric.stride(),
           CLS=class_token, DIST=distill_token, BLOCK_A=ba, BLOCK_B=bb,
           DOT="" if precision == "exact" else precision,
           BLOCK_D=match_block_d(d),
           num_warps=MATCH_WARPS, enable_fp_fusion=precision != "exact")
    return node_max, node_idx


def rank(node_max, node_idx, n: int, r: int, class_token: bool, distill_token: bool):
    """The matching tensors (out_idx, src_idx, dst_pos, src_score) from the row maxima."""
    g, na = node_max.shape
    nb = n // 2
    dev = node_max.device
    out_idx = torch.empty(g, n - r, dtype=torch.int64, device=dev)
    src_idx = torch.empty(g, r, dtype=torch.int64, device=dev)
    dst_pos = torch.empty(g, r, dtype=torch.int64, device=dev)
    src_score = torch.empty(g, r, dtype=torch.float32, device=dev)
    bi, bj = rank_blocks(na)
    search = max(1, (na - 1).bit_length())  # bisection steps over the index range
    launch(_rank_kernel, (g, triton.cdiv(na, bi)), node_max, node_idx, out_idx, src_idx, dst_pos,
           src_score, na, nb, r, search, CLS=class_token, DIST=distill_token, BLOCK_I=bi, BLOCK_J=bj,
           num_warps=RANK_WARPS)
    return out_idx, src_idx, dst_pos, src_score


def match_impl(metric: torch.Tensor, r: int, class_token: bool, distill_token: bool,
               precision: str = "exact"):
    """Bipartite soft matching of metric [G, N, d] in two launches (reference.match's contract)."""
    node_max, node_idx = row_max(metric, class_token, distill_token, precision)
    return rank(node_max, node_idx, metric.shape[1], r, class_token, distill_token)

