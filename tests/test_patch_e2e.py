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
    assert "| 150 |" in block.split("![")[1]  # the sweep table reaches r=150
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_write_section_replaces_only_its_block(tmp_path):
    md = tmp_path / "B.md"
    md.write_text("# title\n\nkeep me\n")
    e2e.write_section("first", md)
    e2e.write_section("second", md)
    text = md.read_text()
    assert text.count(e2e.BEGIN) == 1 and "second" in text and "first" not in text and "keep me" in text


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
