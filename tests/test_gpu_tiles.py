"""The Triton kernels at the tile sizes a GPU runs, in the interpreter (``gpu_tiles()``).

Under the interpreter the launches normally pick tiles so large that a test shape fits in
one; here the shapes are a little larger than the GPU tiles, so the paths between tiles
run: argmax ties across B tiles and B slices, the radix select and many rank programs per
group (match), several source
and channel blocks (merge and its backward), online-softmax rescaling across key blocks
(attention, float16 operands straight into tl.dot), several score steps and row blocks of
the top-K search (select). Every result is compared with the reference; what the
interpreter cannot execute is listed in docs/DESIGN.md ("What the interpreter runs").
"""

from __future__ import annotations

import importlib

import pytest
import torch

import vtome_kernels as vt
from vtome_kernels import reference

pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def _gpu_tiles(triton_interpret):
    from vtome_kernels.triton import gpu_tiles

    with gpu_tiles():
        yield


def _kernels(name):
    return importlib.import_module(f"vtome_kernels.triton.{name}")


def _same_plan(plan, want):
    for name in ("out_idx", "src_idx", "dst_idx", "src_score"):
        assert torch.equal(getattr(plan, name), getattr(want, name)), name


@pytest.mark.parametrize("class_token,wave,grid", [(False, 264, (3, 3, 1)), (True, 12, (3, 2, 2))])
def test_match_ties_across_b_tiles(monkeypatch, class_token, wave, grid):
    """Ties between B tiles in one program (B_STEPS > 1) and across programs (B slices
    combined by the packed atomic max): the lowest B index wins either way."""
    match = _kernels("match")
    monkeypatch.setattr(match, "WAVE", wave)
    n, d = 2 * 150, 8
    assert match.match_blocks(150, 150) == (64, 64) and match.rank_blocks(150) == (32, 128)
    assert match.match_grid(2, 150, 150) == grid  # (A tiles, B slices, B tiles per slice)
    g = torch.Generator().manual_seed(1)
    metric = torch.randn(2, n, d, generator=g)
    metric[:, 1 + 2 * 100] = metric[:, 1 + 2 * 10]  # B tokens 10 and 100 (tiles 0 and 1) alike
    metric[:, 1 + 2 * 140] = metric[:, 1 + 2 * 10]  # ... and 140 (tile 2)
    metric[:, 0:80:2] = metric[:, 1 + 2 * 10, None] * 2  # 40 A tokens tie on all three, one max
    metric[:, 81:120:2] = metric[:, 80:119:2]  # A/B pairs alike: equal row maxima, many ties
    for r in (77, 149 - class_token):
        plan = vt.match(metric, r, class_token=class_token, backend="triton")
        want = vt.match(metric, r, class_token=class_token, backend="reference")
        _same_plan(plan, want)
    assert (want.dst_idx == 21).sum() >= 30  # the ties resolved to the lowest B index (token 10)


def test_match_nan_rows_across_b_slices(monkeypatch):
    """NaN scores in one B slice make the row's maximum NaN whatever the other slices hold
    (it wins the packed atomic max and is never replaced), argmax the last B token; NaN
    rows rank first in index order, as the reference's amax and stable sort give."""
    match = _kernels("match")
    monkeypatch.setattr(match, "WAVE", 264)
    assert match.match_grid(2, 150, 150) == (3, 3, 1)
    g = torch.Generator().manual_seed(4)
    metric = torch.randn(2, 300, 8, generator=g)
    metric[0, 1 + 2 * 140] = float("nan")  # a B token of the last slice: every row NaN
    metric[1, [8, 100, 298]] = float("nan")  # three A tokens in three A tiles
    metric[1, 6] = float("inf")  # ... and an A token that normalises to a negative NaN
    plan = vt.match(metric, 90, backend="triton")
    want = vt.match(metric, 90, backend="reference")
    for name in ("out_idx", "src_idx", "dst_idx"):
        assert torch.equal(getattr(plan, name), getattr(want, name)), name
    assert torch.equal(plan.src_score.isnan(), want.src_score.isnan())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_across_source_and_channel_blocks(dtype):
    merge = _kernels("merge")
    n, c, r = 160, 136, 70
    assert merge._block_c(c) == 128 and merge._block_s(r) == 32  # 2 channel, 3 source blocks
    g = torch.Generator().manual_seed(2)
    metric = torch.randn(2, n, 8, generator=g)
    metric[:, 0:80:2] = metric[:, 11, None] + 1e-3 * torch.randn(2, 40, 8, generator=g)  # 40 sources -> one
    x = torch.randn(2, n, c, generator=g).to(dtype)
    size = torch.randint(1, 5, (2, n, 1), generator=g).float()
    plan = vt.match(metric, r, backend="triton")
    want_plan = vt.match(metric, r, backend="reference")
    _same_plan(plan, want_plan)
    assert (plan.dst_idx == 11).sum(-1).min() >= 30  # one destination's sources span every block
    leaves = [x.clone().requires_grad_(), size.clone().requires_grad_()]
    ref_leaves = [x.clone().requires_grad_(), size.clone().requires_grad_()]
    got = plan.merge(*leaves)
    want = want_plan.merge(*ref_leaves)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    gx = torch.randn(got[0].shape, generator=g).to(dtype)
    gs = torch.randn(got[1].shape, generator=g)
    grads = torch.autograd.grad(got, leaves, (gx, gs))
    want_grads = torch.autograd.grad(want, ref_leaves, (gx, gs))
    torch.testing.assert_close(grads, want_grads, **tol)
    y = plan.unmerge(got[0].detach())
    torch.testing.assert_close(y, want_plan.unmerge(want[0].detach()), **tol)
    src = plan.merge_source()
    assert torch.equal(src, want_plan.merge_source())


@pytest.mark.parametrize("dtype,d,blocks", [(torch.float32, 64, (16, 32)), (torch.float16, 64, (64, 64)),
                                            (torch.bfloat16, 32, (64, 64))])
def test_attention_rescales_across_key_blocks(dtype, d, blocks):
    attn = _kernels("attention")
    nq, nk = 40, 150
    cfg = attn.attn_config(dtype, d, nq, nk)
    assert cfg[3:5] == blocks and nk > 2 * blocks[1]
    assert cfg[0] == (dtype != torch.float16)  # float16 operands go into tl.dot unconverted
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, nn, d, generator=g).to(dtype).requires_grad_() for nn in (nq, nk, nk))
    # sizes grow with the key index: the running max moves in every later key block
    size = torch.arange(1, nk + 1, dtype=torch.float32).pow(3)[None, :, None]
    out = vt.prop_attention(q, k, v, size, backend="triton")
    dout = torch.randn(out.shape, generator=g).to(dtype)
    got = (out,) + torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference.prop_attention(q64, k64, v64, size.double(), d**-0.5)
    want = (ref,) + torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    tol = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol)


def test_select_in_several_score_steps_and_row_blocks(monkeypatch):
    sel = _kernels("select")
    monkeypatch.setattr(sel, "BLOCK_N_MAX", 32)  # the bound, reached by a small group
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 50, 8, generator=g)  # 2 groups of 2 frames: 100 patches a group
    x[:, 1, 10:70:3] = x[:, 0, 10:70:3]  # static patches: score 0, ties across row blocks
    x[:, 3, :45] = x[:, 2, :45]
    assert sel.topk_block_n(100) == 32 and 100 > sel._BLOCK_R
    for budget in (2, 110, 199):
        kept, index = vt.select(x, budget, backend="triton")
        want = vt.select(x, budget, backend="reference")
        assert torch.equal(index, want[1]) and torch.equal(kept, want[0]), budget
