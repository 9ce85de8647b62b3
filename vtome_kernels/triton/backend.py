"""The "triton" backend: the Triton kernels registered as the CUDA kernels of the vtome:: ops.

Each kernel below is a thin function that imports its kernel file on the first call
(``import vtome_kernels`` imports no Triton) and launches it; they are registered for the
CUDA dispatch key of the ops of ops.py when this module is imported, which the package
does at import time (so a saved torch.export program finds them). Results: the same
matching bit for bit in float32 as the reference (MATCH_PRECISION="exact"), merged values
within float32 rounding. merge_fused is this backend's match then its merge (3 launches).

CPU tensors: Triton's interpreter (TRITON_INTERPRET=1 set before triton is first
imported) runs the same kernels on host memory. The ops' CPU dispatch key belongs to the
C++ extension, so ``cpu_interpreter()`` lends it to these kernels for the duration of a
``with`` block (tests) and gives it back on exit; on a pure-Python install there is no C++
kernel to displace, and it works the same.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from typing import Optional, Tuple

import torch

from .. import _checks, ops
from ..ops import (match, merge, merge_fused, merge_source, prop_attention, select,  # noqa: F401
                   select_scores, unmerge)
from . import interpreting

NAME = "triton"


# --------------------------------------------------------------------------------------
# the kernels of the vtome:: ops
# --------------------------------------------------------------------------------------
def match_kernel(metric, r, class_token, distill_token):
    from . import MATCH_PRECISION
    from .match import match_impl

    return match_impl(metric, r, class_token, distill_token, MATCH_PRECISION)


def merge_kernel(x, size, out_idx, src_idx, dst_pos, src_merged):
    from .merge import merge_fwd

    return merge_fwd(x, size, out_idx, src_idx, dst_pos, src_merged)


def merge_backward_kernel(grad, grad_size, x, size, out_idx, src_idx, dst_pos, src_merged):
    """The transposed gather; it reads the forward's outputs, recomputed here (one launch)."""
    from .merge import merge_bwd, merge_fwd

    out_x, out_s = merge_fwd(x, size, out_idx, src_idx, dst_pos, src_merged)
    grad_s = None if grad_size is None else grad_size.contiguous()
    return merge_bwd(grad, grad_s, x, size, out_x, out_s, out_idx, src_idx, dst_pos, src_merged)


def merge_fused_kernel(x, size, metric, r, class_token, distill_token):
    """This backend's match, then its merge; sizes must be positive (checked eagerly)."""
    from .merge import merge_fwd

    if size is None:
        size = torch.ones(x.shape[:-1] + (1,), dtype=torch.float32, device=x.device)
    else:
        _checks.sizes("size", size)
    out_idx, src_idx, dst_pos, _ = match_kernel(metric, r, class_token, distill_token)
    out_x, out_s = merge_fwd(x, size, out_idx, src_idx, dst_pos, None)
    return out_x, out_s, out_idx, src_idx, dst_pos


def merge_source_kernel(source, out_idx, src_idx, dst_pos, src_merged):
    from .merge import merge_source_fwd

    return merge_source_fwd(source, out_idx, src_idx, dst_pos, src_merged)


def unmerge_kernel(y, out_idx, src_idx, dst_pos, n):
    from .merge import unmerge_fwd

    return unmerge_fwd(y, out_idx, src_idx, dst_pos, n)


def unmerge_backward_kernel(grad, out_idx, src_idx, dst_pos):
    from .merge import unmerge_bwd

    return unmerge_bwd(grad, out_idx, src_idx, dst_pos)


def select_kernel(x, k_per_group, groups):
    from .select import select as launch_select

    return launch_select(x, k_per_group, groups)


def select_scores_kernel(x, groups):
    from .select import select_scores as launch_scores

    return launch_scores(x, groups)


def prop_attention_kernel(q, k, v, size, scale):
    from .attention import attn_fwd

    return attn_fwd(q, k, v, size, scale)


def prop_attention_backward_kernel(grad, q, k, v, size, out, lse, scale):
    from .attention import attn_bwd

    return attn_bwd(grad, q, k, v, size, out, lse, scale)


KERNELS = {
    "match": match_kernel,
    "merge": merge_kernel,
    "merge_backward": merge_backward_kernel,
    "merge_fused": merge_fused_kernel,
    "merge_source": merge_source_kernel,
    "unmerge": unmerge_kernel,
    "unmerge_backward": unmerge_backward_kernel,
    "select": select_kernel,
    "select_scores": select_scores_kernel,
    "prop_attention": prop_attention_kernel,
    "prop_attention_backward": prop_attention_backward_kernel,
}
assert set(KERNELS) == set(ops.SCHEMAS), "every vtome op has a Triton kernel"


def _register(lib: torch.library.Library, dispatch_key: str) -> None:
    for name, fn in KERNELS.items():
        lib.impl(name, fn, dispatch_key)


_CUDA_LIB = torch.library.Library("vtome", "IMPL")  # kept alive: it owns the CUDA kernels
_register(_CUDA_LIB, "CUDA")


@contextlib.contextmanager
def cpu_interpreter():
    """Run the vtome ops on CPU tensors with these kernels, in Triton's interpreter.

    Lends the ops' CPU dispatch key to the Triton kernels for the ``with`` block (the
    C++ kernels, if loaded, are displaced, and the "cpp" backend says so) and restores it
    on exit. TRITON_INTERPRET=1 must have been set before triton was first imported.
    Meant for tests: it changes process-wide state, one block at a time (nesting is a
    no-op).
    """
    why = _interpreter_unusable()
    if why is not None:
        raise RuntimeError(why)
    if ops.cpu_override is not None:
        yield
        return
    lib = torch.library.Library("vtome", "IMPL")
    try:
        _register(lib, "CPU")
        ops.cpu_override = "the Triton interpreter"
        yield
    finally:
        ops.cpu_override = None
        lib._destroy()


# --------------------------------------------------------------------------------------
# the backend contract (backends.py)
# --------------------------------------------------------------------------------------
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


def _interpreter_unusable() -> Optional[str]:
    if not interpreting():
        return ("Triton compiles for GPUs; CPU tensors run only in its interpreter: set "
                "TRITON_INTERPRET=1 before triton is imported (slow, for tests)")
    if _loaded_compiled():
        return ("the kernels were imported before TRITON_INTERPRET=1 was set; "
                "set it before the first use")
    return None


def supports(device: torch.device) -> Optional[str]:
    """None if the kernels can run on ``device``, else the reason."""
    device = torch.device(device)
    if device.type == "cuda":
        if interpreting():
            return "TRITON_INTERPRET=1 is set: the kernels run on CPU tensors only"
        return None
    if device.type == "cpu":
        why = _interpreter_unusable()
        if why is None and ops.cpu_override is None:
            why = ("CPU tensors run only inside vtome_kernels.triton.cpu_interpreter(), which "
                   "lends the ops' CPU dispatch key to the Triton interpreter (for tests)")
        return why
    return f"Triton kernels run on CUDA tensors, not {device.type}"
