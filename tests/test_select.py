"""vt.select (FluxViT selection): the public contract and the reference against the loop
oracle (tests/oracle.py). Every other backend is checked against the reference in
test_backends.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vtome_kernels as vt
from cases import check_select, make_clip, select_cases
from oracle import Ambiguous, select_groups
from vtome_kernels import reference


@pytest.mark.parametrize("shape,groups,budget", select_cases())
def test_reference_against_oracle(shape, groups, budget):
    for static in (0.0, 0.5):
        x = make_clip(shape, seed=budget, static=static)
        kept, index = vt.select(x, budget, groups=groups, backend="reference")
        check_select(kept, index, x, budget, groups)


@given(
    b=st.integers(1, 2), t=st.integers(1, 9), l=st.integers(1, 20),
    c=st.sampled_from([1, 2, 3, 5, 8, 9, 16]),
    budget=st.integers(1, 80), groups=st.sampled_from(["auto", 1, 2, 3, 4]),
    static=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 2**16),
)
def test_reference_and_cpu_backends_sweep(b, t, l, c, budget, groups, static, seed):
    if groups != "auto" and t % groups:
        groups = "auto"
    x = make_clip((b, t, l, c), seed=seed, static=static)
    if budget < min(select_groups(t, groups), t * l):
        with pytest.raises(ValueError, match="budget"):
            vt.select(x, budget, groups=groups, backend="reference")
        return
    kept, index = vt.select(x, budget, groups=groups, backend="reference")
    if vt.backends()["cpp"].available:  # the C++ kernels too (not the slow interpreter)
        k2, i2 = vt.select(x, budget, groups=groups, backend="cpp")
        assert torch.equal(i2, index) and torch.equal(k2, kept)
    try:
        check_select(kept, index, x, budget, groups)
    except Ambiguous:
        pass  # a float32 near-tie: the oracle cannot say which side is right


# -- the public contract -----------------------------------------------------------------
def test_auto_groups_rule():
    from vtome_kernels.select import auto_groups

    assert [auto_groups(t) for t in range(1, 17)] == [
        1, 1, 1, 2, 1, 2, 1, 4, 1, 2, 1, 4, 1, 2, 1, 4]


def test_budget_rounding_and_keep_all():
    x = make_clip((2, 8, 6, 5))
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


def test_bf16_scores_from_exact_differences():
    """bf16 values convert exactly to float32: the scores of bf16 x and of x.float() agree."""
    x = make_clip((2, 8, 6, 5), seed=9, dtype=torch.bfloat16)
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
    x = make_clip((1, 6, 4, 3), seed=8)
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
        x = make_clip(shape, seed=budget)
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
