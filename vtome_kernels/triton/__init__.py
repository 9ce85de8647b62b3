"""Triton kernels: fused matching, merging, selection and proportional attention.

One file per kernel family (``match.py``, ``merge.py``, ``select.py``, ``attention.py``:
kernels and their launch helpers) and ``backend.py``, the "triton" backend, which
registers them as the CUDA kernels of the vtome:: ops (ops.py). Importing this package
neither imports Triton nor touches a GPU driver: the kernel files are imported on the
first call. This module holds what the kernel files share.

CUDA tensors run compiled kernels. CPU tensors run in Triton's interpreter (exact but
slow, meant for tests): ``TRITON_INTERPRET=1`` set before triton is first imported, and
the call made inside ``cpu_interpreter()`` (backend.py), which lends the ops' CPU
dispatch key to these kernels.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional, Tuple

import torch

# How match computes similarities: "exact" (default) accumulates k = 0..d-1 one multiply
# and one add at a time, bit-identical to the reference; "tf32" uses tl.dot tiles on tensor
# cores (faster on a GPU) and may then break exact ties and near-ties differently.
MATCH_PRECISION = "exact"


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


_GPU_TILES = [False]  # forced by gpu_tiles(): the interpreter runs the GPU's tile sizes


def large_tiles() -> bool:
    """Whether launches pick the interpreter's large tiles (few Python-level steps, so test
    shapes fit in one tile) rather than the GPU's: under the interpreter, unless forced."""
    return interpreting() and not _GPU_TILES[0]


@contextlib.contextmanager
def gpu_tiles():
    """Within this block the interpreter runs the tile sizes a GPU runs (slow, but the
    cross-tile paths execute: argmax ties across B tiles, online-softmax rescaling across
    key blocks, several channel and source blocks, many rank programs per group)."""
    before = _GPU_TILES[0]
    _GPU_TILES[0] = True
    try:
        yield
    finally:
        _GPU_TILES[0] = before


# CUDA's grid limits: axis 0 up to 2**31 - 1 programs, axes 1 and 2 up to 65535. Every
# kernel puts its large count (groups x rows, batch x heads x blocks) on axis 0.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def check_grid(kernel, grid: Tuple[int, ...]) -> None:
    """Raise before a launch that CUDA would refuse (or that would overflow a program id)."""
    for axis, (n, limit) in enumerate(zip(grid, GRID_LIMITS)):
        if n > limit:
            name = getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))
            raise ValueError(f"{name}: grid {tuple(grid)} exceeds CUDA's limit {limit} on axis {axis}")


def _device(args) -> Optional[torch.device]:
    """The device of the first tensor argument (every launch passes its tensors first)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def _run(kernel, grid, args, kwargs) -> None:
    kernel[grid](*args, **kwargs)


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) on the device of the tensor arguments.

    An empty grid launches nothing (CUDA refuses size 0); a grid beyond CUDA's limits
    raises. CUDA launches run under ``torch.cuda.device(tensor.device)``: Triton launches on
    the current device and its current stream, which need not be the tensors' (cuda:1 while
    cuda:0 is current). The guard costs one device exchange when they already agree.
    """
    grid = tuple(int(v) for v in grid)
    if any(v == 0 for v in grid):
        return
    check_grid(kernel, grid)
    device = _device(args)
    if device is not None and device.type == "cuda":
        with torch.cuda.device(device):
            _run(kernel, grid, args, kwargs)
    else:
        _run(kernel, grid, args, kwargs)


from .backend import cpu_interpreter  # noqa: E402,F401  (after the names backend.py reads)
