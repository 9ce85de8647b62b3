"""What the Triton backend would launch on a GPU, without one: grids, devices, host syncs.

The launch functions run on fake CUDA tensors (``FakeTensorMode``: shapes and devices, no
memory, no driver) with the GPU tile sizes, and ``launch`` records each launch instead of
running it. So every kernel family is seen at 70,000 groups or rows, on ``cuda:1``, and
any read of a device value on the host (``bool``, ``.item()``, ``.tolist()``) raises, as a
real GPU-to-host sync would cost one.
"""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton")

from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode  # noqa: E402

import vtome_kernels as vt  # noqa: E402
import vtome_kernels.triton as backend  # noqa: E402
from vtome_kernels.triton import GRID_LIMITS  # noqa: E402

DEVICE = torch.device("cuda", 1)  # not the current device (0): the guard must switch
BIG = 70_000  # > 65535, CUDA's limit on grid axes 1 and 2


@pytest.fixture
def launches(monkeypatch):
    """Records (kernel, grid, device guarded at launch) instead of running kernels."""
    records = []
    current = []

    class Guard:  # stands in for torch.cuda.device (no CUDA driver here)
        def __init__(self, device):
            self.device = torch.device(device)

        def __enter__(self):
            current.append(self.device)

        def __exit__(self, *exc):
            current.pop()

    def record(kernel, grid, args, kwargs):
        records.append((kernel.fn.__name__, grid, current[-1] if current else None))

    monkeypatch.setattr(torch.cuda, "device", Guard)
    monkeypatch.setattr(backend, "_run", record)
    assert not backend.interpreting()  # GPU tile sizes
    return records


# Imported at collection, while tests/conftest.py's TRITON_INTERPRET=1 is set: kernels
# imported inside a test (where it is unset) would be compiled functions, and every later
# interpreter test in this process would refuse to run.
_MODULES = {name: importlib.import_module(f"vtome_kernels.triton.{name}")
            for name in ("match", "merge", "attention", "select")}


def _kernels(name):
    return _MODULES[name]


def _every_launch(groups: int, rows: int):
    """Every launch function of the four kernel families once, on fake CUDA tensors."""
    match, merge, attn, select = (_kernels(n) for n in ("match", "merge", "attention", "select"))
    with FakeTensorMode():
        def empty(*shape, dtype=torch.float32):
            return torch.empty(*shape, dtype=dtype, device=DEVICE)

        n, c, r = 2 * rows, 16, 3
        n_out = n - r
        metric = empty(groups, n, 8)
        node_max, node_idx = match.row_max(metric, True, False)
        out_idx, src_idx, dst_pos, _ = match.rank(node_max, node_idx, n, r, True, False)
        x, size = empty(groups, n, c), empty(groups, n, 1)
        out_x, out_s = merge.merge_fwd(x, size, out_idx, src_idx, dst_pos, None)
        merge.merge_fwd(x, size, out_idx, src_idx, dst_pos, empty(groups, r, dtype=torch.bool))
        merge.merge_bwd(empty(groups, n_out, c), empty(groups, n_out, 1), x, size, out_x, out_s,
                        out_idx, src_idx, dst_pos, None)
        merge.merge_source_fwd(empty(groups, n, 5, dtype=torch.bool), out_idx, src_idx, dst_pos, None)
        merge.unmerge_fwd(out_x, out_idx, src_idx, dst_pos, n)
        merge.unmerge_bwd(x, out_idx, src_idx, dst_pos)
        # attention rows: TimeSformer's temporal attention has B·n·H of them
        for b, h, nq in ((groups, 1, 40), (1, 1, rows)):
            q = empty(b, h, nq, 64, dtype=torch.bfloat16)
            out, lse = attn.attn_fwd(q, q, q, empty(b, nq, 1), 0.125)
            attn.attn_bwd(out, q, q, q, empty(b, nq, 1), out, lse, 0.125)
        select.select(empty(groups, 4, 9, 16), 5, 2)


