"""V-JEPA 2 with merging: which position a merged token gets, and proportional attention.

    python -m benchmarks.vjepa2_positions            # train, evaluate, print the table
    python -m benchmarks.vjepa2_positions --write    # ... into BENCHMARKS.md

A small V-JEPA 2 (VJEPA2ForVideoClassification: 6 layers, width 96, 3 heads, 8 frames of
32x32 in tubelets of 2 and patches of 8: 64 tokens, one pooler layer) is trained here, from
random weights, on synthetic motion clips (``clips``: three squares of one colour moving
together in one of 8 directions over noise, beside a still square of another colour; the
class is the direction), then evaluated on a fixed held-out set unpatched and patched at
r = 4, 8, 10, 12 per layer for positions "dst" / "mean", prop_attn on / off, pool_prop_attn on / off, and
with positions re-derived from the token index after each merge (what a patch that
ignores positions would do). Fixed seeds; CPU-sized. Numbers are of this small model on
these clips, not of a released checkpoint.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import pathlib
import sys
import time
from typing import List, Optional

import torch

import vtome_kernels as vt
from vtome_kernels.patch.vjepa2 import index_positions

from .harness import machine, progress, write_block

BEGIN, END = "<!-- vjepa2-positions:begin -->", "<!-- vjepa2-positions:end -->"
ROOT = pathlib.Path(__file__).resolve().parent.parent
FRAMES, SIDE, SQUARE, SPEED, NOISE, MOVING = 8, 32, 6, 2, 0.1, 3
DIRECTIONS = [(dx, dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dx, dy) != (0, 0)]
RS = (4, 8, 10, 12)


def clips(n: int, generator: torch.Generator):
    """n clips [n, FRAMES, 3, SIDE, SIDE] and their labels [n] (the direction, 0..7):
    MOVING squares of one colour move SPEED pixels a frame in the clip's direction, from
    random starts, over noise, beside a still square of another colour."""
    g = generator
    label = torch.randint(0, len(DIRECTIONS), (n,), generator=g)
    d = torch.tensor(DIRECTIONS, dtype=torch.float32)[label][:, None, None, :]   # [n, 1, 1, 2]
    travel = SPEED * (FRAMES - 1)
    room = SIDE - SQUARE - travel                                                 # start range if moving
    u = torch.rand(n, MOVING, 1, 2, generator=g)
    start = torch.where(d > 0, u * room, torch.where(d < 0, travel + u * room, u * (SIDE - SQUARE)))
    still = torch.rand(n, 1, 1, 2, generator=g) * (SIDE - SQUARE)
    colour = 0.5 + 0.5 * torch.rand(n, 3, generator=g)
    other = 0.5 + 0.5 * torch.rand(n, 3, generator=g)
    t = torch.arange(FRAMES, dtype=torch.float32)[None, None, :, None]
    pos = start + SPEED * t * d                                                   # [n, MOVING, T, 2]
    grid = torch.arange(SIDE, dtype=torch.float32)

    def squares(at):  # at [n, S, T or 1, 2] -> mask [n, T or 1, SIDE, SIDE] (union of the S squares)
        x = (grid >= at[..., :1]) & (grid < at[..., :1] + SQUARE)
        y = (grid >= at[..., 1:]) & (grid < at[..., 1:] + SQUARE)
        return (y[..., :, None] & x[..., None, :]).any(1).float()

    video = NOISE * torch.randn(n, FRAMES, 3, SIDE, SIDE, generator=g)
    video += squares(pos)[:, :, None] * colour[:, None, :, None, None]
    video += squares(still)[:, :, None] * other[:, None, :, None, None]
    return video, label


def build(seed: int = 0, labels: int = len(DIRECTIONS)):
    from transformers import VJEPA2Config, VJEPA2ForVideoClassification

    torch.manual_seed(seed)
    cfg = VJEPA2Config(crop_size=SIDE, patch_size=8, frames_per_clip=FRAMES, tubelet_size=2, hidden_size=96,
                       num_attention_heads=3, num_hidden_layers=6, mlp_ratio=4.0, num_pooler_layers=1,
                       pred_hidden_size=32, pred_num_attention_heads=2, pred_num_hidden_layers=1,
                       num_labels=labels)
    return VJEPA2ForVideoClassification(cfg)


def train(model, steps: int, batch: int, seed: int, lr: float = 1e-3) -> List[float]:
    """AdamW (30 warm-up steps, then cosine; gradients clipped to norm 1) on fresh clips
    every step; the losses."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        x, y = clips(batch, gen)
        loss = torch.nn.functional.cross_entropy(model(x).logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0:
            progress(f"    step {step + 1}/{steps}: loss {sum(losses[-20:]) / len(losses[-20:]):.3f} "
                     f"({time.perf_counter() - t0:.0f} s)")
    model.eval()
    return losses


def accuracy(model, data, batch: int = 250) -> float:
    x, y = data
    right = 0
    with torch.inference_mode():
        for i in range(0, len(y), batch):
            right += int((model(x[i:i + batch]).logits.argmax(-1) == y[i:i + batch]).sum())
    return right / len(y)


def index_derived(model) -> None:
    """Make the patched model forget positions after every merge: the merged tokens get the
    positions of their new index (0..N'-1), as a patch that ignores positions would."""
    state = model._vt
    merge = type(state).merge

    def forget(i, x, metric):
        out = merge(state, i, x, metric)
        if out.shape[-2] != x.shape[-2]:
            ids = torch.arange(out.shape[-2], device=out.device).expand(out.shape[0], -1)
            state.positions = index_positions(ids, model.config.crop_size // model.config.patch_size)
        return out

    state.merge = forget


SETTINGS = tuple(itertools.product(("dst", "mean", "index"), (True, False), (True, False)))


def evaluate(model, data, rs=RS, settings=SETTINGS) -> List[dict]:
    """Accuracy unpatched, then for every r and setting (positions rule, prop_attn, pool_prop_attn)."""
    rows = [dict(positions="unpatched", prop_attn=None, pool=None, acc={0: accuracy(model, data)})]
    progress(f"    unpatched: {rows[0]['acc'][0]:.3f}")
    vt.patch.vjepa2(model, r=0)
    for positions, prop, pool in settings:
        vt.patch.vjepa2(model, r=0, positions="dst" if positions == "index" else positions, prop_attn=prop,
                        pool_prop_attn=pool)
        if positions == "index":
            index_derived(model)
        acc = {}
        for r in rs:
            model.r = r
            acc[r] = accuracy(model, data)
        model._vt.__dict__.pop("merge", None)
        rows.append(dict(positions=positions, prop_attn=prop, pool=pool, acc=acc))
        progress(f"    positions={positions} prop_attn={prop} pool_prop_attn={pool}: "
                 + ", ".join(f"r={r} {a:.3f}" for r, a in acc.items()))
    vt.patch.remove(model)
    return rows


WORDS = {"dst": "destination's (t, h, w)", "mean": "size-weighted mean of the patches' (t, h, w)",
         "index": "re-derived from the token index (positions ignored)"}


def table(rows: List[dict], rs=RS) -> str:
    lines = ["| positions after a merge | prop_attn | pool_prop_attn | " + " | ".join(f"r={r}" for r in rs) + " |",
             "|---|---|---|" + "---:|" * len(rs)]
    base = rows[0]["acc"][0]
    lines.append(f"| unpatched | | | {base:.3f} " + "| " * (len(rs) - 1) + "|")
    for w in rows[1:]:
        lines.append(f"| {WORDS[w['positions']]} | {'on' if w['prop_attn'] else 'off'} "
                     f"| {'on' if w['pool'] else 'off'} | " + " | ".join(f"{w['acc'][r]:.3f}" for r in rs) + " |")
    return "\n".join(lines)


def run(steps: int = 1200, batch: int = 32, held_out: int = 1000, seed: int = 0, write: bool = False,
        command: str = "python -m benchmarks.vjepa2_positions", rs=RS, settings=SETTINGS) -> str:
    progress(f"training a small V-JEPA 2 on synthetic motion clips: {steps} steps of {batch}")
    t0 = time.perf_counter()
    model = build(seed)
    losses = train(model, steps, batch, seed)
    minutes = (time.perf_counter() - t0) / 60
    data = clips(held_out, torch.Generator().manual_seed(seed + 1))
    rows = evaluate(model, data, rs, settings)
    header = (f"A small V-JEPA 2 trained here (VJEPA2ForVideoClassification from random weights: 6 layers, width 96, "
              f"3 heads, 64 tokens of 8x32x32 clips, one pooler layer) on synthetic motion clips (8 directions of 3 "
              f"squares moving together, a still one beside them; {steps} steps of {batch} fresh clips, {minutes:.1f} min to train, final loss "
              f"{sum(losses[-20:]) / len(losses[-20:]):.3f}); accuracy on {held_out} held-out clips, r per layer. "
              f"Not a released checkpoint. Machine: {machine()}, {datetime.date.today()}. Seeds fixed "
              f"(model {seed}, data {seed}/{seed + 1}). Command: `{command}`.")
    block = header + "\n\n" + table(rows, rs)
    if write:
        write_block(ROOT / "BENCHMARKS.md", BEGIN, END, block, heading="## V-JEPA 2: positions after a merge")
        progress("BENCHMARKS.md V-JEPA 2 section updated")
    return block


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.vjepa2_positions", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1200, help="training steps (default 1200)")
    ap.add_argument("--batch", type=int, default=32, help="clips per training step (default 32)")
    ap.add_argument("--held-out", type=int, default=1000, help="evaluation clips (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine, 2 threads ran 5x slower)")
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cmd = "python -m benchmarks.vjepa2_positions" + ("" if not argv and len(sys.argv) < 2 else
                                                      " " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(run(args.steps, args.batch, args.held_out, args.seed, args.write, cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
