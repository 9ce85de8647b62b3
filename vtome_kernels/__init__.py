"""vtome_kernels: fused token merging (ToMe) for image and video transformers.

Public API (API.md): ``merge``, ``match`` (a ``MergePlan``), ``prop_attention``,
``backends``, ``select`` (FluxViT selection to a token budget), ``grids`` (sampling grids
for a budget), the model patches ``patch`` and the pictures ``vis``. Importing the package
imports no optional backend, neither timm nor transformers, and touches no GPU.
"""

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
