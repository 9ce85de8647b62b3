"""Shared test cases: every backend is checked on these same inputs.

Merging: a Case describes one random input (shape, flags, dtype, sizes, duplicated
tokens, memory layout); ``make`` builds it reproducibly from its seed; ``merge_cases()``
is the fixed list the parametrised tests run, ``cases()`` the hypothesis strategy for the
broad sweep. Selection: ``make_clip`` builds a clip x [B, T, L, C] (static patches, frozen
clips), ``SELECT_CASES`` / ``select_cases()`` the fixed (shape, groups, budget) list and
``check_select`` compares a result with the loop oracle.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
from hypothesis import strategies as st

import oracle

DTYPE_TOL = {  # (atol, rtol) of a merged x against float64 math
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 1e-2),
    torch.float16: (2e-3, 1e-3),
}


@dataclasses.dataclass(frozen=True)
class Case:
    lead: Tuple[int, ...]  # (B,) spatio-temporal or (B, T) divided space-time
    n: int
    r: int
    c: int = 6
    d: int = 5
    class_token: bool = False
    distill_token: bool = False
    dtype: torch.dtype = torch.float32
    sizes: str = "none"  # "none" (None passed), "ones", "random" (integers 1..5)
    dups: int = 0  # tokens overwritten by a copy of another of the same set (exact ties)
    cross_dups: int = 0  # A tokens overwritten by a copy of a B token
    own_metric: bool = False  # metric=None: x is matched on itself
    contiguous: bool = True
    seed: int = 0

    def __str__(self) -> str:  # readable pytest ids
        flags = "".join(
            f for f, on in (("c", self.class_token), ("d", self.distill_token),
                            ("x", self.own_metric), ("t", not self.contiguous)) if on
        )
        dt = str(self.dtype).replace("torch.", "")
        return (f"{'x'.join(map(str, self.lead))}-n{self.n}-r{self.r}-{flags or '_'}-{dt}"
                f"-{self.sizes}-dup{self.dups}.{self.cross_dups}-s{self.seed}")


def _rand(shape, gen, contiguous: bool) -> torch.Tensor:
    if contiguous or len(shape) < 2:
        return torch.randn(shape, generator=gen, dtype=torch.float64)
    flipped = shape[:-2] + (shape[-1], shape[-2])
    return torch.randn(flipped, generator=gen, dtype=torch.float64).transpose(-1, -2)


def make(case: Case):
    """(x, size or None, metric or None) for a case, reproducible from case.seed."""
    gen = torch.Generator().manual_seed(case.seed)
    n = case.n
    x = _rand(case.lead + (n, case.c), gen, case.contiguous)
    metric = x if case.own_metric else _rand(case.lead + (n, case.d), gen, case.contiguous)
    metric = metric.clone()  # keeps a non-contiguous layout (preserve_format)
    for _ in range(case.dups):  # copy a token onto another of the same parity: exact ties
        if n < 3:
            break
        i, j = torch.randint(0, n, (2,), generator=gen).tolist()
        if (i - j) % 2:
            j = j - 1 if j > 0 else j + 1
        metric[..., j, :] = metric[..., i, :]
    for _ in range(case.cross_dups):  # an A token equal to a B token
        if n < 2:
            break
        i = int(torch.randint(0, n // 2, (1,), generator=gen)) * 2 + 1
        j = int(torch.randint(0, (n + 1) // 2, (1,), generator=gen)) * 2
        metric[..., j, :] = metric[..., i, :]
    if case.own_metric:
        x = metric
    size = None
    if case.sizes == "ones":
        size = torch.ones(case.lead + (n, 1), dtype=torch.float64)
    elif case.sizes == "random":
        size = torch.randint(1, 6, case.lead + (n, 1), generator=gen).double()
    x = x.to(case.dtype)
    metric = None if case.own_metric else metric.to(case.dtype)
    if size is not None:
        size = size.to(torch.float32 if case.dtype == torch.float64 else case.dtype)
    return x, size, metric


def groups(t: Optional[torch.Tensor], lead) -> list:
    """Split [*lead, N, C] into a list of G nested lists of float (None -> list of None)."""
    g = 1
    for v in lead:
        g *= v
    if t is None:
        return [None] * g
    return t.double().reshape(g, t.shape[-2], t.shape[-1]).tolist()


def oracle_results(case: Case, x, size, metric, mode="merge", threshold=None, scores=None):
    """The oracle's Result for every group (raises oracle.Ambiguous on a near-tie)."""
    xs = groups(x, case.lead)
    ms = groups(x if metric is None else metric, case.lead)
    ss = groups(size, case.lead)
    sc = [None] * len(xs) if scores is None else scores.double().tolist()
    out = []
    for gx, gm, gs, gsc in zip(xs, ms, ss, sc):
        sizes = [1.0] * case.n if gs is None else [row[0] for row in gs]
        out.append(oracle.merge_group(gx, sizes, gm, case.r, case.class_token, case.distill_token,
                                      mode, threshold, gsc))
    return out


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def assert_same_plan(plan, expected) -> None:
    """Two MergePlans chose the same matching (indices exactly, scores closely)."""
    assert plan.r == expected.r and plan.n == expected.n
    for field in ("out_idx", "src_idx", "dst_idx", "unm_idx", "merged"):
        got, want = getattr(plan, field), getattr(expected, field)
        assert torch.equal(got.cpu(), want.cpu()), f"{field} differs:\n{got}\nvs\n{want}"
    torch.testing.assert_close(plan.src_score.cpu(), expected.src_score.cpu(), atol=1e-5, rtol=1e-5)


