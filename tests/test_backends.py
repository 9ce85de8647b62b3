"""Every backend against the reference, op by op, over the shared cases (tests/cases.py).

One suite for every runnable backend: "reference" (where a check is not a comparison
with itself), "cpp" (skipped where the extension is not built) and "triton" (its kernels
in Triton's CPU interpreter: the ``triton_interpret`` fixture lends them the ops' CPU
dispatch key). Matching choices must be the reference's bit for bit (indices and float32
scores); merged values within the dtype tolerances; every vtome:: op passes
torch.library.opcheck; the merge, unmerge and selection gradients pass gradcheck. The
reference itself is judged by the loop oracles (test_reference.py, test_select.py).
The interpreter is slow, so the Triton backend runs the non-"merge" modes on a quarter
of the cases and smaller sweeps; backend-specific checks (SIMD kernels, launch counts,
tile shapes) live in test_cpp.py and test_triton.py.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings

import vtome_kernels as vt
from cases import (DTYPE_TOL, Case, assert_identical_plan, cases, check_select, make, make_clip,
                   merge_cases, select_cases)
from vtome_kernels import cpp, reference
from vtome_kernels.backends import resolve

BACKENDS = ("reference", "cpp", "triton", "graph")
KERNELS = ("cpp", "triton")  # the backends that run the vtome:: ops
MODES = ("merge", "drop", "hybrid", "random_merge", "random_drop")


@pytest.fixture(autouse=True)
def _runnable_backend(request):
    """Make the test's ``backend`` parameter runnable: Triton in its interpreter, the C++
    backend only where the extension is built."""
    callspec = getattr(request.node, "callspec", None)
    name = callspec.params.get("backend") if callspec is not None else None
    if name == "triton":
        request.getfixturevalue("triton_interpret")
    elif name == "cpp" and not cpp.status()[0]:
        pytest.skip(cpp.status()[1])


def _every(backend: str, case: Case, share: int) -> bool:
    """True for every case, or in the slow interpreter for one case in ``share``."""
    return backend != "triton" or case.seed % share == 0


def _runs(backend: str, case: Case, mode: str) -> bool:
    """Which (case, mode) pairs a backend runs: the interpreter runs mode "merge" on every
    case, "drop" and "hybrid" (the src_merged paths) on a sixteenth of them; the random
    modes match with the reference and merge like "merge" / "drop", so it leaves them out."""
    if backend != "triton" or mode == "merge":
        return True
    return mode in ("drop", "hybrid") and case.seed % 16 == 0


# ======================================================================================
# match, merge, merge_source, unmerge, merge_fused
# ======================================================================================
def _plans(case: Case, backend: str, mode="merge"):
    x, size, metric = make(case)
    m = x if metric is None else metric
    kw = dict(class_token=case.class_token, distill_token=case.distill_token, mode=mode,
              threshold=0.3 if mode == "hybrid" else None)

    def gen():
        return torch.Generator().manual_seed(case.seed) if mode.startswith("random") else None

    return (x, size, vt.match(m, case.r, backend=backend, generator=gen(), **kw),
            vt.match(m, case.r, backend="reference", generator=gen(), **kw))


def _same_results(x, size, plan, want, full=True):
    """plan and want (the reference's) agree on the merge and, if ``full``, on every other
    application of the matching."""
    assert_identical_plan(plan, want)
    got_x, got_s = plan.merge(x, size)
    ref_x, ref_s = want.merge(x, size)
    atol, rtol = DTYPE_TOL[x.dtype]
    assert got_x.dtype == ref_x.dtype and got_s.dtype == ref_s.dtype
    torch.testing.assert_close(got_x, ref_x, atol=atol, rtol=rtol)
    assert torch.equal(got_s, ref_s)
    if not full:
        return got_x, got_s
    # rows that receive nothing are copied bit for bit
    flat_idx = plan.out_idx.reshape(-1, plan.n_out)
    dst = plan._dst_pos
    merged = plan.merged.reshape(dst.shape).long()
    received = torch.zeros(flat_idx.shape, dtype=torch.long).scatter_add_(1, dst, merged) > 0
    base = x.reshape(-1, plan.n, x.shape[-1]).gather(1, flat_idx[..., None].expand(-1, -1, x.shape[-1]))
    assert torch.equal(got_x.reshape(base.shape)[~received], base[~received])
    assert torch.equal(plan.merge_source(), want.merge_source())
    src_bool = torch.eye(plan.n, dtype=torch.bool).expand(plan.lead + (plan.n, plan.n))
    assert torch.equal(plan.merge_source(src_bool), want.merge_source(src_bool))
    assert torch.equal(plan.unmerge(got_x), want.unmerge(got_x))
    return got_x, got_s


@pytest.mark.parametrize("backend,case,mode", [
    pytest.param(b, c, m, id=f"{b}-{m}-{c}")
    for b in KERNELS for m in MODES for c in merge_cases() if _runs(b, c, m)])
def test_same_as_reference(backend, case, mode):
    """Plan, merge, merge_source and unmerge equal the reference's (the interpreter checks
    merge_source and unmerge on a quarter of the cases); in mode "merge" the fused stage of
    vt.merge equals the plan path bit for bit (the interpreter: a sixteenth)."""
    x, size, plan, want = _plans(case, backend, mode)
    got = _same_results(x, size, plan, want, full=_every(backend, case, 4))
    if mode == "merge" and _every(backend, case, 16):
        _, _, metric = make(case)
        fused = vt.merge(x, size, case.r, metric=metric, class_token=case.class_token,
                         distill_token=case.distill_token, backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(fused, got))


@pytest.mark.parametrize("backend", KERNELS)
def test_sweep_same_as_reference(backend):
    """A hypothesis sweep of the shared cases (fewer and smaller in the interpreter)."""
    examples, max_n = (12, 24) if backend == "triton" else (120, 40)

    @settings(max_examples=examples)
    @given(cases(dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64), max_n=max_n))
    def run(case):
        x, size, plan, want = _plans(case, backend)
        _same_results(x, size, plan, want, full=backend != "triton")

    run()


@pytest.mark.parametrize("backend,dtype", [
    (b, d) for b in KERNELS for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    if b != "triton" or d == torch.float64])  # the interpreter: the dtype merge_cases() lacks
def test_dtypes_and_mixed_size_dtype(backend, dtype):
    case = Case((2, 3), 31, 9, c=13, d=7, class_token=True, dtype=dtype, sizes="random", dups=3, seed=7)
    x, size, plan, want = _plans(case, backend)
    _same_results(x, size, plan, want, full=backend != "triton")
    y, s = plan.merge(x)  # size None: float32 sizes whatever x's dtype
    torch.testing.assert_close((y, s), want.merge(x), atol=DTYPE_TOL[dtype][0], rtol=DTYPE_TOL[dtype][1])
    assert s.dtype == torch.float32


@pytest.mark.parametrize("backend", KERNELS)
def test_nan_and_zero_metric(backend):
    g = torch.Generator().manual_seed(2)
    for cls in (False, True):
        metric = torch.randn(3, 21, 6, generator=g)
        metric[0, 4] = float("nan")  # an A token: its row max is NaN (ranked first)
        metric[1, 7] = 0.0  # a zero vector normalises to zero, not NaN
        metric[1, 8] = float("inf")  # inf/inf: a negative NaN on x86
        metric[2, 5] = float("nan")  # a B token: every row's max is NaN, argmax the last B
        assert_identical_plan(vt.match(metric, 6, class_token=cls, backend=backend),
                   vt.match(metric, 6, class_token=cls, backend="reference"))


@pytest.mark.parametrize("backend", KERNELS)
def test_non_contiguous_and_strided_rows(backend):
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(3, 40, 20, generator=g)
    x, metric = wide[:, :, 2:12], wide[:, :, 12:19]  # last dim contiguous, row stride 20
    size = torch.randint(1, 4, (3, 40, 1), generator=g).float()
    for xx, mm in ((x, metric), (x.transpose(0, 1).contiguous().transpose(0, 1), metric.mT.contiguous().mT)):
        plan, want = vt.match(mm, 11, backend=backend), vt.match(mm, 11, backend="reference")
        _same_results(xx, size, plan, want, full=backend != "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_tokens_break_ties_by_position(backend):
    x = torch.zeros(1, 12, 4)
    x[..., 0] = 1.0  # every token identical: all scores equal
    plan = vt.match(x, 3, backend=backend)
    assert plan.src_idx.tolist() == [[0, 2, 4]] and plan.dst_idx.tolist() == [[1, 1, 1]]
    assert plan.unm_idx.tolist() == [[6, 8, 10]]
    plan = vt.match(x, 3, class_token=True, backend=backend)
    assert plan.src_idx.tolist() == [[2, 4, 6]] and plan.unm_idx.tolist() == [[0, 8, 10]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x, m = torch.randn(0, 10, 4), torch.randn(0, 10, 3)
    y, s = vt.merge(x, None, 3, metric=m, backend=backend)
    assert y.shape == (0, 7, 4) and s.shape == (0, 7, 1)
    plan = vt.match(m, 3, backend=backend)
    assert plan.merge_source().shape == (0, 7, 10) and plan.unmerge(y).shape == (0, 10, 4)
    frames = torch.randn(2, 0, 10, 4)
    assert vt.merge(frames, None, 3, backend=backend)[0].shape == (2, 0, 7, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_errors(backend):
    x = torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match="x must be 3-D or 4-D"):
        vt.merge(x[0], None, 1, backend=backend)
    with pytest.raises(TypeError, match="x must have dtype"):
        vt.merge(x.long(), None, 1, backend=backend)
    for bad in (torch.zeros(2, 10, 1), torch.full((2, 10, 1), float("nan"))):
        with pytest.raises(ValueError, match="size must be positive"):
            vt.merge(x, bad, 1, backend=backend)
    if backend not in ("reference", "graph"):  # those two run on every device
        with pytest.raises(vt.BackendUnavailableError, match="cannot run on meta"):
            vt.merge(x.to("meta"), None, 1, backend=backend)


# -- gradients ---------------------------------------------------------------------------
def _gradcheck(backend, fn, inputs):
    """torch.autograd.gradcheck; in the interpreter its fast mode (a random projection of
    the Jacobian: two evaluations instead of one per input element)."""
    return torch.autograd.gradcheck(fn, inputs, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend,mode,lead,cls", [
    (b, m, lead, cls) for b in KERNELS for m in ("merge", "hybrid", "drop")
    for lead, cls in (((2,), False), ((1, 2), True))
    # the interpreter: each mode once ("drop" is "hybrid" with every source discarded)
    if b != "triton" or (m, cls) in (("merge", False), ("hybrid", True))])
def test_gradcheck_float64(backend, mode, lead, cls):
    """merge (in x and size) and unmerge (in y) of a plan."""
    g = torch.Generator().manual_seed(4)
    n = 11
    x = torch.randn(lead + (n, 3), generator=g, dtype=torch.float64, requires_grad=True)
    size = torch.randint(1, 4, lead + (n, 1), generator=g).double().requires_grad_()
    metric = torch.randn(lead + (n, 4), generator=g, dtype=torch.float64)
    threshold = 0.2 if mode == "hybrid" else None
    plan = vt.match(metric, 4, class_token=cls, mode=mode, threshold=threshold, backend=backend)
    assert _gradcheck(backend, lambda x, s: plan.merge(x, s), (x, size))
    y = torch.randn(lead + (n - 4, 3), generator=g, dtype=torch.float64, requires_grad=True)
    assert _gradcheck(backend, plan.unmerge, (y,))


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_reference(backend, dtype):
    """Gradients of x and size through merge (hybrid: some sources discarded) and unmerge."""
    case = Case((2,), 30, 10, c=7, class_token=True, dtype=dtype, sizes="random", dups=2, seed=9)
    x, size, plan, want = _plans(case, backend, "hybrid")
    grads = []
    for p in (plan, want):
        xl, sl = x.clone().requires_grad_(), size.clone().requires_grad_()
        y, s = p.merge(xl, sl)
        full = p.unmerge(y)
        w = torch.arange(full.numel()).reshape(full.shape).sin().to(dtype)
        loss = (full.float() * w.float()).sum() + (s.float() * torch.arange(s.shape[1])[:, None]).sum()
        grads.append(torch.autograd.grad(loss, (xl, sl)))
    atol, rtol = DTYPE_TOL[dtype]
    torch.testing.assert_close(grads[0], grads[1], atol=4 * atol, rtol=4 * rtol)


@pytest.mark.parametrize("backend", ("reference", "cpp"))
def test_fused_stage_gradients_and_errors(backend):
    """vt.merge (the fused stage): gradcheck in x and size, none to the metric. (The
    interpreter skips it: the fused op's backward is merge_backward, gradchecked above.)"""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 2, 10, 3, generator=g, dtype=torch.float64, requires_grad=True)
    size = torch.randint(1, 4, (1, 2, 10, 1), generator=g).double().requires_grad_()
    metric = torch.randn(1, 2, 10, 5, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda x, s: vt.merge(x, s, 3, metric=metric, class_token=True, backend=backend)  # noqa: E731
    assert _gradcheck(backend, fn, (x, size))
    assert _gradcheck(backend, lambda x: vt.merge(x, None, 3, metric=metric, backend=backend), (x,))
    y, _ = fn(x, size)
    y.sum().backward()
    assert metric.grad is None
    with pytest.raises(ValueError, match="size must be positive everywhere, got min -1"):
        vt.merge(x.detach(), size.detach() - 2, 3, backend=backend)
    xs, ss = x.detach()[0], size.detach()[0]
    out = vt.merge(xs, ss, 3, backend=backend)  # 3-D: no reshapes, same result as the plan path
    assert all(torch.equal(a, b) for a, b in zip(out, vt.match(xs, 3, backend=backend).merge(xs, ss)))


# -- opcheck and torch.compile -----------------------------------------------------------
def _opcheck_cases():
    """(name, op, args) for every vtome:: op; the indices come from the reference."""
    g = torch.Generator().manual_seed(6)
    ops = torch.ops.vtome
    metric = torch.randn(2, 15, 4, generator=g)
    out_idx, src_idx, dst_pos, _ = reference.match(metric, 5, True, False)
    x = torch.randn(2, 15, 3, generator=g, dtype=torch.float64, requires_grad=True)
    size = torch.randint(1, 4, (2, 15, 1), generator=g).double().requires_grad_()
    merged = torch.tensor([[True, False, True, True, False]] * 2)
    y = torch.randn(2, 10, 3, generator=g, requires_grad=True)
    source = torch.eye(15).expand(2, 15, 15).contiguous()
    clip = make_clip((2, 4, 6, 8), seed=1).requires_grad_()
    q, k, v = (torch.randn(1, 2, 9, 16, generator=g, requires_grad=True) for _ in range(3))
    return [
        ("match", ops.match.default, (metric, 5, True, False)),
        ("match-bf16-dist", ops.match.default, (metric.bfloat16(), 3, True, True)),
        ("merge", ops.merge.default, (x, size, out_idx, src_idx, dst_pos, None)),
        ("merge-merged", ops.merge.default, (x, size, out_idx, src_idx, dst_pos, merged)),
        ("merge-float32", ops.merge.default, (x.detach().float().requires_grad_(), size.detach().float(),
                                              out_idx, src_idx, dst_pos, None)),
        ("merge_backward", ops.merge_backward.default,
         (torch.randn(2, 10, 3, dtype=torch.float64), torch.randn(2, 10, 1, dtype=torch.float64),
          x.detach(), size.detach(), out_idx, src_idx, dst_pos, None)),
        ("merge_fused", ops.merge_fused.default, (x, size, metric.double(), 5, True, False)),
        ("merge_fused-bf16", ops.merge_fused.default, (x.detach().bfloat16().requires_grad_(), None,
                                                       metric, 4, True, True)),
        ("merge_source", ops.merge_source.default, (source, out_idx, src_idx, dst_pos, merged)),
        ("unmerge", ops.unmerge.default, (y, out_idx, src_idx, dst_pos, 15)),
        ("unmerge_backward", ops.unmerge_backward.default, (torch.randn(2, 15, 3), out_idx, src_idx, dst_pos)),
        ("select", ops.select.default, (clip, 5, 2)),
        ("select_scores", ops.select_scores.default, (clip.detach(), 2)),
        ("prop_attention", ops.prop_attention.default, (q, k, v, None, 0.25)),
        ("prop_attention-size", ops.prop_attention.default,
         (q, k, v, torch.randint(1, 4, (1, 9, 1), generator=g).float(), 0.25)),
    ]


_OPCHECK = [name for name, _, _ in _opcheck_cases()]
_VARIANTS = ("match-bf16-dist", "merge-float32", "merge_fused-bf16", "prop_attention-size")


@pytest.mark.parametrize("backend,name", [
    (b, n) for b in KERNELS for n in _OPCHECK
    # the cpp backend's attention is torch's SDPA: it has no vtome::prop_attention kernel;
    # the interpreter runs each op once (not its dtype / argument variants)
    if not (b == "cpp" and n.startswith("prop_attention")) and not (b == "triton" and n in _VARIANTS)])
def test_opcheck(backend, name):
    """Schema, fake, autograd registration and dispatch of every op on this backend's kernel.

    The interpreter runs the checks that depend on the kernel (schema: no mutation or
    aliasing; fake: the kernel's outputs match the fake's); autograd registration and AOT
    dispatch exercise the ops' Python fakes and formulas, shared by every backend and
    checked with the C++ kernels."""
    _, op, args = next(c for c in _opcheck_cases() if c[0] == name)
    kw = {"test_utils": ("test_schema", "test_faketensor")} if backend == "triton" else {}
    torch.library.opcheck(op, args, **kw)


@pytest.mark.parametrize("backend", KERNELS)
def test_public_api_compiles_fullgraph(backend):
    """vt.merge, vt.prop_attention and vt.select in one torch.compile graph, with backward."""
    def block(x, metric):
        y, s = vt.merge(x, None, 5, metric=metric, class_token=True, backend=backend)
        q = y.reshape(2, y.shape[1], 2, 32).transpose(1, 2)
        out = vt.prop_attention(q, q, q, s, backend=backend).sum(1)
        kept, _ = vt.select(out.reshape(2, 3, 4, 32), 6, backend=backend)
        return kept

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 17, 64, generator=g, requires_grad=True)
    metric = torch.randn(2, 17, 8, generator=g)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got, want = compiled(x, metric), block(x, metric)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), x), torch.autograd.grad(want.sum(), x))


