"""The paper shapes every merge benchmark runs (metric dim 64 = head-averaged keys)."""

from __future__ import annotations

import dataclasses
from typing import Tuple

import torch


@dataclasses.dataclass(frozen=True)
class MergeShape:
    name: str
    x: Tuple[int, ...]  # [B, N, C] (spatio-temporal) or [B, T, N, C] (divided space-time)
    r: int
    class_token: bool
    d: int = 64

    @property
    def groups(self) -> int:
        g = 1
        for v in self.x[:-2]:
            g *= v
        return g

    def inputs(self, dtype=torch.float32, device="cpu", seed=0):
        """(x, size, metric): random activations, sizes 1, random keys."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(self.x, generator=g).to(dtype=dtype, device=device)
        metric = torch.randn(self.x[:-1] + (self.d,), generator=g).to(dtype=dtype, device=device)
        size = torch.ones(self.x[:-1] + (1,), dtype=dtype, device=device)
        return x, size, metric


PAPER_SHAPES = (
    MergeShape("ViT-B/16 image b8", (8, 197, 768), 16, True),
    MergeShape("VideoMAE-B ST b1", (1, 1568, 768), 150, False),
    MergeShape("VideoMAE-B ST b4", (4, 1568, 768), 150, False),
    MergeShape("ViViT-B ST b1", (1, 3137, 768), 300, True),
    MergeShape("TimeSformer DST b4", (4, 8, 196, 768), 18, False),
)
