"""Triton backend: fused matching, merging and proportional attention (issue 3).

The backend contract of ``backends.py``: ``NAME``, ``status()``, ``supports(device)`` and
the functions of ``reference.py`` with the same signatures and results (same matching
bit for bit in float32, merged values within float32 rounding). Kernels live in
``match.py``, ``merge.py`` and ``attention.py`` and are imported on first use, so importing
this module neither imports Triton nor touches a GPU driver.

CUDA tensors run compiled kernels. CPU tensors run only when this backend is asked for by
name and ``TRITON_INTERPRET=1`` was set before the kernels were first imported (Triton's
interpreter: exact but slow, meant for tests).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types
from typing import Optional, Tuple

import torch

NAME = "triton"
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


def status() -> Tuple[bool, str]:
    """(available, why): Triton must be importable (its import touches no driver)."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    try:
        import triton
    except Exception as exc:  # a broken install: say what failed
        return False, f"triton failed to import: {exc!r}"
    mode = "interpreter on CPU tensors (TRITON_INTERPRET=1)" if interpreting() else "CUDA tensors"
    return True, f"triton {triton.__version__}: {mode}"


def _loaded_compiled() -> bool:
    """Kernels already imported as compiled (not interpreted) functions."""
    mod = sys.modules.get("vtome_kernels.triton.match")
    if mod is None:
        return False
    return type(mod._match_kernel).__name__ != "InterpretedFunction"


def supports(device: torch.device) -> Optional[str]:
    """None if the kernels can run on ``device``, else the reason."""
    device = torch.device(device)
    if device.type == "cuda":
        if interpreting():
            return "TRITON_INTERPRET=1 is set: the kernels run on CPU tensors only"
        return None
    if device.type == "cpu":
        if not interpreting():
            return ("Triton compiles for GPUs; CPU tensors run only in its interpreter, "
                    "set TRITON_INTERPRET=1 (slow, for tests)")
        if _loaded_compiled():
            return ("the kernels were imported before TRITON_INTERPRET=1 was set; "
                    "set it before the first use")
        return None
    return f"Triton kernels run on CUDA tensors, not {device.type}"


def match(metric, r: int, class_token: bool, distill_token: bool):
    """reference.match in two launches (scores, then ranking); no score matrix is stored."""
    from .match import match_op
    return match_op(metric, r, class_token, distill_token, MATCH_PRECISION)


def merge(x, size, out_idx, src_idx, dst_pos, src_merged=None):
    """reference.merge in one launch; differentiable in x and size."""
    from .merge import merge_op
    return merge_op(x, size, out_idx, src_idx, dst_pos, src_merged)


def merge_source(source, out_idx, src_idx, dst_pos, src_merged=None):
    """reference.merge_source in one launch (union of the members' 0/1 rows)."""
    from .merge import merge_source_op
    return merge_source_op(source, out_idx, src_idx, dst_pos, src_merged)


def unmerge(y, out_idx, src_idx, dst_pos, n: int):
    """reference.unmerge in one launch; differentiable in y."""
    from .merge import unmerge_op
    return unmerge_op(y, out_idx, src_idx, dst_pos, n)


def prop_attention(q, k, v, size, scale: float):
    """reference.prop_attention as a flash-style kernel; differentiable in q, k and v."""
    from .attention import prop_attention_op
    return prop_attention_op(q, k, v, size, scale)


def select(x, k_per_group: int, groups: int):
    """reference.select in two launches (scores, then per-group top-K and gather)."""
    from .select import select as select_kernel
    return select_kernel(x, k_per_group, groups)


class _BackendModule(types.ModuleType):
    """Keeps the contract functions ``match`` / ``merge`` / ``select`` when their kernel submodules (of
    the same names) are imported: Python would otherwise overwrite the package attribute
    with the submodule. The submodules stay reachable through ``sys.modules``."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and name in ("match", "merge", "select"):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _BackendModule