# ======================================================================================
# select
# ======================================================================================
SELECT_BACKENDS = KERNELS  # the reference is judged by the oracle in test_select.py


@pytest.mark.parametrize("backend", SELECT_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_select_like_reference_and_oracle(backend, dtype):
    for i, (shape, groups, budget) in enumerate(select_cases()):
        x = make_clip(shape, seed=i, dtype=dtype, static=0.4 if i % 2 else 0.0)
        kept, index = vt.select(x, budget, groups=groups, backend=backend)
        ref_kept, ref_index = vt.select(x, budget, groups=groups, backend="reference")
        assert torch.equal(index, ref_index), (shape, groups, budget)
        assert torch.equal(kept, ref_kept), (shape, groups, budget)
        check_select(kept, index, x, budget, groups)


def _select_same(backend, x, budget, groups="auto"):
    kept, index = vt.select(x, budget, groups=groups, backend=backend)
    ref_kept, ref_index = vt.select(x, budget, groups=groups, backend="reference")
    assert torch.equal(index, ref_index), budget
    assert torch.equal(kept.isnan(), ref_kept.isnan()) and torch.equal(kept.nan_to_num(), ref_kept.nan_to_num())
    return kept, index


@pytest.mark.parametrize("backend", SELECT_BACKENDS)
def test_select_ties_identical_frames(backend):
    """Every score 0 (static clip): every backend keeps the first patches of each group."""
    x = make_clip((2, 8, 7, 5), dup_frames=True)
    for budget in (4, 12, 30):
        kept, index = _select_same(backend, x, budget)
        want = [g * 14 + i for g in range(4) for i in range(budget // 4)]
        assert index.tolist() == [want, want]
        assert torch.equal(kept, x.reshape(2, 56, 5)[:, want])


@pytest.mark.parametrize("backend", SELECT_BACKENDS)
def test_select_ties_duplicated_pairs(backend):
    """Patches that repeat the same pair of vectors score bit-identically: ties by position,
    whatever the position (the score may not depend on where a patch sits)."""
    g = torch.Generator().manual_seed(3)
    for c in (19, 24):  # 24: the C++ kernel's vector path (C % 8 == 0)
        x = torch.randn(1, 4, 33, c, generator=g)
        x[:, :, 5:] = x[:, :, :1]  # 28 copies of patch 0's trajectory, a top score repeated
        x[:, :, 0] *= 0.5
        for budget in (2, 10, 40, 60):
            kept, index = _select_same(backend, x, budget)
            check_select(kept, index, x, budget)


@pytest.mark.parametrize("backend", SELECT_BACKENDS)
def test_select_non_finite_scores(backend):
    """inf - inf is NaN: NaN ranks above +inf above every number, ties to the lower position."""
    x = make_clip((2, 4, 6, 3), seed=5)
    x[0, 1, 2, 0] = math.inf  # (1, 0) and (2, 1) pairs: inf; nothing NaN yet
    x[0, 2, 2, 0] = math.inf  # (2, 1): inf - inf = NaN
    x[1, 3, 4, 1] = math.nan
    x[1, 0, 0, 2] = -math.inf
    for budget in (2, 4, 6, 12):
        _select_same(backend, x, budget)


@pytest.mark.parametrize("backend", SELECT_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_select_other_dtypes(backend, dtype):
    for shape in ((2, 8, 5, 6), (1, 4, 17, 16)):
        x = make_clip(shape, seed=11, dtype=dtype)
        kept, index = _select_same(backend, x, 22)
        check_select(kept, index, x, 22)


@pytest.mark.parametrize("backend", SELECT_BACKENDS)
def test_select_non_contiguous_input(backend):
    x = make_clip((2, 6, 5, 8), seed=4).transpose(1, 2).contiguous().transpose(1, 2)
    assert not x.is_contiguous()
    kept, index = vt.select(x, 17, backend=backend)
    check_select(kept, index, x, 17)
    # contiguous, but starting one element into its storage (rows not 8-byte aligned)
    y = make_clip((1, 2 * 6 * 5 * 8 + 1), seed=6)[0, 1:].view(2, 6, 5, 8)
    assert y.is_contiguous() and y.storage_offset() == 1
    kept, index = vt.select(y, 17, backend=backend)
    check_select(kept, index, y, 17)


@pytest.mark.parametrize("backend", SELECT_BACKENDS)
def test_select_scores_bit_for_bit(backend):
    """Every backend's float32 scores equal the reference's exactly (same in-order sums, no
    FMA), on random data where any other summation order would round differently."""
    shapes = [((2, 4, 20, 40), 2), ((1, 6, 9, 64), 3), ((1, 3, 17, 19), 1), ((2, 2, 8, 3), 2)]
    if backend == "cpp":
        shapes.append(((2, 4, 33, 768), 2))
    scores = resolve(backend, "select", torch.device("cpu")).select_scores
    for i, (shape, groups) in enumerate(shapes):
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            x = (make_clip(shape, seed=i) * 3).to(dtype)
            got = scores(x, groups)
            assert got.dtype == torch.float32 and torch.equal(got, reference.select_scores(x, groups)), (shape, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_select_gradient(backend):
    """The kept rows' gradient flows back to their positions (the op's autograd), x untouched."""
    x = make_clip((2, 4, 5, 3), seed=2).requires_grad_()
    before = x.detach().clone()
    kept, index = vt.select(x, 8, backend=backend)
    assert torch.equal(x.detach(), before) and not index.requires_grad
    w = torch.randn_like(kept)
    (kept * w).sum().backward()
    want = torch.zeros(2, 20, 3).scatter_(1, index[..., None].expand(-1, -1, 3), w)
    assert torch.equal(x.grad, want.reshape(2, 4, 5, 3))
    xd = make_clip((1, 4, 3, 2), seed=1, dtype=torch.float64).requires_grad_()
    assert _gradcheck(backend, lambda t: vt.select(t, 4, backend=backend)[0], (xd,))


# ======================================================================================
# proportional attention
# ======================================================================================
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d,n,dtype,with_size", [
    (32, 13, torch.float64, True),
    (64, 37, torch.float32, True),
    (128, 21, torch.float32, False),
    (64, 19, torch.bfloat16, True),
    (32, 1, torch.float32, True),
])
def test_prop_attention_and_gradients(backend, d, n, dtype, with_size):
    """Forward and q, k, v gradients against float64 math."""
    g = torch.Generator().manual_seed(d + n)
    q, k, v = (torch.randn(2, 2, n, d, generator=g).to(dtype).requires_grad_() for _ in range(3))
    size = torch.randint(1, 6, (2, n, 1), generator=g).to(dtype) if with_size else None
    out = vt.prop_attention(q, k, v, size, backend=backend)
    dout = torch.randn(out.shape, generator=g).to(dtype)
    got = (out,) + torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference.prop_attention(q64, k64, v64, None if size is None else size.double(), d**-0.5)
    want = (ref,) + torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype]
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol)


# ======================================================================================
# the op layer itself
# ======================================================================================
def _every_public_op(backend: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 32, generator=g, requires_grad=True)
    y, s = vt.merge(x, None, 3, class_token=True, backend=backend)
    plan = vt.match(x.detach(), 3, backend=backend)
    plan.merge(x, s.new_ones(2, 12, 1))
    plan.merge_source()
    plan.unmerge(y)
    q = y.reshape(2, 9, 2, 16).transpose(1, 2)
    out = vt.prop_attention(q, q, q, s, backend=backend)
    kept, _ = vt.select(out.reshape(2, 2, 9, 16), 6, backend=backend)
    kept.sum().backward()


def test_ops_live_only_under_vtome(monkeypatch):
    """After every backend ran every public op (forward and backward), the dispatcher lists
    the package's ops under vtome:: only: one op per stage, no per-backend copy."""
    for backend in ("reference", "cpp"):
        if vt.backends()[backend].available:
            _every_public_op(backend)
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from vtome_kernels.triton import cpu_interpreter

    with cpu_interpreter():
        _every_public_op("triton")
    names = torch._C._dispatch_get_all_op_names()
    ours = sorted(n for n in names if "vtome" in n)
    assert ours == sorted("vtome::" + op for op in vt.ops.SCHEMAS), ours


def test_cpu_interpreter_lends_the_cpu_key_and_gives_it_back(monkeypatch):
    pytest.importorskip("triton")
    if not cpp.status()[0]:
        pytest.skip(cpp.status()[1])
    from triton.runtime.interpreter import InterpretedFunction

    from vtome_kernels.triton import backend as triton_backend

    launched = []
    run = InterpretedFunction.run
    monkeypatch.setattr(InterpretedFunction, "run",
                        lambda self, *a, **k: launched.append(self.fn.__name__) or run(self, *a, **k))
    metric = torch.randn(1, 10, 4)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    want = torch.ops.vtome.match(metric, 3, False, False)
    with triton_backend.cpu_interpreter():
        assert "lent to the Triton interpreter" in cpp.supports(torch.device("cpu"))
        got = torch.ops.vtome.match(metric, 3, False, False)
    assert launched == ["_match_kernel", "_rank_kernel"]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert cpp.supports(torch.device("cpu")) is None
    torch.ops.vtome.match(metric, 3, False, False)  # the C++ kernel again: no launch
    assert len(launched) == 2
    assert "cpu_interpreter" in triton_backend.supports(torch.device("cpu"))


_PURE_PYTHON = r"""
import sys
import torch
import vtome_kernels as vt
from vtome_kernels.triton import cpu_interpreter
assert "vtome_kernels._C" not in sys.modules, "the extension was loaded"
assert not vt.backends()["cpp"].available and "VTOME_NO_EXT" in vt.backends()["cpp"].detail
from vtome_kernels.backends import resolve
assert resolve("auto", "merge", torch.device("cpu")).NAME == "reference"
try:
    vt.merge(torch.randn(1, 6, 2), None, 2, backend="cpp")
    raise SystemExit("no error")
except vt.BackendUnavailableError as e:
    assert "VTOME_NO_EXT" in str(e), e
assert vt.merge(torch.randn(1, 6, 2), None, 2)[0].shape == (1, 4, 2)  # auto: the reference

g = torch.Generator().manual_seed(0)
x, metric = torch.randn(2, 14, 6, generator=g), torch.randn(2, 14, 5, generator=g)
size = torch.randint(1, 4, (2, 14, 1), generator=g).float()
kw = dict(metric=metric, class_token=True)
with cpu_interpreter():
    got, want = (vt.merge(x, size, 4, backend=b, **kw) for b in ("triton", "reference"))
    torch.testing.assert_close(got, want)
    fn = torch.compile(lambda x, m: vt.merge(x, None, 4, metric=m, backend="triton"), fullgraph=True,
                       backend="eager")
    torch.testing.assert_close(fn(x, metric), vt.merge(x, None, 4, metric=metric, backend="reference"))
    clip = x.reshape(2, 2, 7, 6)
    assert torch.equal(vt.select(clip, 6, backend="triton")[1], vt.select(clip, 6, backend="reference")[1])
print("ok")
"""


def test_pure_python_install_runs_triton_in_the_interpreter():
    """VTOME_NO_EXT=1 (the C++ extension not loaded, as on a pure-Python install): "cpp"
    says why it is unavailable, "auto" takes the reference, and the ops, their fakes and
    autograd still exist, so the Triton kernels run under the interpreter and compile."""
    pytest.importorskip("triton")
    env = dict(os.environ, VTOME_NO_EXT="1", TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", _PURE_PYTHON], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


_LOAD_EXPORTED = r"""
import sys
import torch
import vtome_kernels
x, metric, want = torch.load(sys.argv[2])
got = torch.export.load(sys.argv[1]).module()(x, metric)
assert all(torch.equal(a, b) for a, b in zip(got, want)), "different result"
print("ok")
"""


def test_exported_program_loads_in_a_fresh_process(tmp_path):
    """torch.export of a function using vt.merge; the saved program runs in a new process
    after ``import vtome_kernels`` (the ops are defined at import time)."""

    class Block(torch.nn.Module):
        def forward(self, x, metric):
            y, s = vt.merge(x, None, 5, metric=metric, class_token=True)
            return y * 2, s

    g = torch.Generator().manual_seed(0)
    x, metric = torch.randn(2, 20, 8, generator=g), torch.randn(2, 20, 4, generator=g)
    program = torch.export.export(Block(), (x, metric))
    assert "vtome.merge_fused" in program.graph_module.code
    torch.export.save(program, tmp_path / "block.pt2")
    torch.save((x, metric, Block()(x, metric)), tmp_path / "io.pt")
    out = subprocess.run([sys.executable, "-c", _LOAD_EXPORTED, str(tmp_path / "block.pt2"),
                          str(tmp_path / "io.pt")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
