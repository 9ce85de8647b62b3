"""Patch for timm's VisionTransformer (and DeiT's distilled variant): ToMe in every Block.

Block: x + Attn(LN(x)) (the keys give the metric) -> merge r -> x + MLP(LN(x)).
Every prefix token (``model.num_prefix_tokens``: the class token, DeiT's distillation
token, register tokens, in timm's order cls, then registers) is protected: it never merges
and keeps size 1, also without a class token. Proportional attention is on by default, as
ToMe uses it for supervised ViTs. The model's own class is swapped too, so that
``forward_intermediates`` refuses an NCHW reshape of merged tokens.
"""

from __future__ import annotations

import inspect

import torch

from .common import CostModel, attend, grid_from, install, patched_class, st_keys_step
from .family import Bench, Family, Parts


def _block_forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
    st = self._vt_state
    if (attn_mask is not None or is_causal) and st.merging():
        raise ValueError("a patched timm ViT merges tokens, so attn_mask / is_causal cannot be used with r > 0")
    a = self.attn
    y = self.norm1(x)
    b, n, _ = y.shape
    gate = a.gate(y).sigmoid() if getattr(a, "gate", None) is not None else None
    qkv = a.qkv(y).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = a.q_norm(q), a.k_norm(k)
    if attn_mask is not None or is_causal:  # r == 0 everywhere: the library's own attention
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=a.attn_drop.p if a.training else 0.0, scale=a.scale)
    else:
        out = attend(q, k, v, st.attn_size(), a.scale, a.attn_drop.p, a.training, st.backend)
    out = out.transpose(1, 2).reshape(b, n, getattr(a, "attn_dim", a.num_heads * a.head_dim))
    out = a.norm(out) if hasattr(a, "norm") else out
    if gate is not None:
        out = out * gate
    out = a.proj_drop(a.proj(out))
    x = x + self.drop_path1(self.ls1(out))
    x = st.merge(self._vt_index, x, st.key_metric(k))
    x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
    return x


def _keys(self, x: torch.Tensor) -> torch.Tensor:
    """The block's attention keys [B, H, N, d] of x (layer choice's keys-only steps): the k
    rows of the fused qkv projection of norm1(x), then k_norm."""
    a = self.attn
    y = self.norm1(x)
    b, n, _ = y.shape
    width = a.num_heads * a.head_dim
    bias = None if a.qkv.bias is None else a.qkv.bias[width:2 * width]
    k = torch.nn.functional.linear(y, a.qkv.weight[width:2 * width], bias)
    return a.k_norm(k.reshape(b, n, a.num_heads, a.head_dim).transpose(1, 2))


_keys_step = st_keys_step(_keys)


def _forward_intermediates(self, *args, **kwargs):
    """VisionTransformer.forward_intermediates, refusing output_fmt="NCHW" while merging:
    merged tokens have no H x W layout, and timm's reshape would silently mix channels."""
    base = self._vt_base.forward_intermediates
    fmt = inspect.signature(base).bind(self, *args, **kwargs).arguments.get("output_fmt", "NCHW")
    if fmt == "NCHW" and any(self._vt.schedule(self.r)):
        raise ValueError("a patched timm ViT that merges tokens (r > 0) has no H x W token grid: use "
                         "output_fmt='NLC' (get_intermediate_layers(reshape=False)) or set model.r = 0")
    return base(self, *args, **kwargs)


def _swap_model_class(model, state) -> None:
    model._vt_state = state
    model.__class__ = patched_class(type(model), _forward_intermediates, "forward_intermediates")


def apply_patch(model, r=0, *, mode: str = "merge", threshold=None, prop_attn: bool = True,
                metric: str = "mean", trace_source: bool = False, layer=None,
                backend: str = "auto"):
    """Make a timm VisionTransformer merge tokens in every block (in place; returns it).

    r: int, per-layer list or (r, inflect); later ``model.r = ...`` changes it. mode: the
    modes of vt.merge (threshold for "hybrid"); prop_attn: size bias in attention;
    metric: "mean" (keys averaged over heads) or "concat"; trace_source: keep the map of
    original patches per token (for vtome_kernels.vis); layer: layer choice, the
    schedule's entries as successive merge steps inside that one block (keys-only steps,
    then the block's own merge; API.md). Patching again only changes the options.
    """
    options = dict(mode=mode, threshold=threshold, prop_attn=prop_attn, metric=metric,
                   trace_source=trace_source, layer=layer, backend=backend)
    return install(FAMILY, model, r, options)


def _parts(model) -> Parts:
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a timm VisionTransformer, got {type(model).__name__}")
    blocks = list(model.blocks)
    for i, blk in enumerate(blocks):
        if not isinstance(blk, Block) or not isinstance(blk.attn, Attention):
            raise TypeError(f"block {i} is {type(blk).__name__} with {type(getattr(blk, 'attn', None)).__name__}; "
                            "the timm patch supports Block with the standard Attention")
    cls = getattr(model, "cls_token", None) is not None
    dist = getattr(model, "dist_token", None) is not None
    if dist and not cls:
        raise ValueError("a distillation token without a class token is not supported")
    pe = model.patch_embed
    ph, pw = pe.patch_size
    first = blocks[0]
    cost = CostModel("st", dim=model.embed_dim, mlp=first.mlp.fc1.out_features,
                     heads=first.attn.num_heads, in_per_token=pe.proj.in_channels * ph * pw)
    return Parts(blocks, pe, cost, lambda shape: grid_from(shape, "BCHW", 1, ph, pw, "timm ViT"),
                 class_token=cls, distill_token=dist,
                 prefix=model.num_prefix_tokens,  # class, distillation and register tokens, in front
                 extra_hooks=lambda st: _swap_model_class(model, st))


def _tiny():
    import timm

    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=3,
                          embed_dim=32, num_heads=2, num_classes=5)
    return m, (2, 3, 32, 32), m.patch_embed.proj


def _bench(tiny):
    import timm

    if tiny:
        return timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=2,
                                 embed_dim=32, num_heads=2, num_classes=5)
    return timm.create_model("vit_base_patch16_224", pretrained=False)


FAMILY = Family(
    name="timm", title="timm VisionTransformer", package="timm", scheme="st", patch=apply_patch,
    parts=_parts, block_forward=_block_forward, tiny=_tiny, keys_step=_keys_step,
    bench=Bench("timm ViT-B/16 224", _bench, lambda t: (1, 3, 32, 32) if t else (1, 3, 224, 224), 16),
)
