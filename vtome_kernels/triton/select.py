"""Triton FluxViT selection: scores, per-group top-K and gather in two launches.

Launch 1 (``_score_kernel``, one program per frame and block of patches) writes the
float32 change score of every patch exactly as ``reference.select_scores`` computes it:
d = cur - prev in float32, acc = acc + d * d over c = 0..C-1 in order, compiled without
fused multiply-add, so identical frames tie exactly as in the reference. Each thread owns
one patch and reads 8 consecutive channels at a time (a vector load when C % 8 == 0).

Launch 2 (``_topk_gather_kernel``, one program per group and block of patches) finds the
group's K-th largest score by a radix search over the score bits (scores are >= 0, so
their int32 bit patterns sort like the floats; NaN is mapped above +inf, as torch.sort
ranks it), keeps the scores above it plus the first needed ties in position order (ties
to the lower position), and copies its block's kept rows of x to their output rows: the
output position of a kept patch is the number of kept patches before it (a prefix sum).
Every program of a group finds the same threshold from the same scores.

``select(x, k_per_group, groups)`` has the signature of ``reference.select``. Runs on
CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch

_NAN_KEY = 0x7FC00000  # every NaN ranks here: above +inf (0x7F800000), as in torch.sort
_BLOCK_L = 64  # patches scored per program
_SCORE_WARPS = 2  # 64 threads: one patch each
_BLOCK_R = 64  # patches gathered per program
_BLOCK_W = 32  # words of a row copied per step
_GATHER_WARPS = 4
BLOCK_N_MAX = 2048  # scores of a group read per step by the top-K search (bounded: no spills)


@triton.jit
def _add_in_order(acc, sq, BLOCK_L: tl.constexpr):
    """acc + sq[:, 0] + sq[:, 1] + ... + sq[:, 7], one add at a time, in column order.

    The columns of the [BLOCK_L, 8] tile are taken apart by splits (register moves when
    each thread holds its row's 8 values), never summed by a reduction tree.
    """
    ev, od = tl.split(tl.reshape(sq, (BLOCK_L, 4, 2)))  # columns 0 2 4 6 | 1 3 5 7
    e0, e1 = tl.split(tl.reshape(ev, (BLOCK_L, 2, 2)))  # 0 4 | 2 6
    o0, o1 = tl.split(tl.reshape(od, (BLOCK_L, 2, 2)))  # 1 5 | 3 7
    c0, c4 = tl.split(e0)
    c2, c6 = tl.split(e1)
    c1, c5 = tl.split(o0)
    c3, c7 = tl.split(o1)
    acc = acc + c0
    acc = acc + c1
    acc = acc + c2
    acc = acc + c3
    acc = acc + c4
    acc = acc + c5
    acc = acc + c6
    acc = acc + c7
    return acc


@triton.jit
def _score_kernel(x_ptr, score_ptr, T, L, C, F, BLOCK_L: tl.constexpr):
    """score[b, t, l] = sum_c (x[b, cur, l, c] - x[b, cur - 1, l, c])², c in order.

    Each thread loads 8 consecutive channels of its patch (one 16-byte load for bf16 when
    C % 8 == 0), squares their differences and adds them in channel order.
    """
    pid_bt = tl.program_id(0).to(tl.int64)
    pid_l = tl.program_id(1)
    t = pid_bt % T
    frame0 = pid_bt - t  # b * T
    cur = tl.where(t % F == 0, t + 1, t)  # a group's first frame scores the next pair
    cur = tl.minimum(cur, T - 1)  # one-frame groups (F == 1) load nothing below
    n_c = tl.where(F > 1, C, 0)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    cur_row = x_ptr + ((frame0 + cur) * L + offs_l) * C
    prev_row = cur_row - L * C
    j8 = tl.arange(0, 8)
    acc = tl.zeros([BLOCK_L], dtype=tl.float32)
    for c0 in range(0, n_c, 8):
        m = mask_l[:, None] & ((c0 + j8) < C)[None, :]
        a = tl.load(cur_row[:, None] + (c0 + j8)[None, :], mask=m, other=0.0).to(tl.float32)
        p = tl.load(prev_row[:, None] + (c0 + j8)[None, :], mask=m, other=0.0).to(tl.float32)
        d = a - p
        acc = _add_in_order(acc, d * d, BLOCK_L)  # padded channels add an exact +0
    tl.store(score_ptr + (frame0 + t) * L + offs_l, acc, mask=mask_l)


@triton.jit
def _keys(score_ptr, pos, NG, NAN_KEY: tl.constexpr):
    """int32 keys of the scores at positions pos of a group: bit patterns (scores >= 0 sort
    like their bits), NaN canonical above +inf, padding -1."""
    s = tl.load(score_ptr + pos, mask=pos < NG, other=0.0)
    key = tl.where(s != s, NAN_KEY, s.to(tl.int32, bitcast=True))
    return tl.where(pos < NG, key, -1)


@triton.jit
def _topk_gather_kernel(score_ptr, x_ptr, kept_ptr, index_ptr, G, NG, W, K,
                        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
                        NAN_KEY: tl.constexpr):
    """Top K of group pid(0) (ties to the lower position); copy rows of block pid(1).

    The group's scores are read BLOCK_N at a time (BLOCK_N is bounded, so any group size
    compiles without spilling; the paper layouts fit in one block). x and kept are seen as
    rows of W integer words (the rows' bits, copied exactly).
    """
    pid_g = tl.program_id(0).to(tl.int64)  # b * G + g
    pid_r = tl.program_id(1)
    base = pid_g * NG  # first patch of the group in the flattened [B·T·L] grid
    offs = tl.arange(0, BLOCK_N)

    # Radix search: thr = the largest value with count(key >= thr) >= K, the K-th key.
    thr = 0
    for i in tl.static_range(31):
        cand = thr | (1 << (30 - i))
        cnt = 0
        for n0 in range(0, NG, BLOCK_N):
            key = _keys(score_ptr + base, n0 + offs, NG, NAN_KEY)
            cnt += tl.sum((key >= cand).to(tl.int32), axis=0)
        thr = tl.where(cnt >= K, cand, thr)

    # Keys above thr, and above / equal to it before this program's first row r0.
    r0 = pid_r * BLOCK_R
    gt = 0
    gt_before = 0
    eq_before = 0
    for n0 in range(0, NG, BLOCK_N):
        pos = n0 + offs
        key = _keys(score_ptr + base, pos, NG, NAN_KEY)
        gt += tl.sum((key > thr).to(tl.int32), axis=0)
        gt_before += tl.sum(((key > thr) & (pos < r0)).to(tl.int32), axis=0)
        eq_before += tl.sum(((key == thr) & (pos < r0)).to(tl.int32), axis=0)
    need = K - gt  # ties at thr to keep, lowest positions first
    kept_before = gt_before + tl.minimum(eq_before, need)

    rows = r0 + tl.arange(0, BLOCK_R)
    kr = _keys(score_ptr + base, rows, NG, NAN_KEY)
    eq = kr == thr
    keep = (kr > thr) | (eq & (eq_before + tl.cumsum(eq.to(tl.int32), axis=0) <= need))
    pos = kept_before + tl.cumsum(keep.to(tl.int32), axis=0) - 1  # output row in the group
    keep = keep & (pos < K)  # never true when pos >= K; guards the stores all the same

    out_row = pid_g * K + pos  # [B·G·K] rows of kept, group-major
    tl.store(index_ptr + out_row, (pid_g % G) * NG + rows, mask=keep)  # position in the clip
    src = x_ptr + (base + rows)[:, None] * W
    dst = kept_ptr + out_row[:, None] * W
    for w0 in range(0, W, BLOCK_W):
        cols = w0 + tl.arange(0, BLOCK_W)
        m = keep[:, None] & (cols < W)[None, :]
        v = tl.load(src + cols[None, :], mask=m)
        tl.store(dst + cols[None, :], v, mask=m)


def topk_block_n(ng: int) -> int:
    """Scores per step of the top-K search: the whole group up to BLOCK_N_MAX."""
    return min(triton.next_power_of_2(ng), BLOCK_N_MAX)


def _words(t: torch.Tensor) -> torch.Tensor:
    """t's bits as the widest integer words that tile its rows (copied exactly)."""
    for dtype in (torch.int64, torch.int32, torch.int16):
        size = dtype.itemsize
        if size >= t.element_size() and (t.shape[-1] * t.element_size()) % size == 0:
            try:
                return t.view(dtype)
            except RuntimeError:  # storage offset not aligned to the word
                continue
    return t


def select_scores(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Launch 1 alone: the scores [B, T, L] float32, bit for bit reference.select_scores."""
    b, t, l, c = x.shape
    x = x.contiguous()
    scores = torch.empty(b, t, l, dtype=torch.float32, device=x.device)
    launch(_score_kernel, (b * t, triton.cdiv(l, _BLOCK_L)),
           x, scores, t, l, c, t // groups, BLOCK_L=_BLOCK_L, num_warps=_SCORE_WARPS,
           enable_fp_fusion=False)
    return scores


def select(x: torch.Tensor, k_per_group: int, groups: int):
    """Triton selection with the signature and results of ``reference.select``.

    x [B, T, L, C] -> (kept [B, groups·k, C], index [B, groups·k] int64).
    """
    b, t, l, c = x.shape
    x = x.contiguous()
    f = t // groups
    ng = f * l
    k = k_per_group
    kept = torch.empty(b, groups * k, c, dtype=x.dtype, device=x.device)
    index = torch.empty(b, groups * k, dtype=torch.int64, device=x.device)
    if b == 0:
        return kept, index
    scores = select_scores(x, groups)
    block_n = topk_block_n(ng)
    x_words = _words(x)
    kept_words = kept.view(x_words.dtype)  # fresh, so aligned for any word x allows
    launch(_topk_gather_kernel, (b * groups, triton.cdiv(ng, _BLOCK_R)),
           scores, x_words, kept_words, index, groups, ng, x_words.shape[-1], k,
           BLOCK_N=block_n, BLOCK_R=_BLOCK_R, BLOCK_W=_BLOCK_W, NAN_KEY=_NAN_KEY,
           num_warps=_GATHER_WARPS)
    return kept, index
