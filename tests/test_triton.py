"""What is specific to the Triton backend; its results against the reference, opcheck,
gradients and torch.compile are in test_backends.py with every other backend.

Here: when the backend is usable, the kernels one by one (exact row maxima, the ranking
kernel on large groups and on GPU-sized tiles, the tf32 option), the launch count and the
absent score matrix. Every test runs in Triton's CPU interpreter (the ``triton_interpret``
fixture of conftest.py); shapes are small and tiles large so it stays quick.
"""

import importlib

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import vtome_kernels as vt
from vtome_kernels import reference
from vtome_kernels.backends import resolve
from cases import Case, assert_same_plan, make

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("triton_interpret")


def _kernels(name: str):
    """A kernel module (the package attribute of the same name is the contract function)."""
    return importlib.import_module(f"vtome_kernels.triton.{name}")


def _ieee_scores(metric: torch.Tensor, class_token: bool, distill_token: bool) -> torch.Tensor:
    """reference.similarity with a correctly rounded square root, plus the masks.

    The kernel's norms use IEEE sqrt (as torch does on CUDA); torch's CPU float32 sqrt is
    not always correctly rounded here (about 15% of values are 1 ulp off, measured), so the
    exact-equality check builds the reference's scores with the same IEEE sqrt. Everything
    else is the reference's own code (sum of squares, division, sequential dot).
    """
    m = metric.float()
    sq = torch.zeros_like(m[..., 0])
    for k in range(m.shape[-1]):
        sq += m[..., k] * m[..., k]
    m = m / sq.double().sqrt().float().clamp_min(reference.NORM_EPS)[..., None]
    scores = reference._dot(m[:, ::2], m[:, 1::2])
    if class_token:
        scores[:, 0, :] = -float("inf")
    if distill_token:
        scores[:, :, 0] = -float("inf")
    return scores


# -- availability -----------------------------------------------------------------------
def test_supports_only_when_asked(monkeypatch):
    backend = importlib.import_module("vtome_kernels.triton.backend")
    assert backend.status()[0]
    assert backend.supports("cpu") is None
    assert "TRITON_INTERPRET" in backend.supports("cuda")  # interpreter: CPU tensors only
    assert resolve("auto", "merge", torch.device("cpu")).NAME != "triton"  # never auto on CPU
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET=1" in backend.supports("cpu")
    assert backend.supports("cuda") is None
    assert "meta" in backend.supports("meta")
    with pytest.raises(vt.BackendUnavailableError, match="TRITON_INTERPRET"):
        vt.merge(torch.randn(1, 8, 4), None, 2, backend="triton")
    assert vt.backends()["triton"].available
    assert not torch.cuda.is_initialized()  # nothing above touched the CUDA driver


# -- matching: exact scores, same choices ------------------------------------------------
@pytest.mark.parametrize("case", [
    Case((2,), 17, 5, d=5, dups=3, seed=1),
    Case((3,), 33, 10, d=8, class_token=True, dups=6, seed=2),
    Case((2,), 16, 6, d=6, class_token=True, distill_token=True, dups=4, seed=3),
    Case((1, 2), 40, 12, d=64, dtype=torch.bfloat16, dups=8, cross_dups=1, seed=4),
    Case((2,), 30, 9, d=7, contiguous=False, dups=20, seed=5),
], ids=str)
def test_scores_are_bit_identical(case):
    """Row maxima equal the reference's scores exactly; ranking/layout equal exactly."""
    _, _, metric = make(case)
    flat = metric.reshape(-1, case.n, case.d)
    node_max, node_idx = _kernels("match").row_max(flat, case.class_token, case.distill_token)
    scores = _ieee_scores(flat, case.class_token, case.distill_token)
    assert torch.equal(node_max, scores.amax(-1))
    want = reference.match_scores(scores, case.r, case.class_token, case.distill_token)
    got = _kernels("match").rank(node_max, node_idx, case.n, case.r, case.class_token,
                                 case.distill_token)
    for g, w in zip(got, want):
        assert torch.equal(g, w), (g, w)


