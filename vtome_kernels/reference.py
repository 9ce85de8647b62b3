"""Plain-PyTorch reference backend: the specification every other backend matches.

Readable first, fast second. Every function works on inputs already flattened to matching
groups (``[G, N, ...]``: G = B clips for the spatio-temporal scheme, B*T frames for the
divided space-time scheme) and already validated by the public ops in ``merge.py``,
``attention.py`` and ``select.py``.

A matching is described by four tensors, the same for every backend:

- ``out_idx`` [G, N - r] int64: for every output token, the position (0..N-1) of the token
  it starts from: the unmerged A tokens, then the B tokens (ALGORITHM.md section 1.7).
- ``src_idx`` [G, r] int64: positions of the source tokens, in rank order (best first).
- ``dst_pos`` [G, r] int64: the output row each source goes into (its best B partner).
- ``src_score`` [G, r] float32: each source's best similarity (its row maximum).

Semantics: ALGORITHM.md sections 1 and 2.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import _checks

NAME = "reference"

# A zero metric vector normalises to zero (cosine 0 with everything) instead of NaN.
NORM_EPS = 1e-12
# Rows of A scored at once: keeps the [rows, |B|] accumulator in cache.
_ROW_BLOCK = 256


def status() -> Tuple[bool, str]:
    """(available, why): the reference needs nothing but PyTorch."""
    return True, "plain PyTorch, every device"


def supports(device: torch.device) -> Optional[str]:
    """None: the reference runs on every device."""
    return None


# --------------------------------------------------------------------------------------
# match: metric -> scores -> row max/argmax -> ranking -> output layout
# --------------------------------------------------------------------------------------
def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dot products [G, Na, Nb] of rows of a [G, Na, d] and b [G, Nb, d], in float32.

    Accumulated in order k = 0..d-1 with a separate multiply and add (no fused
    multiply-add), so each value depends only on its two vectors, never on their
    positions. A GEMM gives no such promise: bit-identical tokens can score an ulp apart,
    and the tie rule would then be decided by rounding. Readable and exact, not fast.
    """
    g, na, d = a.shape
    bt = b.transpose(1, 2).contiguous()  # [G, d, Nb]: each k a contiguous row
    out = a.new_empty(g, na, b.shape[1])
    for i in range(0, na, _ROW_BLOCK):
        rows = a[:, i : i + _ROW_BLOCK]
        acc = torch.zeros_like(out[:, i : i + _ROW_BLOCK])
        for k in range(d):
            acc += rows[:, :, k, None] * bt[:, None, k, :]
        out[:, i : i + _ROW_BLOCK] = acc
    return out


def normalize(metric: torch.Tensor) -> torch.Tensor:
    """L2-normalise each token in float32 (sum of squares in order k = 0..d-1).

    The square root is the correctly rounded float32 one, taken through float64: torch's
    float32 CPU sqrt is not correctly rounded (1 ulp off for ~15% of inputs, measured),
    while CUDA's, C++'s std::sqrt and Triton's sqrt_rn are; this way the specification is
    the same on every device.
    """
    metric = metric.float()
    sq = torch.zeros_like(metric[..., 0])
    for k in range(metric.shape[-1]):
        sq += metric[..., k] * metric[..., k]
    norm = sq.double().sqrt().float()  # exact: float64 has room for double rounding of sqrt
    return metric / norm.clamp_min(NORM_EPS)[..., None]


def similarity(metric: torch.Tensor) -> torch.Tensor:
    """Cosine scores [G, ceil(N/2), floor(N/2)] between set A (even) and set B (odd)."""
    m = normalize(metric)
    return _dot(m[:, ::2], m[:, 1::2])


@torch.no_grad()
def match(metric: torch.Tensor, r: int, class_token: bool, distill_token: bool):
    """Bipartite soft matching of every group; metric [G, N, d], 1 <= r <= (N - protected) // 2.

    Returns (out_idx, src_idx, dst_pos, src_score), described in the module docstring.
    """
    return match_scores(similarity(metric), r, class_token, distill_token)


