"""vt.grids: sampling grids that over-sample a token budget, more frames first."""

import pytest

import vtome_kernels as vt


def test_fluxvit_example_1024_tokens():
    """ALGORITHM.md section 5: for 1024 tokens, 16 frames at 168² (patch 14) come first."""
    out = vt.grids(1024)
    assert (out[0].frames, out[0].resolution, out[0].tokens) == (16, 168, 16 * 144)
    assert (12, 168) in [(g.frames, g.resolution) for g in out]
    # 4 frames at 224² is the budget itself: only listed without over-sampling
    assert (4, 224) not in [(g.frames, g.resolution) for g in out]
    exact = vt.grids(1024, oversample=1.0, tolerance=0.0)
    assert [(g.frames, g.resolution) for g in exact] == [(4, 224)]


@pytest.mark.parametrize("budget", [512, 1024, 2048, 3072])
@pytest.mark.parametrize("patch,tubelet", [(14, 1), (16, 2)])
def test_window_order_and_fields(budget, patch, tubelet):
    out = vt.grids(budget, patch_size=patch, tubelet=tubelet, oversample=2.0, tolerance=0.3)
    assert out, "the defaults should offer a grid for the paper budgets"
    for g in out:
        assert g.frames % tubelet == 0 and g.resolution % patch == 0
        assert g.temporal == g.frames // tubelet and g.per_frame == (g.resolution // patch) ** 2
        assert g.tokens == g.temporal * g.per_frame and g.oversample == g.tokens / budget
        assert 2.0 * 0.7 <= g.oversample <= 2.0 * 1.3
    keys = [(-g.frames, g.resolution) for g in out]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)


def test_custom_candidates_and_empty():
    out = vt.grids(100, patch_size=10, frames=[1, 2, 3, 8], resolutions=[30, 50], oversample=1.5,
                   tolerance=0.5)
    # window [75, 225] tokens; L = 9 at 30², 25 at 50²
    assert [(g.frames, g.resolution, g.tokens) for g in out] == [(8, 50, 200), (3, 50, 75)]
    assert vt.grids(10, frames=[4], resolutions=[224]) == []


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        (dict(budget=0), ValueError, "budget"),
        (dict(budget=1.5), TypeError, "budget"),
        (dict(budget=64, patch_size=0), ValueError, "patch_size"),
        (dict(budget=64, tubelet=-1), ValueError, "tubelet"),
        (dict(budget=64, oversample=0.5), ValueError, "oversample"),
        (dict(budget=64, oversample="2"), TypeError, "oversample"),
        (dict(budget=64, tolerance=1.0), ValueError, "tolerance"),
        (dict(budget=64, tolerance=-0.1), ValueError, "tolerance"),
        (dict(budget=64, tubelet=2, frames=[4, 5]), ValueError, "tubelet"),
        (dict(budget=64, resolutions=[100]), ValueError, "patch size"),
        (dict(budget=64, frames=[0]), ValueError, "frames"),
        (dict(budget=64, frames=8), TypeError, "frames"),
    ],
)
def test_bad_inputs(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        vt.grids(**kwargs)
