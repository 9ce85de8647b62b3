"""vt.flux (a budget and a grid per training step) and vt.resample (a clip on a grid)."""

import pytest
import torch

import vtome_kernels as vt
from vtome_kernels.flux import frame_indices

RULES = dict(patch_size=16, tubelet=2, frames=[4, 8, 12, 16], resolutions=[64, 96, 128])


def test_draws_obey_the_grid_rules():
    f = vt.flux([64, 128, 256], seed=3, **RULES)
    assert f.budgets == (64, 128, 256)
    for b in f.budgets:  # the candidates are exactly vt.grids' for that budget
        assert f.grids[b] == vt.grids(b, **RULES)
    seen = set()
    for step in range(200):
        d = f(step)
        assert d.step == step and d.budget in f.budgets and d.grid in f.grids[d.budget]
        assert 2.0 * 0.75 <= d.grid.tokens / d.budget <= 2.0 * 1.25
        seen.add((d.budget, d.grid.frames, d.grid.resolution))
    every = {(b, g.frames, g.resolution) for b, gs in f.grids.items() for g in gs}
    assert seen == every  # 200 uniform draws reach every (budget, grid) pair here


def test_draw_is_a_function_of_seed_and_step():
    a, b = vt.flux([64, 128, 256], seed=7, **RULES), vt.flux([256, 64, 128], seed=7, **RULES)
    steps = [5, 0, 99, 5, 12345678901]
    assert [a(s) for s in steps] == [b(s) for s in steps]  # order of calls and of budgets: irrelevant
    assert a(5) == a(5)
    assert len({(a(s).budget, a(s).grid) for s in range(30)}) > 1  # steps vary
    other = vt.flux([64, 128, 256], seed=8, **RULES)
    assert [a(s) for s in range(30)] != [other(s) for s in range(30)]


@pytest.mark.parametrize("kwargs, err, words", [
    (dict(budgets=[]), TypeError, "non-empty sequence"),
    (dict(budgets=128), TypeError, "non-empty sequence"),
    (dict(budgets=[0]), ValueError, r"budgets\[0\] must be >= 1"),
    (dict(budgets=[128, 1.5]), TypeError, r"budgets\[1\] must be an int"),
    (dict(budgets=[128], seed=-1), ValueError, "seed must be >= 0"),
    (dict(budgets=[128, 100000]), ValueError, r"no candidate grid over-samples the budgets \[100000\]"),
    (dict(budgets=[128], oversample=0.5), ValueError, "oversample must be >= 1.0"),
    (dict(budgets=[128], frames=[3]), ValueError, "multiples of the tubelet"),
])
def test_sampler_errors(kwargs, err, words):
    rules = {**RULES, **{k: v for k, v in kwargs.items() if k in RULES or k == "oversample"}}
    rest = {k: v for k, v in kwargs.items() if k not in rules}
    with pytest.raises(err, match=words):
        vt.flux(**rest, **rules)


def test_step_errors():
    f = vt.flux([128], **RULES)
    with pytest.raises(ValueError, match="step must be >= 0"):
        f(-1)
    with pytest.raises(TypeError, match="step must be an int"):
        f(1.0)


def test_frame_indices_are_segment_middles():
    assert frame_indices(16, 4) == [2, 6, 10, 14]
    assert frame_indices(16, 16) == list(range(16))
    assert frame_indices(10, 3) == [1, 5, 8]
    assert frame_indices(2, 4) == [0, 0, 1, 1]  # more frames than the clip: repeats
    for total in range(1, 20):
        for frames in range(1, 20):
            idx = frame_indices(total, frames)
            assert len(idx) == frames and idx == sorted(idx) and 0 <= idx[0] and idx[-1] < total


def test_resample_shapes_and_content():
    g = torch.Generator().manual_seed(0)
    video = torch.rand(2, 16, 3, 48, 40, generator=g)
    out = vt.resample(video, (4, 32))
    assert out.shape == (2, 4, 3, 32, 32) and out.dtype == video.dtype
    ref = torch.nn.functional.interpolate(video[:, [2, 6, 10, 14]].reshape(8, 3, 48, 40), size=(32, 32),
                                          mode="bilinear", antialias=True)
    torch.testing.assert_close(out, ref.reshape(2, 4, 3, 32, 32), rtol=0, atol=0)
    # a Grid works as the pair; same sizes are the clip itself
    grid = vt.grids(64, **RULES)[0]
    assert vt.resample(torch.rand(1, 20, 3, 64, 64), grid).shape == (1, grid.frames, 3) + (grid.resolution,) * 2
    assert torch.equal(vt.resample(video[..., :40, :], (16, 40)), video[..., :40, :])
    # antialiasing: a one-pixel checkerboard halved averages to grey instead of aliasing
    board = ((torch.arange(32)[:, None] + torch.arange(32)[None]) % 2).float().expand(1, 1, 3, 32, 32)
    inner = (..., slice(1, -1), slice(1, -1))  # away from the border (clamped)
    torch.testing.assert_close(vt.resample(board, (1, 16))[inner], torch.full((1, 1, 3, 14, 14), 0.5))
    # bf16 and gradients pass through
    assert vt.resample(video.bfloat16(), (8, 24)).dtype == torch.bfloat16
    v = video.clone().requires_grad_(True)
    vt.resample(v, (8, 24)).sum().backward()
    assert v.grad is not None and v.grad.shape == v.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resample_cuda_matches_cpu():
    video = torch.rand(2, 12, 3, 40, 40)
    out = vt.resample(video.cuda(), (6, 24))
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), vt.resample(video, (6, 24)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("video, grid, err, words", [
    ([1.0], (4, 32), TypeError, "video must be a torch.Tensor"),
    (torch.rand(2, 3, 8, 8), (4, 32), ValueError, "5-D"),
    (torch.zeros(1, 4, 3, 8, 8, dtype=torch.uint8), (4, 32), TypeError, "floating point"),
    (torch.rand(1, 4, 3, 8, 8), (4,), TypeError, "pair"),
    (torch.rand(1, 4, 3, 8, 8), (4.0, 32), TypeError, "pair"),
    (torch.rand(1, 4, 3, 8, 8), (0, 32), ValueError, "frames must be >= 1"),
    (torch.rand(1, 4, 3, 8, 8), (4, 0), ValueError, "resolution must be >= 1"),
    (torch.rand(1, 0, 3, 8, 8), (4, 8), ValueError, "empty dimension"),
])
def test_resample_errors(video, grid, err, words):
    with pytest.raises(err, match=words):
        vt.resample(video, grid)
