"""The C++ CPU backend ("cpp") against the reference and the loop oracle.

Same merge choices bit for bit (indices and float32 scores), merged values within the
dtype tolerances, opcheck of every vtome:: op, gradcheck of the merge and unmerge
backward in float64, and the fallback when the extension is not built.
"""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings

import vtome_kernels as vt
from cases import DTYPE_TOL, Case, assert_same_plan, cases, make, merge_cases
from test_reference import _check

cpp = pytest.importorskip("vtome_kernels.cpp")
if not cpp.status()[0]:  # the fallback test below still runs in a subprocess
    pytestmark = pytest.mark.skip(reason=cpp.status()[1])


def _plans(case: Case, mode="merge", threshold=None):
    x, size, metric = make(case)
    m = x if metric is None else metric
    kw = dict(class_token=case.class_token, distill_token=case.distill_token, mode=mode,
              threshold=threshold)
    return x, size, vt.match(m, case.r, backend="cpp", **kw), vt.match(m, case.r, backend="reference", **kw)


def _same_plan(plan, want):
    """The same matching, and bit-identical float32 scores (NaN included)."""
    score, ref = plan.src_score, want.src_score
    assert torch.equal(score.view(torch.int32), ref.view(torch.int32)), f"{score}\nvs\n{ref}"
    if not score.isnan().any():
        assert_same_plan(plan, want)
    for field in ("out_idx", "src_idx", "dst_idx", "unm_idx", "merged"):
        assert torch.equal(getattr(plan, field), getattr(want, field)), field


def _same_results(x, size, plan, want):
    """plan (cpp) and want (reference) agree on every application of the matching."""
    _same_plan(plan, want)
    got_x, got_s = plan.merge(x, size)
    ref_x, ref_s = want.merge(x, size)
    atol, rtol = DTYPE_TOL[x.dtype]
    assert got_x.dtype == ref_x.dtype and got_s.dtype == ref_s.dtype
    torch.testing.assert_close(got_x, ref_x, atol=atol, rtol=rtol)
    assert torch.equal(got_s, ref_s)
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


# -- equivalence with the reference and the oracle ----------------------------------------
@pytest.mark.parametrize("case", merge_cases(), ids=str)
def test_cpp_matches_oracle(case):
    _check(case, backend="cpp")


@pytest.mark.parametrize("case", merge_cases(), ids=str)
@pytest.mark.parametrize("mode", ["merge", "drop", "hybrid"])
def test_cpp_matches_reference(case, mode):
    threshold = 0.3 if mode == "hybrid" else None
    x, size, plan, want = _plans(case, mode, threshold)
    _same_results(x, size, plan, want)


@pytest.mark.parametrize("case", merge_cases()[::3], ids=str)
@pytest.mark.parametrize("mode", ["drop", "random_merge", "random_drop"])
def test_cpp_modes_match_oracle(case, mode):
    _check(case, mode=mode, generator_seed=case.seed if mode.startswith("random") else None,
           backend="cpp")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cpp_dtypes_and_mixed_size_dtype(dtype):
    case = Case((2, 3), 31, 9, c=13, d=7, class_token=True, dtype=dtype, sizes="random", dups=3, seed=7)
    x, size, plan, want = _plans(case)
    _same_results(x, size, plan, want)
    y, s = plan.merge(x)  # size None: float32 sizes whatever x's dtype
    torch.testing.assert_close((y, s), want.merge(x), atol=DTYPE_TOL[dtype][0], rtol=DTYPE_TOL[dtype][1])
    assert s.dtype == torch.float32


@settings(max_examples=120)
@given(cases(dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64)))
def test_cpp_matches_reference_sweep(case):
    x, size, plan, want = _plans(case)
    _same_results(x, size, plan, want)


@pytest.mark.parametrize("n,d,cls,dups", [(1568, 64, False, 0), (1569, 64, True, 40),
                                          (197, 64, True, 0), (196, 64, False, 30),
                                          (400, 3, False, 0), (101, 130, True, 5)])
def test_cpp_identical_choices_random_float32(n, d, cls, dups):
    """Many seeds of random float32 metrics, paper-like sizes: the same merges exactly."""
    seeds = range(3) if n > 1000 else range(12)
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        metric = torch.randn(2, n, d, generator=g)
        for _ in range(dups):  # static patches: exact copies, across and within the sets
            i, j = torch.randint(0, n, (2,), generator=g).tolist()
            metric[:, j] = metric[:, i]
        r = n // 4
        _same_plan(vt.match(metric, r, class_token=cls, backend="cpp"),
                   vt.match(metric, r, class_token=cls, backend="reference"))


