"""The end-to-end benchmark runs on tiny configs: table rows, the plot file, the section."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("timm")
pytest.importorskip("matplotlib")

from benchmarks import e2e  # noqa: E402


def test_e2e_tiny_table_and_plot(tmp_path):
    png = tmp_path / "plot.png"
    block = e2e.run(rounds=1, sweep_rounds=1, tiny=True, plot_path=png, command="test")
    for case in e2e.CASES:
        assert f"| {case.name} | {case.r} |" in block
    assert "zero-cost merge speedup" in block
    assert "| 150 |" in block.split("![")[1]  # the sweep table reaches r=150
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_write_section_replaces_only_its_block(tmp_path):
    md = tmp_path / "B.md"
    md.write_text("# title\n\nkeep me\n")
    e2e.write_section("first", md)
    e2e.write_section("second", md)
    e2e.write_section("four", md, batch=4)
    e2e.write_section("batch four", md, batch=4)
    text = md.read_text()
    assert text.count(e2e.BEGIN) == 1 and "second" in text and "first" not in text and "keep me" in text
    assert text.count(e2e.markers(4)[0]) == 1 and "batch four" in text and "\nfour\n" not in text


@pytest.mark.parametrize("case", e2e.CASES, ids=lambda c: c.name.split()[0])
def test_zero_cost_merge_keeps_the_schedule_token_counts(case):
    """The bound's model runs the patched model's token counts, with sizes for attention."""
    import copy

    import torch

    torch.manual_seed(0)
    base = case.build(True).eval()
    shape = case.shape(True)
    patched = case.patch(copy.deepcopy(base), r=3)
    free = e2e.zero_cost_merge(case.patch(copy.deepcopy(base), r=3))
    x = torch.randn(shape)
    with torch.inference_mode():
        patched(x)
        free(x)
    assert free._vt.tokens == patched._vt.tokens
    assert free._vt.tokens[-1] < free._vt.tokens[0]
    assert free._vt.size is not None and bool((free._vt.size == 1).all())


def test_e2e_select_tiny_table(tmp_path):
    from benchmarks import e2e_select

    rows = e2e_select.run(rounds=1, tiny=True)
    assert [r["name"] for r in rows] == list(e2e_select.variants(True))
    assert all(r["ms"] > 0 for r in rows) and rows[0]["speedup"] == 1.0
    md = tmp_path / "B.md"
    md.write_text("keep\n")
    e2e_select.write_section("one", md)
    e2e_select.write_section(e2e_select.table(rows), md)
    text = md.read_text()
    assert text.count(e2e_select.BEGIN) == 1 and "one" not in text and "| unpatched |" in text
