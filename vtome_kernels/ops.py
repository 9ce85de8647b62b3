"""The vtome:: ops: one op per pipeline stage, written once for every backend.

Each op has its schema, its fake (meta) implementation and, where it is differentiable,
its autograd formula here, in Python, so they exist on every install (a pure-Python one,
VTOME_NO_EXT=1, included) and torch.compile, torch.export and torch.library.opcheck see
one op whatever runs it. The kernels are registered to these same ops per dispatch key by
the backends (backends.py): the C++ extension for CPU (csrc/, TORCH_LIBRARY_IMPL), the
Triton kernels for CUDA (triton/backend.py). ``reference.py`` is plain PyTorch and uses
none of them.

Stages and their ops (tensors flattened to matching groups [G, ...], as in reference.py):

    match          metric -> (out_idx, src_idx, dst_pos, src_score)
    merge          x, size, matching -> (x', size')                 autograd: merge_backward
    merge_fused    x, size?, metric -> (x', size', out_idx, src_idx, dst_pos)   (match + merge)
    merge_source   0/1 source map, matching -> merged map
    unmerge        y, matching -> y scattered back                   autograd: unmerge_backward
    select         x [B, T, L, C] -> (kept, index)                   autograd: a scatter
    select_scores  x -> change scores [B, T, L]
    prop_attention q, k, v, size? -> (out, lse)                      autograd: prop_attention_backward

The functions below (``match``, ``merge``, ...) are what a kernel backend's module exposes
as its stages: they call the op, skipping the Python autograd wrapper when no gradient can
flow (measured ~20-40 us a call on the C++ path).
"""

from __future__ import annotations

from typing import Optional

import torch

_LIB = torch.library.Library("vtome", "FRAGMENT")  # kept alive: it owns the schemas

SCHEMAS = {
    "match": "match(Tensor metric, int r, bool class_token, bool distill_token) "
             "-> (Tensor, Tensor, Tensor, Tensor)",
    "merge": "merge(Tensor x, Tensor size, Tensor out_idx, Tensor src_idx, Tensor dst_pos, "
             "Tensor? src_merged) -> (Tensor, Tensor)",
    "merge_backward": "merge_backward(Tensor grad, Tensor? grad_size, Tensor x, Tensor size, "
                      "Tensor out_idx, Tensor src_idx, Tensor dst_pos, Tensor? src_merged) "
                      "-> (Tensor, Tensor)",
    "merge_fused": "merge_fused(Tensor x, Tensor? size, Tensor metric, int r, bool class_token, "
                   "bool distill_token) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "merge_source": "merge_source(Tensor source, Tensor out_idx, Tensor src_idx, Tensor dst_pos, "
                    "Tensor? src_merged) -> Tensor",
    "unmerge": "unmerge(Tensor y, Tensor out_idx, Tensor src_idx, Tensor dst_pos, int n) -> Tensor",
    "unmerge_backward": "unmerge_backward(Tensor grad, Tensor out_idx, Tensor src_idx, "
                        "Tensor dst_pos) -> Tensor",
    "select": "select(Tensor x, int k_per_group, int groups) -> (Tensor, Tensor)",
    "select_scores": "select_scores(Tensor x, int groups) -> Tensor",
    "prop_attention": "prop_attention(Tensor q, Tensor k, Tensor v, Tensor? size, float scale) "
                      "-> (Tensor, Tensor)",
    "prop_attention_backward": "prop_attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, "
                               "Tensor? size, Tensor out, Tensor lse, float scale) "
                               "-> (Tensor, Tensor, Tensor)",
}
for _schema in SCHEMAS.values():
    _LIB.define(_schema)

# Which kernels hold the CPU dispatch key of the ops other than the C++ extension's: set
# by triton/backend.py's ``cpu_interpreter()`` while it lends the CPU key to the Triton
# interpreter (tests); the "cpp" backend refuses to run meanwhile. None: the usual state.
cpu_override: Optional[str] = None


# --------------------------------------------------------------------------------------
# the stages as a kernel backend exposes them
# --------------------------------------------------------------------------------------
def _call(op, diff, *args):
    """op(*args), below the autograd key when no gradient can flow to the differentiable
    inputs ``diff`` (nothing would be recorded; saves the Python autograd wrapper)."""
    if (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in diff)) \
            or torch.compiler.is_compiling():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _idx(*ts):
    return [None if t is None else t.contiguous() for t in ts]