def test_cpp_batch_one_rows_run_in_parallel_and_agree():
    """One group of ViViT size (rows of one group split across threads)."""
    g = torch.Generator().manual_seed(5)
    metric = torch.randn(1, 3137, 64, generator=g)
    metric[0, 100:300] = metric[0, 50]  # a static region: many exact ties
    _same_plan(vt.match(metric, 300, class_token=True, backend="cpp"),
               vt.match(metric, 300, class_token=True, backend="reference"))


def test_cpp_nan_and_zero_metric_like_reference():
    g = torch.Generator().manual_seed(2)
    for cls in (False, True):
        metric = torch.randn(2, 21, 6, generator=g)
        metric[0, 4] = float("nan")  # an A token: its row max is NaN (ranked first)
        metric[1, 7] = 0.0  # a zero vector normalises to zero, not NaN
        metric[1, 8] = float("inf")
        _same_plan(vt.match(metric, 6, class_token=cls, backend="cpp"),
                   vt.match(metric, 6, class_token=cls, backend="reference"))


def test_cpp_non_contiguous_and_strided_rows():
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(3, 40, 20, generator=g)
    x, metric = wide[:, :, 2:12], wide[:, :, 12:19]  # last dim contiguous, row stride 20
    size = torch.randint(1, 4, (3, 40, 1), generator=g).float()
    for xx, mm in ((x, metric), (x.transpose(0, 1).contiguous().transpose(0, 1), metric.mT.contiguous().mT)):
        plan, want = vt.match(mm, 11, backend="cpp"), vt.match(mm, 11, backend="reference")
        _same_results(xx, size, plan, want)