@torch.no_grad()
def match_scores(scores: torch.Tensor, r: int, class_token: bool, distill_token: bool):
    """The matching from a score matrix [G, |A|, |B|] (similarities, or random scores)."""
    scores = scores.float()
    if class_token:  # the class token (A row 0) is never a source
        scores = scores.index_fill(1, scores.new_zeros(1, dtype=torch.long), -math.inf)
    if distill_token:  # nothing merges into the distillation token (B column 0)
        scores = scores.index_fill(2, scores.new_zeros(1, dtype=torch.long), -math.inf)
    n_a, n_b = scores.shape[1], scores.shape[2]

    # Row max and argmax; equal scores: the lowest B index wins.
    node_max = scores.amax(dim=-1)
    cols = torch.arange(n_b, device=scores.device)
    node_idx = torch.where(scores == node_max[..., None], cols, n_b).amin(dim=-1)
    node_idx = node_idx.clamp_max(n_b - 1)  # only NaN rows can reach n_b

    # Rank A tokens by their best score; equal scores keep ascending A order.
    order = torch.sort(node_max, dim=-1, descending=True, stable=True).indices
    src_a, unm_a = order[:, :r], order[:, r:]
    if class_token:  # put the unmerged tokens back in their original order
        unm_a = unm_a.sort(dim=-1).values
    dst_b = node_idx.gather(1, src_a)
    src_score = node_max.gather(1, src_a)
    out_idx, dst_pos = _layout(unm_a, dst_b, n_b, distill_token)
    return out_idx, 2 * src_a, dst_pos, src_score


def _layout(unm_a, dst_b, n_b: int, distill_token: bool):
    """Output order [unmerged A, B] as positions, and each source's output row.

    With a distillation token: [cls, dist, other unmerged A, other B].
    """
    g, n_unm = unm_a.shape
    b_pos = (2 * torch.arange(n_b, device=unm_a.device) + 1).expand(g, n_b)
    if not distill_token:
        return torch.cat([2 * unm_a, b_pos], dim=1), n_unm + dst_b
    out_idx = torch.cat([2 * unm_a[:, :1], b_pos[:, :1], 2 * unm_a[:, 1:], b_pos[:, 1:]], dim=1)
    dst_pos = torch.where(dst_b == 0, 1, n_unm + dst_b)
    return out_idx, dst_pos


