"""Flux, FluxViT's flexible sampling for training: a budget and a grid per step, and the
clip resampled to that grid.

Every training step draws a token budget from a set and a sampling grid (frames,
resolution) whose token count over-samples that budget (the rules of ``vt.grids``); the
clip is resampled to the grid (``resample``) and the patched model keeps the budget by
selection (``select=budget``). One model so learns every budget and every grid; at test
time the best grid for a budget is chosen ("token optimisation"). The draw depends on
(seed, step) alone, so every rank of a distributed job draws the same grid at a step.
"""

from __future__ import annotations

import numbers
import random
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from . import _checks
from .grid import Grid, grids


class Draw(NamedTuple):
    """One step's draw: the token budget to keep and the grid to sample the clip on."""

    step: int
    budget: int
    grid: Grid


class Flux:
    """Draws (budget, grid) per training step; build it with ``vt.flux``."""

    def __init__(self, budgets: Sequence[int], *, seed: int = 0, patch_size: int = 14, tubelet: int = 1,
                 oversample: float = 2.0, tolerance: float = 0.25, frames: Optional[Sequence[int]] = None,
                 resolutions: Optional[Sequence[int]] = None):
        if isinstance(budgets, (str, bytes)) or not isinstance(budgets, Sequence) or len(budgets) == 0:
            raise TypeError(f"budgets must be a non-empty sequence of ints, got {budgets!r}")
        self.budgets: Tuple[int, ...] = tuple(
            sorted(set(_checks.count(f"budgets[{i}]", b, minimum=1) for i, b in enumerate(budgets))))
        self.seed = _checks.count("seed", seed, minimum=0)
        rules = dict(patch_size=patch_size, tubelet=tubelet, oversample=oversample, tolerance=tolerance,
                     frames=frames, resolutions=resolutions)
        self.grids: Dict[int, List[Grid]] = {b: grids(b, **rules) for b in self.budgets}
        empty = [b for b, g in self.grids.items() if not g]
        if empty:
            raise ValueError(f"no candidate grid over-samples the budgets {empty} by {oversample} +- "
                             f"{tolerance * 100:g}%: widen tolerance, frames or resolutions")

    def __call__(self, step: int) -> Draw:
        """The draw of training step ``step``: a budget uniformly from the set, then a grid
        uniformly from that budget's candidates; a function of (seed, step) only."""
        step = _checks.count("step", step, minimum=0)
        rng = random.Random(f"vtome-flux:{self.seed}:{step}")  # str seed: SHA-512, same in every process
        budget = rng.choice(self.budgets)
        return Draw(step, budget, rng.choice(self.grids[budget]))

    def __repr__(self) -> str:
        return f"Flux(budgets={list(self.budgets)}, seed={self.seed})"


def flux(budgets: Sequence[int], *, seed: int = 0, patch_size: int = 14, tubelet: int = 1,
         oversample: float = 2.0, tolerance: float = 0.25, frames: Optional[Sequence[int]] = None,
         resolutions: Optional[Sequence[int]] = None) -> Flux:
    """A Flux sampler: ``flux(budgets)(step)`` is that step's ``Draw(step, budget, grid)``.

    budgets: the token budgets to train for (each step keeps one by selection); the grid
    options are those of ``vt.grids`` (a grid's tokens are within
    ``oversample·(1 ± tolerance)`` of the budget), and every budget must have a grid.
    seed: with the step, the only input of a draw (same grid on every rank at a step).

    >>> f = flux([128, 256], patch_size=16, tubelet=2, frames=[4, 8, 16], resolutions=[96, 128])
    >>> d = f(3); (d.budget, d.grid.frames, d.grid.resolution, d.grid.tokens)
    (256, 16, 128, 512)
    """
    return Flux(budgets, seed=seed, patch_size=patch_size, tubelet=tubelet, oversample=oversample,
                tolerance=tolerance, frames=frames, resolutions=resolutions)


def frame_indices(total: int, frames: int) -> List[int]:
    """Segment-uniform sampling: ``frames`` equal segments of ``total`` frames, the middle
    frame of each (a frame repeats when frames > total)."""
    total = _checks.count("total", total, minimum=1)
    frames = _checks.count("frames", frames, minimum=1)
    return [min(total - 1, ((2 * i + 1) * total) // (2 * frames)) for i in range(frames)]


def resample(video: torch.Tensor, grid: Union[Grid, Tuple[int, int]]) -> torch.Tensor:
    """A clip batch [B, T0, C, H0, W0] on a grid: [B, frames, C, resolution, resolution].

    grid: a ``Grid`` (of ``vt.grids`` or a ``Draw``) or a pair (frames, resolution).
    Frames are sampled segment-uniformly (``frame_indices``), then each frame is resized
    to resolution² (bilinear, antialiased: ``torch.nn.functional.interpolate(...,
    antialias=True)``, half precision in float32; a non-square frame is stretched).
    Floating-point video, on the video's device; unchanged sizes are not resized.
    """
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"video must be a torch.Tensor, got {type(video).__name__}")
    if video.dim() != 5:
        raise ValueError(f"video must be 5-D [B, T, C, H, W], got shape {tuple(video.shape)}")
    if not video.is_floating_point():
        raise TypeError(f"video must be floating point (antialiased resize), got {video.dtype}")
    if isinstance(grid, Grid):
        frames, res = grid.frames, grid.resolution
    elif isinstance(grid, Sequence) and len(grid) == 2 and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in grid):
        frames, res = int(grid[0]), int(grid[1])
    else:
        raise TypeError(f"grid must be a vt.Grid or a pair (frames, resolution) of ints, got {grid!r}")
    frames = _checks.count("frames", frames, minimum=1)
    res = _checks.count("resolution", res, minimum=1)
    b, t0, c, h0, w0 = video.shape
    if t0 == 0 or h0 == 0 or w0 == 0:
        raise ValueError(f"video has an empty dimension: shape {tuple(video.shape)}")
    idx = frame_indices(t0, frames)
    x = video if idx == list(range(t0)) else video[:, torch.tensor(idx, device=video.device)]
    if (h0, w0) == (res, res):
        return x
    wide = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32  # no bf16 antialias on CPU
    y = torch.nn.functional.interpolate(x.reshape(b * frames, c, h0, w0).to(wide), size=(res, res),
                                        mode="bilinear", align_corners=False, antialias=True)
    return y.reshape(b, frames, c, res, res).to(x.dtype)
