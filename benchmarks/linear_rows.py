"""How fast ViT-B's linear layers run against the number of token rows (no merging).

    python -m benchmarks.linear_rows               # torch's threads
    python -m benchmarks.linear_rows --threads 1

Why it is here: a merged model runs the same layers on fewer rows, and the FLOP ratio
assumes every row costs the same. On a CPU at batch 1 that fails for small row counts
(the GEMM's rate falls), which bounds the end-to-end speedup of ViT-B/16 whatever the
merge costs (BENCHMARKS.md, "End to end"). Prints, per layer shape and row count, the
median time of ``torch.nn.Linear`` and its rate in GFLOP/s.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

from .harness import machine, median_ms, time_interleaved

LAYERS = (("qkv", 768, 2304), ("proj", 768, 768), ("fc1", 768, 3072), ("fc2", 3072, 768))
ROWS = (11, 21, 53, 101, 197, 394, 788, 1576)


def rates(rows: Sequence[int] = ROWS, rounds: int = 15) -> list:
    """(layer, rows, ms, GFLOP/s) for every ViT-B linear layer shape and row count."""
    out = []
    torch.manual_seed(0)
    with torch.inference_mode():
        for name, fan_in, fan_out in LAYERS:
            layer = torch.nn.Linear(fan_in, fan_out)
            xs = {m: torch.randn(m, fan_in) for m in rows}
            times = time_interleaved({m: (lambda x=x: layer(x)) for m, x in xs.items()},
                                     torch.device("cpu"), rounds, warmup=2)
            for m in rows:
                ms = median_ms(times[m])
                out.append((f"{name} {fan_in}->{fan_out}", m, ms, 2.0 * m * fan_in * fan_out / ms / 1e6))
    return out


def table(rows: list) -> str:
    lines = ["| layer | rows | ms | GFLOP/s |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {m} | {ms:.3f} | {gf:.1f} |" for name, m, ms, gf in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.linear_rows", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"Machine: {machine()}. float32, {args.rounds} interleaved rounds, medians.\n")
    print(table(rates(rounds=args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
