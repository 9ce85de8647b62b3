"""vt.select (FluxViT selection): every backend against the reference and a loop oracle.

The oracle below shares no code with vtome_kernels: plain Python loops over float64
numbers. Its scores are exact (float64 squares of float32-exact differences summed in
float64) while the backends round in float32, so it knows which comparisons are exact
instead: equal scores from bitwise-identical vector pairs (or two zero changes) tie
exactly everywhere; two other scores closer than AMBIGUOUS at the keep boundary are a
near-tie that float32 may order either way, and the oracle refuses such an input.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import vtome_kernels as vt
from vtome_kernels.backends import resolve as _resolve
from vtome_kernels import reference

AMBIGUOUS = 1e-5


class Ambiguous(Exception):
    """The input has a near-tie at the keep boundary that float32 may decide either way."""


# -- the loop oracle ---------------------------------------------------------------------
def oracle_groups(t: int, groups) -> int:
    if groups != "auto":
        return groups
    for g in (4, 2, 1):
        if t % g == 0 and t // g >= 2:
            return g
    return 1


def oracle_select(x: torch.Tensor, budget: int, groups="auto"):
    """(kept rows as lists of floats, index lists) per clip, by loops in float64."""
    b_, t_, l_, c_ = x.shape
    g_ = oracle_groups(t_, groups)
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
                if i1 != i2 and abs(s1 - s2) <= AMBIGUOUS * max(s1, s2, 1e-30):
                    raise Ambiguous(f"near-tie {s1} vs {s2} at the keep boundary")
            chosen.extend(sorted(pos for _, pos, _ in ranked[:per]))
        out_idx.append(chosen)
        flat = [row for frame in xs[b] for row in frame]
        out_rows.append([flat[i] for i in chosen])
    return out_rows, out_idx


# -- the implementations under test -------------------------------------------------------
def _backend_names():
    """Registered backends that can select on CPU here (reference, cpp, triton, ...)."""
    names = []
    for name, status in vt.backends().items():
        if not status.available:
            continue
        try:
            _resolve(name, "select", torch.device("cpu"))
        except vt.BackendUnavailableError:
            continue
        names.append(name)
    return names


def _triton_kernel():
    try:
        from vtome_kernels.triton.select import select as kernel
    except ImportError:  # triton not installed
        return None
    return kernel


def _cpp_op():
    """torch.ops.vtome.select (csrc/select.cpp) when the C++ extension is built, else None."""
    try:
        import vtome_kernels._C  # noqa: F401  registers the vtome:: ops
    except ImportError:
        pass
    try:
        return torch.ops.vtome.select
    except (AttributeError, RuntimeError):
        return None


# The kernels are also called directly, in case their backend module does not expose them
# (yet); when it does, the backend path alone is tested (same code, half the interpreter time).
_NAMES = _backend_names()
IMPLS = (["backend:" + n for n in _NAMES]
         + (["triton-kernel"] if "triton" not in _NAMES and _triton_kernel() else [])
         + (["cpp-op"] if "cpp" not in _NAMES and _cpp_op() is not None else []))


def run(impl: str, x: torch.Tensor, budget: int, groups="auto"):
    """vt.select through a registered backend, or the Triton kernel wrapper / the C++ op
    called directly (they take k per group and the group count, like reference.select)."""
    if impl.startswith("backend:"):
        return vt.select(x, budget, groups=groups, backend=impl.split(":", 1)[1])
    b, t, l, c = x.shape
    g = oracle_groups(t, groups)
    if budget >= t * l:
        budget = t * l
    kernel = _triton_kernel() if impl == "triton-kernel" else _cpp_op()
    return kernel(x, (budget - budget % g) // g, g)


@pytest.fixture(autouse=True)
def _interpret_triton_impls(request):
    """The Triton implementations run in Triton's CPU interpreter (tests/conftest.py)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("impl") in ("backend:triton", "triton-kernel"):
        request.getfixturevalue("triton_interpret")


# -- cases ---------------------------------------------------------------------------------
def make(shape, seed=0, dtype=torch.float32, static=0.0, dup_frames=False):
    """Random x; ``static`` of the patches never change (score 0: exact ties);
    dup_frames: every frame a copy of frame 0 (every score 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if dup_frames:
        x = x[:, :1].expand(shape).clone()
    elif static:
        still = torch.rand(shape[0], 1, shape[2], 1, generator=g) < static
        x = torch.where(still, x[:, :1], x)
    return x.to(dtype)


CASES = [
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


def _expand(cases):
    for shape, groups, budgets in cases:
        for budget in budgets:
            yield shape, groups, budget


FLAT = list(_expand(CASES))


def check(kept, index, x, budget, groups="auto"):
    """Compare with the oracle: the same positions, and exactly x's rows at them."""
    rows, idx = oracle_select(x, budget, groups)
    assert index.dtype == torch.int64
    assert index.tolist() == idx
    assert kept.dtype == x.dtype and kept.shape == (x.shape[0], len(idx[0]), x.shape[-1])
    assert kept.double().tolist() == rows


