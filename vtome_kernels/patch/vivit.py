"""Patch for Hugging Face ViViT (VivitModel, VivitForVideoClassification).

Spatio-temporal scheme: one matching over the class token and all tubelet tokens of a
clip, the class token protected (never merged, kept at index 0). Proportional attention
is on by default, as in the video paper.
The layer calls its VivitAttention (class-swapped as well) as a module, so
``output_attentions=True`` records it: with eager attention, the probabilities used.
"""

from __future__ import annotations

import torch

from .common import (CostModel, StateHook, attend, eager, grid_from, has_hook, heads_join, heads_split,
                     install, select_tokens, st_keys_step)
from .family import Bench, Family, Parts, hf_video_builder, split_head


def _attention_forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs):
    """VivitAttention, patched: (output, probabilities or None) as the library's, with the
    size bias; the keys are left in ``_vt_keys`` for the block's merge metric."""
    st = self._vt_state
    q, k, v = (heads_split(p(hidden_states), self.num_attention_heads) for p in (self.q_proj, self.k_proj, self.v_proj))
    out = attend(q, k, v, st.attn_size(), self.scaling, self.attention_dropout, self.training, st.backend,
                 probs=eager(self), mask=attention_mask)
    ctx, probs = out if isinstance(out, tuple) else (out, None)
    self._vt_keys = k
    return self.o_proj(heads_join(ctx)), probs


def _layer_forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
    st = self._vt_state
    if attention_mask is not None and not st.user_mask:
        attention_mask = None  # transformers' all-attend mask, built while exporting (no value checks then)
    if attention_mask is not None and st.merging():
        raise ValueError("a patched ViViT merges tokens, so attention_mask cannot be used with r > 0")
    x = hidden_states
    a = self.attention
    out, _ = a(self.layernorm_before(x), attention_mask)  # as a module: output_attentions records it
    k = a.__dict__.pop("_vt_keys")
    x = self.dropout(out) + x
    x = st.merge(self._vt_index, x, st.key_metric(k))
    return self.dropout(self.mlp(self.layernorm_after(x))) + x


def _keys(self, x: torch.Tensor) -> torch.Tensor:
    """The layer's attention keys [B, H, N, d] of x (layer choice's keys-only steps)."""
    a = self.attention
    return heads_split(a.k_proj(self.layernorm_before(x)), a.num_attention_heads)


_keys_step = st_keys_step(_keys)


def _positions(emb, grid) -> torch.Tensor:
    """ViViT's learned patch positions [N, C] for a token grid (T', h, w): as trained for
    the config grid, trilinearly interpolated over (time, height, width) for another one."""
    pos = emb.position_embeddings[0, 1:]
    t0, h0, w0 = emb._vt_grid0
    if tuple(grid) == (t0, h0, w0):
        return pos
    c = pos.shape[-1]
    cube = pos.reshape(1, t0, h0, w0, c).permute(0, 4, 1, 2, 3)
    cube = torch.nn.functional.interpolate(cube, size=tuple(grid), mode="trilinear", align_corners=False)
    return cube.permute(0, 2, 3, 4, 1).reshape(-1, c)


def _embed_forward(self, pixel_values, interpolate_pos_encoding: bool = False):
    """VivitEmbeddings with select=K: keep K tubelet tokens (any grid: positions are
    interpolated in 3-D when it differs from the config's), class token in front."""
    st = self._vt_state
    if st.select is None:
        return self._vt_base.forward(self, pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
    b = pixel_values.shape[0]
    patches = self.patch_embeddings(pixel_values)
    x = select_tokens(st, patches, _positions(self, st.grid), extra=1)
    cls = self.cls_token.expand(b, -1, -1) + self.position_embeddings[:, :1]
    return self.dropout(torch.cat((cls, x), dim=1))


def apply_patch(model, r=0, *, mode: str = "merge", threshold=None, prop_attn: bool = True,
                metric: str = "mean", trace_source: bool = False, layer=None, select=None,
                select_groups="auto", backend: str = "auto"):
    """Make a ViViT model merge tokens in every layer (in place; returns it).

    Options as vt.patch.timm (proportional attention on by default). select=K: FluxViT
    selection of K tubelet tokens before the first block (vt.select on the patch
    embeddings, groups select_groups), the class token kept, each kept token given its own
    position; a denser clip than the config's (more frames, another resolution) gets the
    learned positions interpolated over (time, height, width).
    """
    options = dict(mode=mode, threshold=threshold, prop_attn=prop_attn, metric=metric,
                   trace_source=trace_source, layer=layer, backend=backend)
    return install(FAMILY, model, r, options, select=select, select_groups=select_groups)


class _UserMask(StateHook):
    """Pre-hook of VivitModel: did the caller pass an attention_mask? While exporting,
    transformers turns "no mask" into an all-attend one (it cannot read values then); the
    layers drop that one (same result, no [N, N] mask in the graph) and refuse a mask the
    caller gave when merging."""

    def __call__(self, module, args, kwargs):
        given = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
        self.state.user_mask = given is not None


def _parts(model) -> Parts:
    from transformers import VivitForVideoClassification, VivitModel

    _, base = split_head(model, VivitForVideoClassification, VivitModel, "vivit")
    cfg = base.config
    tt, th, tw = cfg.tubelet_size
    cost = CostModel("st", dim=cfg.hidden_size, mlp=cfg.intermediate_size, heads=cfg.num_attention_heads,
                     in_per_token=cfg.num_channels * tt * th * tw)
    blocks = list(base.layers)
    size = cfg.image_size if isinstance(cfg.image_size, (list, tuple)) else (cfg.image_size, cfg.image_size)
    base.embeddings._vt_grid0 = (cfg.num_frames // tt, size[0] // th, size[1] // tw)
    def extra(state):
        state.user_mask = True  # until the hook has seen a call
        if not has_hook(base, _UserMask, state):
            base.register_forward_pre_hook(_UserMask(state), with_kwargs=True)

    return Parts(blocks, base.embeddings, cost, lambda shape: grid_from(shape, "BTCHW", tt, th, tw, "ViViT"),
                 class_token=True, attention=[(b.attention, _attention_forward) for b in blocks],
                 extra_hooks=extra)


def _tiny():
    from transformers import VivitConfig, VivitForVideoClassification

    cfg = VivitConfig(image_size=32, num_frames=4, tubelet_size=[2, 8, 8], hidden_size=32, num_hidden_layers=3,
                      num_attention_heads=2, intermediate_size=64, num_labels=5)
    m = VivitForVideoClassification(cfg)
    return m, (2, 4, 3, 32, 32), m.vivit.embeddings.patch_embeddings.projection


FAMILY = Family(
    name="vivit", title="transformers ViViT (spatio-temporal, class token protected)", package="transformers",
    scheme="st", patch=apply_patch, parts=_parts, block_forward=_layer_forward, embed_forward=_embed_forward,
    tiny=_tiny, keys_step=_keys_step,
    bench=Bench("ViViT-B 32x224", hf_video_builder("Vivit", tubelet_size=[2, 8, 8]),
                lambda t: (1, 4, 3, 32, 32) if t else (1, 32, 3, 224, 224), 300),
)
