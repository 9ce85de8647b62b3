"""select=K in the video patches (issue 6): FluxViT selection after the embeddings and
before the first block, composed with merging."""

from __future__ import annotations

import pytest
import torch

import vtome_kernels as vt
from patch_models import blocks, build, logits, record_block_lengths

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
    seen, _ = record_block_lengths(model)
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


def test_videomae_table_for_the_config_grid_is_the_librarys():
    from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table
    from vtome_kernels.patch.videomae import _positions, sinusoid_table

    model, x, patch, _ = build("videomae")
    patch(model, r=0)
    emb = model.videomae.embeddings
    assert emb._vt_grid0 == (2, 4, 4)
    assert torch.equal(sinusoid_table((2, 4, 4), (2, 4, 4), 32), emb.position_embeddings[0])
    assert torch.equal(_positions(emb, (2, 4, 4)), emb.position_embeddings[0])
    for grid, dim in [((8, 14, 14), 768), ((3, 5, 7), 96)]:  # the base model's grid; odd sizes
        assert torch.equal(sinusoid_table(grid, grid, dim), get_sinusoid_encoding_table(grid[0] * grid[1] * grid[2], dim)[0])


def test_videomae_table_on_another_grid_maps_centres_onto_the_config_grid():
    from vtome_kernels.patch.videomae import sinusoid_table

    grid, grid0, dim = (4, 6, 3), (2, 4, 4), 32
    t, h, w = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in grid), indexing="ij")
    flat = ((t + 0.5) * 2 / 4 - 0.5) * 16 + ((h + 0.5) * 4 / 6 - 0.5) * 4 + ((w + 0.5) * 4 / 3 - 0.5)
    j = torch.arange(dim, dtype=torch.float64)
    angle = flat.reshape(-1, 1) / 10000 ** (2 * (j // 2) / dim)
    want = torch.where(j % 2 == 0, angle.sin(), angle.cos()).float()
    torch.testing.assert_close(sinusoid_table(grid, grid0, dim), want, rtol=0, atol=1e-6)


ANY_GRID = ["videomae", "vivit", "vjepa2"]


@pytest.mark.parametrize("family", ANY_GRID)
@pytest.mark.parametrize("shape", [(2, 8, 3, 48, 48), (2, 6, 3, 24, 40)])  # denser; fewer, non-square
def test_any_grid_select_keeps_the_budget_and_merging_composes(family, shape):
    model, x, patch, embed = build(family)
    x = torch.randn(shape)
    k = 16
    patch(model, r=2, select=k)
    counts = vt.patch.token_counts(model, x.shape)
    extra = int(family == "vivit")
    assert counts[0] == k + extra and counts[1] == counts[0] - 2
    seen, _ = record_block_lengths(model)
    model.train()
    out = logits(model, x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    t, h, w = model._vt.grid
    assert (t, h, w) == (shape[1] // 2, shape[3] // 8, shape[4] // 8)
    assert seen == counts[:-1]
    out.square().mean().backward()
    assert embed.weight.grad is not None and embed.weight.grad.abs().sum() > 0


def test_videomae_any_grid_without_select():
    """No select: every tubelet of the clip's grid with the grid's positions; the same as
    select keeping everything; a bool_masked_pos keeps the visible ones."""
    model, _, patch, _ = build("videomae")
    x = torch.randn(2, 8, 3, 40, 24)
    patch(model, r=0)
    with torch.no_grad():
        want = logits(model, x)
        patch(model, r=0, select=10_000)
        torch.testing.assert_close(logits(model, x), want, rtol=0, atol=1e-5)
        patch(model, r=2)
        assert torch.isfinite(logits(model, x)).all()
        patch(model, r=0)
        mask = torch.zeros(2, 4 * 5 * 3, dtype=torch.bool)
        mask[:, ::3] = True
        out = model.videomae(x, bool_masked_pos=mask).last_hidden_state
    assert out.shape == (2, 40, 32)


def test_vjepa2_other_resolution_carries_the_clips_rows_and_columns():
    from vtome_kernels.patch.vjepa2 import index_positions

    model, _, patch, _ = build("vjepa2")
    x = torch.randn(1, 4, 3, 48, 24)  # 6 x 3 patches a frame (the config: 4 x 4)
    patch(model, r=0)
    with torch.no_grad():
        model.vjepa2(x, skip_predictor=True)
    pos = model._vt.positions
    assert pos.shape == (1, 36, 3)
    want = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(6), torch.arange(3), indexing="ij"), -1)
    assert torch.equal(pos[0], want.reshape(-1, 3).float())
    patch(model, r=0, select=10)
    with torch.no_grad():
        model.vjepa2(x, skip_predictor=True)
    assert torch.equal(model._vt.positions, index_positions(model._vt.kept, 6, 3))


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
