"""pytest-benchmark suite of one merge step: ``pytest benchmarks --benchmark-group-by=param:shape``.

The same providers and paper shapes as the main job; each provider that can run here is a
parameter (nothing unavailable is listed, so nothing is skipped).
"""

import pytest
import torch

from benchmarks.providers import make_providers
from benchmarks.shapes import PAPER_SHAPES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROVIDERS = list(make_providers(PAPER_SHAPES[0], DEVICE, compile_tome=True))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", PAPER_SHAPES, ids=lambda s: s.name.replace(" ", "_"))
def test_merge(benchmark, shape, provider):
    fn = make_providers(shape, DEVICE, compile_tome=provider == "tome-compiled")[provider]
    x, size, metric = shape.inputs(device=DEVICE)
    fn(x, size, metric)  # warm-up (and compilation) outside the timing
    benchmark(fn, x, size, metric)
