"""Slow, obviously-correct loop oracles: merging (ALGORITHM.md section 1, one matching
group) and selection (section 5, ``select``).

It shares no code with vtome_kernels.reference: plain Python loops, float64 arithmetic,
lists of member positions. Scores are compared in float64, so it cannot reproduce the
reference's float32 rounding; it knows which comparisons are exact instead:
- two scores are *exactly* tied when they come from bitwise-identical vector pairs (the
  same A vector against the same B vector), or are both -inf (masked);
- any other pair of scores closer than AMBIGUOUS is a near-tie that float32 rounding may
  order either way: the oracle raises Ambiguous and the caller discards that input.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

AMBIGUOUS = 1e-6  # ten times float32 rounding of a cosine, far below random gaps
SELECT_AMBIGUOUS = 1e-5  # relative gap of two change scores at the keep boundary


class Ambiguous(Exception):
    """The input has a near-tie that float32 rounding may decide either way."""


class Result:
    """The oracle's answer for one group: members of every output token, in output order."""

    def __init__(self, groups, src, dst, unm, merged, x, size, n, members=None):
        self.groups = groups  # list of lists of input positions, base token first
        self.src, self.dst, self.unm, self.merged = src, dst, unm, merged
        self.x, self.size, self.n = x, size, n
        # What each output token is made of: its group, less a base token whose own
        # content is dropped (hybrid).
        self.members = groups if members is None else members


def _unit(v: Sequence[float]) -> List[float]:
    norm = math.sqrt(sum(a * a for a in v))
    return [a / norm for a in v] if norm > 1e-12 else [0.0 for _ in v]


def _cmp_key(rows, i, j):
    """Identity of the score (A token i, B token j): the pair of vectors as tuples."""
    return (tuple(rows[i]), tuple(rows[j]))


