"""Triton matching: fused normalise + A·Bᵀ + row max/argmax, then the ranking (two launches).

``match`` is bit-for-bit the reference's matching in float32: every score is accumulated
over k = 0..d-1 one step at a time with a separate multiply and add (the kernels are
compiled with ``enable_fp_fusion=False``, so no FMA contraction), the norms use IEEE
``sqrt_rn`` / ``div_rn`` exactly like ``reference.normalize``. The score matrix is never
written.

Match runs one program per (A tile, slice of B): B is split across programs until a launch
has two waves of an H100 (``WAVE``; VideoMAE-B at batch 1: 13 A tiles x 13 slices). Each
program normalises its A tile and its B tiles once, keeps its rows' running maximum and
lowest-index argmax over its slice, and merges them into the row's best with one 64-bit
atomic max of (order-preserving score bits, 2**32 - 1 - index): the highest score wins,
then the lowest index, in whatever order the slices finish, so the result is exact and
deterministic.

The ranking kernel finds the weakest source (the r-th best) by a radix select over the
32-bit keys, one 256-bin histogram pass per byte (4 passes; every program of a group does
them, so none waits for another), then gives each of its A tokens its position in the
stable descending order by counting (position of i = #{j: m_j > m_i or (m_j == m_i and
j < i)}) and writes the output layout of ``reference._layout`` directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import large_tiles, launch


@triton.jit
def _key(m):
    """float32 -> int32 with the same order (-0.0 counts as +0.0, as float comparison does);
    every NaN, whatever its sign, maps to the largest key: NaN ranks first, as the
    reference's descending sort orders it."""
    bits = (m + 0.0).to(tl.int32, bitcast=True)
    return tl.where(m != m, 2147483647, bits ^ ((bits >> 31) & 0x7FFFFFFF))


