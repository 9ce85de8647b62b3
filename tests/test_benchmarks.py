"""The benchmark harness: providers compute the same merge, and the main job runs."""

import pytest
import torch

import vtome_kernels as vt
from benchmarks.__main__ import main, write_benchmarks_md
from benchmarks.providers import make_providers, tome_eager
from benchmarks.shapes import MergeShape, PAPER_SHAPES


@pytest.mark.parametrize("shape", [MergeShape("st", (2, 41, 8), 9, True, d=6),
                                   MergeShape("dst", (2, 3, 20, 8), 4, False, d=6)],
                         ids=lambda s: s.name)
def test_tome_eager_is_the_same_merge(shape):
    """The ToMe baseline merges exactly what vtome_kernels specifies (random inputs have no
    near-ties at this size)."""
    x, size, metric = shape.inputs(dtype=torch.float32)
    want = vt.merge(x, size, shape.r, metric=metric, class_token=shape.class_token,
                    backend="reference")
    torch.testing.assert_close(tome_eager(x, size, metric, shape.r, shape.class_token), want)
    for name, fn in make_providers(shape, torch.device("cpu"), compile_tome=False).items():
        if name.startswith("vt-"):
            torch.testing.assert_close(fn(x, size, metric), want)


def test_paper_shapes():
    assert [s.x for s in PAPER_SHAPES] == [(8, 197, 768), (1, 1568, 768), (4, 1568, 768),
                                           (1, 3137, 768), (4, 8, 196, 768)]
    assert [s.r for s in PAPER_SHAPES] == [16, 150, 150, 300, 18]


def test_main_job_prints_the_table(capsys):
    assert main(["--quick", "--shapes", "ViT-B/16", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| ViT-B/16 image b8 [8, 197, 768] r=16 | tome-eager |" in out
    assert "| floor |" in out and "| vt-reference |" in out
    assert out.count("| same |") >= 2  # tome-eager and vt-reference checked before timing
    assert "Not run here: vt-triton (" in out  # absent on CPU without the interpreter, and says why


def test_write_replaces_only_the_table(tmp_path):
    path = tmp_path / "B.md"
    path.write_text("intro\n<!-- main-table:begin -->\nold\n<!-- main-table:end -->\nnotes\n")
    write_benchmarks_md("| new |", "header", path)
    assert path.read_text() == ("intro\n<!-- main-table:begin -->\nheader\n\n| new |\n"
                                "<!-- main-table:end -->\nnotes\n")


def test_name_filter_matches_word_starts():
    from benchmarks.harness import name_matches

    names = [s.name for s in PAPER_SHAPES]
    assert [n for n in names if name_matches("ViT-B", n)] == ["ViT-B/16 image b8"]
    assert [n for n in names if name_matches("b4, ViViT", n)] == ["VideoMAE-B ST b4", "ViViT-B ST b1",
                                                                 "TimeSformer DST b4"]
    assert all(name_matches("", n) for n in names) and not any(name_matches("nothing", n) for n in names)
    assert name_matches("ViT-B/16", "timm ViT-B/16 224") and not name_matches("ViT-B", "ViViT-B 32x224")


def test_linear_rows_table():
    from benchmarks import linear_rows

    rows = linear_rows.rates(rows=(3, 5), rounds=1)
    assert [(r[0].split()[0], r[1]) for r in rows] == [(n, m) for n, _, _ in linear_rows.LAYERS for m in (3, 5)]
    assert all(ms > 0 and gf > 0 for _, _, ms, gf in rows)
    assert linear_rows.table(rows).count("\n") == len(rows) + 1
