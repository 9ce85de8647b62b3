"""The public contract of API.md: shapes, dtypes, errors, untouched inputs, gradients."""

import pytest
import torch

import vtome_kernels as vt
from cases import make, merge_cases


def _inputs(lead=(2,), n=10, c=4, d=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(lead + (n, c), generator=g, dtype=dtype),
            torch.randint(1, 4, lead + (n, 1), generator=g).to(dtype),
            torch.randn(lead + (n, d), generator=g, dtype=dtype))


# -- shapes, dtypes, schemes ------------------------------------------------------------
@pytest.mark.parametrize("lead", [(2,), (2, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_shapes_and_dtypes(lead, dtype):
    x, size, metric = _inputs(lead, dtype=dtype)
    y, s = vt.merge(x, size, 3, metric=metric)
    assert y.shape == lead + (7, 4) and s.shape == lead + (7, 1)
    assert y.dtype == dtype and s.dtype == size.dtype
    assert torch.equal(s.sum(-2), size.sum(-2))  # merging conserves the total size
    y, s = vt.merge(x, None, 3)
    assert s.dtype == torch.float32 and s.shape == lead + (7, 1)


def test_divided_space_time_is_one_matching_per_frame():
    x, size, metric = _inputs((2, 3), n=11)
    y, s = vt.merge(x, size, 4, metric=metric, class_token=True)
    for b in range(2):
        for t in range(3):
            yf, sf = vt.merge(x[b, t][None], size[b, t][None], 4, metric=metric[b, t][None],
                              class_token=True)
            assert torch.equal(y[b, t], yf[0]) and torch.equal(s[b, t], sf[0])


def test_r_zero_and_clamp():
    x, size, metric = _inputs(n=9)
    y, s = vt.merge(x, size, 0, metric=metric)
    assert y is x and s is size
    y, s = vt.merge(x, None, 0)
    assert y is x and torch.equal(s, torch.ones(2, 9, 1))
    y, _ = vt.merge(x, size, 100, metric=metric)  # clamped to 9 // 2
    assert y.shape[1] == 5
    y, _ = vt.merge(x, size, 100, metric=metric, class_token=True, distill_token=True)
    assert y.shape[1] == 9 - 3
    one = torch.randn(2, 1, 4)
    assert vt.merge(one, None, 5)[0] is one


def test_plan_fields_and_round_trip():
    x, size, metric = _inputs((2, 3), n=12)
    plan = vt.match(metric, 4, class_token=True)
    assert plan.r == 4 and plan.n == 12 and plan.n_out == 8
    assert plan.src_idx.shape == (2, 3, 4) and plan.dst_idx.shape == (2, 3, 4)
    assert plan.unm_idx.shape == (2, 3, 2) and plan.out_idx.shape == (2, 3, 8)
    assert (plan.src_idx % 2 == 0).all() and (plan.dst_idx % 2 == 1).all()
    assert (plan.unm_idx[..., 0] == 0).all()  # the class token stays first
    y, s = plan.merge(x, size)
    torch.testing.assert_close((y, s), vt.merge(x, size, 4, metric=metric, class_token=True))
    full = plan.unmerge(y)
    assert full.shape == x.shape
    out_idx = plan.out_idx
    assert torch.equal(full.gather(2, out_idx[..., None].expand(-1, -1, -1, 4)), y)
    src = plan.merge_source()
    counts = plan.merge(x)[1]  # sizes counted from ones = members per output token
    assert src.shape == (2, 3, 8, 12) and torch.equal(src.sum(-1, keepdim=True), counts)
    assert src.dtype == torch.float32
    src_bool = plan.merge_source(torch.eye(12, dtype=torch.bool).expand(2, 3, 12, 12))
    assert src_bool.dtype == torch.bool and torch.equal(src_bool.float(), src)


def test_source_tracking_composes_over_layers():
    x = torch.randn(1, 20, 5)
    plan1 = vt.match(x, 5)
    x1, s1 = plan1.merge(x)
    src1 = plan1.merge_source()
    plan2 = vt.match(x1, 4)
    x2, s2 = plan2.merge(x1, s1)
    src2 = plan2.merge_source(src1)
    assert src2.shape == (1, 11, 20)
    assert torch.equal(src2.sum(-1, keepdim=True), s2)  # each original token is in one group
    assert torch.equal(src2.sum(1), torch.ones(1, 20))


def test_modes():
    x, size, metric = _inputs(n=12)
    y, s = vt.merge(x, size, 4, metric=metric, mode="drop")
    plan = vt.match(metric, 4)
    assert torch.equal(y, x.gather(1, plan.out_idx[..., None].expand(-1, -1, 4)))
    assert torch.equal(s, torch.ones(2, 8, 1))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = vt.merge(x, size, 4, metric=metric, mode="random_merge", generator=g1)
    b = vt.merge(x, size, 4, metric=metric, mode="random_merge", generator=g2)
    torch.testing.assert_close(a, b)  # seeded: reproducible
    # Hybrid, nothing passes: every source still merges, every destination it reaches
    # loses its own content (the video paper's rule); the others are copied.
    y, s = vt.merge(x, size, 4, metric=metric, mode="hybrid", threshold=2.0)
    for g in range(2):
        for o, pos in enumerate(plan.out_idx[g].tolist()):
            members = [p for p, d in zip(plan.src_idx[g].tolist(), plan.dst_idx[g].tolist()) if d == pos]
            members = members or [pos]
            w = size[g, members]
            torch.testing.assert_close(y[g, o], (x[g, members] * w).sum(0) / w.sum())
            assert s[g, o, 0] == w.sum()
    y2, s2 = vt.merge(x, size, 4, metric=metric, mode="hybrid", threshold=-2.0)  # everything
    torch.testing.assert_close((y2, s2), vt.merge(x, size, 4, metric=metric))


def test_metric_default_is_x_itself():
    x, size, _ = _inputs()
    torch.testing.assert_close(vt.merge(x, size, 3), vt.merge(x, size, 3, metric=x))


# -- inputs are never modified ----------------------------------------------------------
@pytest.mark.parametrize("case", merge_cases()[::4], ids=str)
@pytest.mark.parametrize("mode", ["merge", "drop", "hybrid"])
def test_inputs_unchanged(case, mode):
    x, size, metric = make(case)
    before = [t.clone() for t in (x, size, metric) if t is not None]
    threshold = 0.5 if mode == "hybrid" else None
    plan = vt.match(x if metric is None else metric, case.r, class_token=case.class_token,
                    distill_token=case.distill_token, mode=mode, threshold=threshold)
    y, s = plan.merge(x, size)
    plan.merge_source()
    plan.unmerge(y)
    after = [t for t in (x, size, metric) if t is not None]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


# -- gradients --------------------------------------------------------------------------
@pytest.mark.parametrize("lead,class_token", [((2,), False), ((2,), True), ((1, 2), False)])
def test_merge_gradcheck_float64(lead, class_token):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(lead + (11, 3), generator=g, dtype=torch.float64, requires_grad=True)
    size = torch.randint(1, 4, lead + (11, 1), generator=g).double().requires_grad_()
    metric = torch.randn(lead + (11, 4), generator=g, dtype=torch.float64)
    fn = lambda x, size: vt.merge(x, size, 4, metric=metric, class_token=class_token)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, size))
    plan = vt.match(metric, 4, class_token=class_token)
    y = torch.randn(lead + (7, 3), generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(plan.unmerge, (y,))


def test_matching_passes_no_gradient_to_metric():
    x = torch.randn(2, 10, 4, requires_grad=True)
    metric = torch.randn(2, 10, 3, requires_grad=True)
    y, _ = vt.merge(x, None, 3, metric=metric)
    y.sum().backward()
    assert metric.grad is None and x.grad is not None
    x2 = x.detach().clone().requires_grad_()
    y2, _ = vt.merge(x2, None, 3)  # x as its own metric: gradient through the merge only
    y2.sum().backward()
    # Each output row is a mean whose weights sum to 1: the gradient sums to rows x channels.
    torch.testing.assert_close(x2.grad.sum(), torch.tensor(2 * 7 * 4.0))


# -- errors -----------------------------------------------------------------------------
def _bad(exc, match, fn, *args, **kw):
    with pytest.raises(exc, match=match):
        fn(*args, **kw)


def test_errors_merge():
    x, size, metric = _inputs()
    _bad(TypeError, "x must be a torch.Tensor", vt.merge, [1.0], None, 1)
    _bad(ValueError, r"x must be 3-D or 4-D, got shape \(10, 4\)", vt.merge, x[0], None, 1)
    _bad(TypeError, "x must have dtype", vt.merge, x.long(), None, 1)
    _bad(ValueError, r"r must be >= 0, got -1", vt.merge, x, None, -1)
    _bad(TypeError, "r must be an int, got float", vt.merge, x, None, 1.5)
    _bad(TypeError, "r must be an int, got bool", vt.merge, x, None, True)
    _bad(ValueError, r"size must have shape \[2, 10, 1\]", vt.merge, x, size[:, :9], 1)
    _bad(ValueError, r"size must have shape \[2, 10, 1\]", vt.merge, x, size.expand(2, 10, 2), 1)
    _bad(ValueError, "size must be 3-D", vt.merge, x, size[..., 0], 1)
    _bad(ValueError, "size must be positive", vt.merge, x, size - 1, 1)
    _bad(TypeError, "size must have dtype", vt.merge, x, size.long(), 1)
    _bad(ValueError, r"metric must have shape \[2, 10, any\]", vt.merge, x, None, 1, metric=metric[:1])
    _bad(ValueError, "metric must be 3-D or 4-D", vt.merge, x, None, 1, metric=metric[0])
    _bad(ValueError, "mode must be one of", vt.merge, x, None, 1, mode="average")
    _bad(TypeError, "threshold must be a float", vt.merge, x, None, 1, mode="hybrid")
    _bad(ValueError, "threshold is only used by mode='hybrid'", vt.merge, x, None, 1, threshold=0.5)
    _bad(TypeError, "generator must be a torch.Generator", vt.merge, x, None, 1, generator=3)
    _bad(ValueError, "backend must be one of", vt.merge, x, None, 1, backend="cuda")
    _bad(TypeError, "class_token must be a bool", vt.merge, x, None, 1, class_token=1)
    _bad(ValueError, "distill_token=True needs class_token=True", vt.merge, x, None, 1,
         distill_token=True)
    _bad(ValueError, "metric must have a last dim >= 1", vt.match, metric[..., :0], 1)
    meta = metric.to("meta")  # a second device without a GPU
    _bad(ValueError, "one device, got x on cpu, metric on meta", vt.merge, x, None, 1, metric=meta)
    _bad(ValueError, "one device, got x on cpu, size on meta", vt.merge, x, size.to("meta"), 1)
    plan = vt.match(metric, 2)
    _bad(ValueError, "one device", plan.merge, x.to("meta"))


def test_errors_plan():
    x, size, metric = _inputs((2, 3))
    plan = vt.match(metric, 3)
    _bad(ValueError, r"x must be 4-D", plan.merge, x[0])
    _bad(ValueError, r"x must have shape \[2, 3, 10, any\]", plan.merge, x[:, :, :9])
    _bad(ValueError, r"size must have shape \[2, 3, 10, 1\]", plan.merge, x, size[:, :1])
    _bad(ValueError, r"y must have shape \[2, 3, 7, any\]", plan.unmerge, x)
    _bad(ValueError, r"source must have shape \[2, 3, 10, any\]", plan.merge_source,
         torch.zeros(2, 3, 9, 10))
    _bad(TypeError, "source must have dtype", plan.merge_source, torch.zeros(2, 3, 10, 10).long())


def test_backends_listing_and_forced_backend():
    listing = vt.backends()
    assert listing["reference"].available
    for name, status in listing.items():
        assert isinstance(status.detail, str) and status.detail
    x, _, _ = _inputs()
    y, _ = vt.merge(x, None, 2, backend="reference")
    assert y.shape == (2, 8, 4)


def test_import_is_light():
    """import vtome_kernels loads neither torch._dynamo nor Triton (seconds of import time)."""
    import subprocess
    import sys

    code = ("import sys, vtome_kernels; "
            "print(sorted(m for m in ('torch._dynamo', 'triton', 'timm', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_public_api_compiles_fullgraph():
    """torch.compile traces vt.merge and vt.prop_attention without graph breaks: the
    backend choice is a constant for dynamo (backends._choose)."""
    g = torch.Generator().manual_seed(3)
    x, metric = torch.randn(2, 33, 16, generator=g), torch.randn(2, 33, 8, generator=g)
    q = torch.randn(2, 2, 23, 8, generator=g)

    def block(x, metric, q):
        y, size = vt.merge(x, None, 10, metric=metric, class_token=True)
        return y, vt.prop_attention(q, q, q, size)

    compiled = torch.compile(block, fullgraph=True, backend="eager")
    for got, want in zip(compiled(x, metric, q), block(x, metric, q)):
        torch.testing.assert_close(got, want)
