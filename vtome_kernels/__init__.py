"""vtome_kernels: fused token merging (ToMe) for image and video transformers.

Public API (API.md): ``merge``, ``match`` (a ``MergePlan``), ``prop_attention``,
``backends``, the model patches ``patch`` and the pictures ``vis``. Importing the package
imports no optional backend, neither timm nor transformers, and touches no GPU.
"""

from .attention import prop_attention
from .backends import BackendUnavailableError, backends
from .merge import MergePlan, match, merge
from . import patch, vis  # noqa: E402  (light: timm/transformers load on first patch)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "MergePlan",
    "backends",
    "match",
    "merge",
    "patch",
    "prop_attention",
    "vis",
]
