"""Pictures of merged tokens: which original patches ended up in the same token.

From a source map (``trace_source=True`` in a patch, or ``MergePlan.merge_source``) every
original patch gets the id of the token that holds it; each group is filled in one colour
over the image (or clip) and outlined, as in the ToMe and video-merging papers' figures.
An image is one panel; a clip is a grid of frames (PNG), optionally also a GIF.
Pillow is imported only when drawing.
"""

from __future__ import annotations

import colorsys
import math
from typing import Optional, Sequence

import numpy as np
import torch


def group_ids(source: torch.Tensor, grid: Sequence[int], *, prefix_tokens: int = 0) -> torch.Tensor:
    """Group id of every original patch, shaped grid (T, h, w); -1 where no token holds it
    (patches dropped by selection).

    source: [N', N0] for one image or clip (the first prefix_tokens rows and columns are
    class / distillation tokens, never merged), or [T, n', n0] for a clip merged frame by frame (TimeSformer; ids are
    then distinct across frames).
    """
    if not isinstance(source, torch.Tensor):
        raise TypeError(f"source must be a torch.Tensor, got {type(source).__name__}")
    grid = tuple(int(g) for g in grid)
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"grid must be (T, h, w) with positive entries, got {grid}")
    t, h, w = grid
    src = source.detach().float().cpu()
    if src.dim() == 2:
        if prefix_tokens:
            src = src[prefix_tokens:, prefix_tokens:]
        if src.shape[1] != t * h * w:
            raise ValueError(f"source covers {src.shape[1]} patches but grid {grid} has {t * h * w}")
        ids = src.argmax(0)
        ids[src.sum(0) == 0] = -1  # a patch no token holds (not kept by select=K)
        return ids.reshape(t, h, w)
    if src.dim() == 3:
        if src.shape[0] != t or src.shape[2] != h * w:
            raise ValueError(f"a per-frame source must be [T={t}, n', {h * w}], got {tuple(src.shape)}")
        offset = torch.arange(t)[:, None] * src.shape[1]
        return (src.argmax(1) + offset).reshape(t, h, w)
    raise ValueError(f"source must be 2-D [N', N0] or 3-D [T, n', n0], got shape {tuple(src.shape)}")


