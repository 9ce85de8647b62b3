"""End to end: whole models, unpatched against patched, on random weights (no downloads).

    python -m benchmarks.e2e                 # the table and the VideoMAE-B plot
    python -m benchmarks.e2e --write         # ... into BENCHMARKS.md and benchmarks/e2e_videomae.png
    python -m benchmarks --e2e               # the main job runs it after the merge table

For every model: the unpatched library model and a patched deep copy (at its r, and at
r=0 to show the patch's own cost) are timed interleaved (round-robin, medians), batch 1,
inference mode. The FLOP ratio is what the
token counts imply (vt.patch.flops: linear layers, attention, MLP, matching, embedding);
speedup / FLOP ratio says how much of that the implementation turns into time. Merge
share: the time spent in matching and merging (timed inside the patched blocks in
separate runs) over the patched forward.

Zero-cost merge: a third copy whose merge step only drops the last r' tokens (a slice, sizes
kept as ones so attention takes the same path). It runs the same layers on the same token
counts with a merge that costs nothing, so its speedup is the most any merge
implementation can reach on this machine: when it falls short of the FLOP ratio, the
model's own layers do not get proportionally faster with fewer tokens (small GEMMs run
at a lower rate), not the merge.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import pathlib
import sys
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch

import vtome_kernels as vt

from .harness import machine, median_ms, name_matches, progress, time_interleaved, write_block

BEGIN, END = "<!-- e2e-table:begin -->", "<!-- e2e-table:end -->"
ROOT = pathlib.Path(__file__).resolve().parent.parent
PLOT = ROOT / "benchmarks" / "e2e_videomae.png"


@dataclasses.dataclass
class Case:
    name: str
    build: Callable[[bool], torch.nn.Module]   # tiny -> model with random weights
    shape: Callable[[bool], Tuple[int, ...]]   # tiny -> input shape at batch 1
    r: int
    patch: Callable


# One row per declared family (Family.bench), in the order of vt.patch.FAMILIES.
CASES = tuple(Case(f.bench.name, f.bench.build, f.bench.shape, f.bench.r, f.patch)
              for f in vt.patch.FAMILIES.values() if f.bench is not None)
SWEEP = (0, 25, 50, 75, 100, 125, 150)


def _run(model, x):
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def zero_cost_merge(model: torch.nn.Module) -> torch.nn.Module:
    """Make a patched model's merge step a free slice: keep the first N - r' tokens of x
    (r' clamped as vt.merge clamps it) and give them size 1. Benchmark-only: the result
    is not a merge, only its token counts and its cost (none) are right."""
    state = model._vt

    def merge(i: int, x: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
        r = state.r_list[i] if i < len(state.r_list) else 0
        r = min(r, (x.shape[-2] - state.protected) // 2)
        if r <= 0:
            return x
        keep = x.shape[-2] - r
        state.size = x.new_ones(x.shape[:-1] + (1,))[..., :keep, :]
        if state.positions is not None:  # rotary families: the kept tokens keep their positions
            state.positions = state.positions[..., :keep, :]
        return x[..., :keep, :]

    state.merge = merge
    return model


def _merge_share(model, x, repeats: int) -> float:
    """Median fraction of the patched forward spent matching and merging."""
    state = model._vt
    shares = []
    state.timing = True
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            _run(model, x)
            total = time.perf_counter() - t0
            shares.append(state.merge_seconds / total)
    finally:
        state.timing = False
    shares.sort()
    return shares[len(shares) // 2]


def _cpu_interleaved(fns, rounds: int) -> dict:
    """Like harness.time_interleaved, with the process's CPU time (time.process_time): the
    work done, less sensitive than wall time to other jobs on a shared machine."""
    for fn in fns.values():
        fn()
    names, times = list(fns), {n: [] for n in fns}
    for i in range(rounds):
        for name in names[i % len(names):] + names[: i % len(names)]:
            t0 = time.process_time()
            fns[name]()
            times[name].append(time.process_time() - t0)
    return times


def model_rows(cases: Sequence[Case], rounds: int, tiny: bool, batch: int = 1, clock: str = "wall") -> List[dict]:
    """Time every case unpatched and patched, interleaved; one dict of numbers per case."""
    rows = []
    for i, case in enumerate(cases, 1):
        progress(f"[{i}/{len(cases)}] {case.name} r={case.r}: building (random weights)")
        torch.manual_seed(0)
        base = case.build(tiny).eval()
        patched = case.patch(copy.deepcopy(base), r=case.r)
        free = zero_cost_merge(case.patch(copy.deepcopy(base), r=case.r))
        shape = (batch,) + case.shape(tiny)[1:]
        x = torch.randn(shape)
        progress(f"    timing unpatched vs patched, {rounds} interleaved rounds")
        def at(r):
            def fn():
                patched.r = r
                return _run(patched, x)
            return fn

        with torch.inference_mode():
            fns = {"unpatched": lambda: _run(base, x), "patched": at(case.r), "patched r=0": at(0),
                   "zero-cost merge": lambda: _run(free, x)}
            if clock == "cpu":
                times = _cpu_interleaved(fns, rounds)
            else:
                times = time_interleaved(fns, torch.device("cpu"), rounds, warmup=1)
            patched.r = case.r
            share = _merge_share(patched, x, max(2, min(rounds, 3)))
        ms0, ms1 = median_ms(times["unpatched"]), median_ms(times["patched"])
        ms_r0, ms_free = median_ms(times["patched r=0"]), median_ms(times["zero-cost merge"])
        counts = vt.patch.token_counts(patched, shape)
        ratio = vt.patch.flops(patched, shape, 0) / vt.patch.flops(patched, shape)
        row = dict(name=case.name, r=case.r, batch=batch, tokens=(counts[0], counts[-1]), ms0=ms0, ms1=ms1, ms_r0=ms_r0,
                   ms_free=ms_free, speedup=ms0 / ms1, flop_ratio=ratio, share=share)
        progress(f"    unpatched {ms0:.1f} ms, patched {ms1:.1f} ms (at r=0 {ms_r0:.1f} ms): {row['speedup']:.2f}x "
                 f"(FLOPs imply {ratio:.2f}x, a zero-cost merge {ms0 / ms_free:.2f}x), "
                 f"merging {100 * share:.1f}% of the patched forward")
        rows.append(row)
        del base, patched, free
    return rows


def table(rows: List[dict], batch: int = 1) -> str:
    lines = [
        f"| model (batch {batch}) | r | tokens in -> out | unpatched ms | patched ms | patched r=0 ms "
        "| unpatched clips/s | patched clips/s | speedup | FLOP ratio | speedup / FLOP ratio "
        "| zero-cost merge speedup | speedup / zero-cost | merge share |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in rows:
        lines.append(
            f"| {w['name']} | {w['r']} | {w['tokens'][0]} -> {w['tokens'][1]} | {w['ms0']:.1f} | {w['ms1']:.1f} "
            f"| {w['ms_r0']:.1f} "
            f"| {w['batch'] * 1e3 / w['ms0']:.2f} | {w['batch'] * 1e3 / w['ms1']:.2f} | {w['speedup']:.2f}x | {w['flop_ratio']:.2f}x "
            f"| {w['speedup'] / w['flop_ratio']:.2f} | {w['ms0'] / w['ms_free']:.2f}x | {w['ms_free'] / w['ms1']:.2f} "
            f"| {100 * w['share']:.1f}% |")
    return "\n".join(lines)


def sweep(rounds: int, tiny: bool, rs: Sequence[int] = SWEEP) -> List[dict]:
    """VideoMAE-B speedup and tokens against r (one model, r switched between calls)."""
    case = CASES[0]
    progress(f"sweep: {case.name}, r in {list(rs)}, {rounds} interleaved rounds")
    torch.manual_seed(0)
    base = case.build(tiny).eval()
    patched = case.patch(copy.deepcopy(base), r=0)
    shape = case.shape(tiny)
    x = torch.randn(shape)

    def at(r):
        def fn():
            patched.r = r
            return _run(patched, x)
        return fn

    fns = {"unpatched": lambda: _run(base, x)}
    fns.update({f"r={r}": at(r) for r in rs})
    with torch.inference_mode():
        times = time_interleaved(fns, torch.device("cpu"), rounds, warmup=1)
    ms0 = median_ms(times["unpatched"])
    out = []
    for r in rs:
        ms = median_ms(times[f"r={r}"])
        counts = vt.patch.token_counts(patched, shape, r)
        ratio = vt.patch.flops(patched, shape, 0) / vt.patch.flops(patched, shape, r)
        out.append(dict(r=r, ms=ms, speedup=ms0 / ms, final=counts[-1], mean_tokens=sum(counts[:-1]) / (len(counts) - 1),
                        flop_ratio=ratio))
        progress(f"    r={r}: {ms:.1f} ms, {ms0 / ms:.2f}x (FLOPs {ratio:.2f}x), final tokens {counts[-1]}")
    return out


def plot(points: List[dict], path: pathlib.Path, title: str) -> None:
    """Speedup (measured and FLOP-implied) and token counts against r, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [p["r"] for p in points]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    ax.plot(rs, [p["speedup"] for p in points], "o-", color="tab:blue", label="measured speedup")
    ax.plot(rs, [p["flop_ratio"] for p in points], "s--", color="tab:blue", alpha=0.5, label="FLOP ratio")
    ax.set_xlabel("r (tokens merged per layer)")
    ax.set_ylabel("speedup vs unpatched (x)", color="tab:blue")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(rs, [p["final"] for p in points], "^-", color="tab:orange", label="tokens after the last layer")
    ax2.plot(rs, [p["mean_tokens"] for p in points], "v:", color="tab:orange", label="mean tokens per layer")
    ax2.set_ylabel("tokens", color="tab:orange")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper center", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markers(batch: int = 1) -> Tuple[str, str]:
    """The BENCHMARKS.md markers of the end-to-end block at this batch (batch 1: BEGIN, END)."""
    if batch == 1:
        return BEGIN, END
    return f"<!-- e2e-table-b{batch}:begin -->", f"<!-- e2e-table-b{batch}:end -->"


def write_section(block: str, path: pathlib.Path, batch: int = 1) -> None:
    """Replace the end-to-end table of this batch between its markers in BENCHMARKS.md."""
    begin, end = markers(batch)
    write_block(path, begin, end, block, heading="## End to end" if batch == 1 else f"### End to end, batch {batch}")


def run(rounds: int = 5, sweep_rounds: int = 3, only: str = "", tiny: bool = False, write: bool = False,
        plot_path: Optional[pathlib.Path] = None, command: str = "python -m benchmarks.e2e",
        batch: int = 1, clock: str = "wall") -> str:
    """The end-to-end table (and, at batch 1, the VideoMAE plot); returns the markdown block."""
    cases = [c for c in CASES if name_matches(only, c.name)]
    rows = model_rows(cases, rounds, tiny, batch, clock)
    swept = batch == 1 and (plot_path is not None or write)
    header = (f"Machine: {machine()}. {datetime.date.today()}, float32, batch {batch}, random weights, "
              f"{'process CPU time' if clock == 'cpu' else 'wall time'}, "
              f"{rounds} interleaved rounds{f' (sweep {sweep_rounds})' if swept else ''}, medians. Merge backend on CPU: "
              f"{_auto_backends()}. Command: `{command}`.")
    block = header + "\n\n" + table(rows, batch)
    if swept:
        points = sweep(sweep_rounds, tiny)
        path = plot_path or PLOT
        plot(points, path, f"VideoMAE-B 16x224, batch 1, CPU ({datetime.date.today()})")
        block += "\n\n![VideoMAE-B speedup and tokens against r](benchmarks/" + path.name + ")"
        block += "\n\n| r | patched ms | speedup | FLOP ratio | tokens after last layer |\n|---:|---:|---:|---:|---:|\n"
        block += "\n".join(f"| {p['r']} | {p['ms']:.1f} | {p['speedup']:.2f}x | {p['flop_ratio']:.2f}x | {p['final']} |"
                           for p in points)
    if write:
        write_section(block, ROOT / "BENCHMARKS.md", batch)
        progress("BENCHMARKS.md end-to-end section updated")
    return block


def _auto_backends() -> str:
    from vtome_kernels.backends import resolve

    cpu = torch.device("cpu")
    return ", ".join(f"{op} -> {resolve('auto', op, cpu).NAME}" for op in ("match", "merge", "prop_attention"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per model (default 5)")
    ap.add_argument("--sweep-rounds", type=int, default=3, help="rounds of the VideoMAE r sweep (default 3)")
    ap.add_argument("--models", default="", help="comma-separated starts of words of model names (ViT-B, VideoMAE)")
    ap.add_argument("--plot", action="store_true", help="also run the VideoMAE-B sweep and write the PNG")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="wall time (default) or the process's CPU time (steadier on a shared machine)")
    ap.add_argument("--batch", type=int, default=1, help="clips (images) per forward (default 1)")
    ap.add_argument("--tiny", action="store_true", help="tiny configs (a smoke run, numbers meaningless)")
    ap.add_argument("--write", action="store_true",
                    help="update this batch's table in BENCHMARKS.md (and, at batch 1, the plot)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cmd = "python -m benchmarks.e2e" + ("" if not argv and len(sys.argv) < 2 else
                                        " " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(run(args.rounds, args.sweep_rounds, args.models, args.tiny, args.write,
              PLOT if args.plot else None, cmd, args.batch, args.clock))
    return 0


if __name__ == "__main__":
    sys.exit(main())
