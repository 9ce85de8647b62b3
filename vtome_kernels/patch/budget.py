"""Token counts, FLOPs and the r that meets a budget, from a patched model and an input shape.

FLOPs are counted from the tokens that enter each block (what the schedule and the
clamping of each merge imply): the linear layers and the two attention products of every
block, the MLP on the tokens left after the merge, the matching's score matrix, the key
projection of layer choice's keys-only steps, the patch embedding, and an attentive
pooler's layers on the final tokens (V-JEPA 2's head). Multiply-adds count two.
Normalisations, softmax and a linear head are left out (a few percent at most); the ratio
patched / unpatched is what the budget uses.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

from .. import _checks
from .common import MergeState, kept_tokens, state_of

SCHEDULES = ("constant", "decreasing")


def _shape(input_shape) -> Tuple[int, ...]:
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence):
        raise TypeError(f"input_shape must be a tuple of ints, got {type(input_shape).__name__}")
    return tuple(_checks.count(f"input_shape[{i}]", v, minimum=1) for i, v in enumerate(input_shape))


def _counts(state: MergeState, grid, steps: List[List[int]]) -> Tuple[List[int], List[List[Tuple[int, int]]]]:
    """Tokens entering each block (per frame for "dst", with protected tokens for "st"), then
    the final count; and every block's merge steps (``MergeState.steps``) as (tokens before
    the step, r it really merges: clamped to half), the last one the block's own merge."""
    t, h, w = grid
    n = h * w if state.scheme == "dst" else kept_tokens(state, grid) + state.protected
    protected = 0 if state.scheme == "dst" else state.protected
    counts, merges = [], []
    for block in steps:
        counts.append(n)
        done = []
        for r in block:
            rr = max(0, min(r, (n - protected) // 2))
            done.append((n, rr))
            n -= rr
        merges.append(done)
    counts.append(n)
    return counts, merges


def _seq(state: MergeState, grid, n: int) -> int:
    """The sequence length a block sees for n tokens (per frame for "dst")."""
    return 1 + n * grid[0] if state.scheme == "dst" else n


def token_counts(model, input_shape, r=None) -> List[int]:
    """Sequence length entering every block, then the final one (len = depth + 1).

    input_shape: what the model takes ([B, C, H, W] for timm, [B, T, C, H, W] for the video
    models); r: a schedule, None for ``model.r``.
    """
    state = state_of(model)
    grid = state.grid_of(_shape(input_shape))
    counts, _ = _counts(state, grid, state.steps(model.r if r is None else r))
    return [_seq(state, grid, n) for n in counts]


def flops(model, input_shape, r=None) -> float:
    """FLOPs of one forward of ``input_shape`` under schedule r (None: ``model.r``)."""
    state = state_of(model)
    shape = _shape(input_shape)
    grid = state.grid_of(shape)
    counts, merges = _counts(state, grid, state.steps(model.r if r is None else r))
    cost = state.cost
    d = cost.dim // cost.heads if state.metric == "mean" else cost.dim
    total = cost.embed(grid[0] * grid[1] * grid[2])
    for block in merges:
        total += sum(cost.keys_step(n, rr, d) for n, rr in block[:-1])  # layer choice
        total += cost.block(*block[-1], d)  # the block on the tokens it sees, and its merge
    total += cost.head(counts[-1])  # an attentive pooler on the final tokens
    return total * shape[0]


def budget(model, input_shape, *, flops_ratio: Optional[float] = None,
           tokens: Optional[int] = None, schedule: str = "constant") -> Union[int, Tuple[int, float]]:
    """The smallest r whose schedule meets the budget; set it with ``model.r = ...``.

    Give one of flops_ratio (a fraction of the unpatched FLOPs, 0 < f <= 1) or tokens (the
    largest final sequence length allowed). schedule "constant" returns an int r,
    "decreasing" a pair (r, -1.0) (from 2r in the first block down to 0). Honours the
    patch's options (``layer``, ``metric``). Raises ValueError if no r reaches the budget.
    """
    state = state_of(model)
    shape = _shape(input_shape)
    _checks.choice("schedule", schedule, SCHEDULES)
    if (flops_ratio is None) == (tokens is None):
        raise ValueError("give exactly one of flops_ratio and tokens")
    if flops_ratio is not None:
        if isinstance(flops_ratio, bool) or not isinstance(flops_ratio, (int, float)):
            raise TypeError(f"flops_ratio must be a float, got {type(flops_ratio).__name__}")
        if not 0 < flops_ratio <= 1:
            raise ValueError(f"flops_ratio must be in (0, 1], got {flops_ratio}")
    else:
        tokens = _checks.count("tokens", tokens, minimum=1)

    def sched(r):
        return r if schedule == "constant" else (r, -1.0)

    base = flops(model, shape, 0)
    grid = state.grid_of(shape)
    limit = grid[0] * grid[1] * grid[2] + 1  # beyond this r nothing changes
    best = None
    for r in range(limit + 1):
        if flops_ratio is not None:
            value = flops(model, shape, sched(r)) / base
            ok = value <= flops_ratio + 1e-12
        else:
            value = token_counts(model, shape, sched(r))[-1]
            ok = value <= tokens
        best = value if best is None else min(best, value)
        if ok:
            return sched(r)
    what = "FLOP ratio" if flops_ratio is not None else "final token count"
    target = flops_ratio if flops_ratio is not None else tokens
    raise ValueError(f"no {schedule} schedule reaches a {what} of {target}; the least possible "
                     f"is {best:.4g}")
