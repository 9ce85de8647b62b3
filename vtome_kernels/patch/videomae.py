"""Patch for Hugging Face VideoMAE (VideoMAEModel, VideoMAEForVideoClassification).

Spatio-temporal scheme: one matching over all tubelet tokens of a clip (no class token).
Proportional attention is off by default and the final average pooling is plain, as the
video paper runs off-the-shelf VideoMAE checkpoints; ``weighted_pool=True`` makes the
pooling size-weighted (sum of x * size over the sum of sizes), as ToMe's MAE variant does.
The layer calls its VideoMAESelfAttention (class-swapped as well) as a module, so
``output_attentions=True`` records it: with eager attention, the probabilities used.
"""

from __future__ import annotations

import torch

from .common import (CostModel, StateHook, attend, eager, has_hook, select_tokens, grid_from,
                     heads_join, heads_split, install, st_keys_step)
from .family import Bench, Family, Parts, hf_video_builder, split_head


def _attention_forward(self, hidden_states: torch.Tensor, **kwargs):
    """VideoMAESelfAttention, patched: (context, probabilities or None) as the library's,
    with the size bias; the keys are left in ``_vt_keys`` for the block's merge metric."""
    st = self._vt_state
    q, k, v = (heads_split(p(hidden_states), self.num_attention_heads) for p in (self.query, self.key, self.value))
    out = attend(q, k, v, st.attn_size(), self.scaling, self.dropout_prob, self.training, st.backend,
                 probs=eager(self))
    ctx, probs = out if isinstance(out, tuple) else (out, None)
    self._vt_keys = k
    return heads_join(ctx), probs


def _layer_forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    st = self._vt_state
    x = hidden_states
    sa = self.attention.attention
    y = self.layernorm_before(x)
    ctx, _ = sa(y)  # called as a module: output_attentions records its probabilities
    k = sa.__dict__.pop("_vt_keys")
    x = self.attention.output(ctx, y) + x
    x = st.merge(self._vt_index, x, st.key_metric(k))
    out = self.output(self.intermediate(self.layernorm_after(x)), x)
    if st.weighted_pool and self._vt_index == st.depth - 1:
        st.last = out
    return out


def _keys(self, x: torch.Tensor) -> torch.Tensor:
    """The layer's attention keys [B, H, N, d] of x (layer choice's keys-only steps)."""
    sa = self.attention.attention
    return heads_split(sa.key(self.layernorm_before(x)), sa.num_attention_heads)


_keys_step = st_keys_step(_keys)


def _embed_forward(self, pixel_values, bool_masked_pos=None):
    """VideoMAEEmbeddings with select=K: keep K tubelet tokens, then add their positions."""
    st = self._vt_state
    if st.select is None:
        return self._vt_base.forward(self, pixel_values, bool_masked_pos)
    if bool_masked_pos is not None:
        raise ValueError("select=K and bool_masked_pos cannot be combined: both choose the visible tokens")
    pos = self.position_embeddings
    n = st.grid[0] * st.grid[1] * st.grid[2]
    if n != pos.shape[1] or tuple(pixel_values.shape[-2:]) != tuple(self.patch_embeddings.image_size):
        raise ValueError(
            f"VideoMAE has fixed sinusoidal positions for its config grid ({pos.shape[1]} tubelets of "
            f"{self.config.num_frames} frames at {self.config.image_size}px); select=K cannot run it on a "
            f"different grid, got input {tuple(pixel_values.shape)} ({n} tubelets)")
    patches = self.patch_embeddings(pixel_values)
    return select_tokens(st, patches, pos[0].detach().to(patches.device), extra=0)


class _WeightedPool(StateHook):
    """fc_norm receives mean(x); with merging, give it sum(x * size) / sum(size) instead."""

    def __call__(self, module, args):
        st = self.state
        if not st.weighted_pool or st.size is None or st.last is None:
            return None
        x, size = st.last, st.size.to(st.last.dtype)
        st.last = None
        return ((x * size).sum(1) / size.sum(1),)


def apply_patch(model, r=0, *, mode: str = "merge", threshold=None, prop_attn: bool = False,
                weighted_pool: bool = False, metric: str = "mean", trace_source: bool = False,
                layer=None, select=None, select_groups="auto", backend: str = "auto"):
    """Make a VideoMAE model merge tokens in every layer (in place; returns it).

    Options as vt.patch.timm; prop_attn defaults to False here. weighted_pool (only for
    VideoMAEForVideoClassification with mean pooling): size-weighted final average.
    select=K: FluxViT selection of K tubelet tokens before the first block (vt.select on
    the patch embeddings, groups select_groups; the positions of the kept tokens added
    after). VideoMAE's positions are fixed for its config grid, so the input must be that grid.
    """
    if not isinstance(weighted_pool, bool):
        raise TypeError(f"weighted_pool must be a bool, got {type(weighted_pool).__name__}")
    head, _ = _split(model)
    if weighted_pool and (head is None or head.fc_norm is None):
        raise ValueError("weighted_pool=True needs VideoMAEForVideoClassification with mean pooling "
                         "(config.use_mean_pooling=True)")
    options = dict(mode=mode, threshold=threshold, prop_attn=prop_attn, metric=metric,
                   trace_source=trace_source, layer=layer, backend=backend)
    install(FAMILY, model, r, options, select=select, select_groups=select_groups)
    model._vt.weighted_pool = weighted_pool
    return model


def _split(model):
    from transformers import VideoMAEForVideoClassification, VideoMAEModel

    return split_head(model, VideoMAEForVideoClassification, VideoMAEModel, "videomae")


def _parts(model) -> Parts:
    head, base = _split(model)
    cfg = base.config
    pe = base.embeddings.patch_embeddings
    ph, pw = pe.patch_size
    tube = pe.tubelet_size
    cost = CostModel("st", dim=cfg.hidden_size, mlp=cfg.intermediate_size, heads=cfg.num_attention_heads,
                     in_per_token=cfg.num_channels * tube * ph * pw)
    blocks = list(base.encoder.layer)

    def extra(state):
        norm = head.fc_norm if head is not None else None
        if norm is not None and not has_hook(norm, _WeightedPool, state):
            norm.register_forward_pre_hook(_WeightedPool(state))

    return Parts(blocks, base.embeddings, cost, lambda shape: grid_from(shape, "BTCHW", tube, ph, pw, "VideoMAE"),
                 attention=[(b.attention.attention, _attention_forward) for b in blocks], extra_hooks=extra)


def _tiny():
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    cfg = VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32,
                         num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, num_labels=5)
    m = VideoMAEForVideoClassification(cfg)
    return m, (2, 4, 3, 32, 32), m.videomae.embeddings.patch_embeddings.projection


FAMILY = Family(
    name="videomae", title="transformers VideoMAE (spatio-temporal)", package="transformers", scheme="st",
    patch=apply_patch, parts=_parts, block_forward=_layer_forward, embed_forward=_embed_forward, tiny=_tiny,
    keys_step=_keys_step,
    bench=Bench("VideoMAE-B 16x224", hf_video_builder("VideoMAE", patch_size=8),
                lambda t: (1, 4, 3, 32, 32) if t else (1, 16, 3, 224, 224), 150),
)
