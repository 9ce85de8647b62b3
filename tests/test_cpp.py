"""What is specific to the C++ CPU backend ("cpp"); its results against the reference are
in test_backends.py with every other backend.

Here: the SIMD score kernels (each instruction set's tile shape, on paper-size groups with
many exact ties), rows of one group split across threads, the C++ argument checks, the
choice of "auto" on CPU. (Without the extension: test_backends.py's pure-Python test.)
"""

import os
import subprocess
import sys

import pytest
import torch

import vtome_kernels as vt
from cases import assert_identical_plan

cpp = pytest.importorskip("vtome_kernels.cpp")
if not cpp.status()[0]:
    pytestmark = pytest.mark.skip(reason=cpp.status()[1])


@pytest.mark.parametrize("n,d,cls,dups", [(1568, 64, False, 0), (1569, 64, True, 40),
                                          (197, 64, True, 0), (196, 64, False, 30),
                                          (400, 3, False, 0), (101, 130, True, 5)])
def test_cpp_identical_choices_random_float32(n, d, cls, dups):
    """Many seeds of random float32 metrics, paper-like sizes: the same merges exactly."""
    seeds = range(3) if n > 1000 else range(12)
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        metric = torch.randn(2, n, d, generator=g)
        for _ in range(dups):  # static patches: exact copies, across and within the sets
            i, j = torch.randint(0, n, (2,), generator=g).tolist()
            metric[:, j] = metric[:, i]
        r = n // 4
        assert_identical_plan(vt.match(metric, r, class_token=cls, backend="cpp"),
                              vt.match(metric, r, class_token=cls, backend="reference"))


def test_cpp_batch_one_rows_run_in_parallel_and_agree():
    """One group of ViViT size (rows of one group split across threads)."""
    g = torch.Generator().manual_seed(5)
    metric = torch.randn(1, 3137, 64, generator=g)
    metric[0, 100:300] = metric[0, 50]  # a static region: many exact ties
    assert_identical_plan(vt.match(metric, 300, class_token=True, backend="cpp"),
                          vt.match(metric, 300, class_token=True, backend="reference"))


def test_cpp_ops_refuse_inconsistent_plans():
    metric = torch.randn(1, 10, 3)
    out_idx, src_idx, dst_pos, _ = torch.ops.vtome.match(metric, 3, False, False)
    x, size = torch.randn(1, 10, 2), torch.ones(1, 10, 1)
    with pytest.raises(RuntimeError, match="dst_pos out of range"):
        torch.ops.vtome.merge(x, size, out_idx, src_idx, dst_pos + 100, None)
    with pytest.raises(RuntimeError, match="src_idx out of range"):
        torch.ops.vtome.merge(x, size, out_idx, src_idx - 100, dst_pos, None)
    with pytest.raises(RuntimeError, match="must cover"):
        torch.ops.vtome.merge(x[:, :9], size[:, :9], out_idx, src_idx, dst_pos, None)
    with pytest.raises(RuntimeError, match="r must be in"):
        torch.ops.vtome.match(metric, 6, False, False)


def test_cpp_is_auto_on_cpu():
    assert vt.backends()["cpp"].available
    from vtome_kernels.backends import resolve

    assert resolve("auto", "merge", torch.device("cpu")).NAME == "cpp"
    assert resolve("auto", "match", torch.device("cpu")).NAME == "cpp"


@pytest.mark.parametrize("isa", ["generic", "generic16"])
def test_other_score_kernels_agree(isa):
    """The baseline kernel and the AVX-512 tile shape (run here without AVX-512) give the
    reference's choices too (VTOME_ISA picks the kernel at load time: a subprocess)."""
    code = (
        "import torch, vtome_kernels as vt\n"
        "from vtome_kernels import _C\n"
        f"assert _C.score_kernel() == {isa!r}, _C.score_kernel()\n"
        "for seed, (n, d, cls, dist) in enumerate([(1569, 64, True, False), (197, 64, True, True),\n"
        "                                          (51, 7, False, False), (100, 130, False, False)]):\n"
        "    g = torch.Generator().manual_seed(seed)\n"
        "    m = torch.randn(2, n, d, generator=g)\n"
        "    m[:, 10:30] = m[:, 5:6]\n"
        "    p, q = (vt.match(m, n // 3, class_token=cls, distill_token=dist, backend=b) for b in ('cpp', 'reference'))\n"
        "    for f in ('out_idx', 'src_idx', 'dst_idx'):\n"
        "        assert torch.equal(getattr(p, f), getattr(q, f)), (seed, f)\n"
        "    assert torch.equal(p.src_score, q.src_score), seed\n"
        "print('ok')\n"
    )
    env = dict(os.environ, VTOME_ISA=isa)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
