"""Tiny random models of every patched family (no downloads), for the patch tests: each
family's own test builder (``Family.tiny``), read from ``vt.patch.FAMILIES``."""

from __future__ import annotations

import torch

import vtome_kernels as vt


def build(family: str, seed: int = 0):
    """(model in eval mode, input tensor, patch function, patch-embedding conv)."""
    torch.manual_seed(seed)
    fam = vt.patch.FAMILIES[family]
    model, shape, embed = fam.tiny()
    return model.eval(), torch.randn(shape), fam.patch, embed


def logits(model, x):
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def blocks(model):
    """The transformer blocks of a model, in order (as its family declares them)."""
    for fam in vt.patch.FAMILIES.values():
        try:
            return fam.blocks(model)
        except (TypeError, ImportError):
            continue
    raise AssertionError(f"no blocks found in {type(model).__name__}")


def record_block_lengths(model):
    """Hooks that append the sequence length entering every block: (lengths, handles)."""
    seen = []
    handles = [blk.register_forward_pre_hook(
        lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).shape[1]), with_kwargs=True)
        for blk in blocks(model)]
    return seen, handles