def match_group(
    metric: Sequence[Sequence[float]],
    r: int,
    class_token: bool = False,
    distill_token: bool = False,
    scores: Optional[Sequence[Sequence[float]]] = None,
):
    """(src, dst, unm, best) positions for one group; scores (|A| x |B|) replaces cosines."""
    n = len(metric) if scores is None else len(scores) + len(scores[0])
    protected = int(class_token) + int(distill_token)
    r = min(r, (n - protected) // 2)
    a_pos = list(range(0, n, 2))
    b_pos = list(range(1, n, 2))
    if r <= 0:  # nothing merges: every token stays where it is
        return [], [], a_pos, [], r
    unit = [_unit(v) for v in metric] if scores is None else None

    def score(ia, jb):
        if class_token and ia == 0:
            return -math.inf
        if distill_token and jb == 0:
            return -math.inf
        if scores is not None:
            return float(scores[ia][jb])
        return sum(p * q for p, q in zip(unit[a_pos[ia]], unit[b_pos[jb]]))

    def identity(ia, jb):
        if score(ia, jb) == -math.inf:
            return "masked"
        if scores is not None:
            return ("value", float(scores[ia][jb]))
        return _cmp_key(metric, a_pos[ia], b_pos[jb])

    def check_gap(s1, id1, s2, id2):
        if id1 == id2 or (s1 == s2 == -math.inf):
            return
        if scores is None and abs(s1 - s2) < AMBIGUOUS:
            raise Ambiguous(f"near-tie {s1!r} vs {s2!r}")

    # Row max and argmax; the lowest B index wins exact ties.
    best = []
    for ia in range(len(a_pos)):
        bj, bs = 0, score(ia, 0)
        for jb in range(1, len(b_pos)):
            s = score(ia, jb)
            check_gap(s, identity(ia, jb), bs, identity(ia, bj))
            if s > bs:
                bj, bs = jb, s
        best.append((bs, bj))

    # Rank A tokens by descending best score; exact ties keep ascending order.
    order = list(range(len(a_pos)))
    for i1 in order:
        for i2 in order:
            if i1 < i2:
                check_gap(best[i1][0], identity(i1, best[i1][1]), best[i2][0], identity(i2, best[i2][1]))
    order.sort(key=lambda ia: -best[ia][0] if best[ia][0] != -math.inf else math.inf)
    src = order[:r]
    unm = order[r:]
    if class_token:
        unm = sorted(unm)
    return (
        [a_pos[i] for i in src],
        [b_pos[best[i][1]] for i in src],
        [a_pos[i] for i in unm],
        [best[i][0] for i in src],
        r,
    )


def merge_group(
    x: Sequence[Sequence[float]],
    size: Sequence[float],
    metric: Sequence[Sequence[float]],
    r: int,
    class_token: bool = False,
    distill_token: bool = False,
    mode: str = "merge",
    threshold: Optional[float] = None,
    scores=None,
) -> Result:
    """Match one group and merge x (list of rows) and size (list of floats)."""
    n = len(x)
    src, dst, unm, src_best, r = match_group(metric, r, class_token, distill_token, scores)
    if r <= 0:
        groups = [[p] for p in range(n)]
        return Result(groups, [], [], unm, [], [list(map(float, row)) for row in x], list(size), n)
    dropped_bases = set()
    if mode in ("drop", "random_drop"):
        merged = [False] * len(src)
    else:
        merged = [True] * len(src)
    if mode == "hybrid":  # every source merges; a destination with any source under the
        # threshold loses its own content (the video paper's code)
        dropped_bases = {d for d, s in zip(dst, src_best) if not s >= threshold}
    b_tokens = list(range(1, n, 2))
    if distill_token:
        order = [unm[0], b_tokens[0]] + unm[1:] + b_tokens[1:]
    else:
        order = unm + b_tokens
    groups, kept = [], []
    for base in order:
        members = [base]
        for s, d, m in zip(src, dst, merged):
            if d == base and m:
                members.append(s)
        groups.append(members)
        kept.append(members[1:] if base in dropped_bases else members)
    out_x, out_s = [], []
    for members in kept:
        tot = sum(float(size[p]) for p in members)
        row = [sum(float(x[p][c]) * float(size[p]) for p in members) / tot for c in range(len(x[0]))]
        if len(members) == 1:
            row = [float(v) for v in x[members[0]]]
        out_x.append(row)
        out_s.append(1.0 if mode in ("drop", "random_drop") else tot)
    return Result(groups, src, dst, unm, merged, out_x, out_s, n, kept)


def merge_source_group(result: Result, source: Sequence[Sequence[float]]) -> List[List[float]]:
    """Union (max) of the source rows of every output token's members."""
    return [[max(float(source[p][c]) for p in g) for c in range(len(source[0]))] for g in result.members]


def unmerge_group(result: Result, y: Sequence[Sequence[float]]) -> List[List[float]]:
    """Every input position gets the row of the output token it belongs to (sources:
    their destination's, merged or discarded)."""
    where = {}
    for o, g in enumerate(result.groups):
        where[g[0]] = o
    for s, d in zip(result.src, result.dst):
        where[s] = where[d]
    return [list(map(float, y[where[p]])) for p in range(result.n)]


# --------------------------------------------------------------------------------------
# selection (FluxViT): plain loops over float64 numbers, sharing no code with vtome_kernels.
# Its scores are exact (float64 squares of float32-exact differences summed in float64)
# while the backends round in float32, so it knows which comparisons are exact instead:
# equal scores from bitwise-identical vector pairs (or two zero changes) tie exactly
# everywhere; two other scores closer than SELECT_AMBIGUOUS at the keep boundary are a
# near-tie that float32 may order either way, and the oracle refuses such an input.
# --------------------------------------------------------------------------------------
def select_groups(t: int, groups) -> int:
    """The group count of ``groups`` ("auto": the largest of 4, 2, 1 leaving >= 2 frames)."""
    if groups != "auto":
        return groups
    for g in (4, 2, 1):
        if t % g == 0 and t // g >= 2:
            return g
    return 1


def select(x, budget: int, groups="auto"):
    """(kept rows as lists of floats, index lists) per clip of x [B, T, L, C], by loops."""
    b_, t_, l_, c_ = x.shape
    g_ = select_groups(t_, groups)
    f_ = t_ // g_
    xs = x.double().tolist()
    if budget >= t_ * l_:
        k = t_ * l_
    else:
        k = budget - budget % g_
    per = k // g_
    out_idx, out_rows = [], []
    for b in range(b_):
        chosen = []
        for g in range(g_):
            items = []  # (score, position, identity of the scored pair)
            for fr in range(g * f_, (g + 1) * f_):
                for l in range(l_):
                    if f_ == 1:
                        score, ident = 0.0, "zero"
                    else:
                        cur = fr + 1 if fr == g * f_ else fr
                        a, p = xs[b][cur][l], xs[b][cur - 1][l]
                        score = sum((u - v) ** 2 for u, v in zip(a, p))
                        ident = "zero" if a == p else (tuple(a), tuple(p))
                    items.append((score, fr * l_ + l, ident))
            ranked = sorted(items, key=lambda it: (-it[0], it[1]))
            if per < len(ranked):
                (s1, _, i1), (s2, _, i2) = ranked[per - 1], ranked[per]
                if i1 != i2 and abs(s1 - s2) <= SELECT_AMBIGUOUS * max(s1, s2, 1e-30):
                    raise Ambiguous(f"near-tie {s1} vs {s2} at the keep boundary")
            chosen.extend(sorted(pos for _, pos, _ in ranked[:per]))
        out_idx.append(chosen)
        flat = [row for frame in xs[b] for row in frame]
        out_rows.append([flat[i] for i in chosen])
    return out_rows, out_idx
