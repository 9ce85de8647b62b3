"""The "cpp" backend: the CPU kernels of the C++ extension ``vtome_kernels._C`` (csrc/).

Loading the extension registers its kernels for the CPU dispatch key of the vtome:: ops
(ops.py defines the ops; csrc/ registers implementations only). match fuses
normalisation, exact scores with a running row max/argmax (no score matrix in memory),
ranking and the output layout; merge builds every output row in one pass; merge_fused is
the two in one op. All are bit-for-bit the reference's choices (see csrc/scores/scores.h
for why the scores are exact) and run in parallel over groups and rows. Proportional
attention on CPU is torch's fused SDPA kernel (the reference's): nothing to gain in C++.

Built by setup.py unless VTOME_NO_EXT=1; unbuilt, or with VTOME_NO_EXT=1 set when the
package is imported (a pure-Python install, emulated), status() says so and "auto" falls
back to the reference.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from . import ops, reference
from .ops import match, merge, merge_fused, merge_source, select, select_scores, unmerge  # noqa: F401

NAME = "cpp"

_C = None
if os.environ.get("VTOME_NO_EXT", "") not in ("", "0"):
    _WHY = "VTOME_NO_EXT=1 is set: a pure-Python install, the C++ extension is not loaded"
else:
    try:
        from . import _C  # registers the CPU kernels of the vtome:: ops
    except ImportError as exc:  # a pure-Python install or a failed build
        _WHY = ("the C++ extension vtome_kernels._C is not built (pure-Python install with "
                f"VTOME_NO_EXT=1, or no compiler at install time): {exc}")
    else:
        _WHY = f"C++ CPU kernels ({_C.score_kernel()} score kernel)"


def status() -> Tuple[bool, str]:
    """(available, why): available when the extension vtome_kernels._C is loaded."""
    return _C is not None, _WHY


def supports(device: torch.device) -> Optional[str]:
    """None on CPU (the kernels read host memory only), unless another backend holds the
    ops' CPU dispatch key for now (the Triton interpreter in tests)."""
    if device.type != "cpu":
        return f"the C++ kernels run on CPU tensors, got {device.type}"
    if ops.cpu_override is not None:
        return f"the CPU kernels of the vtome ops are lent to {ops.cpu_override} for now"
    return None


prop_attention = reference.prop_attention