@pytest.mark.parametrize("shape,groups,budget", FLAT)
def test_reference_against_oracle(shape, groups, budget):
    for static in (0.0, 0.5):
        x = make(shape, seed=budget, static=static)
        kept, index = vt.select(x, budget, groups=groups, backend="reference")
        check(kept, index, x, budget, groups)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backends_against_reference_and_oracle(impl, dtype):
    for i, (shape, groups, budget) in enumerate(FLAT):
        x = make(shape, seed=i, dtype=dtype, static=0.4 if i % 2 else 0.0)
        kept, index = run(impl, x, budget, groups)
        ref_kept, ref_index = reference_select(x, budget, groups)
        assert torch.equal(index, ref_index), (shape, groups, budget)
        assert torch.equal(kept, ref_kept), (shape, groups, budget)
        check(kept, index, x, budget, groups)


def reference_select(x, budget, groups):
    return vt.select(x, budget, groups=groups, backend="reference")


@pytest.mark.parametrize("impl", IMPLS)
def test_ties_identical_frames(impl):
    """Every score 0 (static clip): every backend keeps the first patches of each group."""
    x = make((2, 8, 7, 5), dup_frames=True)
    for budget in (4, 12, 30):
        kept, index = run(impl, x, budget)
        per = budget // 4
        want = [g * 14 + i for g in range(4) for i in range(per)]
        assert index.tolist() == [want, want]
        assert torch.equal(kept, x.reshape(2, 56, 5)[:, want])


@pytest.mark.parametrize("impl", IMPLS)
def test_ties_duplicated_pairs(impl):
    """Patches that repeat the same pair of vectors score bit-identically: ties by position,
    whatever the position (the score may not depend on where a patch sits)."""
    g = torch.Generator().manual_seed(3)
    for c in (19, 24):  # 24: the C++ kernel's vector path (C % 8 == 0)
        x = torch.randn(1, 4, 33, c, generator=g)
        x[:, :, 5:] = x[:, :, :1]  # 28 copies of patch 0's trajectory, a top score repeated
        x[:, :, 0] *= 0.5
        for budget in (2, 10, 40, 60):
            kept, index = run(impl, x, budget)
            ref_kept, ref_index = reference_select(x, budget, "auto")
            assert torch.equal(index, ref_index) and torch.equal(kept, ref_kept)
            check(kept, index, x, budget)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_scores_agree(impl):
    """inf - inf is NaN: NaN ranks above +inf above every number, ties to the lower position."""
    x = make((2, 4, 6, 3), seed=5)
    x[0, 1, 2, 0] = math.inf  # (1, 0) and (2, 1) pairs: inf; nothing NaN yet
    x[0, 2, 2, 0] = math.inf  # (2, 1): inf - inf = NaN
    x[1, 3, 4, 1] = math.nan
    x[1, 0, 0, 2] = -math.inf
    for budget in (2, 4, 6, 12):
        kept, index = run(impl, x, budget)
        ref_kept, ref_index = reference_select(x, budget, "auto")
        assert torch.equal(index, ref_index), budget
        assert torch.equal(kept.isnan(), ref_kept.isnan())
        assert torch.equal(kept.nan_to_num(), ref_kept.nan_to_num())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_other_dtypes(impl, dtype):
    for shape in ((2, 8, 5, 6), (1, 4, 17, 16)):
        x = make(shape, seed=11, dtype=dtype)
        kept, index = run(impl, x, 22)
        ref_kept, ref_index = reference_select(x, 22, "auto")
        assert torch.equal(index, ref_index) and torch.equal(kept, ref_kept)
        check(kept, index, x, 22)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_input(impl):
    x = make((2, 6, 5, 8), seed=4).transpose(1, 2).contiguous().transpose(1, 2)
    assert not x.is_contiguous()
    kept, index = run(impl, x, 17)
    check(kept, index, x, 17)
    # contiguous, but starting one element into its storage (rows not 8-byte aligned)
    y = make((1, 2 * 6 * 5 * 8 + 1), seed=6)[0, 1:].view(2, 6, 5, 8)
    assert y.is_contiguous() and y.storage_offset() == 1
    kept, index = run(impl, y, 17)
    check(kept, index, y, 17)


