"""Where the time of the C++ backend goes, part by part, at the paper shapes.

    python -m benchmarks.cpp_parts [--rounds 30] [--shapes ViViT] [--cpu-time]

Interleaved medians (ms) of: the floor and its two halves (bmm of normalised A·Bᵀ into a
buffer; copy of x into a buffer), a fresh output allocation plus that copy (what any merge
pays for returning new memory), the vtome::match and vtome::merge ops called directly, and
the public vt.merge(backend="cpp"). Numbers for BENCHMARKS.md ("C++ CPU backend").
--cpu-time runs everything on one thread and reads that thread's CPU time instead of the
wall clock: the work itself, unaffected by other processes taking the cores away (on a
shared machine the wall clock of a 2-thread op includes waiting for a descheduled thread).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import vtome_kernels as vt
from vtome_kernels import cpp

from .harness import machine, median_ms, time_interleaved
from .providers import floor
from .shapes import PAPER_SHAPES


def cpu_time_interleaved(fns, rounds: int):
    """Milliseconds of this thread's CPU time per call, round-robin, medians."""
    for fn in fns.values():
        fn()
    names = list(fns)
    out = {n: [] for n in names}
    for i in range(rounds):
        for name in names[i % len(names):] + names[: i % len(names)]:
            t0 = time.thread_time()
            fns[name]()
            out[name].append(time.thread_time() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in out.items()}


def parts(shape, rounds: int, cpu_time: bool = False):
    x, size, metric = shape.inputs()
    r, cls = shape.r, shape.class_token
    n, c = x.shape[-2], x.shape[-1]
    fx, fs, fm = x.reshape(-1, n, c), size.reshape(-1, n, 1), metric.reshape(-1, n, metric.shape[-1])
    rr = min(r, (n - cls) // 2)
    plan = cpp.match(fm, rr, cls, False)
    m = fm.float()
    m = m / m.norm(dim=-1, keepdim=True)
    a, bt = m[:, ::2].contiguous(), m[:, 1::2].transpose(1, 2).contiguous()
    scores = torch.empty(m.shape[0], a.shape[1], bt.shape[2])
    out = torch.empty_like(x)
    fl = floor(shape, x.device)
    fns = {
        "floor": lambda: fl(x, size, metric),
        "bmm": lambda: torch.bmm(a, bt, out=scores),
        "copy": lambda: out.copy_(x),
        "alloc+copy": lambda: torch.empty_like(x).copy_(x),
        "op match": lambda: cpp.match(fm, rr, cls, False),
        "op merge": lambda: cpp.merge(fx, fs, *plan[:3]),
        "vt.merge cpp": lambda: vt.merge(x, size, r, metric=metric, class_token=cls, backend="cpp"),
    }
    if cpu_time:
        return cpu_time_interleaved(fns, rounds)
    return {k: median_ms(v) for k, v in time_interleaved(fns, x.device, rounds).items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cpp_parts", description=__doc__)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--shapes", default="")
    ap.add_argument("--cpu-time", action="store_true", help="one thread, its CPU time")
    args = ap.parse_args(argv)
    if args.cpu_time:
        torch.set_num_threads(1)
    print(f"Machine: {machine()}; score kernel {cpp.status()[1]}")
    names = None
    for shape in PAPER_SHAPES:
        if args.shapes and not any(k.strip() in shape.name for k in args.shapes.split(",")):
            continue
        med = parts(shape, args.rounds, args.cpu_time)
        if names is None:
            names = list(med)
            print("| shape | " + " | ".join(names) + " |")
            print("|---|" + "---:|" * len(names))
        print(f"| {shape.name} | " + " | ".join(f"{med[k]:.3f}" for k in names) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
