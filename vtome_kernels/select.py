"""Public FluxViT-style token selection: keep a budget of the most changing patches.

``select(x, budget)`` scores every patch of x [B, T, L, C] by its change from the previous
frame of its group, keeps the top budget / G of every group of frames in their original
order and returns them with their positions in the flattened T·L grid (to gather the
positional embeddings). Semantics: ALGORITHM.md section 5; contract: API.md; the
specification: ``reference.select``.
"""

from __future__ import annotations

from typing import Tuple, Union

import torch

from . import _checks
from .backends import resolve

AUTO_GROUPS = (4, 2, 1)


def auto_groups(frames: int) -> int:
    """The largest of 4, 2, 1 that divides ``frames`` and leaves >= 2 frames a group.

    Falls back to 1 (one group of every frame) when no choice leaves two frames, i.e.
    for a single frame.
    """
    for g in AUTO_GROUPS:
        if frames % g == 0 and frames // g >= 2:
            return g
    return 1


def resolve_groups(groups, frames: int) -> int:
    """The group count for ``groups`` ("auto" or an int dividing ``frames``)."""
    if isinstance(groups, str):
        _checks.choice("groups", groups, ("auto",))
        return auto_groups(frames)
    groups = _checks.count("groups", groups, minimum=1)
    if frames % groups:
        raise ValueError(f"groups must divide the frame count T={frames}, got {groups}")
    return groups


def kept_count(budget: int, frames: int, per_frame: int, groups: int) -> int:
    """Tokens kept: every token if budget >= T·L, else budget rounded down to a multiple of
    the group count (an error if that leaves a group nothing)."""
    total = frames * per_frame
    if budget >= total:
        return total
    k = budget - budget % groups
    if k == 0:
        raise ValueError(
            f"budget must be >= the group count {groups} so every group keeps a token, got {budget}"
        )
    return k


def select(
    x: torch.Tensor,
    budget: int,
    *,
    groups: Union[str, int] = "auto",
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``budget`` most changing patches of x [B, T, L, C] (FluxViT selection).

    Returns (kept [B, K, C] in original (t, l) order, index [B, K] int64 positions in the
    flattened T·L grid). K = budget rounded down to a multiple of the group count; a budget
    >= T·L keeps everything (kept is ``x.reshape(B, T*L, C)``, a view when x is
    contiguous). ``groups``: "auto" (the largest of 4, 2, 1 that divides T and leaves >= 2
    frames a group) or an int dividing T. Scores are float32 squared L2 distances to the
    previous frame of the group (the first frame takes the second's score; a one-frame
    group scores 0); the top K / G of every group are kept, ties to the lower position.
    Differentiable in x; x is never modified.
    """
    _checks.tensor("x", x, (4,))
    budget = _checks.count("budget", budget, minimum=1)
    b, t, l, c = x.shape
    if t == 0 or l == 0 or c == 0:
        raise ValueError(f"x must have T, L and C >= 1, got shape {tuple(x.shape)}")
    g = resolve_groups(groups, t)
    module = resolve(backend, "select", x.device)  # an unknown or unusable backend fails here
    k = kept_count(budget, t, l, g)
    if k == t * l or b == 0:
        index = torch.arange(k, device=x.device).expand(b, k).contiguous()
        return (x.reshape(b, t * l, c) if k == t * l else x.new_zeros(b, k, c)), index
    return module.select(x, k // g, g)  # the op's autograd (ops.py) carries the gradient
