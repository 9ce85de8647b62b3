"""Tiny random models of every patched family (no downloads), for the patch tests."""

from __future__ import annotations

import torch

import vtome_kernels as vt


def _timm():
    import timm

    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=3,
                          embed_dim=32, num_heads=2, num_classes=5)
    return m, (2, 3, 32, 32), vt.patch.timm, m.patch_embed.proj


def _videomae():
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    cfg = VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32,
                         num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, num_labels=5)
    m = VideoMAEForVideoClassification(cfg)
    return m, (2, 4, 3, 32, 32), vt.patch.videomae, m.videomae.embeddings.patch_embeddings.projection


def _vivit():
    from transformers import VivitConfig, VivitForVideoClassification

    cfg = VivitConfig(image_size=32, num_frames=4, tubelet_size=[2, 8, 8], hidden_size=32, num_hidden_layers=3,
                      num_attention_heads=2, intermediate_size=64, num_labels=5)
    m = VivitForVideoClassification(cfg)
    return m, (2, 4, 3, 32, 32), vt.patch.vivit, m.vivit.embeddings.patch_embeddings.projection


def _timesformer():
    from transformers import TimesformerConfig, TimesformerForVideoClassification

    cfg = TimesformerConfig(image_size=32, patch_size=8, num_frames=4, hidden_size=32, num_hidden_layers=3,
                            num_attention_heads=2, intermediate_size=64, num_labels=5)
    m = TimesformerForVideoClassification(cfg)
    return m, (2, 4, 3, 32, 32), vt.patch.timesformer, m.timesformer.embeddings.patch_embeddings.projection


BUILDERS = {"timm": _timm, "videomae": _videomae, "vivit": _vivit, "timesformer": _timesformer}


def build(family: str, seed: int = 0):
    """(model in eval mode, input tensor, patch function, patch-embedding conv)."""
    torch.manual_seed(seed)
    model, shape, patch, embed = BUILDERS[family]()
    return model.eval(), torch.randn(shape), patch, embed


def logits(model, x):
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def blocks(model):
    """The transformer blocks of a model, in order."""
    for path in ("blocks", "videomae.encoder.layer", "vivit.layers", "timesformer.encoder.layer"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return list(obj)
    raise AssertionError(f"no blocks found in {type(model).__name__}")
