"""r schedules: how many tokens each layer merges (ALGORITHM.md section 3).

- an int: the same r in every layer;
- a list: used as given, padded with zeros to the depth;
- a pair (r, inflect): ToMe's straight line. first = int(r·(1 - inflect)) (rounded down
  first), last = 2r - first, layer i gets int(first + (last - first)·i / (L - 1))
  (inflect -1: from 2r down to 0; +1: from 0 up to 2r). This is ToMe's ``parse_r`` rule
  exactly, fractional inflects included; one layer (L = 1) gets [first].
"""

from __future__ import annotations

from typing import List, Sequence, Tuple, Union

from . import _checks

Schedule = Union[int, Sequence[int], Tuple[int, float]]


def layer_r(r: Schedule, depth: int) -> List[int]:
    """The r of every layer for a model of ``depth`` blocks."""
    depth = _checks.count("depth", depth, minimum=1)
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"r as a tuple must be (r, inflect), got {r!r}")
        base = _checks.count("r", r[0])
        inflect = r[1]
        if isinstance(inflect, bool) or not isinstance(inflect, (int, float)):
            raise TypeError(f"inflect must be a number, got {type(inflect).__name__}")
        if not -1.0 <= inflect <= 1.0:
            raise ValueError(f"inflect must be in [-1, 1], got {inflect}")
        first = int(base * (1.0 - inflect))  # truncated before the end point is derived
        last = 2 * base - first
        step = (last - first) / (depth - 1) if depth > 1 else 0.0
        return [int(first + step * i) for i in range(depth)]
    if isinstance(r, (list,)):
        values = [_checks.count(f"r[{i}]", v) for i, v in enumerate(r)]
        if len(values) > depth:
            raise ValueError(f"r has {len(values)} entries but the model has {depth} layers")
        return values + [0] * (depth - len(values))
    return [_checks.count("r", r)] * depth
