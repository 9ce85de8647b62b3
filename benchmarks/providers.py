"""Merge providers benchmarked side by side, all with the signature fn(x, size, metric).

- tome-eager: ToMe's published sequence of PyTorch ops (normalise, matmul, fill, max,
  argsort, gather, sort, scatter-reduce x·size and size, divide), written here from its
  description: what users run today.
- tome-compiled: torch.compile of tome-eager.
- floor: the work no fused merge avoids, as the cheapest torch ops that do it: the bmm of
  the already-normalised A·Bᵀ scores, plus one copy of x into a preallocated output.
- vt-<backend>: vtome_kernels.merge with each backend usable on the device.
"""

from __future__ import annotations

import math
from typing import Callable, Dict

import torch

import vtome_kernels as vt

from .harness import runnable_backends


def tome_eager(x, size, metric, r: int, class_token: bool):
    """One ToMe merge step, as ToMe's own code does it (DST: frames folded into the batch)."""
    lead = x.shape[:-2]
    x, size, metric = (t.reshape((-1,) + t.shape[-2:]) for t in (x, size, metric))
    n = metric.shape[1]
    r = min(r, (n - int(class_token)) // 2)
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]

    def combine(t):
        even, odd = t[..., ::2, :], t[..., 1::2, :]
        g, na, c = even.shape
        unm = even.gather(dim=-2, index=unm_idx.expand(g, na - r, c))
        src = even.gather(dim=-2, index=src_idx.expand(g, r, c))
        odd = odd.scatter_reduce(-2, dst_idx.expand(g, r, c), src, reduce="sum")
        return torch.cat([unm, odd], dim=1)

    xs = combine(x * size)
    s = combine(size)
    out = xs / s
    return out.reshape(lead + out.shape[-2:]), s.reshape(lead + s.shape[-2:])


def make_providers(shape, device: torch.device, compile_tome: bool = True) -> Dict[str, Callable]:
    """name -> fn(x, size, metric) for one paper shape."""
    r, cls = shape.r, shape.class_token
    out: Dict[str, Callable] = {"tome-eager": lambda x, s, m: tome_eager(x, s, m, r, cls)}
    if compile_tome:
        compiled = torch.compile(tome_eager, dynamic=False)
        out["tome-compiled"] = lambda x, s, m: compiled(x, s, m, r, cls)
    out["floor"] = floor(shape, device)
    for name in runnable_backends("merge", device):
        out[f"vt-{name}"] = (
            lambda x, s, m, name=name: vt.merge(x, s, r, metric=m, class_token=cls, backend=name)
        )
    return out


def floor(shape, device):
    """bmm of the normalised scores into a preallocated buffer + one copy of x."""
    state = {}

    def run(x, size, metric):
        if "a" not in state:  # normalised halves and buffers, prepared outside the timing
            m = metric.reshape((-1,) + metric.shape[-2:]).float()
            m = m / m.norm(dim=-1, keepdim=True)
            state["a"], state["bt"] = m[:, ::2].contiguous(), m[:, 1::2].transpose(1, 2).contiguous()
            state["scores"] = torch.empty(m.shape[0], state["a"].shape[1], state["bt"].shape[2],
                                          device=m.device)
            state["out"] = torch.empty_like(x)
        torch.bmm(state["a"], state["bt"], out=state["scores"])
        state["out"].copy_(x)
        return state["out"]

    return run
