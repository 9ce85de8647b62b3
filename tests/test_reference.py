"""The reference backend against the loop oracle (tests/oracle.py), case by case."""

import pytest
import torch
from hypothesis import assume, given, settings

import vtome_kernels as vt
from cases import DTYPE_TOL, Case, cases, make, merge_cases, oracle_results
from oracle import Ambiguous, merge_source_group, unmerge_group


def _check(case: Case, mode="merge", threshold=None, generator_seed=None, allow_ambiguous=False,
           backend="reference"):
    x, size, metric = make(case)
    gen = scores = None
    if generator_seed is not None:
        gen = torch.Generator().manual_seed(generator_seed)
        g = x.reshape((-1,) + x.shape[-2:]).shape[0]
        scores = torch.rand(g, (case.n + 1) // 2, case.n // 2,
                            generator=torch.Generator().manual_seed(generator_seed))
    try:
        want = oracle_results(case, x, size, metric, mode, threshold, scores)
    except Ambiguous:
        if allow_ambiguous:
            assume(False)
        raise
    plan = vt.match(x if metric is None else metric, case.r, class_token=case.class_token,
                    distill_token=case.distill_token, mode=mode, threshold=threshold,
                    generator=gen, backend=backend)
    out_x, out_s = plan.merge(x, size)
    assert out_x.dtype == x.dtype and out_x.shape == case.lead + (case.n - plan.r, case.c)
    assert out_s.shape == case.lead + (case.n - plan.r, 1)
    atol, rtol = DTYPE_TOL[x.dtype]
    src_map = plan.merge_source()
    y_full = plan.unmerge(out_x)
    eye = [[float(i == j) for j in range(case.n)] for i in range(case.n)]

    def flat(t):  # [*lead, ...] -> [G, ...]
        return t.reshape((len(want),) + t.shape[len(case.lead):])

    for g, res in enumerate(want):
        assert flat(plan.src_idx)[g].tolist() == res.src
        assert flat(plan.dst_idx)[g].tolist() == res.dst
        assert flat(plan.unm_idx)[g].tolist() == res.unm
        assert flat(plan.merged)[g].tolist() == res.merged
        torch.testing.assert_close(flat(out_x)[g].double(), torch.tensor(res.x, dtype=torch.float64),
                                   atol=atol, rtol=rtol)
        assert flat(out_s)[g, :, 0].double().tolist() == res.size
        assert flat(src_map)[g].tolist() == merge_source_group(res, eye)
        assert flat(y_full)[g].double().tolist() == unmerge_group(res, flat(out_x)[g].double().tolist())
    return plan


@pytest.mark.parametrize("case", merge_cases(), ids=str)
def test_reference_matches_oracle(case):
    _check(case)


@pytest.mark.parametrize("case", merge_cases()[::3], ids=str)
@pytest.mark.parametrize("mode", ["drop", "random_merge", "random_drop"])
def test_reference_modes_match_oracle(case, mode):
    _check(case, mode=mode, generator_seed=case.seed if mode.startswith("random") else None)


@pytest.mark.parametrize("case", merge_cases()[1::4], ids=str)
def test_reference_hybrid_matches_oracle(case):
    x, _, metric = make(case)
    plan = vt.match(x if metric is None else metric, case.r, class_token=case.class_token,
                    distill_token=case.distill_token)
    scores = plan.src_score[torch.isfinite(plan.src_score)].unique()  # sorted, distinct
    half = scores.numel() // 2  # a threshold between two scores, so no score sits on it
    threshold = float(scores[half - 1 : half + 1].mean()) if scores.numel() >= 2 else 0.0
    plan = _check(case, mode="hybrid", threshold=threshold)
    if plan.r >= 2 and scores.numel() >= 2:
        kept = plan.dst_kept
        assert plan.merged.all(), "in hybrid mode every source merges"
        assert kept.any() and not kept.all(), "threshold at the median should split"


@settings(max_examples=250)
@given(cases())
def test_reference_matches_oracle_sweep(case):
    _check(case, allow_ambiguous=True)


def test_exact_duplicates_break_ties_by_position():
    """Identical static patches: every A row ties, so the lowest positions become sources
    and each goes to the lowest-index B token among equals."""
    x = torch.zeros(1, 12, 4)
    x[..., 0] = 1.0  # every token identical: all scores equal
    plan = vt.match(x, 3)
    assert plan.src_idx.tolist() == [[0, 2, 4]]
    assert plan.dst_idx.tolist() == [[1, 1, 1]]
    assert plan.unm_idx.tolist() == [[6, 8, 10]]
    plan = vt.match(x, 3, class_token=True)
    assert plan.src_idx.tolist() == [[2, 4, 6]] and plan.unm_idx.tolist() == [[0, 8, 10]]
