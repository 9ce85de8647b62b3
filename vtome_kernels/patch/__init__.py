"""Model patches: turn a loaded timm or Hugging Face model into a token-merging one.

    vt.patch.timm(model, r=16)            # timm VisionTransformer
    vt.patch.videomae(model, r=150)       # transformers VideoMAE (spatio-temporal)
    vt.patch.vivit(model, r=300)          # transformers ViViT (spatio-temporal, cls protected)
    vt.patch.timesformer(model, r=18)     # transformers TimeSformer (divided space-time)
    vt.patch.vjepa2(model, r=71)          # transformers V-JEPA 2 (rotary positions carried by the tokens)
    model.r = (16, -1.0)                  # int, per-layer list or (r, inflect); 0 = unpatched

The same module objects keep their weights; patching again only changes the options.
``budget`` / ``flops`` / ``token_counts`` size a schedule; ``source`` gives the traced map
of original patches per token (for ``vtome_kernels.vis``). timm and transformers are
imported only when their patch is called. ``FAMILIES`` declares every family (family.py):
a new one is its file plus one entry here.
"""

from __future__ import annotations

from . import timesformer as _timesformer
from . import timm as _timm
from . import videomae as _videomae
from . import vivit as _vivit
from . import vjepa2 as _vjepa2
from .budget import budget, flops, token_counts
from .common import remove, state_of
from .family import Family

# name -> Family, in the order of the end-to-end benchmark's rows.
FAMILIES = {f.name: f for f in (_videomae.FAMILY, _vivit.FAMILY, _timesformer.FAMILY, _timm.FAMILY,
                                           _vjepa2.FAMILY)}

timm = FAMILIES["timm"].patch
videomae = FAMILIES["videomae"].patch
vivit = FAMILIES["vivit"].patch
timesformer = FAMILIES["timesformer"].patch
vjepa2 = FAMILIES["vjepa2"].patch


def source(model):
    """The source map of the last forward ([B, N', N0], per frame [B, T, n', n0] for
    TimeSformer) or None if nothing merged; needs ``trace_source=True``."""
    state = state_of(model)
    if not state.trace_source:
        raise ValueError("the model was patched with trace_source=False; patch it again with trace_source=True")
    return state.source


__all__ = ["FAMILIES", "Family", "budget", "flops", "remove", "source", "token_counts", *FAMILIES]