def test_every_grid_fits_cuda_limits_at_70000_groups_and_rows(launches):
    _every_launch(BIG, 6)
    _every_launch(1, BIG)
    kernels = {name for name, _, _ in launches}
    assert kernels == {"_match_kernel", "_rank_kernel", "_merge_kernel", "_scatter_back_kernel",
                       "_attn_fwd_kernel", "_attn_bwd_kv_kernel", "_attn_bwd_q_kernel",
                       "_score_kernel", "_topk_gather_kernel"}
    for name, grid, _ in launches:
        assert 1 <= len(grid) <= 3, (name, grid)
        assert all(0 < v <= lim for v, lim in zip(grid, GRID_LIMITS)), (name, grid)
    assert max(g[0] for _, g, _ in launches) >= BIG  # the large counts did reach axis 0


def test_every_launch_is_guarded_by_the_tensors_device(launches):
    _every_launch(3, 6)
    assert launches and all(dev == DEVICE for _, _, dev in launches), launches


def test_a_grid_beyond_the_limits_raises_before_launching(launches):
    kernel = _kernels("merge")._merge_kernel
    with pytest.raises(ValueError, match="limit 65535 on axis 1"):
        backend.launch(kernel, (1, BIG), torch.zeros(1))
    with pytest.raises(ValueError, match="on axis 0"):
        backend.launch(kernel, (2**31,), torch.zeros(1))
    backend.launch(kernel, (0, BIG))  # empty: nothing launched, nothing checked
    assert launches == []


def test_the_cuda_path_does_not_sync_with_the_host(launches):
    """The public ops on fake CUDA tensors: a host read of a device value would raise
    DataDependentOutputException (a real GPU would wait there once per layer)."""
    with FakeTensorMode():
        x = torch.randn(2, 3, 20, 8, device=DEVICE)
        size = torch.ones(2, 3, 20, 1, device=DEVICE)
        y, s = vt.merge(x, size, 4, class_token=True, backend="triton")
        plan = vt.match(x, 4, backend="triton")
        plan.merge(x, size)
        plan.merge_source()
        plan.unmerge(y)
        q = torch.randn(2, 3, 16, 8, device=DEVICE)
        vt.prop_attention(q, q, q, s.reshape(2, 3 * 16, 1)[:, :16], backend="triton")
        vt.select(torch.randn(2, 4, 9, 8, device=DEVICE), 10, backend="triton")
        assert y.shape == (2, 3, 16, 8) and y.device == DEVICE
    with pytest.raises(DataDependentOutputException), FakeTensorMode():
        bool((torch.ones(3, device=DEVICE) > 0).all())  # what the test above would catch


def test_sizes_check_stays_eager_on_cpu():
    with pytest.raises(ValueError, match="size must be positive everywhere, got min 0"):
        vt.merge(torch.randn(1, 8, 4), torch.zeros(1, 8, 1), 2, backend="reference")


def test_auto_attention_on_cuda_by_dtype(monkeypatch):
    """float32 / float64 go to the reference (SDPA), bfloat16 / float16 to the Triton kernel
    (docs/DESIGN.md, "auto and float32 attention on CUDA")."""
    import types

    import vtome_kernels.attention as attention

    chosen = []

    def resolve(backend, op, device):
        module = attention.resolve.__wrapped__(backend, op, device)
        chosen.append(module.__name__)
        return types.SimpleNamespace(prop_attention=lambda q, *args: q)

    resolve.__wrapped__ = attention.resolve
    monkeypatch.setattr(attention, "resolve", resolve)
    with FakeTensorMode():
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            q = torch.randn(1, 2, 8, 16, device=DEVICE, dtype=dtype)
            vt.prop_attention(q, q, q, None)
        vt.prop_attention(q.float(), q.float(), q.float(), None, backend="triton")  # by name: as asked
    assert chosen == ["vtome_kernels.reference"] * 2 + ["vtome_kernels.triton.backend"] * 3