def assert_identical_plan(plan, expected) -> None:
    """The same matching and bit-identical float32 scores: what every backend's exact
    matching must give against the reference's. A NaN score must be NaN in the same place;
    its sign and payload are not specified (a GPU writes the canonical NaN, x86 a negative one)."""
    score, ref = plan.src_score, expected.src_score
    nan = ref.isnan()
    assert torch.equal(score.isnan(), nan), f"{score}\nvs\n{ref}"
    assert torch.equal(score.masked_fill(nan, 0).view(torch.int32),
                       ref.masked_fill(nan, 0).view(torch.int32)), f"{score}\nvs\n{ref}"
    if not score.isnan().any():
        assert_same_plan(plan, expected)
    for field in ("out_idx", "src_idx", "dst_idx", "unm_idx", "merged"):
        assert torch.equal(getattr(plan, field), getattr(expected, field)), field


def merge_cases():
    """The fixed cases every backend runs: the foundation's list of what must hold."""
    out = []
    seed = 0
    for lead, n, r in [((2,), 16, 4), ((3,), 17, 5), ((1,), 33, 100), ((2,), 9, 0),
                       ((2, 3), 14, 3), ((1, 4), 15, 7), ((4,), 2, 1), ((2,), 1, 1),
                       ((2,), 64, 20), ((1,), 3, 1)]:
        for class_token, distill_token in [(False, False), (True, False), (True, True)]:
            for dtype in (torch.float32, torch.bfloat16):
                seed += 1
                out.append(Case(lead, n, r, class_token=class_token, distill_token=distill_token,
                                dtype=dtype, sizes=("none", "ones", "random")[seed % 3],
                                dups=seed % 4, own_metric=seed % 5 == 0,
                                contiguous=seed % 3 != 0, seed=seed))
    out.append(Case((2,), 20, 6, dtype=torch.float16, sizes="random", dups=3, seed=101))
    out.append(Case((2, 2), 21, 6, class_token=True, dtype=torch.float16, seed=102))
    out.append(Case((3,), 24, 8, dups=12, sizes="random", seed=103))  # many exact ties
    out.append(Case((3,), 24, 8, cross_dups=1, seed=104))
    return out


@st.composite
def cases(draw, dtypes=(torch.float32, torch.bfloat16, torch.float16), max_n=40):
    """Hypothesis strategy over Cases (values come from the case's seed)."""
    lead = draw(st.sampled_from([(1,), (2,), (3,), (1, 2), (2, 3)]))
    n = draw(st.integers(1, max_n))
    class_token = draw(st.booleans())
    distill_token = class_token and draw(st.booleans())
    return Case(
        lead=lead,
        n=n,
        r=draw(st.integers(0, n)),
        c=draw(st.integers(1, 9)),
        d=draw(st.integers(2, 12)),  # d = 1: every cosine is exactly +-1
        class_token=class_token,
        distill_token=distill_token,
        dtype=draw(st.sampled_from(dtypes)),
        sizes=draw(st.sampled_from(["none", "ones", "random"])),
        dups=draw(st.integers(0, 6)),
        cross_dups=draw(st.integers(0, 1)),
        own_metric=draw(st.booleans()),
        contiguous=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# --------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------
def make_clip(shape, seed=0, dtype=torch.float32, static=0.0, dup_frames=False):
    """Random x [B, T, L, C]; ``static`` of the patches never change (score 0: exact ties);
    dup_frames: every frame a copy of frame 0 (every score 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if dup_frames:
        x = x[:, :1].expand(shape).clone()
    elif static:
        still = torch.rand(shape[0], 1, shape[2], 1, generator=g) < static
        x = torch.where(still, x[:, :1], x)
    return x.to(dtype)


SELECT_CASES = [
    # (shape [B, T, L, C], groups, budgets)
    ((2, 8, 6, 5), "auto", (4, 5, 7, 20, 47, 48, 100)),  # G = 4
    ((2, 6, 7, 4), "auto", (2, 5, 13, 41, 42)),  # G = 2, odd L
    ((1, 7, 5, 3), "auto", (1, 6, 34, 35)),  # T odd: G = 1
    ((2, 4, 4, 6), "auto", (2, 3, 9, 16)),  # T = 4: G = 2 (4 would leave 1 frame)
    ((2, 2, 3, 4), "auto", (1, 5, 6)),  # G = 1
    ((2, 1, 9, 3), "auto", (1, 4, 9, 10)),  # one frame: scores 0, first patches kept
    ((1, 8, 5, 3), 8, (8, 16, 39, 40)),  # explicit, one frame a group
    ((2, 8, 5, 3), 2, (2, 17, 40)),
    ((1, 6, 5, 7), 3, (3, 10, 29)),
    ((1, 12, 3, 4), 6, (6, 18, 35)),
    ((2, 9, 4, 5), 3, (3, 11, 35)),
    ((1, 16, 9, 3), "auto", (4, 40, 143)),  # a group of 36 patches, C below the unroll
    ((1, 4, 18, 32), "auto", (6, 31, 71)),  # full 16-patch tiles of the C++ kernel
]


def select_cases():
    """(shape, groups, budget) for every budget of SELECT_CASES."""
    return [(shape, groups, budget) for shape, groups, budgets in SELECT_CASES for budget in budgets]


def check_select(kept, index, x, budget, groups="auto"):
    """The loop oracle's positions, and exactly x's rows at them (raises oracle.Ambiguous)."""
    rows, idx = oracle.select(x, budget, groups)
    assert index.dtype == torch.int64
    assert index.tolist() == idx
    assert kept.dtype == x.dtype and kept.shape == (x.shape[0], len(idx[0]), x.shape[-1])
    assert kept.double().tolist() == rows
