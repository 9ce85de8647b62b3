"""Patch for Hugging Face V-JEPA 2 (VJEPA2Model, VJEPA2ForVideoClassification): the encoder.

Spatio-temporal scheme, no class token. Every encoder layer rotates its queries and keys
by 3-D RoPE over (frame, row, column); the unpatched model derives those positions from
each token's index (or from the ``position_mask`` ids it is given), which merging breaks.
Here the tokens carry their positions: the embedding gives every token its (t, h, w) as
the model derives it from its index ([B, N, 3], MergeState.positions), every merge
carries them from its plan (``positions="dst"``: a merged token keeps its destination's,
exactly what ``position_mask`` would give the kept tokens; ``"mean"``: the size-weighted
mean of its patches', RoPE being continuous), and every later layer rotates by them. The
metric is the keys before rotation, averaged over heads (content, not position).
``select=K`` keeps K tubelet tokens before the first layer with their own positions, as
the unpatched layers run with ``position_mask`` = the kept indices. The attentive pooler
of VJEPA2ForVideoClassification can bias its attention by log(size) too
(``pool_prop_attn``). The predictor is untouched; it refuses to run after a merge or a
selection (its positions would be the token index again): pass ``skip_predictor=True``.
"""

from __future__ import annotations

import torch

from .common import (CostModel, StateHook, attend, eager, grid_from, has_hook, heads_join, heads_split, install,
                     select_tokens, st_keys_step)
from .family import Bench, Family, Parts, split_head


def index_positions(ids: torch.Tensor, grid_size: int) -> torch.Tensor:
    """(t, h, w) [B, N, 3] float32 of token ids [B, N], derived as the model derives them
    (VJEPA2RopeAttention.get_position_ids, on the config's grid_size = crop_size // patch_size,
    whatever the input's resolution)."""
    per_frame = grid_size * grid_size
    t = ids // per_frame
    h = (ids - t * per_frame) // grid_size
    w = ids - t * per_frame - h * grid_size
    return torch.stack((t, h, w), dim=-1).float()


def _attention_forward(self, hidden_states: torch.Tensor, position_mask=None):
    """VJEPA2RopeAttention, patched: RoPE by the tokens' own positions, the size bias;
    (output, probabilities or None) as the library's; the keys before rotation are left in
    ``_vt_keys`` for the layer's merge metric."""
    st = self._vt_state
    q, k, v = (heads_split(p(hidden_states), self.num_attention_heads) for p in (self.query, self.key, self.value))
    pos = st.positions.to(q.dtype)  # RoPE in the activations' dtype, as the model computes it
    ids = (pos[:, None, :, 0], pos[:, None, :, 1], pos[:, None, :, 2])
    qr, kr = self.apply_rotary_embeddings(q, ids), self.apply_rotary_embeddings(k, ids)
    out = attend(qr, kr, v, st.attn_size(), self.scaling, self.dropout_prob, self.training, st.backend,
                 probs=eager(self))
    ctx, probs = out if isinstance(out, tuple) else (out, None)
    self._vt_keys = k
    return self.proj(heads_join(ctx)), probs


def _layer_forward(self, hidden_states: torch.Tensor, position_mask=None, **kwargs):
    st = self._vt_state
    if position_mask is not None:
        raise ValueError("a patched V-JEPA 2 encoder layer takes its positions from the tokens, not position_mask")
    x = hidden_states
    ctx, probs = self.attention(self.norm1(x))  # as a module: output_attentions records it
    k = self.attention.__dict__.pop("_vt_keys")
    x = self.drop_path(ctx) + x
    x = st.merge(self._vt_index, x, st.key_metric(k))
    x = self.drop_path(self.mlp(self.norm2(x))) + x
    return x, probs


def _keys(self, x: torch.Tensor) -> torch.Tensor:
    """The layer's attention keys before rotation [B, H, N, d] of norm1(x) (layer choice's
    keys-only steps: the merge metric, as in the layer itself)."""
    return heads_split(self.attention.key(self.norm1(x)), self.attention.num_attention_heads)


_keys_step = st_keys_step(_keys)


