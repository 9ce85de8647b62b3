"""What is particular to each patched family: TimeSformer's per-frame merge in its own
token order, ViViT's, DeiT's and register ViTs' protected tokens, VideoMAE's pooling, the budget helper."""

from __future__ import annotations

import re

import pytest
import torch

import vtome_kernels as vt
from patch_models import blocks, build, logits

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_defaults_for_proportional_attention():
    pytest.importorskip("transformers")
    pytest.importorskip("timm")
    want = {"timm": True, "videomae": False, "vivit": True, "timesformer": True, "vjepa2": True}
    for family, on in want.items():
        model, _, patch, _ = build(family)
        patch(model, r=1)
        assert model._vt.prop_attn is on, family


def test_timesformer_merges_each_frame_in_its_token_order():
    """Frames of one flat colour and no position/time embeddings: every token of a frame is
    the same vector, frames differ. Merging within true frames keeps each frame uniform
    after the block; grouping tokens in the wrong order ((t n) instead of TimeSformer's
    (n t)) would average across frames and break that."""
    pytest.importorskip("transformers")
    model, x, patch, _ = build("timesformer")
    emb = model.timesformer.embeddings
    with torch.no_grad():
        emb.position_embeddings.zero_()
        emb.time_embeddings.zero_()
    t = model.config.num_frames
    x = torch.randn(2, t, 3, 1, 1).expand(2, t, 3, 32, 32).contiguous()
    patch(model, r=[3, 0, 0], trace_source=True)
    out = []
    blocks(model)[0].register_forward_hook(lambda m, a, o: out.append(o[0]))
    with torch.no_grad():
        logits(model, x)
    tok = out[0][:, 1:]
    n = tok.shape[1] // t
    assert n == 16 - 3
    frames = tok.reshape(2, n, t, -1)              # TimeSformer's layout: patch outer, frame inner
    spread = (frames - frames[:, :1]).abs().amax()
    assert spread < 1e-5, spread
    # The frames themselves still differ (the test would be empty otherwise).
    assert (frames[:, 0, 0] - frames[:, 0, 1]).abs().amax() > 1e-3
    src = vt.patch.source(model)
    assert src.shape == (2, t, n, 16)


def test_timesformer_rejects_other_attention_types():
    pytest.importorskip("transformers")
    from transformers import TimesformerConfig, TimesformerModel

    model = TimesformerModel(TimesformerConfig(image_size=32, patch_size=8, num_frames=2, hidden_size=16,
                                               num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                               attention_type="space_only"))
    with pytest.raises(ValueError, match="divided_space_time"):
        vt.patch.timesformer(model, r=1)


def test_bare_models_patch_too():
    pytest.importorskip("transformers")
    for family, attr in (("videomae", "videomae"), ("vivit", "vivit"), ("timesformer", "timesformer")):
        model, x, patch, _ = build(family)
        bare = getattr(model, attr)
        with torch.no_grad():
            want = bare(x).last_hidden_state
            patch(bare, r=0)
            torch.testing.assert_close(bare(x).last_hidden_state, want, rtol=0, atol=1e-5)
            bare.r = 2
            assert bare(x).last_hidden_state.shape[1] == vt.patch.token_counts(bare, x.shape)[-1]


def test_videomae_weighted_pool():
    pytest.importorskip("transformers")
    model, x, patch, _ = build("videomae")
    with torch.no_grad():
        want0 = logits(model, x)
        patch(model, r=0, weighted_pool=True)
        torch.testing.assert_close(logits(model, x), want0, rtol=0, atol=1e-5)
        model.r = 3
        got = logits(model, x)
        hidden = model.videomae(x).last_hidden_state
        size = model._vt.size
        pooled = (hidden * size).sum(1) / size.sum(1)
        want = model.classifier(model.fc_norm(pooled))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        plain = model.classifier(model.fc_norm(hidden.mean(1)))
        assert not torch.allclose(got, plain)
        patch(model, r=3, weighted_pool=False)
        torch.testing.assert_close(logits(model, x), plain, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="weighted_pool=True needs"):
        vt.patch.videomae(model.videomae, r=1, weighted_pool=True)