@given(
    b=st.integers(1, 2), t=st.integers(1, 9), l=st.integers(1, 20),
    c=st.sampled_from([1, 2, 3, 5, 8, 9, 16]),
    budget=st.integers(1, 80), groups=st.sampled_from(["auto", 1, 2, 3, 4]),
    static=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 2**16),
)
def test_reference_and_cpu_backends_sweep(b, t, l, c, budget, groups, static, seed):
    if groups != "auto" and t % groups:
        groups = "auto"
    x = make((b, t, l, c), seed=seed, static=static)
    if budget < min(oracle_groups(t, groups), t * l):
        with pytest.raises(ValueError, match="budget"):
            vt.select(x, budget, groups=groups, backend="reference")
        return
    kept, index = vt.select(x, budget, groups=groups, backend="reference")
    for name in _NAMES:  # the compiled CPU backends too (not the slow interpreter)
        if name not in ("reference", "triton"):
            k2, i2 = vt.select(x, budget, groups=groups, backend=name)
            assert torch.equal(i2, index) and torch.equal(k2, kept), name
    try:
        check(kept, index, x, budget, groups)
    except Ambiguous:
        pass  # a float32 near-tie: the oracle cannot say which side is right


def _score_impls():
    out = []
    if "cpp" in _NAMES or _cpp_op() is not None:
        out.append("cpp")
    if "triton" in _NAMES or _triton_kernel() is not None:
        out.append("triton")
    return out


@pytest.mark.parametrize("impl", _score_impls())
def test_scores_bit_for_bit(impl, request):
    """Every backend's float32 scores equal the reference's exactly (same in-order sums, no
    FMA), on random data where any other summation order would round differently."""
    if impl == "triton":
        request.getfixturevalue("triton_interpret")
        from vtome_kernels.triton.select import select_scores
    else:
        import vtome_kernels.cpp  # noqa: F401  loads the vtome:: ops

        select_scores = torch.ops.vtome.select_scores
    shapes = [((2, 4, 20, 40), 2), ((1, 6, 9, 64), 3), ((1, 3, 17, 19), 1), ((2, 2, 8, 3), 2)]
    if impl == "cpp":
        shapes.append(((2, 4, 33, 768), 2))
    for i, (shape, groups) in enumerate(shapes):
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            x = (make(shape, seed=i) * 3).to(dtype)
            want = reference.select_scores(x, groups)
            got = select_scores(x, groups)
            assert got.dtype == torch.float32 and torch.equal(got, want), (shape, dtype)


# -- the public contract -----------------------------------------------------------------
def test_auto_groups_rule():
    from vtome_kernels.select import auto_groups

    assert [auto_groups(t) for t in range(1, 17)] == [
        1, 1, 1, 2, 1, 2, 1, 4, 1, 2, 1, 4, 1, 2, 1, 4]


def test_budget_rounding_and_keep_all():
    x = make((2, 8, 6, 5))
    assert vt.select(x, 23)[0].shape == (2, 20, 5)  # rounded down to a multiple of 4
    assert vt.select(x, 23, groups=1)[0].shape == (2, 23, 5)
    for budget in (48, 49, 1000):
        kept, index = vt.select(x, budget)
        assert torch.equal(kept, x.reshape(2, 48, 5))
        assert torch.equal(index, torch.arange(48).expand(2, 48))
    kept, index = vt.select(x, 47)  # 44: a real selection, sorted positions
    assert kept.shape == (2, 44, 5) and (index.diff(dim=1) > 0).all()


def test_empty_batch():
    kept, index = vt.select(torch.randn(0, 4, 3, 2), 5)
    assert kept.shape == (0, 4, 2) and index.shape == (0, 4)


def test_input_untouched_and_gradient():
    x = make((2, 4, 5, 3), seed=2).requires_grad_()
    before = x.detach().clone()
    kept, index = vt.select(x, 8)
    assert torch.equal(x.detach(), before)
    assert not index.requires_grad
    w = torch.randn_like(kept)
    (kept * w).sum().backward()
    want = torch.zeros(2, 20, 3)
    want.scatter_(1, index[..., None].expand(-1, -1, 3), w)
    assert torch.equal(x.grad, want.reshape(2, 4, 5, 3))
    xd = make((1, 4, 3, 2), seed=1, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: vt.select(t, 4)[0], (xd,))


