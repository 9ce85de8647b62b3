"""Patch for Hugging Face TimeSformer (TimesformerModel, TimesformerForVideoClassification).

Divided space-time scheme. TimeSformer lays its tokens out as [cls, (patch, frame)]: the
patch index is the outer one, the frame the inner one (TimesformerEmbeddings builds
``(b n) t m -> b (n t) m``). The patched layer keeps that layout: temporal attention over
the T frames of every token slot, spatial attention over the tokens of every frame (the
class token joins each frame, then is averaged back), and then the merge: the class token
set aside, each frame matched and merged on its own with r per frame (metric: the spatial
attention's keys), so every frame keeps the same count and temporal attention still sees
T tokens per slot. Proportional attention (on by default) is the published code's: the
log(size) bias only in the spatial attention and only on the patch tokens' query rows; the
class token's query row and the temporal attention are unbiased (ALGORITHM.md 4.1).
``output_attentions=True`` returns every layer's spatial attention probabilities (over the
merged tokens, with the size bias), as the unpatched layer returns its own.
"""

from __future__ import annotations

import torch

from .common import CostModel, attend, grid_from, heads_join, install
from .family import Bench, Family, Parts, hf_video_builder, split_head


def _attention(module, x, size, st, probs: bool = False):
    """TimeSformer's attention (qkv + output dense) of x [G, N, C]; also returns the keys and
    (probs=True) the attention probabilities, else None. size [G, N, 1] or None: the
    log(size) key bias, applied to every query row but the first (the class token's)."""
    sa = module.attention
    g, n, c = x.shape
    qkv = sa.qkv(x).reshape(g, n, 3, sa.num_heads, c // sa.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    args = (sa.scale, sa.attn_drop.p, sa.training, st.backend)
    if size is None:
        out = attend(q, k, v, None, *args, probs=probs)
    else:  # query rows are independent: the class token's row alone, unbiased, then the rest
        cls = attend(q[:, :, :1], k, v, None, *args, probs=probs)
        rest = attend(q[:, :, 1:], k, v, size, *args, probs=probs)
        out = tuple(torch.cat(pair, dim=2) for pair in zip(cls, rest)) if probs else torch.cat((cls, rest), dim=2)
    ctx, p = out if probs else (out, None)
    return module.output(heads_join(ctx)), k, p


def _layer_forward(self, hidden_states: torch.Tensor, output_attentions: bool = False):
    st = self._vt_state
    x = hidden_states
    t = self.config.num_frames
    b, length, c = x.shape
    n = (length - 1) // t
    cls, tok = x[:, :1], x[:, 1:]                       # tok: [b, (n t), c]
    size = st.attn_size()                                # [b, t, n, 1] or None

    # Temporal attention over the frames of every token slot (no size bias, as published).
    temporal = tok.reshape(b * n, t, c)
    res, _, _ = _attention(self.temporal_attention, self.temporal_layernorm(temporal), None, st)
    res = self.temporal_dense(self.drop_path(res).reshape(b, n * t, c))
    tok = tok + res

    # Spatial attention over the tokens of every frame, the class token joining each frame.
    spatial = tok.reshape(b, n, t, c).transpose(1, 2).reshape(b * t, n, c)
    spatial = torch.cat((cls.repeat(1, t, 1).reshape(b * t, 1, c), spatial), dim=1)
    s_size = None
    if size is not None:
        s_size = torch.cat((size.new_ones(b * t, 1, 1), size.reshape(b * t, n, 1)), dim=1)
    res, k, probs = _attention(self.attention, self.layernorm_before(spatial), s_size, st, output_attentions)
    res = self.drop_path(res)
    cls_res = res[:, 0].reshape(b, t, c).mean(1, keepdim=True)
    res = res[:, 1:].reshape(b, t, n, c).transpose(1, 2).reshape(b, n * t, c)
    cls, tok = cls + cls_res, tok + res

    # Merge every frame on its own: [b, (n t), c] -> [b, t, n, c] -> [b, t, n - r, c].
    if st.r_list[self._vt_index] > 0:
        frames = tok.reshape(b, n, t, c).transpose(1, 2)
        metric = st.key_metric(k[:, :, 1:]).reshape(b, t, n, -1)
        frames = st.merge(self._vt_index, frames, metric)
        tok = frames.transpose(1, 2).reshape(b, -1, c)

    x = torch.cat((cls, tok), dim=1)
    out = x + self.drop_path(self.output(self.intermediate(self.layernorm_after(x))))
    return (out, probs) if output_attentions else (out,)


def _keys_step(self, x: torch.Tensor, r: int) -> torch.Tensor:
    """Layer choice's keys-only merge step of x [b, 1 + n·t, c]: every frame merged on its
    own by the spatial attention's keys of LayerNorm(its tokens) (the class token set aside)."""
    st = self._vt_state
    t = self.config.num_frames
    b, length, c = x.shape
    n = (length - 1) // t
    frames = x[:, 1:].reshape(b, n, t, c).transpose(1, 2)  # [b, t, n, c]
    sa = self.attention.attention
    bias = None if sa.qkv.bias is None else sa.qkv.bias[c:2 * c]
    k = torch.nn.functional.linear(self.layernorm_before(frames), sa.qkv.weight[c:2 * c], bias)
    k = k.reshape(b * t, n, sa.num_heads, c // sa.num_heads).transpose(1, 2)
    frames = st.merge(self._vt_index, frames, st.key_metric(k).reshape(b, t, n, -1), r)
    return torch.cat((x[:, :1], frames.transpose(1, 2).reshape(b, -1, c)), dim=1)


def apply_patch(model, r=0, *, mode: str = "merge", threshold=None, prop_attn: bool = True,
                metric: str = "mean", trace_source: bool = False, layer=None, select=None,
                backend: str = "auto"):
    """Make a TimeSformer (divided space-time attention) merge r tokens per frame per layer.

    select=K is refused: divided space-time attention needs the same tokens in every frame
    and at every position over time, which selection at the input does not keep.

    Options as vt.patch.timm; r counts tokens per frame. The source map (trace_source) is
    per frame: [B, T, n', n0] over the n0 patches of each frame.
    """
    if select is not None:
        FAMILY.parts(model)  # a model of another family is a TypeError first
        raise ValueError("select is not supported by the TimeSformer patch: its divided space-time attention "
                         "needs equal token counts per frame and aligned positions over time")
    options = dict(mode=mode, threshold=threshold, prop_attn=prop_attn, metric=metric,
                   trace_source=trace_source, layer=layer, backend=backend)
    return install(FAMILY, model, r, options)


def _parts(model) -> Parts:
    from transformers import TimesformerForVideoClassification, TimesformerModel

    _, base = split_head(model, TimesformerForVideoClassification, TimesformerModel, "timesformer")
    cfg = base.config
    if cfg.attention_type != "divided_space_time":
        raise ValueError(f"the TimeSformer patch needs attention_type='divided_space_time', got {cfg.attention_type!r}")
    pe = base.embeddings.patch_embeddings
    ph, pw = pe.patch_size
    cost = CostModel("dst", dim=cfg.hidden_size, mlp=cfg.intermediate_size, heads=cfg.num_attention_heads,
                     in_per_token=cfg.num_channels * ph * pw, frames=cfg.num_frames)
    return Parts(list(base.encoder.layer), base.embeddings, cost,
                 lambda shape: grid_from(shape, "BTCHW", 1, ph, pw, "TimeSformer"))


def _tiny():
    from transformers import TimesformerConfig, TimesformerForVideoClassification

    cfg = TimesformerConfig(image_size=32, patch_size=8, num_frames=4, hidden_size=32, num_hidden_layers=3,
                            num_attention_heads=2, intermediate_size=64, num_labels=5)
    m = TimesformerForVideoClassification(cfg)
    return m, (2, 4, 3, 32, 32), m.timesformer.embeddings.patch_embeddings.projection


FAMILY = Family(
    name="timesformer", title="transformers TimeSformer (divided space-time)", package="transformers",
    scheme="dst", patch=apply_patch, parts=_parts, block_forward=_layer_forward, tiny=_tiny,
    keys_step=_keys_step,
    bench=Bench("TimeSformer-B 8x224", hf_video_builder("Timesformer", patch_size=8),
                lambda t: (1, 4, 3, 32, 32) if t else (1, 8, 3, 224, 224), 18),
)