# -- autograd, opcheck ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["merge", "hybrid", "drop"])
@pytest.mark.parametrize("lead,cls", [((2,), False), ((1, 2), True)])
def test_cpp_gradcheck_float64(mode, lead, cls):
    g = torch.Generator().manual_seed(4)
    n = 13
    x = torch.randn(lead + (n, 3), generator=g, dtype=torch.float64, requires_grad=True)
    size = torch.randint(1, 4, lead + (n, 1), generator=g).double().requires_grad_()
    metric = torch.randn(lead + (n, 4), generator=g, dtype=torch.float64)
    threshold = 0.2 if mode == "hybrid" else None
    plan = vt.match(metric, 5, class_token=cls, mode=mode, threshold=threshold, backend="cpp")
    assert torch.autograd.gradcheck(lambda x, s: plan.merge(x, s), (x, size))
    y = torch.randn(lead + (n - 5, 3), generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(plan.unmerge, (y,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_backward_matches_reference(dtype):
    case = Case((2,), 30, 10, c=7, class_token=True, dtype=dtype, sizes="random", dups=2, seed=9)
    x, size, plan, want = _plans(case, "hybrid", 0.2)
    grads = []
    for p in (plan, want):
        xl, sl = x.clone().requires_grad_(), size.clone().requires_grad_()
        y, s = p.merge(xl, sl)
        (y.float().square().sum() + (s.float() * torch.arange(s.shape[1])[:, None]).sum()).backward()
        full = p.unmerge(y.detach().requires_grad_())
        grads.append((xl.grad, sl.grad))
    atol, rtol = DTYPE_TOL[dtype]
    torch.testing.assert_close(grads[0], grads[1], atol=4 * atol, rtol=4 * rtol)


def _opcheck_args():
    g = torch.Generator().manual_seed(6)
    metric = torch.randn(2, 15, 4, generator=g)
    out_idx, src_idx, dst_pos, _ = torch.ops.vtome.match(metric, 5, True, False)
    x = torch.randn(2, 15, 3, generator=g, dtype=torch.float64, requires_grad=True)
    size = torch.randint(1, 4, (2, 15, 1), generator=g).double().requires_grad_()
    merged = torch.tensor([[True, False, True, True, False]] * 2)
    y = torch.randn(2, 10, 3, generator=g, requires_grad=True)
    source = torch.eye(15).expand(2, 15, 15).contiguous()
    return [
        (torch.ops.vtome.match.default, (metric, 5, True, False)),
        (torch.ops.vtome.match.default, (metric.bfloat16(), 3, True, True)),
        (torch.ops.vtome.merge.default, (x, size, out_idx, src_idx, dst_pos, None)),
        (torch.ops.vtome.merge.default, (x, size, out_idx, src_idx, dst_pos, merged)),
        (torch.ops.vtome.merge.default, (x.detach().float().requires_grad_(), size.detach().float(),
                                         out_idx, src_idx, dst_pos, None)),
        (torch.ops.vtome.merge_source.default, (source, out_idx, src_idx, dst_pos, merged)),
        (torch.ops.vtome.unmerge.default, (y, out_idx, src_idx, dst_pos, 15)),
        (torch.ops.vtome.merge_backward.default,
         (torch.randn(2, 10, 3, dtype=torch.float64), torch.randn(2, 10, 1, dtype=torch.float64),
          x.detach(), size.detach(), out_idx, src_idx, dst_pos, None)),
        (torch.ops.vtome.unmerge_backward.default, (torch.randn(2, 15, 3), out_idx, src_idx, dst_pos)),
        (torch.ops.vtome.merge_fused.default, (x, size, metric.double(), 5, True, False)),
        (torch.ops.vtome.merge_fused.default, (x.detach().bfloat16().requires_grad_(), None, metric,
                                               4, True, True)),
    ]


@pytest.mark.parametrize("i", range(11))
def test_cpp_opcheck(i):
    op, args = _opcheck_args()[i]
    torch.library.opcheck(op, args)


def test_cpp_compiles_fullgraph():
    g = torch.Generator().manual_seed(8)
    x, metric = torch.randn(2, 20, 5, generator=g), torch.randn(2, 20, 4, generator=g)
    size = torch.ones(2, 20, 1)

    def fn(x, m):  # the backend's ops (the public API resolves backends by import: not traced)
        out_idx, src_idx, dst_pos, _ = cpp.match(m, 6, True, False)
        return cpp.merge(x, size, out_idx, src_idx, dst_pos)

    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, metric), fn(x, metric))


# -- the fused fast path of vt.merge ---------------------------------------------------------
@pytest.mark.parametrize("case", merge_cases()[::2], ids=str)
def test_fused_fast_path_equals_plan_path(case):
    """vt.merge (one fused call on CPU) == match + plan.merge of the reference, and
    == the cpp plan path bit for bit."""
    x, size, metric = make(case)
    kw = dict(metric=metric, class_token=case.class_token, distill_token=case.distill_token)
    got = vt.merge(x, size, case.r, backend="cpp", **kw)
    m = x if metric is None else metric
    plan = vt.match(m, case.r, class_token=case.class_token, distill_token=case.distill_token,
                    backend="cpp")
    assert all(torch.equal(a, b) for a, b in zip(got, plan.merge(x, size)))
    want = vt.merge(x, size, case.r, backend="reference", **kw)
    atol, rtol = DTYPE_TOL[x.dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def test_fused_fast_path_gradients_and_errors():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 12, 4, generator=g, dtype=torch.float64, requires_grad=True)
    size = torch.randint(1, 4, (2, 3, 12, 1), generator=g).double().requires_grad_()
    metric = torch.randn(2, 3, 12, 5, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda x, s: vt.merge(x, s, 4, metric=metric, class_token=True, backend="cpp")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, size))
    assert torch.autograd.gradcheck(lambda x: vt.merge(x, None, 4, metric=metric, backend="cpp"), (x,))
    y, _ = fn(x, size)
    y.sum().backward()
    assert metric.grad is None
    with pytest.raises(ValueError, match="size must be positive everywhere, got min -1"):
        vt.merge(x.detach(), size.detach() - 2, 3, backend="cpp")
    with pytest.raises(ValueError, match="size must be positive everywhere"):
        vt.merge(x.detach(), size.detach() * float("nan"), 3, backend="cpp")
    xs, ss = x.detach()[0], size.detach()[0]
    out = vt.merge(xs, ss, 4, backend="cpp")  # 3-D: no reshapes, same result as the plan path
    assert all(torch.equal(a, b) for a, b in zip(out, vt.match(xs, 4, backend="cpp").merge(xs, ss)))


# -- errors, registry, fallback ------------------------------------------------------------
def test_cpp_public_errors_are_the_documented_ones():
    x = torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match="x must be 3-D or 4-D"):
        vt.merge(x[0], None, 1, backend="cpp")
    with pytest.raises(TypeError, match="x must have dtype"):
        vt.merge(x.long(), None, 1, backend="cpp")
    with pytest.raises(ValueError, match="size must be positive"):
        vt.merge(x, torch.zeros(2, 10, 1), 1, backend="cpp")
    with pytest.raises(vt.BackendUnavailableError, match="cannot run on meta"):
        vt.merge(x.to("meta"), None, 1, backend="cpp")


