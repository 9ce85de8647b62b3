"""Train for every budget: a fixed grid against Flux (FluxViT's flexible sampling), in miniature.

    python -m benchmarks.flux_train                       # train both, evaluate, print the table
    python -m benchmarks.flux_train --write               # ... into BENCHMARKS.md
    torchrun --nproc-per-node 2 -m benchmarks.flux_train  # the same under torch.distributed (gloo)
    python -m benchmarks.flux_train --nproc 2             # ... spawning the 2 processes itself

A small VideoMAE (VideoMAEForVideoClassification from random weights, config grid 8
frames of 32x32 in tubelets of 2 and patches of 8: 64 tokens) is trained twice, same seed,
same steps, same source clips (``clips``: 16 frames of 48x48; a square moving in one of 8
directions over noise beside a still square of another colour; the class is the
direction, so one frame is not enough):

- fixed grid: every clip resampled to the config grid (8 frames at 32²), all 64 tokens;
- Flux: every step draws a budget from ``BUDGETS`` and a grid over-sampling it
  (``vt.flux``), the clips are resampled to that grid (``vt.resample``) and the patched
  model keeps the budget by selection (``vt.patch.videomae(model, select=budget)``).

Both are then evaluated at 1/4, 1/2 and all of the 64 tokens, each with its best grid for
the budget (token optimisation: of the grids of ``vt.grids`` over-sampling the budget by
1, 2 or 4, the one that scores best on a validation split), accuracy on a test split.

Distributed: under torchrun (or ``--nproc N``), every rank trains on its own clips (the
global batch split between ranks, DistributedDataParallel over gloo), and every step the
ranks all-gather their draw and assert it is the same grid and budget. Evaluation runs on
rank 0. Numbers are of this small model on these clips, not of a released checkpoint.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import pathlib
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

import vtome_kernels as vt

from .harness import machine, progress, write_block

BEGIN, END = "<!-- flux-train:begin -->", "<!-- flux-train:end -->"
ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC_FRAMES, SRC_SIDE, SQUARE, SPEED, NOISE = 16, 48, 10, 1.5, 0.1
DIRECTIONS = [(dx, dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dx, dy) != (0, 0)]
PATCH, TUBELET, FRAMES, SIDE = 8, 2, 8, 32                      # the model's config grid: 64 tokens
TOKENS = (FRAMES // TUBELET) * (SIDE // PATCH) ** 2
BUDGETS = (16, 32, 64)                                          # 1/4, 1/2, all of TOKENS
RULES = dict(patch_size=PATCH, tubelet=TUBELET, frames=(2, 4, 6, 8, 12, 16), resolutions=(16, 24, 32, 40, 48))
EVAL_OVERSAMPLE = (1.0, 2.0, 4.0)


def clips(n: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """n source clips [n, SRC_FRAMES, 3, SRC_SIDE, SRC_SIDE] and labels [n] (0..7): a
    square of one colour moves SPEED pixels a frame in the clip's direction from a random
    start, over noise, beside a still square of another colour."""
    g = generator
    label = torch.randint(0, len(DIRECTIONS), (n,), generator=g)
    d = torch.tensor(DIRECTIONS, dtype=torch.float32)[label][:, None, :]           # [n, 1, 2]
    travel = SPEED * (SRC_FRAMES - 1)
    room = SRC_SIDE - SQUARE - travel
    u = torch.rand(n, 1, 2, generator=g)
    start = torch.where(d > 0, u * room, torch.where(d < 0, travel + u * room, u * (SRC_SIDE - SQUARE)))
    still = torch.rand(n, 1, 2, generator=g) * (SRC_SIDE - SQUARE)
    colour, other = (0.5 + 0.5 * torch.rand(n, 3, generator=g) for _ in range(2))
    t = torch.arange(SRC_FRAMES, dtype=torch.float32)[None, :, None]
    pos = start + SPEED * t * d                                                     # [n, T, 2]
    grid = torch.arange(SRC_SIDE, dtype=torch.float32)

    def square(at):  # at [n, T or 1, 2] -> mask [n, T or 1, SIDE, SIDE]
        x = (grid >= at[..., :1]) & (grid < at[..., :1] + SQUARE)
        y = (grid >= at[..., 1:]) & (grid < at[..., 1:] + SQUARE)
        return (y[..., :, None] & x[..., None, :]).float()

    video = NOISE * torch.randn(n, SRC_FRAMES, 3, SRC_SIDE, SRC_SIDE, generator=g)
    video += square(pos)[:, :, None] * colour[:, None, :, None, None]
    video += square(still)[:, :, None] * other[:, None, :, None, None]
    return video, label


def build(seed: int, width: int, depth: int):
    """A small VideoMAEForVideoClassification (mean pooling), patched (r=0, no select)."""
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    torch.manual_seed(seed)
    cfg = VideoMAEConfig(image_size=SIDE, patch_size=PATCH, num_frames=FRAMES, tubelet_size=TUBELET,
                         hidden_size=width, num_hidden_layers=depth, num_attention_heads=max(1, width // 32),
                         intermediate_size=2 * width, num_labels=len(DIRECTIONS))
    return vt.patch.videomae(VideoMAEForVideoClassification(cfg), r=0)


def _dist() -> Tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def train(model, mode: str, steps: int, batch: int, seed: int, lr: float = 2e-3) -> Tuple[List[float], Dict]:
    """AdamW (warm-up then cosine, gradients clipped to 1) on fresh source clips every step
    (rank r draws its own batch // world of them); mode "fixed" (config grid, all tokens)
    or "flux" (the step's draw of ``vt.flux``, same on every rank: asserted). The losses
    and how often each (budget, frames, resolution) was drawn."""
    rank, world = _dist()
    if batch % world:
        raise ValueError(f"batch {batch} must divide between {world} ranks")
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
    sampler = vt.flux(BUDGETS, seed=seed, **RULES)
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    losses, drawn = [], {}
    t0 = time.perf_counter()
    for step in range(steps):
        video, label = clips(batch // world, gen)
        if mode == "flux":
            draw = sampler(step)
            key = (draw.budget, draw.grid.frames, draw.grid.resolution)
            if world > 1:  # every rank must train on the same grid and budget at this step
                mine = torch.tensor(key)
                every = [torch.zeros_like(mine) for _ in range(world)]
                torch.distributed.all_gather(every, mine)
                assert all(torch.equal(e, mine) for e in every), f"step {step}: ranks drew {every}"
            vt.patch.videomae(model, r=0, select=draw.budget)
            x = vt.resample(video, draw.grid)
        else:
            key = (TOKENS, FRAMES, SIDE)
            x = vt.resample(video, (FRAMES, SIDE))
        drawn[key] = drawn.get(key, 0) + 1
        loss = torch.nn.functional.cross_entropy(net(x).logits, label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if rank == 0 and (step + 1) % max(1, steps // 5) == 0:
            progress(f"    {mode} step {step + 1}/{steps}: loss {sum(losses[-20:]) / len(losses[-20:]):.3f} "
                     f"({time.perf_counter() - t0:.0f} s)")
    vt.patch.videomae(model, r=0)
    model.eval()
    return losses, drawn


def candidates(budget: int) -> List[vt.Grid]:
    """Token optimisation's grids for a budget: vt.grids over-sampling it by 1, 2 or 4."""
    out = []
    for o in EVAL_OVERSAMPLE:
        out += [g for g in vt.grids(budget, oversample=o, **RULES) if g not in out]
    return out


def accuracy(model, data, budget: int, grid: vt.Grid, batch: int = 250) -> float:
    video, label = data
    vt.patch.videomae(model, r=0, select=None if budget >= grid.tokens else budget)
    right = 0
    with torch.inference_mode():
        for i in range(0, len(label), batch):
            x = vt.resample(video[i:i + batch], grid)
            right += int((model(x).logits.argmax(-1) == label[i:i + batch]).sum())
    vt.patch.videomae(model, r=0)
    return right / len(label)


def evaluate(model, val, test, name: str) -> Dict[int, Tuple[vt.Grid, float, float]]:
    """Per budget: the grid that scores best on val (ties: the earlier candidate), its
    val and test accuracy."""
    out = {}
    for b in BUDGETS:
        scored = [(accuracy(model, val, b, g), -i, g) for i, g in enumerate(candidates(b))]
        v, _, g = max(scored)
        out[b] = (g, v, accuracy(model, test, b, g))
        progress(f"    {name} budget {b}: best of {len(scored)} grids {g.frames}x{g.resolution}² "
                 f"({g.tokens} tokens): val {v:.3f}, test {out[b][2]:.3f}")
    return out


def table(results: Dict[str, Dict[int, Tuple[vt.Grid, float, float]]]) -> str:
    lines = ["| budget (tokens) | fixed grid: best grid | fixed grid: accuracy | Flux: best grid | Flux: accuracy |",
             "|---|---|---:|---|---:|"]
    for b in BUDGETS:
        cells = []
        for name in ("fixed", "flux"):
            g, _, acc = results[name][b]
            cells += [f"{g.frames}x{g.resolution}² ({g.tokens})", f"{acc:.3f}"]
        lines.append(f"| {b} ({b / TOKENS:.2g} of {TOKENS}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(steps: int, batch: int, held_out: int, seed: int, width: int, depth: int, write: bool,
        command: str) -> Optional[str]:
    rank, world = _dist()
    results, notes = {}, []
    t0 = time.perf_counter()
    for mode in ("fixed", "flux"):
        if rank == 0:
            progress(f"training a small VideoMAE ({mode}): {steps} steps of {batch} clips on {world} process(es)")
        model = build(seed, width, depth)
        t1 = time.perf_counter()
        losses, drawn = train(model, mode, steps, batch, seed)
        notes.append(f"{mode}: {(time.perf_counter() - t1) / 60:.1f} min, final loss "
                     f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        if rank == 0:
            val = clips(held_out, torch.Generator().manual_seed(seed + 10_001))
            test = clips(held_out, torch.Generator().manual_seed(seed + 10_002))
            results[mode] = evaluate(model, val, test, mode)
            if mode == "flux":
                notes.append(f"Flux drew {len(drawn)} (budget, grid) pairs")
    if rank != 0:
        return None
    minutes = (time.perf_counter() - t0) / 60
    header = (
        f"Small model trained here on synthetic clips: VideoMAEForVideoClassification from random weights "
        f"(width {width}, {depth} layers, config grid {FRAMES} frames of {SIDE}² in {TUBELET}x{PATCH}x{PATCH} "
        f"tubelets: {TOKENS} tokens), trained twice with the same seed and {steps} steps of {batch} fresh "
        f"source clips ({SRC_FRAMES} frames of {SRC_SIDE}²: a square moving in one of 8 directions beside a still "
        f"one; the class is the direction) on {world} process(es): on the fixed config grid, and with Flux "
        f"(budgets {list(BUDGETS)}, grids of `vt.grids` over-sampling the budget 2x +-25%, frames "
        f"{list(RULES['frames'])}, resolutions {list(RULES['resolutions'])}; selection keeps the budget). "
        f"Evaluation per budget with the best grid (over-sampling 1, 2 or 4; chosen on {held_out} validation "
        f"clips), accuracy on {held_out} test clips. {'; '.join(notes)}; {minutes:.1f} min in all. Not a released "
        f"checkpoint. Machine: {machine()}, {datetime.date.today()}. Command: `{command}`.")
    block = header + "\n\n" + table(results)
    if write:
        write_block(ROOT / "BENCHMARKS.md", BEGIN, END, block, heading="## Train for every budget: Flux")
        progress("BENCHMARKS.md Flux section updated")
    return block


def _worker(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    _main(args)


def _main(args) -> None:
    torch.set_num_threads(args.threads)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        torch.distributed.init_process_group("gloo")
    try:
        out = run(args.steps, args.batch, args.held_out, args.seed, args.width, args.depth, args.write, args.command)
        if out is not None:
            print(out, flush=True)
    finally:
        if distributed:
            torch.distributed.destroy_process_group()


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.flux_train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600, help="training steps of each model (default 600)")
    ap.add_argument("--batch", type=int, default=32, help="clips per step, all ranks together (default 32)")
    ap.add_argument("--held-out", type=int, default=500, help="validation and test clips each (default 500)")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nproc", type=int, default=1, help="spawn this many gloo processes (default 1: none)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    launcher = "torchrun --nproc-per-node " + os.environ["WORLD_SIZE"] + " -m" if "WORLD_SIZE" in os.environ \
        else "python -m"
    args.command = f"{launcher} benchmarks.flux_train" + "".join(" " + a for a in given)
    if args.nproc > 1:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.multiprocessing.spawn(_worker, args=(args.nproc, port, args), nprocs=args.nproc, join=True)
    else:
        _main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
