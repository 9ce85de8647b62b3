"""The README's Python examples run as written (in order, one namespace) and give the
shapes their comments promise."""

from __future__ import annotations

import pathlib
import re

import pytest

pytest.importorskip("timm")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)  # draw_model writes merged.png / merged.gif here
    ns: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i}", "exec"), ns)

    assert tuple(ns["x"].shape) == (2, 16, 144, 768)  # the last block rebinds x (FluxViT grid)
    assert tuple(ns["y"].shape) == (2, 8, 178, 768)
    assert tuple(ns["full"].shape) == (4, 1568, 768)
    assert tuple(ns["out"].shape) == (4, 12, 1418, 64)
    assert tuple(ns["kept"].shape) == (2, 1024, 768) and tuple(ns["pos"].shape) == (2, 1024, 768)
    assert ns["logits"].shape[0] == 1
    vt, model, clip = ns["vt"], ns["model"], ns["clip"]
    assert vt.patch.token_counts(model, clip.shape, 150)[:2] == [1568, 1418]
    assert vt.patch.token_counts(model, clip.shape, 150)[-1] == 28
    draw, sampler = ns["draw"], ns["sampler"]  # Train for every budget
    assert draw.step == 1 and draw.grid in sampler.grids[draw.budget] and ns["loss"].ndim == 0
    for name in ("merged.png", "merged.gif"):
        assert (tmp_path / name).stat().st_size > 0
