"""vtome_kernels: fused token merging (ToMe) for image and video transformers.

Public API (API.md): ``merge``, ``match`` (a ``MergePlan``), ``prop_attention``,
``backends``, ``select`` (FluxViT selection to a token budget), ``grids`` (sampling grids
for a budget), the model patches ``patch`` and the pictures ``vis``. Importing the package
defines the vtome:: ops (ops.py) and registers their kernels (the C++ extension for CPU,
thin functions that load the Triton kernels on first call for CUDA); it imports neither
Triton, torch._dynamo, timm nor transformers, and touches no GPU.
"""

from . import ops  # the vtome:: ops (schemas, fakes, autograd), before any kernel
from . import cpp, triton  # noqa: F401  their kernels for CPU (C++) and CUDA (Triton), light
from . import patch, vis  # noqa: E402  (light: timm/transformers load on first patch)
from .attention import prop_attention
from .backends import BackendUnavailableError, backends
from .grid import Grid, grids
from .merge import MergePlan, match, merge
from .select import select

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "Grid",
    "MergePlan",
    "backends",
    "grids",
    "match",
    "merge",
    "patch",
    "prop_attention",
    "select",
    "vis",
]