def match(metric: torch.Tensor, r: int, class_token: bool, distill_token: bool):
    """(out_idx, src_idx, dst_pos, src_score) of every group of metric [G, N, d]; no gradient."""
    return tuple(_call(torch.ops.vtome.match.default, (), metric, r, class_token, distill_token))


def merge(x, size, out_idx, src_idx, dst_pos, src_merged=None):
    """Merged (x [G, N', C], size [G, N', 1]); differentiable in x and size."""
    out_idx, src_idx, dst_pos, src_merged = _idx(out_idx, src_idx, dst_pos, src_merged)
    return tuple(_call(torch.ops.vtome.merge.default, (x, size),
                       x, size, out_idx, src_idx, dst_pos, src_merged))


def merge_fused(x, size, metric, r: int, class_token: bool, distill_token: bool):
    """match + merge (mode "merge"): (x [G, N - r, C], size [G, N - r, 1]).

    size None means ones (returned sizes float32); sizes must be positive (the kernel
    checks). Differentiable in x and size.
    """
    out = _call(torch.ops.vtome.merge_fused.default, (x, size),
                x, size, metric, r, class_token, distill_token)
    return out[0], out[1]


def merge_source(source, out_idx, src_idx, dst_pos, src_merged=None):
    """Merged 0/1 source map [G, N', N0] (union of the members)."""
    out_idx, src_idx, dst_pos, src_merged = _idx(out_idx, src_idx, dst_pos, src_merged)
    return _call(torch.ops.vtome.merge_source.default, (),
                 source, out_idx, src_idx, dst_pos, src_merged)


def unmerge(y, out_idx, src_idx, dst_pos, n: int):
    """y [G, N', C] scattered back to [G, n, C]; differentiable in y."""
    out_idx, src_idx, dst_pos = _idx(out_idx, src_idx, dst_pos)
    return _call(torch.ops.vtome.unmerge.default, (y,), y, out_idx, src_idx, dst_pos, n)


def select(x, k_per_group: int, groups: int):
    """(kept [B, groups·k, C], index [B, groups·k]); differentiable in x."""
    return tuple(_call(torch.ops.vtome.select.default, (x,), x, k_per_group, groups))


def select_scores(x, groups: int):
    """Change scores [B, T, L] float32 (reference.select_scores)."""
    return _call(torch.ops.vtome.select_scores.default, (), x, groups)


def prop_attention(q, k, v, size, scale: float):
    """softmax(q·kᵀ·scale + log(size)ᵀ)·v; differentiable in q, k and v."""
    return _call(torch.ops.vtome.prop_attention.default, (q, k, v), q, k, v, size, scale)[0]


# --------------------------------------------------------------------------------------
# fake (meta) implementations: shapes and dtypes only
# --------------------------------------------------------------------------------------
def _fake(name):
    return torch.library.register_fake("vtome::" + name)


@_fake("match")
def _match_fake(metric, r, class_token, distill_token):
    g, n = metric.shape[0], metric.shape[1]
    new = lambda *s, dtype=torch.long: metric.new_empty(s, dtype=dtype)  # noqa: E731
    return new(g, n - r), new(g, r), new(g, r), new(g, r, dtype=torch.float32)


@_fake("merge")
def _merge_fake(x, size, out_idx, src_idx, dst_pos, src_merged):
    g, n_out = out_idx.shape
    return x.new_empty(g, n_out, x.shape[-1]), size.new_empty(g, n_out, 1)


@_fake("merge_backward")
def _merge_backward_fake(grad, grad_size, x, size, out_idx, src_idx, dst_pos, src_merged):
    return x.new_empty(x.shape), size.new_empty(size.shape)


@_fake("merge_fused")
def _merge_fused_fake(x, size, metric, r, class_token, distill_token):
    g, n = x.shape[0], x.shape[1]
    s_dtype = torch.float32 if size is None else size.dtype
    new = lambda *s, dtype=torch.long: x.new_empty(s, dtype=dtype)  # noqa: E731
    return (new(g, n - r, x.shape[-1], dtype=x.dtype), new(g, n - r, 1, dtype=s_dtype),
            new(g, n - r), new(g, r), new(g, r))


@_fake("merge_source")
def _merge_source_fake(source, out_idx, src_idx, dst_pos, src_merged):
    g, n_out = out_idx.shape
    return source.new_empty(g, n_out, source.shape[-1])


@_fake("unmerge")
def _unmerge_fake(y, out_idx, src_idx, dst_pos, n):
    return y.new_empty(y.shape[0], n, y.shape[-1])


