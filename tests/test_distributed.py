"""Distributed training keeps working with a patched model: DDP (gloo, 2 CPU processes) gives
the gradients of one process on the whole batch."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import patch_models


def _model():
    model, x, patch, _ = patch_models.build("timm", seed=0)
    patch(model, r=8)
    return model.train(), torch.randn((4,) + tuple(x.shape[1:]), generator=torch.Generator().manual_seed(2))


def _loss(model, x):
    return patch_models.logits(model, x).square().mean()


def _worker(rank: int, world: int, init: str, out: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model, x = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        half = x.shape[0] // world
        _loss(ddp, x[rank * half:(rank + 1) * half]).backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, out)
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_match_one_process(tmp_path):
    model, x = _model()
    _loss(model, x).backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    out = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'store'}", out), nprocs=2, join=True)
    got = torch.load(out)
    assert got.keys() == want.keys() and len(got) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)
