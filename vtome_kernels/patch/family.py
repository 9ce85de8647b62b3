"""One declaration per model family, read by everything generic about the patches.

A family is one file (its patched forwards and its ``FAMILY``) plus one entry in
``vtome_kernels.patch.FAMILIES``. ``install`` (common.py) builds a model's merge state
from ``Family.parts(model)``; ``vt.patch.<name>`` is ``Family.patch``; the tests build
their tiny random models with ``Family.tiny`` and find blocks with ``Family.blocks``; the
end-to-end benchmark times ``Family.bench``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Sequence, Tuple

import torch


@dataclasses.dataclass
class Parts:
    """What a patch needs from one model of a family (its config decides the numbers).

    blocks: the transformer blocks, in order, class-swapped to ``Family.block_forward``;
    embed: the module whose forward pre-hook starts a forward (class-swapped to
    ``Family.embed_forward`` when the family has one); cost: its FLOP model (budget.py);
    grid_of: input shape -> token grid (T', h, w); class_token / distill_token / prefix:
    the tokens in front that never merge; attention: (module, forward) pairs class-swapped
    too (the attention modules a Hugging Face model records); extra_hooks: anything else
    installed once the state exists (pooling hooks, the model's own class swap).
    """

    blocks: List[torch.nn.Module]
    embed: torch.nn.Module
    cost: "CostModel"  # noqa: F821 (common.CostModel)
    grid_of: Callable[[Tuple[int, ...]], Tuple[int, int, int]]
    class_token: bool = False
    distill_token: bool = False
    prefix: Optional[int] = None
    attention: Sequence[Tuple[torch.nn.Module, Callable]] = ()
    extra_hooks: Callable = lambda state: None


@dataclasses.dataclass(frozen=True)
class Bench:
    """The family's row of the end-to-end benchmark (random weights, batch 1)."""

    name: str
    build: Callable[[bool], torch.nn.Module]   # tiny -> model (tiny: a smoke-test size)
    shape: Callable[[bool], Tuple[int, ...]]   # tiny -> input shape at batch 1
    r: int


@dataclasses.dataclass(frozen=True)
class Family:
    """Everything particular to one model family.

    name: ``vt.patch.<name>``; title: the models it takes, in words; package: where those
    come from ("timm" or "transformers", imported only when patching); scheme: "st" (one
    sequence per clip) or "dst" (per frame, TimeSformer); parts: model -> Parts (a
    TypeError for a model of another family); block_forward / embed_forward: the patched
    forwards (embed_forward None: no ``select=K``); keys_step: (block, x, r) -> x, one
    keys-only merge step of layer choice (``common.st_keys_step`` for a spatio-temporal
    block, from its attention keys of LayerNorm(x)); rotary: tokens carry their (t, h, w)
    positions through merges (MergeState.positions); tiny: the test builder, () ->
    (model, input shape, the module whose weight is the patch embedding); bench: the e2e row.
    """

    name: str
    title: str
    package: str
    scheme: str
    patch: Callable
    parts: Callable[[torch.nn.Module], Parts]
    block_forward: Callable
    tiny: Callable[[], Tuple[torch.nn.Module, Tuple[int, ...], torch.nn.Module]]
    keys_step: Callable
    bench: Optional[Bench] = None
    embed_forward: Optional[Callable] = None
    rotary: bool = False

    def blocks(self, model: torch.nn.Module) -> List[torch.nn.Module]:
        """Where the family's blocks are in model (TypeError for another family's model)."""
        return list(self.parts(model).blocks)


def split_head(model: torch.nn.Module, head_cls: type, base_cls: type, attr: str):
    """(head or None, base model) of a Hugging Face video model: a *ForVideoClassification
    head holds its base model at ``attr``; anything else is a clear TypeError."""
    if isinstance(model, head_cls):
        return model, getattr(model, attr)
    if isinstance(model, base_cls):
        return None, model
    raise TypeError(f"model must be a transformers {base_cls.__name__} or {head_cls.__name__}, "
                    f"got {type(model).__name__}")


_TINY_VIDEO = dict(image_size=32, num_frames=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64, num_labels=5)  # a smoke-test size of every video config


def hf_video_builder(prefix: str, **tiny_extra) -> Callable[[bool], torch.nn.Module]:
    """Builder of transformers' <prefix>ForVideoClassification for the e2e benchmark: the
    library's default (base) config with 400 labels, or a tiny one."""
    def build(tiny: bool) -> torch.nn.Module:
        import transformers

        config = getattr(transformers, f"{prefix}Config")
        model = getattr(transformers, f"{prefix}ForVideoClassification")
        return model(config(**_TINY_VIDEO, **tiny_extra) if tiny else config(num_labels=400))

    return build
