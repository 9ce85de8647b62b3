"""Which (frames, resolution) grid to sample for a token budget, the FluxViT way.

FluxViT samples a clip more densely than the budget allows and lets ``select`` keep the
most changing patches: for a 1024-token budget, 12-16 frames at 168² (patch 14) beat 4
frames at 224² by about 3 points (ALGORITHM.md section 5). ``grids`` lists the candidate
grids whose token count over-samples the budget by a chosen factor, more frames (at a
lower resolution) first.
"""

from __future__ import annotations

import numbers
from typing import Iterable, List, NamedTuple, Optional, Sequence

from . import _checks


class Grid(NamedTuple):
    """One sampling grid: ``frames`` at ``resolution``² pixels."""

    frames: int  # frames sampled from the clip
    resolution: int  # square side in pixels, a multiple of the patch size
    temporal: int  # T = frames / tubelet: token frames
    per_frame: int  # L = (resolution / patch_size)²: patches per token frame
    tokens: int  # T·L: tokens before selection
    oversample: float  # tokens / budget


def _factor(name: str, value, minimum: float, below: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not value >= minimum or (below is not None and not value < below):
        want = f">= {minimum}" + (f" and < {below}" if below is not None else "")
        raise ValueError(f"{name} must be {want}, got {value}")
    return value


def _ints(name: str, values, step: int, what: str) -> List[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a sequence of ints, got {type(values).__name__}")
    out = [_checks.count(f"{name}[{i}]", v, minimum=1) for i, v in enumerate(values)]
    bad = [v for v in out if v % step]
    if bad:
        raise ValueError(f"{name} must be multiples of the {what} {step}, got {bad}")
    return out


def grids(
    budget: int,
    *,
    patch_size: int = 14,
    tubelet: int = 1,
    oversample: float = 2.0,
    tolerance: float = 0.25,
    frames: Optional[Sequence[int]] = None,
    resolutions: Optional[Sequence[int]] = None,
) -> List[Grid]:
    """Grids whose token count is within ``oversample·(1 ± tolerance)`` of ``budget``.

    Tokens of a grid: (frames / tubelet)·(resolution / patch_size)². Candidates default to
    frames in multiples of 4·tubelet up to 32·tubelet (so ``select`` can use 4 groups)
    and resolutions of 12 to 16 patches a side (168² to 224² with 14-pixel patches).
    Ordered as FluxViT prefers: more frames first, then lower resolution. Empty when no
    candidate fits (widen ``tolerance`` or the candidates).

    >>> g = grids(1024)[0]; (g.frames, g.resolution, g.tokens)
    (16, 168, 2304)
    """
    budget = _checks.count("budget", budget, minimum=1)
    patch_size = _checks.count("patch_size", patch_size, minimum=1)
    tubelet = _checks.count("tubelet", tubelet, minimum=1)
    oversample = _factor("oversample", oversample, 1.0)
    tolerance = _factor("tolerance", tolerance, 0.0, below=1.0)
    if frames is None:
        frames = range(4 * tubelet, 32 * tubelet + 1, 4 * tubelet)
    if resolutions is None:
        resolutions = [n * patch_size for n in range(12, 17)]
    frames = _ints("frames", frames, tubelet, "tubelet")
    resolutions = _ints("resolutions", resolutions, patch_size, "patch size")

    lo, hi = budget * oversample * (1 - tolerance), budget * oversample * (1 + tolerance)
    out = []
    for f in sorted(set(frames), reverse=True):
        for res in sorted(set(resolutions)):
            t, l = f // tubelet, (res // patch_size) ** 2
            if lo <= t * l <= hi:
                out.append(Grid(f, res, t, l, t * l, t * l / budget))
    return out