@_fake("unmerge_backward")
def _unmerge_backward_fake(grad, out_idx, src_idx, dst_pos):
    return grad.new_empty(grad.shape[0], out_idx.shape[1], grad.shape[-1])


@_fake("select")
def _select_fake(x, k_per_group, groups):
    k = groups * k_per_group
    return x.new_empty(x.shape[0], k, x.shape[-1]), x.new_empty(x.shape[0], k, dtype=torch.long)


@_fake("select_scores")
def _select_scores_fake(x, groups):
    return x.new_empty(x.shape[:3], dtype=torch.float32)


def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@_fake("prop_attention")
def _prop_attention_fake(q, k, v, size, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_lse_dtype(q))


@_fake("prop_attention_backward")
def _prop_attention_backward_fake(grad, q, k, v, size, out, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# --------------------------------------------------------------------------------------
# autograd: written once, each formula an op (or plain torch) that every device runs
# --------------------------------------------------------------------------------------
def _merge_grads(grad, grad_size, x, size, out_idx, src_idx, dst_pos, src_merged):
    """(dx, dsize) of a merge through vtome::merge_backward."""
    if grad is None:
        grad = x.new_zeros(x.shape[0], out_idx.shape[1], x.shape[-1])
    return torch.ops.vtome.merge_backward(grad, grad_size, x, size, out_idx, src_idx, dst_pos,
                                          src_merged)


def _merge_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _merge_backward(ctx, grad, grad_size):
    x, size, out_idx, src_idx, dst_pos, src_merged = ctx.saved_tensors
    dx, dsize = _merge_grads(grad, grad_size, x, size, out_idx, src_idx, dst_pos, src_merged)
    need = ctx.needs_input_grad
    return (dx if need[0] else None), (dsize if need[1] else None), None, None, None, None


torch.library.register_autograd("vtome::merge", _merge_backward, setup_context=_merge_setup)


def _fused_setup(ctx, inputs, output):
    x, size = inputs[0], inputs[1]
    ctx.save_for_backward(x, size, output[2], output[3], output[4])


def _fused_backward(ctx, grad, grad_size, *_):
    x, size, out_idx, src_idx, dst_pos = ctx.saved_tensors
    size_given = size is not None
    if not size_given:
        size = torch.ones(x.shape[:-1] + (1,), dtype=torch.float32, device=x.device)
    dx, dsize = _merge_grads(grad, grad_size, x, size, out_idx, src_idx, dst_pos, None)
    need = ctx.needs_input_grad
    return ((dx if need[0] else None), (dsize if size_given and need[1] else None),
            None, None, None, None)


torch.library.register_autograd("vtome::merge_fused", _fused_backward, setup_context=_fused_setup)


def _unmerge_setup(ctx, inputs, output):
    _, out_idx, src_idx, dst_pos, _ = inputs
    ctx.save_for_backward(out_idx, src_idx, dst_pos)


def _unmerge_backward(ctx, grad):
    out_idx, src_idx, dst_pos = ctx.saved_tensors
    return (torch.ops.vtome.unmerge_backward(grad.contiguous(), out_idx, src_idx, dst_pos),
            None, None, None, None)


torch.library.register_autograd("vtome::unmerge", _unmerge_backward, setup_context=_unmerge_setup)


def _select_setup(ctx, inputs, output):
    x = inputs[0]
    ctx.shape = x.shape
    ctx.save_for_backward(output[1])


def _select_backward(ctx, grad_kept, _grad_index):
    """The kept rows' gradient scattered back to their positions; zero elsewhere."""
    (index,) = ctx.saved_tensors
    b, t, l, c = ctx.shape
    grad = grad_kept.new_zeros(b, t * l, c)
    grad = grad.scatter(1, index[..., None].expand(-1, -1, c), grad_kept)
    return grad.reshape(b, t, l, c), None, None


torch.library.register_autograd("vtome::select", _select_backward, setup_context=_select_setup)


def _attention_setup(ctx, inputs, output):
    q, k, v, size, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, size, output[0], output[1])


def _attention_backward(ctx, grad, _grad_lse):
    q, k, v, size, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.vtome.prop_attention_backward(grad, q, k, v, size, out, lse, ctx.scale)
    return dq, dk, dv, None, None


torch.library.register_autograd("vtome::prop_attention", _attention_backward,
                                setup_context=_attention_setup)