# --------------------------------------------------------------------------------------
# merge: x, size -> merged x, size (size-weighted mean, float32 accumulation)
# --------------------------------------------------------------------------------------
def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float32 for every input dtype, float64 kept (for gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[g, idx[g, i], :] for every g, i."""
    return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))


def merge(x, size, out_idx, src_idx, dst_pos, src_merged=None):
    """Merge x [G, N, C] and size [G, N, 1] by a matching -> ([G, N', C], [G, N', 1]).

    Every output row is the size-weighted mean of its base token and the sources merged
    into it, accumulated in float32; rows that receive no source are copied exactly.
    src_merged [G, r] (bool, None = all) marks the sources that merge; the others are
    discarded.
    Differentiable in x and size.
    """
    acc = acc_dtype(x)
    xf, sf = x.to(acc), size.to(acc)
    merged = torch.ones_like(src_idx, dtype=acc) if src_merged is None else src_merged.to(acc)
    base_x, base_s = _rows(xf, out_idx), _rows(sf, out_idx)
    w = _rows(sf, src_idx) * merged[..., None]
    tot_s = base_s.scatter_add(1, dst_pos[..., None], w)
    tot_x = (base_x * base_s).scatter_add(
        1, dst_pos[..., None].expand(-1, -1, x.shape[-1]), _rows(xf, src_idx) * w
    )
    received = torch.zeros_like(base_s).scatter_add(1, dst_pos[..., None], merged[..., None]) > 0
    x_out = torch.where(received, tot_x / tot_s, base_x)
    return x_out.to(x.dtype), tot_s.to(size.dtype)


def merge_fused(x, size, metric, r: int, class_token: bool, distill_token: bool):
    """The fused stage, match then merge (mode "merge"): (x [G, N - r, C], size [G, N - r, 1]).

    size None means ones (the returned sizes are then float32); sizes must be positive.
    """
    if size is None:
        size = torch.ones(x.shape[:-1] + (1,), dtype=torch.float32, device=x.device)
    else:
        _checks.sizes("size", size)
    out_idx, src_idx, dst_pos, _ = match(metric, r, class_token, distill_token)
    return merge(x, size, out_idx, src_idx, dst_pos)


def merge_source(source, out_idx, src_idx, dst_pos, src_merged=None):
    """Merge a 0/1 source map [G, N, N0]: merged rows are the union (max) of their members."""
    work = source.to(torch.uint8) if source.dtype == torch.bool else source
    src_rows = _rows(work, src_idx)
    if src_merged is not None:  # a discarded source adds nothing (0 is the identity of max)
        src_rows = src_rows * src_merged[..., None].to(work.dtype)
    out = _rows(work, out_idx).scatter_reduce(
        1, dst_pos[..., None].expand(-1, -1, work.shape[-1]), src_rows, reduce="amax"
    )
    return out.to(source.dtype)


def unmerge(y, out_idx, src_idx, dst_pos, n: int):
    """Scatter y [G, N', C] back to [G, n, C]: every source copies its destination's row."""
    full = y.new_zeros(y.shape[0], n, y.shape[-1])
    full = full.scatter(1, out_idx[..., None].expand(-1, -1, y.shape[-1]), y)
    return full.scatter(1, src_idx[..., None].expand(-1, -1, y.shape[-1]), _rows(y, dst_pos))


# --------------------------------------------------------------------------------------
# proportional attention
# --------------------------------------------------------------------------------------
def prop_attention(q, k, v, size, scale: float):
    """softmax(q kᵀ * scale + log(size)ᵀ) v; q [B, H, Nq, d], k, v [B, H, Nk, d], size [B, Nk, 1].

    size None is plain attention. The bias is per key, broadcast over heads and queries.
    """
    mask = None
    if size is not None:
        mask = size.float().log()[:, None, None, :, 0].to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# ======================================================================================
# select: FluxViT-style token selection to a budget (ALGORITHM.md section 5, API.md)
# ======================================================================================
def select_scores(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Change score [B, T, L] float32 of every patch of x [B, T, L, C].

    Frames are split into ``groups`` runs of F = T / groups consecutive frames. A patch's
    score is the squared L2 distance to the same patch in the previous frame of its group
    (same order as the L2 distance, without a square root whose rounding could create
    ties); the group's first frame takes the second frame's score. A group of one frame
    has no change to measure: its scores are 0, so the tie rule keeps its first patches.

    Computed in float32 from x converted to float32: d = cur - prev, then acc += d * d
    for c = 0..C-1 in order, a separate multiply and add. A score depends only on its two
    vectors, so identical frames tie exactly in every backend.
    """
    b, t, l, c = x.shape
    f = t // groups
    if f == 1:
        return x.new_zeros(b, t, l, dtype=torch.float32)
    xc = x.float().permute(3, 0, 1, 2).contiguous()  # [C, B, T, L]: each c a contiguous slab
    diff = xc[:, :, 1:] - xc[:, :, :-1]  # pair (frame t+1, frame t) for t = 0..T-2
    sq = diff * diff
    acc = torch.zeros_like(sq[0])
    for k in range(c):
        acc += sq[k]
    # Frame t scores pair (t, t-1); a group's first frame (t % F == 0) scores (t+1, t).
    frame = torch.arange(t, device=x.device)
    pair = torch.where(frame % f == 0, frame, frame - 1)
    return acc[:, pair]


@torch.no_grad()
def select_index(scores: torch.Tensor, k_per_group: int, groups: int) -> torch.Tensor:
    """Positions [B, groups * k] in the flattened T·L grid of the kept patches.

    The top k_per_group scores of every group, ties to the lower position (a stable
    descending sort; NaN ranks above every number, as torch.sort orders it), returned in
    ascending position order.
    """
    b, t, l = scores.shape
    n_group = (t // groups) * l
    per_group = scores.reshape(b, groups, n_group)
    top = torch.sort(per_group, dim=-1, descending=True, stable=True).indices[..., :k_per_group]
    top = top.sort(dim=-1).values
    offset = torch.arange(groups, device=scores.device)[:, None] * n_group
    return (top + offset).reshape(b, groups * k_per_group)


def select(x: torch.Tensor, k_per_group: int, groups: int):
    """Keep the k_per_group most changing patches of every group of frames.

    x [B, T, L, C], groups dividing T, 1 <= k_per_group <= (T / groups)·L (validated by
    ``vtome_kernels.select``). Returns (kept [B, groups·k, C] in the original (t, l)
    order, index [B, groups·k] int64 into the flattened T·L grid).
    """
    b, t, l, c = x.shape
    index = select_index(select_scores(x, groups), k_per_group, groups)
    kept = x.reshape(b, t * l, c).gather(1, index[..., None].expand(-1, -1, c))
    return kept, index
