"""vtome_kernels: fused token merging (ToMe) for image and video transformers.

Public API (API.md): ``merge``, ``match`` (a ``MergePlan``), ``prop_attention`` and
``backends``. Importing the package imports no optional backend and touches no GPU.
"""

from .attention import prop_attention
from .backends import BackendUnavailableError, backends
from .merge import MergePlan, match, merge

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "MergePlan",
    "backends",
    "match",
    "merge",
    "prop_attention",
]
