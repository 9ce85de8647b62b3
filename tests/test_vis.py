"""Pictures of merged groups: ids from source maps, PNG and GIF files from a patched model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vtome_kernels as vt
from vtome_kernels.vis import group_ids

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


def test_group_ids_from_a_hand_made_source():
    # 1 class token + 4 patches (grid 1x2x2); tokens: cls, {p0, p3}, {p1}, {p2}.
    src = torch.tensor([[1, 0, 0, 0, 0],
                        [0, 1, 0, 0, 1],
                        [0, 0, 1, 0, 0],
                        [0, 0, 0, 1, 0]], dtype=torch.float32)
    ids = group_ids(src, (1, 2, 2), prefix_tokens=1)
    assert ids.tolist() == [[[0, 1], [2, 0]]]  # ids count the tokens after the prefix
    # Per frame (divided space-time): ids differ across frames.
    frame = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.float32)
    per_frame = torch.stack([frame, frame])
    ids = group_ids(per_frame, (2, 2, 2))
    assert ids[0].flatten().tolist() == [0, 1, 2, 0] and ids[1].flatten().tolist() == [3, 4, 5, 3]


def test_group_ids_errors():
    with pytest.raises(ValueError, match="covers 4 patches"):
        group_ids(torch.eye(4), (1, 3, 3))
    with pytest.raises(TypeError, match="source must be a torch.Tensor"):
        group_ids([[1]], (1, 1, 1))
    with pytest.raises(ValueError, match="grid must be"):
        group_ids(torch.eye(4), (2, 2))


def test_draw_clip_png_and_gif(tmp_path):
    pytest.importorskip("transformers")
    from patch_models import build, logits

    model, x, patch, _ = build("vivit")
    patch(model, r=4, trace_source=True)
    with torch.no_grad():
        logits(model, x)
    png, gif = tmp_path / "groups.png", tmp_path / "groups.gif"
    picture = vt.vis.draw_model(model, x[1], sample=1, path=png, gif=gif, cols=2)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == picture.size
        arr = np.asarray(im.convert("RGB"))
    # 4 frames of 32x32 in 2 columns with 2-pixel gaps.
    assert arr.shape == (2 * 34 + 2, 2 * 34 + 2, 3)
    with Image.open(gif) as im:
        assert im.format == "GIF" and im.n_frames == 4
    # Patches of one group share a colour; the group count is the token count.
    src = vt.patch.source(model)[1]
    ids = group_ids(src, model._vt.grid, prefix_tokens=1)
    assert len(ids.unique()) == src.shape[0] - 1


def test_draw_image_without_pixels(tmp_path):
    pytest.importorskip("timm")
    from patch_models import build

    model, x, patch, _ = build("timm")
    patch(model, r=8, trace_source=True)
    with torch.no_grad():
        model(x)
    picture = vt.vis.draw_model(model, path=tmp_path / "img.png")
    assert picture.size == (8 * 16 + 4, 8 * 16 + 4)
    arr = np.asarray(picture)
    # Grey tiles under colour: more distinct colours than one, outlines drawn dark.
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 3
    assert (arr == 20).all(-1).any()


def test_draw_model_needs_trace():
    pytest.importorskip("timm")
    from patch_models import build

    model, x, patch, _ = build("timm")
    patch(model, r=2)
    with pytest.raises(ValueError, match="trace_source"):
        vt.vis.draw_model(model)