def _palette(n: int) -> np.ndarray:
    """n distinct saturated colours (golden-ratio hues), uint8 [n, 3]."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    rows = [colorsys.hsv_to_rgb(hh, 0.55 + 0.4 * ((i * 7) % 3) / 2, 0.95) for i, hh in enumerate(hues)]
    return (np.array(rows) * 255).astype(np.uint8)


def _frames_array(frames, count: int, h: int, w: int) -> np.ndarray:
    """Frames as uint8 [F, H, W, 3], cropped to whole patches (grey 16-pixel tiles if None)."""
    if frames is None:
        return np.full((count, h * 16, w * 16, 3), 200, np.uint8)
    f = torch.as_tensor(frames).detach().cpu()
    if f.dim() == 3:
        f = f[None]
    if f.dim() != 4 or f.shape[1] not in (1, 3):
        raise ValueError(f"frames must be [C, H, W] or [F, C, H, W] with C = 1 or 3, got {tuple(f.shape)}")
    f = f.float()
    if f.shape[1] == 1:
        f = f.expand(-1, 3, -1, -1)
    lo, hi = float(f.min()), float(f.max())
    if lo < 0 or hi > 1.0 + 1e-6:  # normalised or 0..255 pixels: stretch to [0, 1] for display
        f = (f - lo) / max(hi - lo, 1e-12)
    img = (f.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    ph, pw = img.shape[1] // h, img.shape[2] // w
    if ph < 1 or pw < 1:
        raise ValueError(f"frames of {img.shape[1]}x{img.shape[2]} pixels are smaller than the {h}x{w} patch grid")
    return img[:, : ph * h, : pw * w]


def _render(ids: np.ndarray, img: np.ndarray, colours: np.ndarray, alpha: float) -> np.ndarray:
    """One frame: ids [h, w] upsampled to img [H, W, 3], colour blended, group borders dark."""
    hh, ww = img.shape[0] // ids.shape[0], img.shape[1] // ids.shape[1]
    up = np.repeat(np.repeat(ids, hh, axis=0), ww, axis=1)
    out = ((1 - alpha) * img + alpha * colours[up]).astype(np.uint8)
    edge = np.zeros(up.shape, bool)
    edge[:, 1:] |= up[:, 1:] != up[:, :-1]
    edge[:, :-1] |= up[:, 1:] != up[:, :-1]
    edge[1:, :] |= up[1:, :] != up[:-1, :]
    edge[:-1, :] |= up[1:, :] != up[:-1, :]
    out[edge] = (20, 20, 20)
    return out


def draw(source: torch.Tensor, grid: Sequence[int], *, frames=None, prefix_tokens: int = 0,
         path=None, gif=None, cols: Optional[int] = None, alpha: float = 0.55, duration_ms: int = 250):
    """Draw the merged groups of one image or clip; returns the PIL image (grid of frames).

    frames: the pixels ([C, H, W] or [F, C, H, W], any value range; None: grey tiles). With
    F frames and a grid of T token slots in time (tubelets), frame f shows slot f*T//F.
    path: write a PNG there; gif: also write an animated GIF of the frames there.
    """
    from PIL import Image

    ids = group_ids(source, grid, prefix_tokens=prefix_tokens).numpy()
    t, h, w = ids.shape
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    n_frames = t if frames is None else (1 if torch.as_tensor(frames).dim() == 3 else len(frames))
    img = _frames_array(frames, n_frames, h, w)
    dropped = ids < 0
    _, inv = np.unique(ids, return_inverse=True)
    ids = inv.reshape(ids.shape) + 1
    ids[dropped] = 0
    colours = _palette(int(ids.max()) + 1)
    colours[0] = (40, 40, 40)  # patches no token holds are darkened
    panels = [_render(ids[f * t // n_frames], img[f], colours, alpha) for f in range(n_frames)]
    cols = min(n_frames, 8) if cols is None else int(cols)
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    rows = math.ceil(n_frames / cols)
    ph, pw, pad = panels[0].shape[0], panels[0].shape[1], 2
    sheet = np.full((rows * (ph + pad) + pad, cols * (pw + pad) + pad, 3), 255, np.uint8)
    for i, p in enumerate(panels):
        y, x = pad + (i // cols) * (ph + pad), pad + (i % cols) * (pw + pad)
        sheet[y : y + ph, x : x + pw] = p
    picture = Image.fromarray(sheet)
    if path is not None:
        picture.save(path, format="PNG")
    if gif is not None:
        images = [Image.fromarray(p) for p in panels]
        images[0].save(gif, format="GIF", save_all=True, append_images=images[1:],
                       duration=duration_ms, loop=0)
    return picture


def draw_model(model, frames=None, *, sample: int = 0, path=None, gif=None, **kw):
    """Draw what merged in the last forward of a model patched with trace_source=True.

    frames: the input of that forward for this sample ([C, H, W] image or [F, C, H, W]
    clip), or None for grey tiles.
    """
    from .patch.common import state_of

    state = state_of(model)
    if not state.trace_source:
        raise ValueError("the model was patched with trace_source=False; patch it with trace_source=True and run it")
    if state.grid is None:
        raise ValueError("the model has not run a forward since it was patched")
    t, h, w = state.grid
    if state.source is None:  # nothing merged: every patch is its own group
        n0 = t * h * w
        src = torch.eye(h * w)[None].expand(t, -1, -1) if state.scheme == "dst" else torch.eye(n0 + state.protected)
    else:
        src = state.source[sample]
    prefix = state.protected if state.scheme == "st" else 0
    return draw(src, state.grid, frames=frames, prefix_tokens=prefix,
                path=path, gif=gif, **kw)
