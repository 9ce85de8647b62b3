"""r schedules (ALGORITHM.md section 3)."""

import pytest

from vtome_kernels.schedule import layer_r


def test_int_list_and_padding():
    assert layer_r(16, 4) == [16, 16, 16, 16]
    assert layer_r([3, 2], 4) == [3, 2, 0, 0]
    assert layer_r(0, 2) == [0, 0]


def test_inflect_lines():
    assert layer_r((8, 0), 5) == [8] * 5
    assert layer_r((8, -1), 5) == [16, 12, 8, 4, 0]  # decreasing: 2r -> 0
    assert layer_r((8, 1), 5) == [0, 4, 8, 12, 16]  # increasing: 0 -> 2r
    assert layer_r((16, -1), 12)[0] == 32 and layer_r((16, -1), 12)[-1] == 0
    assert abs(sum(layer_r((16, -1), 12)) - 16 * 12) <= 12  # about r * L in total
    assert layer_r((5, -1), 1) == [10]


def tome_rule(r, inflect, layers):
    """ToMe's parse_r for a pair (r, inflect), transcribed from its description: the first
    layer's r truncated to an int, the last 2r minus it, a straight line between."""
    start = int(r * (1.0 - inflect))
    end = 2 * r - start
    return [int(start + (end - start) / (layers - 1) * i) for i in range(layers)]


def test_fractional_inflect_follows_tome():
    assert layer_r((1, -0.5), 12) == [1] * 12  # the truncated start 1 gives a flat line
    inflects = sorted({k / 20 for k in range(-20, 21)} | {-0.77, -0.33, 0.1, 0.33, 0.66, 0.9})
    for layers in (2, 3, 7, 12, 24):
        for r in range(0, 41):
            for inflect in inflects:
                assert layer_r((r, inflect), layers) == tome_rule(r, inflect, layers), (r, inflect, layers)


@pytest.mark.parametrize("bad,exc,msg", [
    (-1, ValueError, "r must be >= 0"),
    ([1, -2], ValueError, r"r\[1\] must be >= 0"),
    ([1] * 5, ValueError, "r has 5 entries but the model has 4 layers"),
    ((8, 2.0), ValueError, r"inflect must be in \[-1, 1\]"),
    ((8, 0, 1), ValueError, r"must be \(r, inflect\)"),
    ((8, "a"), TypeError, "inflect must be a number"),
    (1.5, TypeError, "r must be an int"),
])
def test_bad_schedules(bad, exc, msg):
    with pytest.raises(exc, match=msg):
        layer_r(bad, 4)
