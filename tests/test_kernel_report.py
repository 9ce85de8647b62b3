"""The static GPU report: every Triton kernel compiles for sm_80 and sm_90 at the paper
shapes' constexprs with no register spills and shared memory within the target's limit."""

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_kernels_compile_without_spills():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, not interpret
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernel_report"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| _")]
    kernels = {(r[0].strip("| "), r[2]) for r in rows}
    for name in ("_match_kernel", "_rank_kernel", "_merge_kernel", "_scatter_back_kernel",
                 "_attn_fwd_kernel", "_attn_bwd_kv_kernel", "_attn_bwd_q_kernel",
                 "_score_kernel", "_topk_gather_kernel"):
        for target in ("sm_80", "sm_90"):
            assert (name, target) in kernels, f"{name} {target} missing:\n{proc.stdout}"
    for r in rows:
        regs, spills, smem = int(r[3]), r[4], re.match(r"(\d+) B \(limit (\d+)\)", r[5])
        assert spills == "0/0", f"register spills: {' | '.join(r)}"
        assert regs <= 255 and int(smem.group(1)) <= int(smem.group(2)), " | ".join(r)
        if r[0].strip("| ") in ("_match_kernel", "_score_kernel") and "option" not in r[1]:
            assert r[7].strip(" |") == "0"  # the exact paths have no fused multiply-add
        if (r[0].strip("| ").startswith("_attn") and "bf16" in r[1]) or "tf32 option" in r[1]:
            assert r[6] != "no"  # tensor cores for bfloat16 attention
    assert proc.returncode == 0


def test_traffic_estimate_counts_the_unavoidable_bytes():
    from benchmarks.kernel_report import traffic
    from benchmarks.shapes import PAPER_SHAPES

    for shape in PAPER_SHAPES:
        t = traffic(shape)
        g, n, c = shape.groups, shape.x[-2], shape.x[-1]
        r = min(shape.r, (n - shape.class_token) // 2)
        floor = g * 4 * (n * c + (n - r) * c + n * shape.d)  # read x and metric, write x once
        assert floor <= t["fused"] < 1.1 * floor
        assert t["tome-eager"] > t["fused"] + 2 * t["score matrix"]