def test_cpp_ops_refuse_inconsistent_plans():
    metric = torch.randn(1, 10, 3)
    out_idx, src_idx, dst_pos, _ = torch.ops.vtome.match(metric, 3, False, False)
    x, size = torch.randn(1, 10, 2), torch.ones(1, 10, 1)
    with pytest.raises(RuntimeError, match="dst_pos out of range"):
        torch.ops.vtome.merge(x, size, out_idx, src_idx, dst_pos + 100, None)
    with pytest.raises(RuntimeError, match="src_idx out of range"):
        torch.ops.vtome.merge(x, size, out_idx, src_idx - 100, dst_pos, None)
    with pytest.raises(RuntimeError, match="must cover"):
        torch.ops.vtome.merge(x[:, :9], size[:, :9], out_idx, src_idx, dst_pos, None)
    with pytest.raises(RuntimeError, match="r must be in"):
        torch.ops.vtome.match(metric, 6, False, False)


def test_cpp_is_auto_on_cpu():
    assert vt.backends()["cpp"].available
    from vtome_kernels.backends import resolve

    assert resolve("auto", "merge", torch.device("cpu")).NAME == "cpp"
    assert resolve("auto", "match", torch.device("cpu")).NAME == "cpp"


def test_unbuilt_extension_falls_back_to_reference():
    """What a VTOME_NO_EXT=1 install sees: "cpp" unavailable with a reason, "auto" = reference."""
    code = (
        "import sys, torch; sys.modules['vtome_kernels._C'] = None\n"
        "import vtome_kernels as vt\n"
        "from vtome_kernels.backends import resolve\n"
        "st = vt.backends()['cpp']; assert not st.available and 'not built' in st.detail, st\n"
        "assert resolve('auto', 'merge', torch.device('cpu')).NAME == 'reference'\n"
        "try:\n"
        "    vt.merge(torch.randn(1, 6, 2), None, 2, backend='cpp'); raise SystemExit('no error')\n"
        "except vt.BackendUnavailableError as e:\n"
        "    assert 'VTOME_NO_EXT' in str(e)\n"
        "print(vt.merge(torch.randn(1, 6, 2), None, 2)[0].shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([1, 4, 2])" in out.stdout


@pytest.mark.parametrize("isa", ["generic", "generic16"])
def test_other_score_kernels_agree(isa):
    """The baseline kernel and the AVX-512 tile shape (run here without AVX-512) give the
    reference's choices too (VTOME_ISA picks the kernel at load time: a subprocess)."""
    code = (
        "import torch, vtome_kernels as vt\n"
        "from vtome_kernels import _C\n"
        f"assert _C.score_kernel() == {isa!r}, _C.score_kernel()\n"
        "for seed, (n, d, cls, dist) in enumerate([(1569, 64, True, False), (197, 64, True, True),\n"
        "                                          (51, 7, False, False), (100, 130, False, False)]):\n"
        "    g = torch.Generator().manual_seed(seed)\n"
        "    m = torch.randn(2, n, d, generator=g)\n"
        "    m[:, 10:30] = m[:, 5:6]\n"
        "    p, q = (vt.match(m, n // 3, class_token=cls, distill_token=dist, backend=b) for b in ('cpp', 'reference'))\n"
        "    for f in ('out_idx', 'src_idx', 'dst_idx'):\n"
        "        assert torch.equal(getattr(p, f), getattr(q, f)), (seed, f)\n"
        "    assert torch.equal(p.src_score, q.src_score), seed\n"
        "print('ok')\n"
    )
    env = dict(os.environ, VTOME_ISA=isa)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_cpp_empty_batch():
    x, m = torch.randn(0, 10, 4), torch.randn(0, 10, 3)
    y, s = vt.merge(x, None, 3, metric=m, backend="cpp")
    assert y.shape == (0, 7, 4) and s.shape == (0, 7, 1)
    plan = vt.match(m, 3, backend="cpp")
    assert plan.merge_source().shape == (0, 7, 10) and plan.unmerge(y).shape == (0, 10, 4)
    frames = torch.randn(2, 0, 10, 4)
    assert vt.merge(frames, None, 3, backend="cpp")[0].shape == (2, 0, 7, 4)