def test_bf16_scores_from_exact_differences():
    """bf16 values convert exactly to float32: the scores of bf16 x and of x.float() agree."""
    x = make((2, 8, 6, 5), seed=9, dtype=torch.bfloat16)
    assert torch.equal(vt.select(x, 20)[1], vt.select(x.float(), 20)[1])


@pytest.mark.parametrize(
    "args,kwargs,exc,words",
    [
        ((torch.randn(2, 4, 3, 2), 0), {}, ValueError, "budget"),
        ((torch.randn(2, 4, 3, 2), -3), {}, ValueError, "budget"),
        ((torch.randn(2, 4, 3, 2), 2.5), {}, TypeError, "budget"),
        ((torch.randn(2, 4, 3, 2), True), {}, TypeError, "budget"),
        ((torch.randn(2, 4, 3, 2), 1), {}, ValueError, "budget"),  # below the 2 groups
        ((torch.randn(4, 3, 2), 4), {}, ValueError, "x must be 4-D"),
        ((torch.randn(1, 2, 4, 3, 2), 4), {}, ValueError, "x must be 4-D"),
        (([[1.0]], 4), {}, TypeError, "x must be a torch.Tensor"),
        ((torch.ones(2, 4, 3, 2, dtype=torch.int64), 4), {}, TypeError, "x must have dtype"),
        ((torch.randn(2, 0, 3, 2), 4), {}, ValueError, "T, L and C"),
        ((torch.randn(2, 6, 3, 2), 4), {"groups": 4}, ValueError, "groups must divide"),
        ((torch.randn(2, 6, 3, 2), 4), {"groups": 0}, ValueError, "groups"),
        ((torch.randn(2, 6, 3, 2), 4), {"groups": "fast"}, ValueError, "groups"),
        ((torch.randn(2, 6, 3, 2), 4), {"groups": True}, TypeError, "groups"),
        ((torch.randn(2, 6, 3, 2), 4), {"groups": 2.0}, TypeError, "groups"),
        ((torch.randn(2, 6, 3, 2), 4), {"backend": "nope"}, ValueError, "backend"),
    ],
)
def test_bad_inputs(args, kwargs, exc, words):
    with pytest.raises(exc, match=words):
        vt.select(*args, **kwargs)


def test_reference_scores_definition():
    """The documented score: squared L2 distance to the previous frame of the group."""
    x = make((1, 6, 4, 3), seed=8)
    s = reference.select_scores(x, 2)
    d = (x[:, 1:] - x[:, :-1]).pow(2).sum(-1)
    assert torch.allclose(s[:, [1, 2, 4, 5]], d[:, [0, 1, 3, 4]])
    assert torch.equal(s[:, 0], s[:, 1]) and torch.equal(s[:, 3], s[:, 4])
    assert torch.equal(reference.select_scores(x, 6), torch.zeros(1, 6, 4))


# -- the benchmark's baseline ------------------------------------------------------------
def test_fluxvit_eager_selects_the_same_tokens():
    """The benchmark's FluxViT recipe keeps what vt.select keeps (random inputs, no ties;
    its group rule agrees with "auto" wherever T % 4 == 0 or T == 2)."""
    from benchmarks.select import fluxvit_eager, fluxvit_groups, make_providers, SelectShape

    assert [fluxvit_groups(t) for t in (2, 4, 6, 8, 16)] == [1, 4, 2, 4, 4]
    for shape, budget in (((2, 8, 7, 5), 20), ((1, 16, 6, 3), 41), ((2, 6, 5, 4), 11)):
        x = make(shape, seed=budget)
        kept, _ = vt.select(x, budget, groups=fluxvit_groups(shape[1]), backend="reference")
        assert torch.equal(fluxvit_eager(x, budget), kept)
    s = SelectShape(1, 8, 7, 5, 20)
    x = s.inputs()
    for name, fn in make_providers(s, torch.device("cpu")).items():
        if name.startswith("vt-"):
            assert torch.equal(fn(x)[0], fluxvit_eager(x, 20)), name


def test_benchmark_main_prints_the_table(capsys):
    from benchmarks.select import main, paper_shapes

    assert len(paper_shapes()) == 20  # budget 2048 >= 8·196 tokens is left out
    assert main(["--quick", "--batch", "1", "--channels", "8", "--budgets", "30",
                 "--layouts", "8x9", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| B=1 T=8 L=9 C=8 K=30 | fluxvit-eager |" in out
    assert "| floor |" in out and "| vt-reference |" in out
