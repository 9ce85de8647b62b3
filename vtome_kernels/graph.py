"""Graph backend: the pipeline in plain, vectorised aten ops, for exported graphs.

``torch.onnx.export`` (``dynamo=True`` or the TorchScript exporter), ``torch.jit.trace``
and ``torch.export`` see only ordinary aten ops here: no custom op, no per-dimension loop,
no ``aten.sort.stable`` (which has no ONNX function). ``backends.resolve`` picks this module
for every op while torch.onnx.export or torch.jit.trace traces (``exporting()``), whatever
backend was asked for, so a plain ``torch.onnx.export(model, args, dynamo=True)`` of a
patched model works. torch.export keeps the chosen backend's vtome:: ops. It is also
an ordinary backend (``backend="graph"``) with the contract of ``reference.py``.

What it computes, and how it stays exact where the contract promises it:

- Scores are a matrix product of integer-valued slices of the normalised metric
  (``similarity``): each unit vector is split into two slices of ``_slice_bits(d)`` bits,
  h = round(m·2^s) and l = round((m·2^s - h)·2^s); the products h_a·h_b and
  [h_a, l_a]·[l_b, h_b] are sums of integers below 2^24, so every GEMM (any blocking, any
  order of additions, FMA or not, TF32 inputs) returns them exactly, and a pair's score
  depends only on its two vectors. Identical tokens therefore tie exactly, in torch and in
  every ONNX runtime. A plain float GEMM does not promise that (torch's CPU bmm gives
  duplicated rows an ulp apart in about 1 case in 200, measured). The slices round each
  component to 2^-(2s+1) (s = 10 for d <= 64: 5e-7), so scores differ from the
  reference's by up to ~1e-5: on near-ties closer than that the two may choose differently.
- Row max and argmax: ``max(dim)`` (ONNX ReduceMax + ArgMax; the first maximal index wins,
  as both document). A class token is masked after the max (its row max set to -inf), a
  distillation token by leaving column 0 out of it: no pass over the score matrix.
- Ranking: a stable descending sort in torch graphs (``torch.sort(stable=True)``); in
  ONNX graphs, which have no sort, a TopK over all A tokens, whose ties go to the lower
  index as the ONNX operator documents (checked in onnxruntime by the tests).
- Merge: one gather of whole rows (ONNX Gather) for the output, and a scatter-add
  (ScatterElements with reduction "add") of each source's weighted difference to its
  destination: the size-weighted mean in float32, rows that receive nothing bit for bit.

NaN metrics are not handled like the reference (which maps a NaN row to the last column).
"""

from __future__ import annotations

import math
import sys
from typing import Optional, Tuple

import torch

from . import _checks, reference

NAME = "graph"

NORM_EPS = reference.NORM_EPS


def status() -> Tuple[bool, str]:
    """(available, why): plain PyTorch ops only."""
    return True, "plain vectorised aten ops, every device; chosen automatically while exporting"


def supports(device: torch.device) -> Optional[str]:
    """None: runs on every device."""
    return None


def exporting() -> bool:
    """True while torch.onnx.export (either exporter) or torch.jit.trace traces: graphs that
    cannot hold the vtome:: ops. (torch.export keeps them: they load after
    ``import vtome_kernels``; ``backend="graph"`` gives a program of plain aten ops.)"""
    return bool(torch.jit.is_tracing() or _onnx())


def _onnx() -> bool:
    """True while torch.onnx.export traces (torch.onnx is imported only by its users)."""
    onnx = sys.modules.get("torch.onnx")
    return bool(onnx is not None and onnx.is_in_onnx_export())


