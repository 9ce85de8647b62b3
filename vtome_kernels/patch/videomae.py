"""Patch for Hugging Face VideoMAE (VideoMAEModel, VideoMAEForVideoClassification).

Spatio-temporal scheme: one matching over all tubelet tokens of a clip (no class token).
Proportional attention is off by default and the final average pooling is plain, as the
video paper runs off-the-shelf VideoMAE checkpoints; ``weighted_pool=True`` makes the
pooling size-weighted (sum of x * size over the sum of sizes), as ToMe's MAE variant does.
"""

from __future__ import annotations

import torch

from .common import CostModel, MergeState, StateHook, attend, has_hook, grid_from, heads_join, heads_split, install


def _layer_forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    st = self._vt_state
    x = hidden_states
    st.tokens.append(x.shape[1])
    sa = self.attention.attention
    y = self.layernorm_before(x)
    q = heads_split(sa.query(y), sa.num_attention_heads)
    k = heads_split(sa.key(y), sa.num_attention_heads)
    v = heads_split(sa.value(y), sa.num_attention_heads)
    ctx = attend(q, k, v, st.attn_size(), sa.scaling, sa.dropout_prob, sa.training, st.backend)
    x = self.attention.output(heads_join(ctx), y) + x
    x = st.merge(self._vt_index, x, st.key_metric(k))
    out = self.output(self.intermediate(self.layernorm_after(x)), x)
    if st.weighted_pool and self._vt_index == st.depth - 1:
        st.last = out
    return out


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
                layer=None, backend: str = "auto"):
    """Make a VideoMAE model merge tokens in every layer (in place; returns it).

    Options as vt.patch.timm; prop_attn defaults to False here. weighted_pool (only for
    VideoMAEForVideoClassification with mean pooling): size-weighted final average.
    """
    from transformers import VideoMAEForVideoClassification, VideoMAEModel

    head = None
    if isinstance(model, VideoMAEForVideoClassification):
        head, base = model, model.videomae
    elif isinstance(model, VideoMAEModel):
        base = model
    else:
        raise TypeError(f"model must be a transformers VideoMAEModel or VideoMAEForVideoClassification, "
                        f"got {type(model).__name__}")
    if not isinstance(weighted_pool, bool):
        raise TypeError(f"weighted_pool must be a bool, got {type(weighted_pool).__name__}")
    if weighted_pool and (head is None or head.fc_norm is None):
        raise ValueError("weighted_pool=True needs VideoMAEForVideoClassification with mean pooling "
                         "(config.use_mean_pooling=True)")
    cfg = base.config
    pe = base.embeddings.patch_embeddings
    ph, pw = pe.patch_size
    tube = pe.tubelet_size
    cost = CostModel("st", dim=cfg.hidden_size, mlp=cfg.intermediate_size, heads=cfg.num_attention_heads,
                     in_per_token=cfg.num_channels * tube * ph * pw)
    blocks = list(base.encoder.layer)

    def make_state():
        return MergeState("videomae", len(blocks), "st", False, False,
                          lambda shape: grid_from(shape, "BTCHW", tube, ph, pw, "VideoMAE"), cost)

    def extra(state):
        norm = head.fc_norm if head is not None else None
        if norm is not None and not has_hook(norm, _WeightedPool, state):
            norm.register_forward_pre_hook(_WeightedPool(state))

    options = dict(mode=mode, threshold=threshold, prop_attn=prop_attn, metric=metric,
                   trace_source=trace_source, layer=layer, backend=backend)
    install(model, blocks, _layer_forward, base.embeddings, make_state, r, options, extra)
    model._vt.weighted_pool = weighted_pool
    return model
