"""The prepared GPU check (``python -m benchmarks.gpu``): it refuses to run without CUDA,
its part (a) passes in Triton's interpreter at the GPU tile sizes (how CI shows the check
works), and on a GPU machine (marker ``gpu``) the whole check passes compiled."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, interpret: bool, tmp_path, timeout: int):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--out", str(tmp_path)] + args,
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_without_cuda_it_says_so_in_one_line_and_exits_2(monkeypatch, capsys, tmp_path):
    from benchmarks import gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main(["--out", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA device" in out
    assert not (tmp_path / "report.md").exists()


def test_interpret_runs_part_a_at_the_gpu_tiles(tmp_path):
    proc = _run(["--interpret"], True, tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "report.json").read_text())
    checks = data["correctness"]
    ops = {c["op"] for c in checks}
    assert ops == {"match", "merge", "merge backward", "merge_source", "unmerge", "unmerge backward",
                   "prop_attention", "prop_attention backward", "select"}
    assert {c["dtype"] for c in checks} == {"float32", "bfloat16", "float16"}
    assert all(c["ok"] for c in checks) and data["all_agree"]
    assert "checks agree with the reference" in (tmp_path / "report.md").read_text()


@pytest.mark.gpu
def test_the_whole_check_passes_compiled(tmp_path):
    proc = _run([], False, tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert json.loads((tmp_path / "report.json").read_text())["all_agree"]


def test_parts_b_and_d_run_on_cpu_at_smoke_sizes(triton_interpret):
    """The code of parts (b) (attention) and (d) runs here too, on CPU at tiny sizes, so the
    day a GPU is lent does not find a typo in it (the timings mean nothing here)."""
    from benchmarks import gpu

    table = gpu.attention_table(torch.device("cpu"), 1, shapes=(("tiny", (1, 2, 20, 16)),))
    assert table.count("| tiny [1, 2, 20, 16] |") == 2 and "| float32 | " in table
    rows = gpu.e2e_rows(torch.device("cpu"), batch=1, rounds=1, dtype=torch.float32, tiny=True)
    assert [w["model"].split()[0] for w in rows] == ["VideoMAE-B", "ViViT-B", "TimeSformer-B"]
    assert all(w["r0_matches_unpatched"] and w["patched_finite"] and w["flop_ratio"] > 1 for w in rows)
    assert gpu.e2e_table(rows).count("\n") == 4