# --------------------------------------------------------------------------------------
# match
# --------------------------------------------------------------------------------------
def _slice_bits(d: int) -> int:
    """Bits s per slice such that every slice product sum stays below 2^24 (exact in
    float32): |h|_2 <= 2^s + sqrt(d)/2, |l|_2 <= 2^(s-1)·sqrt(d), so the concatenated
    product is at most ~2^(2s)·sqrt(d). Capped at 10 so slices are exact in TF32 too."""
    return max(1, min(10, int((23 - 0.5 * math.log2(max(d, 1))) // 2)))


def normalize(metric: torch.Tensor) -> torch.Tensor:
    """L2-normalise each token in float32 (a zero vector stays zero)."""
    m = metric.float()
    return m / torch.linalg.vector_norm(m, dim=-1, keepdim=True).clamp_min(NORM_EPS)


def similarity(metric: torch.Tensor) -> torch.Tensor:
    """Cosine scores [G, ceil(N/2), floor(N/2)] between set A (even) and set B (odd), each a
    function of its two vectors only (module docstring)."""
    m = normalize(metric)
    if _onnx():  # onnxruntime's GEMM computes every entry alike (tests check identical tokens)
        return m[:, ::2] @ m[:, 1::2].transpose(1, 2)
    s = _slice_bits(int(m.shape[-1]))
    scaled = m * float(2**s)
    hi = torch.round(scaled)  # integer-valued slices: m ≈ hi·2^-s + lo·2^-2s
    lo = torch.round((scaled - hi) * float(2**s))
    high = hi[:, ::2] @ hi[:, 1::2].transpose(1, 2)
    cross = torch.cat((hi, lo), dim=-1)[:, ::2] @ torch.cat((lo, hi), dim=-1)[:, 1::2].transpose(1, 2)
    return high * float(2.0 ** (-2 * s)) + cross * float(2.0 ** (-3 * s))


def _stable_desc(values: torch.Tensor) -> torch.Tensor:
    """Indices sorting values [G, M] descending, equal values in ascending index order.

    ONNX has no stable sort, but its TopK documents that ties go to the lower index; torch's
    topk does not promise that, so torch graphs keep the stable sort."""
    if _onnx():
        return values.topk(int(values.shape[-1]), dim=-1).indices
    return torch.sort(values, dim=-1, descending=True, stable=True).indices


def _ascending(idx: torch.Tensor) -> torch.Tensor:
    """Distinct indices [G, M] in ascending order."""
    m = int(idx.shape[-1])
    return idx if m < 2 else idx.topk(m, dim=-1, largest=False).values


@torch.no_grad()
def match(metric: torch.Tensor, r: int, class_token: bool, distill_token: bool):
    """(out_idx, src_idx, dst_pos, src_score) of metric [G, N, d], as reference.match."""
    return _rank(similarity(metric), int(r), bool(class_token), bool(distill_token))


@torch.no_grad()
def match_scores(scores: torch.Tensor, r: int, class_token: bool, distill_token: bool):
    """The matching from a score matrix [G, |A|, |B|], as reference.match_scores."""
    return _rank(scores.float(), int(r), bool(class_token), bool(distill_token))


def _max(scores: torch.Tensor):
    """Row max and the first maximal column (torch documents the first index)."""
    return scores.max(dim=-1)


def _top1(scores: torch.Tensor):
    """Row max and the first maximal column in ONNX: one TopK (ties to the lower index, as
    ONNX documents) reads the matrix once, ReduceMax + ArgMax twice."""
    val, idx = scores.topk(1, dim=-1)
    return val[..., 0], idx[..., 0]


def _best(scores: torch.Tensor, class_token: bool, distill_token: bool):
    """Row max and argmax [G, |A|] (first maximal column), protected tokens masked."""
    best = _top1 if _onnx() else _max
    if distill_token:  # nothing merges into the distillation token (B column 0)
        node_max, node_idx = best(scores[:, :, 1:])
        node_idx = node_idx + 1
    else:
        node_max, node_idx = best(scores)
    if class_token:  # the class token (A row 0) is never a source
        first = torch.arange(int(scores.shape[1]), device=scores.device) == 0
        node_max = torch.where(first, -math.inf, node_max)
    return node_max, node_idx


def _rank(scores: torch.Tensor, r: int, class_token: bool, distill_token: bool):
    node_max, node_idx = _best(scores, class_token, distill_token)
    order = _stable_desc(node_max)
    src_a, unm_a = order[:, :r], order[:, r:]
    if class_token:  # the unmerged tokens back in their original order
        unm_a = _ascending(unm_a)
    dst_b = node_idx.gather(1, src_a)
    src_score = node_max.gather(1, src_a)
    out_idx, dst_pos = reference._layout(unm_a, dst_b, int(scores.shape[2]), distill_token)
    return out_idx, 2 * src_a, dst_pos, src_score


# --------------------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------------------
def _rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[g, idx[g, i], :] for every g, i: one Gather of whole rows of the flattened t
    (ONNX GatherElements would read an index per element)."""
    g, n, c = t.shape[0], int(t.shape[1]), int(t.shape[2])
    offset = torch.arange(g, device=t.device)[:, None] * n
    return t.reshape(-1, c).index_select(0, (idx + offset).reshape(-1)).reshape(g, int(idx.shape[1]), c)


def merge(x, size, out_idx, src_idx, dst_pos, src_merged=None):
    """Merged (x [G, N', C], size [G, N', 1]) as reference.merge; differentiable in x, size.

    Every output row is gathered once from its base token; each source then adds
    (x_src - x_dst)·w_src / (total size of its destination) to its row, which sums to the
    size-weighted mean (x_dst·s_dst + Σ x_src·w_src) / (s_dst + Σ w_src). A row that
    receives nothing is the gathered row itself, bit for bit."""
    acc = reference.acc_dtype(x)
    c = int(x.shape[-1])
    xf, sf = x.to(acc), size.to(acc)
    base_x, base_s = _rows(xf, out_idx), _rows(sf, out_idx)
    w = _rows(sf, src_idx)
    if src_merged is not None:
        w = w * src_merged[..., None].to(acc)
    dst = dst_pos[..., None]
    tot_s = base_s.scatter_add(1, dst, w)
    dst_x = _rows(base_x, dst_pos)
    share = (_rows(xf, src_idx) - dst_x) * (w / tot_s.gather(1, dst))
    x_out = base_x.scatter_add(1, dst.expand(-1, -1, c), share)
    return x_out.to(x.dtype), tot_s.to(size.dtype)


def merge_fused(x, size, metric, r: int, class_token: bool, distill_token: bool):
    """match + merge (mode "merge"): (x [G, N - r, C], size [G, N - r, 1]); size None = ones."""
    if size is None:
        size = torch.ones(x.shape[:-1] + (1,), dtype=torch.float32, device=x.device)
    else:
        _checks.sizes("size", size)  # skipped while exporting: no value check in a graph
    out_idx, src_idx, dst_pos, _ = match(metric, r, class_token, distill_token)
    return merge(x, size, out_idx, src_idx, dst_pos)


# The source map, unmerge and attention are already plain gathers, scatters and SDPA.
merge_source = reference.merge_source
unmerge = reference.unmerge
prop_attention = reference.prop_attention


# --------------------------------------------------------------------------------------
# select
# --------------------------------------------------------------------------------------
def select_scores(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Change scores [B, T, L] as reference.select_scores, the sum over C in one reduction
    (identical frames still score exactly 0)."""
    t = int(x.shape[1])
    f = t // groups
    if f == 1:
        return x.new_zeros(x.shape[:3], dtype=torch.float32)
    xf = x.float()
    diff = xf[:, 1:] - xf[:, :-1]
    acc = (diff * diff).sum(-1)
    frame = torch.arange(t)
    pair = torch.where(frame % f == 0, frame, frame - 1).to(x.device)
    return acc[:, pair]


def select(x: torch.Tensor, k_per_group: int, groups: int):
    """(kept [B, groups·k, C], index [B, groups·k]) as reference.select; differentiable in x."""
    t, l, c = int(x.shape[1]), int(x.shape[2]), int(x.shape[3])
    n_group = (t // groups) * l
    per_group = select_scores(x, groups).reshape(-1, n_group)  # [B·groups, n_group]
    top = _stable_desc(per_group)[:, :k_per_group]
    top = _ascending(top).reshape(-1, groups, k_per_group)
    offset = torch.arange(groups, device=x.device)[:, None] * n_group
    index = (top + offset).reshape(-1, groups * k_per_group)
    kept = _rows(x.reshape(-1, t * l, c), index)
    return kept, index
