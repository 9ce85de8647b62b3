"""Public proportional attention: softmax(q·kᵀ·scale + log(size)ᵀ)·v (ALGORITHM.md section 2).

A merged token of size s counts as s keys. The bias is per key, broadcast over heads and
queries; size None is plain attention.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks
from .backends import resolve

# "auto" on CUDA sends attention in these dtypes to the reference (PyTorch's SDPA, whose
# memory-efficient kernel takes the log-size bias as its mask) rather than to the Triton
# kernel, whose float32 dots run on CUDA cores at small tiles: docs/DESIGN.md, "auto and
# float32 attention on CUDA" (an argument until a GPU measures it: python -m benchmarks.gpu).
IEEE_DTYPES = (torch.float32, torch.float64)


def prop_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    size: Optional[torch.Tensor],
    *,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of q [B, H, Nq, d] over k, v [B, H, Nk, d] with key sizes [B, Nk, 1].

    scale=None is d**-0.5. Returns [B, H, Nq, d] in q's dtype; differentiable in q, k, v.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(name, t, (4,))
    _checks.same_device(q=q, k=k, v=v, size=size)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, _, d = q.shape
    _checks.leading("k", k, (b, h, k.shape[2]), d, "q")
    _checks.leading("v", v, tuple(k.shape[:3]), d, "k")
    if size is not None:
        _checks.tensor("size", size, (3,))
        _checks.leading("size", size, (b, k.shape[2]), 1, "k (batch, keys)")
        _checks.sizes("size", size)
    if scale is None:
        scale = d**-0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if backend == "auto" and q.device.type == "cuda" and q.dtype in IEEE_DTYPES:
        backend = "reference"  # see IEEE_DTYPES
    module = resolve(backend, "prop_attention", q.device)
    return module.prop_attention(q, k, v, size, float(scale))