def test_deit_distillation_token_protected():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=4,
                              depth=2, embed_dim=32, num_heads=2, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    vt.patch.timm(model, r=4, trace_source=True)
    with torch.no_grad():
        model(x)
    src = vt.patch.source(model)
    assert model._vt.protected == 2
    assert src[:, 0, 0].eq(1).all() and src[:, 1, 1].eq(1).all()
    assert src[:, :2].sum(-1).eq(1).all()


REGISTER_VITS = {  # timm order: class token, then registers, then patches
    "cls+reg": dict(reg_tokens=4),
    "cls+reg, no_embed_class": dict(reg_tokens=4, no_embed_class=True),
    "reg only": dict(reg_tokens=4, class_token=False, global_pool="avg"),
    "reg only, no_embed_class": dict(reg_tokens=3, class_token=False, global_pool="avg", no_embed_class=True),
}


def register_vit(kind):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=3,
                              embed_dim=32, num_heads=2, num_classes=5, **REGISTER_VITS[kind]).eval()
    return model, torch.randn(2, 3, 32, 32)


@pytest.fixture(params=sorted(REGISTER_VITS))
def reg_kind(request):
    return request.param


def block_outputs(model, x):
    out, handles = [], [b.register_forward_hook(lambda m, a, o: out.append(o)) for b in model.blocks]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return out


def test_register_vit_r0_equals_unpatched(reg_kind):
    model, x = register_vit(reg_kind)
    with torch.no_grad():
        want = model(x)
        vt.patch.timm(model, r=0)
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("r", [2, (3, -1.0), 1000])
def test_register_vit_counts_follow_schedule(reg_kind, r):
    model, x = register_vit(reg_kind)
    vt.patch.timm(model, r=r)
    p = model.num_prefix_tokens
    assert model._vt.protected == p
    seen = [o.shape[1] for o in block_outputs(model, x)]
    want = vt.patch.token_counts(model, x.shape)
    assert want[0] == 64 + p and [want[0]] + seen == [want[0]] + want[1:]
    assert model._vt.tokens == want[:-1]
    if r == 1000:  # clamped to half of the patch tokens, the prefix kept
        assert want[1] == p + 32


def test_register_vit_prefix_never_merges(reg_kind):
    """The prefix rows after block 0 are the unmerged block's (attention + residual + MLP,
    per token), whatever merges around them; they keep size 1 and their own source."""
    model, x = register_vit(reg_kind)
    p = model.num_prefix_tokens
    vt.patch.timm(model, r=0)
    want = block_outputs(model, x)[0]
    vt.patch.timm(model, r=[20, 5, 5], trace_source=True)
    got = block_outputs(model, x)
    assert got[0].shape[1] == 64 + p - 20
    torch.testing.assert_close(got[0][:, :p], want[:, :p], rtol=0, atol=1e-6)
    src, size = vt.patch.source(model), model._vt.size
    assert src.shape == (2, 64 + p - 30, 64 + p)
    torch.testing.assert_close(src[:, :p], torch.eye(p, 64 + p).expand(2, -1, -1), rtol=0, atol=0)
    assert src[:, p:, :p].eq(0).all()  # no patch token holds a prefix token
    torch.testing.assert_close(src.sum(-2), torch.ones(2, 64 + p))
    torch.testing.assert_close(src.sum(-1, keepdim=True), size)
    assert size[:, :p].eq(1).all() and size[:, p:].sum(1).eq(64).all()


def test_register_vit_draw_and_budget(reg_kind, tmp_path):
    model, x = register_vit(reg_kind)
    vt.patch.timm(model, r=8, trace_source=True)
    with torch.no_grad():
        model(x)
    picture = vt.vis.draw_model(model, path=tmp_path / "img.png")
    assert picture.size == (8 * 16 + 4, 8 * 16 + 4)
    model.r = vt.patch.budget(model, x.shape, flops_ratio=0.6)
    assert vt.patch.flops(model, x.shape) <= 0.6 * vt.patch.flops(model, x.shape, 0)
    assert [o.shape[1] for o in block_outputs(model, x)] == vt.patch.token_counts(model, x.shape)[1:]


def test_register_vit_trains_with_and_without_checkpointing(reg_kind):
    model, x = register_vit(reg_kind)
    vt.patch.timm(model, r=4)
    model.train()
    grads = []
    for ckpt in (False, True):
        model.set_grad_checkpointing(ckpt)
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0]["reg_token"].abs().sum() > 0
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=0, atol=1e-5, msg=k)