def _embed_forward(self, pixel_values_videos: torch.Tensor):
    """VJEPA2Embeddings, patched: the tokens of the library, then (select=K) the K kept;
    records every token's (t, h, w) in the state."""
    st = self._vt_state
    x = self._vt_base.forward(self, pixel_values_videos)
    b, n, _ = x.shape
    t, h, w = st.grid
    if n != t * h * w:
        raise ValueError(f"V-JEPA 2 made {n} tokens of an input of shape {tuple(pixel_values_videos.shape)}, "
                         f"expected the grid {t}x{h}x{w}")
    if st.select is not None:
        x = select_tokens(st, x, None, extra=0)
        ids = st.kept
    else:
        ids = torch.arange(n, device=x.device).expand(b, n)
    st.positions = index_positions(ids, self.config.crop_size // self.config.patch_size)
    return x


def _pool_self_forward(self, hidden_states: torch.Tensor, attention_mask=None):
    """VJEPA2PoolerSelfAttention with (pool_prop_attn) a log(size) bias on its keys."""
    st = self._vt_state
    q, k, v = (heads_split(p(hidden_states), self.num_heads) for p in (self.q_proj, self.k_proj, self.v_proj))
    size = st.size if st.pool_prop_attn and attention_mask is None else None
    out = attend(q, k, v, size, self.scale, self.dropout, self.training, st.backend, probs=eager(self),
                 mask=attention_mask)
    ctx, probs = out if isinstance(out, tuple) else (out, None)
    return self.out_proj(heads_join(ctx)), probs


def _pool_cross_forward(self, queries, keys, values, attention_mask=None):
    """VJEPA2PoolerCrossAttention (no output projection) with (pool_prop_attn) a log(size)
    bias on its keys."""
    st = self._vt_state
    q = heads_split(self.q_proj(queries), self.num_heads)
    k, v = heads_split(self.k_proj(keys), self.num_heads), heads_split(self.v_proj(values), self.num_heads)
    size = st.size if st.pool_prop_attn and attention_mask is None else None
    out = attend(q, k, v, size, self.scale, self.dropout, self.training, st.backend, probs=eager(self),
                 mask=attention_mask)
    ctx, probs = out if isinstance(out, tuple) else (out, None)
    return heads_join(ctx), probs


class _PredictorGuard(StateHook):
    """The predictor reads encoder tokens by their index: refuse it after a merge or a selection."""

    def __call__(self, module, args):
        st = self.state
        if st.size is not None or st.kept is not None:
            raise ValueError("the V-JEPA 2 predictor cannot run on merged or selected encoder tokens: call the "
                             "patched VJEPA2Model with skip_predictor=True (or set model.r = 0)")


def apply_patch(model, r=0, *, mode: str = "merge", threshold=None, prop_attn: bool = True,
                positions: str = "dst", pool_prop_attn: bool = True, metric: str = "mean",
                trace_source: bool = False, layer=None, select=None, select_groups="auto",
                backend: str = "auto"):
    """Make a V-JEPA 2 encoder merge tokens in every layer, positions carried by the tokens
    (in place; returns it).

    Options as vt.patch.timm (metric: the keys before rotation). positions: "dst" (a merged
    token keeps its destination's (t, h, w)) or "mean" (size-weighted mean of its patches').
    pool_prop_attn (VJEPA2ForVideoClassification): a log(size) bias in the attentive
    pooler's attention. select=K: FluxViT selection of K tubelet tokens before the first
    layer (vt.select on the patch embeddings, groups select_groups), each kept token with
    its own position. Defaults from BENCHMARKS.md ("V-JEPA 2: positions after a merge").
    """
    if not isinstance(pool_prop_attn, bool):
        raise TypeError(f"pool_prop_attn must be a bool, got {type(pool_prop_attn).__name__}")
    options = dict(mode=mode, threshold=threshold, prop_attn=prop_attn, metric=metric,
                   trace_source=trace_source, layer=layer, backend=backend, positions=positions)
    install(FAMILY, model, r, options, select=select, select_groups=select_groups)
    model._vt.pool_prop_attn = pool_prop_attn
    return model


def _parts(model) -> Parts:
    from transformers import VJEPA2ForVideoClassification, VJEPA2Model

    head, base = split_head(model, VJEPA2ForVideoClassification, VJEPA2Model, "vjepa2")
    cfg = base.config
    enc = base.encoder
    blocks = list(enc.layer)
    p, tube = cfg.patch_size, cfg.tubelet_size
    pooler = head.pooler if head is not None else None
    cost = CostModel("st", dim=cfg.hidden_size, mlp=int(cfg.hidden_size * cfg.mlp_ratio),
                     heads=cfg.num_attention_heads, in_per_token=cfg.in_chans * tube * p * p,
                     pooler=None if pooler is None else len(pooler.self_attention_layers))
    attention = [(b.attention, _attention_forward) for b in blocks]
    if pooler is not None:
        attention += [(layer.self_attn, _pool_self_forward) for layer in pooler.self_attention_layers]
        attention.append((pooler.cross_attention_layer.cross_attn, _pool_cross_forward))

    def extra(state):
        if not has_hook(base.predictor, _PredictorGuard, state):
            base.predictor.register_forward_pre_hook(_PredictorGuard(state))

    return Parts(blocks, enc.embeddings, cost, lambda shape: grid_from(shape, "BTCHW", tube, p, p, "V-JEPA 2"),
                 attention=attention, extra_hooks=extra)


def _config(tiny: bool, **kw):
    from transformers import VJEPA2Config

    if tiny:
        kw = dict(crop_size=32, patch_size=8, frames_per_clip=4, tubelet_size=2, hidden_size=32,
                  num_attention_heads=2, num_hidden_layers=3, mlp_ratio=2.0, num_pooler_layers=1,
                  pred_hidden_size=16, pred_num_attention_heads=2, pred_num_hidden_layers=1, num_labels=5, **kw)
    return VJEPA2Config(**kw)


def _tiny():
    from transformers import VJEPA2ForVideoClassification

    m = VJEPA2ForVideoClassification(_config(True))
    m.vjepa2.predictor.requires_grad_(False)  # the classifier never runs it: no gradient to expect
    return m, (2, 4, 3, 32, 32), m.vjepa2.encoder.embeddings.patch_embeddings.proj


def _bench(tiny: bool):
    """VJEPA2ForVideoClassification, ViT-L as the library's default config (1024 wide, 24
    layers, 256 px, patch 16, tubelet 2) for 16-frame clips, 400 labels; or the tiny one."""
    from transformers import VJEPA2ForVideoClassification

    return VJEPA2ForVideoClassification(_config(tiny) if tiny else _config(False, frames_per_clip=16, num_labels=400))


FAMILY = Family(
    name="vjepa2", title="transformers V-JEPA 2 (spatio-temporal, rotary positions carried by the tokens)",
    package="transformers", scheme="st", patch=apply_patch, parts=_parts, block_forward=_layer_forward,
    embed_forward=_embed_forward, rotary=True, tiny=_tiny, keys_step=_keys_step,
    bench=Bench("V-JEPA 2 ViT-L 16x256", _bench, lambda t: (1, 4, 3, 32, 32) if t else (1, 16, 3, 256, 256), 71),
)