@triton.jit
def _match_kernel(
    m_ptr, best_ptr,
    NA, NB, D, A_TILES, B_STEPS,
    stride_g, stride_n, stride_d,
    CLS: tl.constexpr, DIST: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
    DOT: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Row max and lowest-index argmax of the cosine scores of one A tile against one slice
    of B (B_STEPS tiles), merged into every row's best by one 64-bit atomic max.

    Program (pid(0) = g * A_TILES + A tile, pid(1) = B slice). The A tile and each B tile
    are normalised once in the program (sum of squares k = 0..d-1, IEEE sqrt, clamp,
    div_rn, as reference.normalize). best[g, a] packs (order-preserving score bits << 32) |
    (2**32 - 1 - b): the largest score wins, then the lowest b, whatever order the slices
    finish in, so the result is deterministic and exact.

    DOT="" is the exact path (one k at a time, separate multiply and add); DOT="tf32" uses
    tl.dot on [block, BLOCK_D] tiles (tensor cores) and divides by the norms afterwards:
    faster, but tf32 rounding and the summation order can give identical tokens different
    scores, so ties and near-ties may break differently from the reference.
    """
    pid = tl.program_id(0)
    g = (pid // A_TILES).to(tl.int64)
    base = m_ptr + g * stride_g
    a = (pid % A_TILES) * BLOCK_A + tl.arange(0, BLOCK_A)
    a_ok = a < NA
    a_off = (2 * a).to(tl.int64) * stride_n
    sq_a = tl.zeros([BLOCK_A], dtype=tl.float32)
    bad_a = tl.zeros([BLOCK_A], dtype=tl.int1)  # a NaN or inf entry: its unit vector holds NaN
    for k in range(D):
        v = tl.load(base + a_off + k * stride_d, mask=a_ok, other=0.0).to(tl.float32)
        sq_a = sq_a + v * v
        bad_a = bad_a | (v != v) | (tl.abs(v) == float("inf"))
    nrm_a = tl.maximum(tl.sqrt_rn(sq_a), 1e-12)

    run_max = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)
    run_idx = tl.zeros([BLOCK_A], dtype=tl.int32)
    for step in range(B_STEPS):
        b = (tl.program_id(1) * B_STEPS + step) * BLOCK_B + tl.arange(0, BLOCK_B)
        b_ok = b < NB
        b_off = (2 * b + 1).to(tl.int64) * stride_n
        sq_b = tl.zeros([BLOCK_B], dtype=tl.float32)
        bad_b = tl.zeros([BLOCK_B], dtype=tl.int1)
        for k in range(D):
            v = tl.load(base + b_off + k * stride_d, mask=b_ok, other=0.0).to(tl.float32)
            sq_b = sq_b + v * v
            bad_b = bad_b | (v != v) | (tl.abs(v) == float("inf"))
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
        # A NaN score makes the row's maximum NaN and its argmax the last B token, as the
        # reference's amax and clamped argmin give (tl.max leaves NaN handling open). A
        # score is NaN exactly when one of its unit vectors holds a NaN, i.e. when its A or
        # B token has a NaN or inf entry (components of a unit vector are otherwise finite),
        # so the rows are found from the tokens, not by a pass over the score tile.
        bad_col = bad_b & b_ok
        if DIST:
            bad_col = bad_col & (b != 0)
        nan_row = bad_a | (tl.max(bad_col.to(tl.int32), axis=0) > 0)
        if CLS:
            nan_row = nan_row & (a != 0)
        t_max = tl.where(nan_row, float("nan"), tl.max(acc, axis=1))
        hit = (acc == t_max[:, None]) & b_ok[None, :]
        t_idx = tl.where(nan_row, NB - 1, tl.min(tl.where(hit, b[None, :], NB), axis=1))
        # Equal maxima keep the earlier (lower) column; a NaN maximum is never replaced.
        better = ((t_max > run_max) | nan_row | (step == 0)) & (run_max == run_max)
        run_idx = tl.where(better, t_idx, run_idx)
        run_max = tl.where(better, t_max, run_max)
    has_b = (tl.program_id(1) * B_STEPS) * BLOCK_B < NB
    packed = (_key(run_max).to(tl.int64) << 32) | (4294967295 - run_idx.to(tl.int64))
    tl.atomic_max(best_ptr + g * NA + a, packed, mask=a_ok & has_b, sem="relaxed")


@triton.jit
def _unpack(best):
    """(order-preserving int32 key, B index) of a packed best."""
    return (best >> 32).to(tl.int32), (4294967295 - (best & 4294967295)).to(tl.int32)


@triton.jit
def _rank_kernel(
    best_ptr, out_idx_ptr, src_idx_ptr, dst_pos_ptr, score_ptr,
    NA, NB, R,
    CLS: tl.constexpr, DIST: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Ranking and output layout of A tokens [pid(1) block] of matching group pid(0).

    Every program first finds the weakest source, the R-th key in descending order (equal
    keys by ascending index), by a radix select: four passes, one per byte of the key from
    the top, each a 256-bin histogram of the keys that share the bytes found so far. Then
    one pass counts, for each of its tokens, pos_i = #{j: k_j > k_i or (k_j == k_i and j < i)}
    and the ties at the threshold before it (the first ``need`` ties are sources); with a
    class token also the ascending position among the unmerged, u_i = #{j < i: j unmerged}.
    """
    g = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    n_unm = NA - R
    n_out = n_unm + NB
    brow = best_ptr + g * NA
    out_row = out_idx_ptr + g * n_out
    bins = tl.arange(0, 256)
    # Radix select on the unsigned form u = key ^ 0x80000000 (same order as the keys).
    prefix = tl.full([], 0, tl.int64)  # the bytes found so far, in place
    rem = R  # how many keys at or above the threshold are still to be passed
    for byte in tl.static_range(4):
        shift = 24 - 8 * byte
        hist = tl.zeros([256], dtype=tl.int32)
        for j0 in range(0, NA, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            kj, _ = _unpack(tl.load(brow + j, mask=j < NA, other=0))
            u = (kj.to(tl.int64) + 2147483648)  # 0 .. 2**32 - 1, same order
            same = ((u >> (shift + 8)) == (prefix >> (shift + 8))) & (j < NA)
            hist += tl.histogram(((u >> shift) & 255).to(tl.int32), 256, mask=same)
        above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0)  # keys in higher bins
        digit = tl.max(tl.where(above + hist >= rem, bins, -1), axis=0)
        rem -= tl.sum(tl.where(bins > digit, hist, 0), axis=0)
        prefix += digit.to(tl.int64) << shift
    k_last = (prefix - 2147483648).to(tl.int32)
    need = rem  # ties at k_last that are sources: the lowest indices first

    i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = i < NA
    ki, dst_b = _unpack(tl.load(brow + i, mask=i_ok, other=0))
    pos = tl.zeros([BLOCK_I], dtype=tl.int32)
    u = tl.zeros([BLOCK_I], dtype=tl.int32)
    ties_i = tl.zeros([BLOCK_I], dtype=tl.int32)  # ties at k_last before i
    ties = 0  # ties at k_last before block j0
    for j0 in range(0, NA, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_ok = j < NA
        kj, _ = _unpack(tl.load(brow + j, mask=j_ok, other=0))
        before = (kj[None, :] > ki[:, None]) | ((kj[None, :] == ki[:, None]) & (j[None, :] < i[:, None]))
        pos += tl.sum((before & j_ok[None, :]).to(tl.int32), axis=1)
        tie_j = (kj == k_last) & j_ok
        ties_i += tl.sum((tie_j[None, :] & (j[None, :] < i[:, None])).to(tl.int32), axis=1)
        if CLS:
            src_j = (kj > k_last) | (tie_j & (ties + tl.cumsum(tie_j.to(tl.int32), axis=0) <= need))
            earlier = (~src_j[None, :]) & j_ok[None, :] & (j[None, :] < i[:, None])
            u += tl.sum(earlier.to(tl.int32), axis=1)
            ties += tl.sum(tie_j.to(tl.int32), axis=0)
    src = ((ki > k_last) | ((ki == k_last) & (ties_i < need))) & i_ok
    dst = n_unm + dst_b
    if DIST:
        dst = tl.where(dst_b == 0, 1, dst)
    rank = g * R + pos
    bits = ki ^ ((ki >> 31) & 0x7FFFFFFF)  # the key back to the float's bits
    tl.store(src_idx_ptr + rank, (2 * i).to(tl.int64), mask=src)
    tl.store(dst_pos_ptr + rank, dst.to(tl.int64), mask=src)
    tl.store(score_ptr + rank, bits.to(tl.float32, bitcast=True), mask=src)
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
WAVE = 2 * 132  # programs that fill an H100 twice (132 SMs): B is split until a match has them


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def match_blocks(na: int, nb: int):
    """Tiles of the match kernel: large under the interpreter (fewer Python-level steps)."""
    if large_tiles():
        return _pow2(na, 16, 256), _pow2(nb, 16, 256)
    return 64, 64


def match_grid(g: int, na: int, nb: int):
    """(A tiles, B slices, B tiles per slice): B is split across programs until the launch
    has WAVE programs (one slice under the interpreter's large tiles)."""
    ba, bb = match_blocks(na, nb)
    a_tiles, b_tiles = triton.cdiv(na, ba), triton.cdiv(nb, bb)
    if large_tiles():
        return a_tiles, 1, max(1, b_tiles)
    slices = max(1, min(b_tiles, triton.cdiv(WAVE, max(1, g * a_tiles))))
    steps = max(1, triton.cdiv(b_tiles, slices))
    return a_tiles, max(1, triton.cdiv(b_tiles, steps)), steps


def match_block_d(d: int) -> int:
    """k-tile of the tl.dot option (unused by the exact path); 16 keeps sm_80/90 spill-free."""
    return 16


def rank_blocks(na: int):
    """(BLOCK_I, BLOCK_J): tokens per program, tokens per counting step."""
    if large_tiles():
        return _pow2(na, 16, 1024), _pow2(na, 16, 1024)
    return 32, 128


PRECISIONS = ("exact", "tf32")
_EMPTY = -(2**63)  # below every packed best


def row_best(metric: torch.Tensor, class_token: bool, distill_token: bool, precision: str = "exact"):
    """best [G, |A|] int64: each A token's packed (score key, B index) of its best match."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    g, n, d = metric.shape
    na, nb = (n + 1) // 2, n // 2
    best = torch.full((g, na), _EMPTY, dtype=torch.int64, device=metric.device)
    ba, bb = match_blocks(na, nb)
    a_tiles, slices, steps = match_grid(g, na, nb)
    launch(_match_kernel, (g * a_tiles, slices),
           metric, best, na, nb, d, a_tiles, steps, *metric.stride(),
           CLS=class_token, DIST=distill_token, BLOCK_A=ba, BLOCK_B=bb,
           DOT="" if precision == "exact" else precision,
           BLOCK_D=match_block_d(d),
           num_warps=MATCH_WARPS, enable_fp_fusion=precision != "exact")
    return best


def unpack(best: torch.Tensor):
    """(node_max [G, |A|] float32, node_idx [G, |A|] int32) of packed bests."""
    key = (best >> 32).to(torch.int32)
    bits = key ^ ((key >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), (0xFFFFFFFF - (best & 0xFFFFFFFF)).to(torch.int32)


def pack(node_max: torch.Tensor, node_idx: torch.Tensor) -> torch.Tensor:
    """The packed bests of row maxima and their B indices (inverse of ``unpack``)."""
    node_max = node_max.float() + 0.0
    bits = node_max.view(torch.int32)
    key = torch.where(node_max.isnan(), 0x7FFFFFFF, bits ^ ((bits >> 31) & 0x7FFFFFFF))
    return (key.to(torch.int64) << 32) | (0xFFFFFFFF - node_idx.to(torch.int64))


def row_max(metric: torch.Tensor, class_token: bool, distill_token: bool, precision: str = "exact"):
    """(node_max [G, |A|] float32, node_idx [G, |A|] int32): the match launch, unpacked."""
    return unpack(row_best(metric, class_token, distill_token, precision))


def rank_best(best, n: int, r: int, class_token: bool, distill_token: bool):
    """The matching tensors (out_idx, src_idx, dst_pos, src_score) from the packed bests."""
    g, na = best.shape
    nb = n // 2
    dev = best.device
    out_idx = torch.empty(g, n - r, dtype=torch.int64, device=dev)
    src_idx = torch.empty(g, r, dtype=torch.int64, device=dev)
    dst_pos = torch.empty(g, r, dtype=torch.int64, device=dev)
    src_score = torch.empty(g, r, dtype=torch.float32, device=dev)
    bi, bj = rank_blocks(na)
    launch(_rank_kernel, (g, triton.cdiv(na, bi)), best, out_idx, src_idx, dst_pos,
           src_score, na, nb, r, CLS=class_token, DIST=distill_token, BLOCK_I=bi, BLOCK_J=bj,
           num_warps=RANK_WARPS)
    return out_idx, src_idx, dst_pos, src_score


def rank(node_max, node_idx, n: int, r: int, class_token: bool, distill_token: bool):
    """The matching tensors from row maxima and their B indices (packed, then ranked)."""
    return rank_best(pack(node_max, node_idx), n, r, class_token, distill_token)


def match_impl(metric: torch.Tensor, r: int, class_token: bool, distill_token: bool,
               precision: str = "exact"):
    """Bipartite soft matching of metric [G, N, d] in two launches (reference.match's contract)."""
    best = row_best(metric, class_token, distill_token, precision)
    return rank_best(best, metric.shape[1], r, class_token, distill_token)

