"""Model patches: turn a loaded timm or Hugging Face model into a token-merging one.

    vt.patch.timm(model, r=16)            # timm VisionTransformer
    vt.patch.videomae(model, r=150)       # transformers VideoMAE (spatio-temporal)
    vt.patch.vivit(model, r=300)          # transformers ViViT (spatio-temporal, cls protected)
    vt.patch.timesformer(model, r=18)     # transformers TimeSformer (divided space-time)
    model.r = (16, -1.0)                  # int, per-layer list or (r, inflect); 0 = unpatched

The same module objects keep their weights; patching again only changes the options.
``budget`` / ``flops`` / ``token_counts`` size a schedule; ``source`` gives the traced map
of original patches per token (for ``vtome_kernels.vis``). timm and transformers are
imported only when their patch is called.
"""

from __future__ import annotations

from .budget import budget, flops, token_counts
from .common import remove, state_of
from .timesformer import apply_patch as timesformer
from .timm import apply_patch as timm
from .videomae import apply_patch as videomae
from .vivit import apply_patch as vivit


def source(model):
    """The source map of the last forward ([B, N', N0], per frame [B, T, n', n0] for
    TimeSformer) or None if nothing merged; needs ``trace_source=True``."""
    state = state_of(model)
    if not state.trace_source:
        raise ValueError("the model was patched with trace_source=False; patch it again with trace_source=True")
    return state.source


__all__ = ["budget", "flops", "remove", "source", "timesformer", "timm", "token_counts",
           "videomae", "vivit"]
