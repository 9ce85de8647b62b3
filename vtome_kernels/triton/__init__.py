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

import os

# How match computes similarities: "exact" (default) accumulates k = 0..d-1 one multiply
# and one add at a time, bit-identical to the reference; "tf32" uses tl.dot tiles on tensor
# cores (faster on a GPU) and may then break exact ties and near-ties differently.
MATCH_PRECISION = "exact"


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs); an empty grid launches nothing (CUDA refuses size 0)."""
    if any(int(v) == 0 for v in grid):
        return
    kernel[grid](*args, **kwargs)


from .backend import cpu_interpreter  # noqa: E402,F401  (after the names backend.py reads)
