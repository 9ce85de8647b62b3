"""FluxViT selection benchmark: vt.select against FluxViT's eager recipe and the floor.

    python -m benchmarks.select                 # every shape, the table on stdout
    python -m benchmarks.select --write         # ... and update its table in BENCHMARKS.md
    python -m benchmarks.select --quick         # 5 rounds (a smoke run)
    python -m benchmarks.select --batch 1 --channels 384 --budgets 1024
    python -m benchmarks.select --threads 1     # one CPU thread (steadier on a shared machine)

Shapes (ALGORITHM.md section 5): T=16 frames of L=144 patches (168² at patch 14) and
T=8 of L=196 (224²), C = 384 and 768, budgets 2048, 1024, 512, batch 1 and 8. A budget
at or above T·L selects nothing (every provider returns its input) and is left out.

Providers, all given the same x:
- fluxvit-eager: FluxViT's recipe as its description gives it, written here: L2 norm of
  the frame differences per group, two argsorts (order, then rank), boolean indexing;
- vt-<backend>: vtome_kernels.select with every backend usable on the device;
- copy: x copied into a preallocated buffer (one read and one write of x's bytes), timed
  in the same rounds, which measures the memory rate;
- floor (derived, not a call): one read of x plus one write of the kept tokens at the
  rate of `copy`: copy_ms · (bytes(x) + bytes(kept)) / (2 · bytes(x)).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import pathlib
import sys
from typing import Callable, Dict, List, Sequence

import torch

import vtome_kernels as vt
from vtome_kernels.select import auto_groups, kept_count

from .harness import absent_note, machine, median_ms, progress, runnable_backends, time_interleaved, write_block

BEGIN, END = "<!-- select-table:begin -->", "<!-- select-table:end -->"
LAYOUTS = ((16, 144), (8, 196))  # (T, L)
CHANNELS = (384, 768)
BUDGETS = (2048, 1024, 512)
BATCHES = (1, 8)


@dataclasses.dataclass(frozen=True)
class SelectShape:
    b: int
    t: int
    l: int
    c: int
    budget: int

    @property
    def name(self) -> str:
        return f"B={self.b} T={self.t} L={self.l} C={self.c} K={self.budget}"

    def inputs(self, dtype=torch.float32, device="cpu", seed=0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.b, self.t, self.l, self.c, generator=g).to(dtype=dtype, device=device)


def paper_shapes(batches=BATCHES, layouts=LAYOUTS, channels=CHANNELS, budgets=BUDGETS) -> List[SelectShape]:
    """Every combination whose budget is below T·L (otherwise there is nothing to select)."""
    return [SelectShape(b, t, l, c, k) for (t, l) in layouts for c in channels for b in batches
            for k in budgets if k < t * l]


def fluxvit_groups(t: int) -> int:
    """FluxViT's group rule: 4 if T % 4 == 0, 1 if T == 2, else 2."""
    return 4 if t % 4 == 0 else (1 if t == 2 else 2)


def fluxvit_eager(x: torch.Tensor, budget: int) -> torch.Tensor:
    """FluxViT's selection in eager PyTorch: norm of frame differences, argsort twice, mask."""
    b, t, l, c = x.shape
    g = fluxvit_groups(t)
    f = t // g
    k = budget // g
    xg = x.reshape(b, g, f, l, c)
    diff = (xg[:, :, 1:] - xg[:, :, :-1]).norm(dim=-1)  # [B, G, F-1, L]
    score = torch.cat([diff[:, :, :1], diff], dim=2).reshape(b, g, f * l)
    rank = score.argsort(dim=-1, descending=True).argsort(dim=-1)
    keep = (rank < k).reshape(b, t * l)
    return x.reshape(b, t * l, c)[keep].reshape(b, g * k, c)


def make_providers(shape: SelectShape, device: torch.device) -> Dict[str, Callable]:
    """name -> fn(x) for one shape (``copy`` writes into a buffer it owns)."""
    k = shape.budget
    out: Dict[str, Callable] = {"fluxvit-eager": lambda x: fluxvit_eager(x, k)}
    for name in runnable_backends("select", device):
        out[f"vt-{name}"] = lambda x, name=name: vt.select(x, k, backend=name)
    buf = {}

    def copy(x):
        if "y" not in buf:
            buf["y"] = torch.empty_like(x)
        return buf["y"].copy_(x)

    out["copy"] = copy
    return out


def select_table(shapes: Sequence[SelectShape], device: torch.device, rounds: int, dtype) -> str:
    """Markdown table: medians per provider and shape, speedup vs fluxvit-eager, x floor."""
    lines = [
        "| shape | provider | median ms | speedup vs fluxvit-eager | x floor |",
        "|---|---|---:|---:|---:|",
    ]
    for i, shape in enumerate(shapes, 1):
        progress(f"[{i}/{len(shapes)}] {shape.name}: warming up")
        x = shape.inputs(dtype=dtype, device=device)
        fns = {name: (lambda fn=fn: fn(x)) for name, fn in make_providers(shape, device).items()}
        want = vt.select(x, shape.budget, backend="reference")  # every vt- result checked first
        for name, fn in fns.items():
            if name.startswith("vt-") and not all(torch.equal(a, b) for a, b in zip(fn(), want)):
                raise AssertionError(f"{name} selects other tokens than the reference at {shape.name}")
        med = {name: median_ms(t) for name, t in time_interleaved(fns, device, rounds).items()}
        kept = kept_count(shape.budget, shape.t, shape.l, auto_groups(shape.t))
        floor = med["copy"] * (shape.t * shape.l + kept) / (2 * shape.t * shape.l)
        med["floor"] = floor
        progress("    " + ", ".join(f"{n} {m:.3f} ms" for n, m in med.items()))
        for name, ms in med.items():
            lines.append(f"| {shape.name} | {name} | {ms:.3f} | {med['fluxvit-eager'] / ms:.2f}x | "
                         f"{ms / floor:.2f} |")
    note = absent_note("select", device)
    return "\n".join(lines) + (f"\n\n{note}" if note else "")


def write_section(table: str, header: str, path: pathlib.Path) -> None:
    """Replace the selection table between its markers in BENCHMARKS.md."""
    write_block(path, BEGIN, END, f"{header}\n\n{table}")


def _ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.select", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30, help="timed calls per provider (default 30)")
    ap.add_argument("--quick", action="store_true", help="5 rounds")
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--channels", default="384,768", help="comma-separated C")
    ap.add_argument("--budgets", default="2048,1024,512", help="comma-separated budgets")
    ap.add_argument("--layouts", default="16x144,8x196", help="comma-separated TxL")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    ap.add_argument("--write", action="store_true", help="update the table in BENCHMARKS.md")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    layouts = [tuple(int(v) for v in s.split("x")) for s in args.layouts.split(",") if s.strip()]
    shapes = paper_shapes(_ints(args.batch), layouts, _ints(args.channels), _ints(args.budgets))
    if not shapes:
        ap.error("no shape has a budget below T·L")
    rounds = 5 if args.quick else args.rounds
    device = torch.device(args.device)
    shown = " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"Machine: {machine()}. {datetime.date.today()}, dtype {args.dtype}, "
              f"{rounds} interleaved rounds, medians. Command: `python -m benchmarks.select"
              f"{' ' + shown if shown else ''}`.")
    table = select_table(shapes, device, rounds, getattr(torch, args.dtype))
    print(header + "\n\n" + table)
    if args.write:
        write_section(table, header, pathlib.Path(__file__).resolve().parent.parent / "BENCHMARKS.md")
        progress("BENCHMARKS.md updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