@pytest.mark.parametrize("class_token,distill_token", [(False, False), (True, False), (True, True)])
def test_rank_large_groups_with_ties(class_token, distill_token):
    """|A| = 2100 (ViViT-B has 1569) in one launch, many exactly equal row maxima."""
    g = torch.Generator().manual_seed(7)
    scores = torch.randint(0, 40, (2, 2100, 12), generator=g).float() / 40
    if class_token:
        scores[:, 0] = -float("inf")
    if distill_token:
        scores[:, :, 0] = -float("inf")
    node_max = scores.amax(-1)
    node_idx = torch.where(scores == node_max[..., None], torch.arange(12), 12).amin(-1).int()
    n = 2 * 2100 - 1  # |A| = 2100, |B| = 2099: only the rank kernel looks at |B|
    want = reference.match_scores(torch.cat([scores, scores.new_full((2, 2100, 2099 - 12), -9.0)], 2),
                                  900, class_token, distill_token)
    got = _kernels("match").rank(node_max, node_idx, n, 900, class_token, distill_token)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_faster_match_precisions(monkeypatch):
    """MATCH_PRECISION="tf32" (tl.dot tiles) still matches like the reference on inputs
    without near-ties (the interpreter computes tf32 as float32; on a GPU it rounds)."""
    backend = importlib.import_module("vtome_kernels.triton")
    metric = torch.randn(2, 41, 70, generator=torch.Generator().manual_seed(11))
    want = vt.match(metric, 12, class_token=True, backend="reference")
    monkeypatch.setattr(backend, "MATCH_PRECISION", "tf32")
    assert_same_plan(vt.match(metric, 12, class_token=True, backend="triton"), want)
    monkeypatch.setattr(backend, "MATCH_PRECISION", "fast")
    with pytest.raises(ValueError, match="precision must be one of"):
        vt.match(metric, 12, backend="triton")


@pytest.mark.parametrize("class_token,distill_token,r", [(False, False, 1), (False, False, 30),
                                                         (True, True, 59)])
def test_rank_with_gpu_sized_tiles(monkeypatch, class_token, distill_token, r):
    """Many programs per group (the GPU's small tiles): each finds the same weakest source."""
    monkeypatch.setattr(_kernels("match"), "rank_blocks", lambda na: (16, 32))
    g = torch.Generator().manual_seed(8)
    scores = torch.randint(0, 9, (1, 61, 60), generator=g).float() / 9
    scores[:, 5] = -0.0  # -0.0 ties with +0.0, as in the float comparisons of the reference
    scores[:, 7] = 0.0
    if class_token:
        scores[:, 0] = -float("inf")
    if distill_token:
        scores[:, :, 0] = -float("inf")
    node_max = scores.amax(-1)
    node_idx = torch.where(scores == node_max[..., None], torch.arange(60), 60).amin(-1).int()
    want = reference.match_scores(scores, r, class_token, distill_token)
    got = _kernels("match").rank(node_max, node_idx, 121, r, class_token, distill_token)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# -- launches and memory -----------------------------------------------------------------
@pytest.mark.parametrize("lead,class_token", [((2,), False), ((2, 3), True)])
def test_merge_is_three_launches(monkeypatch, lead, class_token):
    from triton.runtime.interpreter import InterpretedFunction

    launched = []
    run = InterpretedFunction.run

    def counting(self, *args, **kwargs):
        launched.append(self.fn.__name__)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", counting)
    x = torch.randn(lead + (24, 6))
    y, s = vt.merge(x, None, 7, class_token=class_token, backend="triton")
    assert launched == ["_match_kernel", "_rank_kernel", "_merge_kernel"]
    want = vt.merge(x, None, 7, class_token=class_token, backend="reference")
    torch.testing.assert_close((y, s), want)


def _largest_allocation(fn) -> int:
    """Bytes of the largest CPU allocation made while fn runs (inside custom ops too)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)


def test_no_score_matrix_is_allocated():
    n = 96
    x, metric = torch.randn(2, n, 4), torch.randn(2, n, 4)
    square = (n // 2) ** 2 * 4  # one group's float32 score matrix, in bytes
    assert x.numel() * 4 < square
    ref = _largest_allocation(lambda: vt.merge(x, None, 20, metric=metric, backend="reference"))
    assert ref >= square  # the check sees the reference's score matrix
    got = _largest_allocation(lambda: vt.merge(x, None, 20, metric=metric, backend="triton"))
    assert got < square