def test_timm_forward_intermediates():
    """NLC intermediates follow the merged counts; NCHW (a reshape to the patch grid that
    would silently mix channels of merged tokens) is refused while merging, exact at r=0."""
    pytest.importorskip("timm")
    model, x, patch, _ = build("timm")
    with torch.no_grad():
        want = model.forward_intermediates(x, intermediates_only=True)
        patch(model, r=0)
        got = model.forward_intermediates(x, intermediates_only=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        model.r = 2
        with pytest.raises(ValueError, match="output_fmt='NLC'"):
            model.forward_intermediates(x)
        with pytest.raises(ValueError, match="output_fmt='NLC'"):
            model.get_intermediate_layers(x, n=2, reshape=True)
        nlc = model.forward_intermediates(x, None, False, False, False, "NLC", True)
    counts = vt.patch.token_counts(model, x.shape)
    assert [t.shape[1] + 1 for t in nlc] == counts[1:]  # the class token split off
    vt.patch.remove(model)
    assert type(model).__name__ == "VisionTransformer"


# -- budget ----------------------------------------------------------------------------------
def test_flops_hand_count_vit():
    """Unpatched FLOPs of the tiny ViT, counted by hand from its sizes."""
    pytest.importorskip("timm")
    model, x, patch, _ = build("timm")
    patch(model, r=0)
    n, c, m, depth = 65, 32, 128, 3
    block = 2 * (4 * n * c * c + 2 * n * n * c) + 2 * 2 * n * c * m
    embed = 2 * 64 * (3 * 4 * 4) * c
    assert vt.patch.flops(model, (1, 3, 32, 32)) == embed + depth * block
    assert vt.patch.flops(model, (2, 3, 32, 32)) == 2 * (embed + depth * block)


@pytest.mark.parametrize("family", list(vt.patch.FAMILIES))
@pytest.mark.parametrize("schedule", ["constant", "decreasing"])
def test_budget_is_the_smallest_r(family, schedule):
    pytest.importorskip(vt.patch.FAMILIES[family].package)
    model, x, patch, _ = build(family)
    patch(model, r=0)
    shape = tuple(x.shape)
    base = vt.patch.flops(model, shape, 0)
    r = vt.patch.budget(model, shape, flops_ratio=0.8, schedule=schedule)
    r0 = r if schedule == "constant" else r[0]
    assert (r0 if schedule == "constant" else r) == (r0 if schedule == "constant" else (r0, -1.0))
    assert vt.patch.flops(model, shape, r) <= 0.8 * base
    prev = r0 - 1 if schedule == "constant" else (r0 - 1, -1.0)
    assert vt.patch.flops(model, shape, prev) > 0.8 * base
    # A budget in tokens: the final sequence length at most the target.
    counts = vt.patch.token_counts(model, shape, 0)
    target = counts[0] - 6
    rt = vt.patch.budget(model, shape, tokens=target, schedule=schedule)
    assert vt.patch.token_counts(model, shape, rt)[-1] <= target
    # The patched model really runs at that budget.
    model.r = rt
    with torch.no_grad():
        logits(model, x)
    assert model._vt.tokens == vt.patch.token_counts(model, shape)[:-1]


def test_budget_errors():
    pytest.importorskip("timm")
    model, x, patch, _ = build("timm")
    with pytest.raises(ValueError, match="not patched"):
        vt.patch.budget(model, x.shape, flops_ratio=0.5)
    patch(model, r=0)
    with pytest.raises(ValueError, match="least possible"):
        vt.patch.budget(model, x.shape, flops_ratio=0.01)
    with pytest.raises(ValueError, match="exactly one"):
        vt.patch.budget(model, x.shape)
    with pytest.raises(ValueError, match=re.escape("flops_ratio must be in (0, 1]")):
        vt.patch.budget(model, x.shape, flops_ratio=1.5)
    with pytest.raises(ValueError, match="schedule must be one of"):
        vt.patch.budget(model, x.shape, flops_ratio=0.5, schedule="increasing")
    with pytest.raises(ValueError, match="4-D"):
        vt.patch.flops(model, (3, 32, 32))
