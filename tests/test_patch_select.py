"""select=K in the video patches (issue 6): FluxViT selection after the embeddings and
before the first block, composed with merging."""

from __future__ import annotations

import pytest
import torch

import vtome_kernels as vt
from patch_models import blocks, build, logits

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

EMBED = {"videomae": lambda m: m.videomae.embeddings, "vivit": lambda m: m.vivit.embeddings}


@pytest.mark.parametrize("family", ["videomae", "vivit"])
def test_select_everything_is_the_unpatched_model(family):
    model, x, patch, _ = build(family)
    with torch.no_grad():
        want = logits(model, x)
        patch(model, r=0, select=10_000)
        torch.testing.assert_close(logits(model, x), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["videomae", "vivit"])
def test_kept_tokens_carry_their_own_positions(family):
    """The first block sees exactly the library's embedded tokens at the kept positions
    (class token first for ViViT), chosen by vt.select on the patch embeddings."""
    model, x, patch, _ = build(family)
    emb = EMBED[family](model)
    full = []
    handle = emb.register_forward_hook(lambda m, a, out: full.append(out))
    with torch.no_grad():
        logits(model, x)
    handle.remove()
    k = 6
    patch(model, r=0, select=k)
    seen = []
    blocks(model)[0].register_forward_pre_hook(lambda m, a, kw: seen.append(a[0] if a else kw["hidden_states"]),
                                               with_kwargs=True)
    with torch.no_grad():
        logits(model, x)
    index = model._vt.kept
    t, h, w = model._vt.grid
    patches = emb.patch_embeddings(x).reshape(x.shape[0], t, h * w, -1)
    assert torch.equal(index, vt.select(patches, k)[1])
    extra = 1 if family == "vivit" else 0
    want = full[0][:, extra:].gather(1, index[..., None].expand(-1, -1, full[0].shape[-1]))
    if extra:
        want = torch.cat((full[0][:, :1], want), dim=1)
    torch.testing.assert_close(seen[0], want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["videomae", "vivit"])
def test_select_then_merge_lengths_and_gradients(family):
    model, x, patch, embed = build(family)
    patch(model, r=2, select=12, trace_source=True)
    counts = vt.patch.token_counts(model, x.shape)
    assert counts[0] == 12 + (family == "vivit")
    seen = []
    for blk in blocks(model):
        blk.register_forward_pre_hook(lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).shape[1]),
                                      with_kwargs=True)
    model.train()
    out = logits(model, x)
    out.square().mean().backward()
    assert seen == counts[:-1]
    assert embed.weight.grad is not None and embed.weight.grad.abs().sum() > 0
    src = vt.patch.source(model)
    n0 = (x.shape[1] // 2) * 16  # tubelets of 2 frames, 4x4 patches a frame
    assert src.shape[-1] == n0 + (family == "vivit")
    assert int(src.sum()) == x.shape[0] * (12 + (family == "vivit"))  # every kept patch, once
    # Pictures show the dropped patches darkened: ids -1 where no token holds a patch.
    ids = vt.vis.group_ids(src[0], model._vt.grid, prefix_tokens=int(family == "vivit"))
    assert (ids == -1).sum() == n0 - 12


def test_vivit_denser_grid_interpolates_positions():
    model, x, patch, _ = build("vivit")
    dense = torch.randn(1, 8, 3, 48, 48)  # twice the frames, 1.5x the resolution
    patch(model, r=2, select=32)
    with torch.no_grad():
        out = logits(model, dense)
    assert out.shape == (1, 5) and torch.isfinite(out).all()
    assert model._vt.grid == (4, 6, 6)
    # The config grid keeps the learned table exactly.
    from vtome_kernels.patch.vivit import _positions

    emb = model.vivit.embeddings
    assert torch.equal(_positions(emb, emb._vt_grid0), emb.position_embeddings[0, 1:])


def test_videomae_other_grid_is_a_clear_error():
    model, x, patch, _ = build("videomae")
    patch(model, r=0, select=8)
    with pytest.raises(ValueError, match="fixed sinusoidal positions"):
        logits(model, torch.randn(1, 8, 3, 32, 32))


@pytest.mark.parametrize("family, kwargs, err, words", [
    ("timesformer", dict(select=8), ValueError, "select is not supported by the TimeSformer"),
    ("timm", dict(select=8), TypeError, "unexpected keyword"),
    ("vivit", dict(select=0), ValueError, "select must be >= 1"),
    ("vivit", dict(select=True), TypeError, "select must be an int"),
    ("videomae", dict(select=4, select_groups=0), ValueError, "select_groups must be"),
])
def test_select_errors(family, kwargs, err, words):
    pytest.importorskip("timm")
    model, x, patch, _ = build(family)
    with pytest.raises(err, match=words):
        patch(model, r=1, **kwargs)


def test_select_groups_not_dividing_frames_fails_at_forward():
    model, x, patch, _ = build("vivit")
    patch(model, r=0, select=4, select_groups=3)
    with pytest.raises(ValueError, match="groups must divide"):
        logits(model, x)
