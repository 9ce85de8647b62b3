"""C++ CPU backend: the ops of ``vtome_kernels._C`` (csrc/), same contract as reference.py.

match fuses normalisation, exact scores with a running row max/argmax (no score matrix in
memory), ranking and the output layout; merge builds every output row in one pass. Both
are bit-for-bit the reference's choices (see csrc/scores/scores.h for why the scores are
exact) and run in parallel over groups and rows (at::parallel_for). The ops live under
``torch.ops.vtome``; their fake (meta) implementations and autograd formulas are
registered here, so torch.compile and torch.library.opcheck work and merge/unmerge are
differentiable. Built by setup.py unless VTOME_NO_EXT=1; unbuilt, status() says so and
"auto" falls back to the reference.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import reference

NAME = "cpp"

try:
    from . import _C  # registers the vtome:: ops
except ImportError as exc:  # a pure-Python install (VTOME_NO_EXT=1) or a failed build
    _C = None
    _IMPORT_ERROR = str(exc)
else:
    _IMPORT_ERROR = ""


if _C is None:
    _STATUS = (False, "the C++ extension vtome_kernels._C is not built (pure-Python install "
               f"with VTOME_NO_EXT=1, or no compiler at install time): {_IMPORT_ERROR}")
else:
    _STATUS = (True, f"C++ CPU kernels ({_C.score_kernel()} score kernel)")


def status() -> Tuple[bool, str]:
    """(available, why): available when the extension vtome_kernels._C is built."""
    return _STATUS


def supports(device: torch.device) -> Optional[str]:
    """None on CPU; the kernels read host memory only."""
    return None if device.type == "cpu" else f"the C++ kernels run on CPU tensors, got {device.type}"


def _idx(*ts):
    return [None if t is None else t.contiguous() for t in ts]


def _call(op, diff, *args):
    """op(*args), skipping the Python autograd wrapper (~20-40 us a call, measured) when no
    gradient can flow to the differentiable inputs ``diff``: nothing would be recorded."""
    if (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in diff)) \
            or torch.compiler.is_compiling():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def match(metric: torch.Tensor, r: int, class_token: bool, distill_token: bool):
    """(out_idx, src_idx, dst_pos, src_score) of every group of metric [G, N, d]."""
    return tuple(torch.ops.vtome.match(metric, r, class_token, distill_token))


def merge(x, size, out_idx, src_idx, dst_pos, src_merged=None):
    """Merged (x [G, N', C], size [G, N', 1]); differentiable in x and size."""
    out_idx, src_idx, dst_pos, src_merged = _idx(out_idx, src_idx, dst_pos, src_merged)
    return tuple(_call(torch.ops.vtome.merge.default, (x, size), x, size, out_idx, src_idx, dst_pos, src_merged))


def merge_fused(x, size, metric, r: int, class_token: bool, distill_token: bool):
    """match + merge (mode "merge") in one call: (x [G, N - r, C], size [G, N - r, 1]).

    size None means ones (returned sizes float32). Differentiable in x and size.
    """
    out = _call(torch.ops.vtome.merge_fused.default, (x, size), x, size, metric, r, class_token, distill_token)
    return out[0], out[1]


def merge_source(source, out_idx, src_idx, dst_pos, src_merged=None):
    """Merged 0/1 source map [G, N', N0] (union of members)."""
    out_idx, src_idx, dst_pos, src_merged = _idx(out_idx, src_idx, dst_pos, src_merged)
    return torch.ops.vtome.merge_source(source, out_idx, src_idx, dst_pos, src_merged)


def unmerge(y, out_idx, src_idx, dst_pos, n: int):
    """y [G, N', C] scattered back to [G, n, C]; differentiable in y."""
    out_idx, src_idx, dst_pos = _idx(out_idx, src_idx, dst_pos)
    return _call(torch.ops.vtome.unmerge.default, (y,), y, out_idx, src_idx, dst_pos, n)


def select(x, k_per_group: int, groups: int):
    """FluxViT selection (csrc/select.cpp): (kept [B, groups·k, C], index [B, groups·k])."""
    return tuple(torch.ops.vtome.select(x, k_per_group, groups))


# Proportional attention on CPU is torch's fused SDPA kernel: nothing to gain in C++.
prop_attention = reference.prop_attention


# --------------------------------------------------------------------------------------
# fake implementations and autograd of the vtome:: ops
# --------------------------------------------------------------------------------------
def _register() -> None:
    lib = "vtome::"

    @torch.library.register_fake(lib + "match")
    def _match_fake(metric, r, class_token, distill_token):
        g, n = metric.shape[0], metric.shape[1]
        new = lambda *s, dtype=torch.long: metric.new_empty(s, dtype=dtype)  # noqa: E731
        return new(g, n - r), new(g, r), new(g, r), new(g, r, dtype=torch.float32)

    @torch.library.register_fake(lib + "merge")
    def _merge_fake(x, size, out_idx, src_idx, dst_pos, src_merged):
        g, n_out = out_idx.shape
        return x.new_empty(g, n_out, x.shape[-1]), size.new_empty(g, n_out, 1)

    @torch.library.register_fake(lib + "merge_fused")
    def _merge_fused_fake(x, size, metric, r, class_token, distill_token):
        g, n = x.shape[0], x.shape[1]
        s_dtype = torch.float32 if size is None else size.dtype
        new = lambda *s, dtype=torch.long: x.new_empty(s, dtype=dtype)  # noqa: E731
        return (new(g, n - r, x.shape[-1], dtype=x.dtype), new(g, n - r, 1, dtype=s_dtype),
                new(g, n - r), new(g, r), new(g, r))

    @torch.library.register_fake(lib + "merge_backward")
    def _merge_backward_fake(grad, grad_size, x, size, out_idx, src_idx, dst_pos, src_merged):
        return x.new_empty(x.shape), size.new_empty(size.shape)

    @torch.library.register_fake(lib + "merge_source")
    def _merge_source_fake(source, out_idx, src_idx, dst_pos, src_merged):
        g, n_out = out_idx.shape
        return source.new_empty(g, n_out, source.shape[-1])

    @torch.library.register_fake(lib + "unmerge")
    def _unmerge_fake(y, out_idx, src_idx, dst_pos, n):
        return y.new_empty(y.shape[0], n, y.shape[-1])

    @torch.library.register_fake(lib + "unmerge_backward")
    def _unmerge_backward_fake(grad, out_idx, src_idx, dst_pos):
        return grad.new_empty(grad.shape[0], out_idx.shape[1], grad.shape[-1])

    def merge_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def merge_backward(ctx, grad, grad_size):
        x, size, out_idx, src_idx, dst_pos, src_merged = ctx.saved_tensors
        if grad is None:
            grad = x.new_zeros(x.shape[0], out_idx.shape[1], x.shape[-1])
        dx, dsize = torch.ops.vtome.merge_backward(grad, grad_size, x, size, out_idx, src_idx,
                                                   dst_pos, src_merged)
        need = ctx.needs_input_grad
        return (dx if need[0] else None), (dsize if need[1] else None), None, None, None, None

    torch.library.register_autograd(lib + "merge", merge_backward, setup_context=merge_setup)

    def fused_setup(ctx, inputs, output):
        x, size = inputs[0], inputs[1]
        ctx.size_given = size is not None
        ctx.save_for_backward(x, size, output[2], output[3], output[4])

    def fused_backward(ctx, grad, grad_size, *_):
        x, size, out_idx, src_idx, dst_pos = ctx.saved_tensors
        if grad is None:
            grad = x.new_zeros(x.shape[0], out_idx.shape[1], x.shape[-1])
        if size is None:
            size = torch.ones(x.shape[:-1] + (1,), dtype=torch.float32, device=x.device)
        dx, dsize = torch.ops.vtome.merge_backward(grad, grad_size, x, size, out_idx, src_idx,
                                                   dst_pos, None)
        need = ctx.needs_input_grad
        return ((dx if need[0] else None), (dsize if ctx.size_given and need[1] else None),
                None, None, None, None)

    torch.library.register_autograd(lib + "merge_fused", fused_backward, setup_context=fused_setup)

    def unmerge_setup(ctx, inputs, output):
        _, out_idx, src_idx, dst_pos, _ = inputs
        ctx.save_for_backward(out_idx, src_idx, dst_pos)

    def unmerge_backward(ctx, grad):
        out_idx, src_idx, dst_pos = ctx.saved_tensors
        return torch.ops.vtome.unmerge_backward(grad, out_idx, src_idx, dst_pos), None, None, None, None

    torch.library.register_autograd(lib + "unmerge", unmerge_backward, setup_context=unmerge_setup)


def _register_select() -> None:
    @torch.library.register_fake("vtome::select")
    def _select_fake(x, k_per_group, groups):
        k = groups * k_per_group
        return x.new_empty(x.shape[0], k, x.shape[-1]), x.new_empty(x.shape[0], k, dtype=torch.long)

    @torch.library.register_fake("vtome::select_scores")
    def _select_scores_fake(x, groups):
        return x.new_empty(x.shape[:3], dtype=torch.float32)


if _C is not None:
    _register()
    _register_select()
