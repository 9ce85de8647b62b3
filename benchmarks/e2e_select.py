"""End to end with FluxViT selection: VideoMAE-B on a 16-frame 224² clip (1568 tubelet
tokens) run on a quarter of its tokens (select=392), against the unpatched model; also
selection combined with merging inside the blocks.

    python -m benchmarks.e2e_select            # table on stdout
    python -m benchmarks.e2e_select --write    # ... and into BENCHMARKS.md
    python -m benchmarks.e2e_select --tiny     # tiny config, a smoke run (numbers meaningless)

Random weights from the library config (no downloads), CPU, batch 1, float32, inference
mode; every variant is a patched deep copy of the same model, timed interleaved
(round-robin), medians.
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import sys
from typing import Dict, List

import torch

import vtome_kernels as vt

from .e2e import _run
from .harness import machine, median_ms, progress, time_interleaved, write_block

BEGIN, END = "<!-- e2e-select-table:begin -->", "<!-- e2e-select-table:end -->"


def variants(tiny: bool) -> Dict[str, dict]:
    """name -> patch options (None: the unpatched model)."""
    tokens = 4 * 4 if tiny else 8 * 14 * 14  # tubelets of the config's clip
    quarter = tokens // 4
    return {
        "unpatched": None,
        f"select={quarter}": dict(r=0, select=quarter),
        f"select={quarter}, r=20": dict(r=2 if tiny else 20, select=quarter),
        "r=150 (merging only)": dict(r=3 if tiny else 150),
    }


def run(rounds: int, tiny: bool = False) -> List[dict]:
    """Median ms per variant and its speedup over the unpatched model."""
    torch.manual_seed(0)
    base = vt.patch.FAMILIES["videomae"].bench.build(tiny).eval()
    cfg = base.config
    x = torch.randn(1, cfg.num_frames, 3, cfg.image_size, cfg.image_size)
    fns = {}
    for name, opts in variants(tiny).items():
        model = copy.deepcopy(base)
        if opts is not None:
            vt.patch.videomae(model, **opts)
        fns[name] = (lambda m=model: _run(m, x))
    progress(f"VideoMAE-B {'(tiny) ' if tiny else ''}{list(x.shape)}: {len(fns)} variants, {rounds} rounds")
    with torch.inference_mode():
        times = time_interleaved(fns, torch.device("cpu"), rounds, warmup=1)
    med = {n: median_ms(t) for n, t in times.items()}
    ref = med["unpatched"]
    return [dict(name=n, ms=m, speedup=ref / m) for n, m in med.items()]


def table(rows: List[dict]) -> str:
    lines = ["| VideoMAE-B 16x224, batch 1 | median ms | speedup |", "|---|---:|---:|"]
    lines += [f"| {r['name']} | {r['ms']:.1f} | {r['speedup']:.2f}x |" for r in rows]
    return "\n".join(lines)


def write_section(block: str, path: pathlib.Path) -> None:
    """Replace the block between this benchmark's markers in BENCHMARKS.md (appended once)."""
    write_block(path, BEGIN, END, block)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.e2e_select", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--tiny", action="store_true", help="tiny config (a smoke run)")
    ap.add_argument("--write", action="store_true", help="update the table in BENCHMARKS.md")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    rows = run(args.rounds, args.tiny)
    header = (f"Machine: {machine()}. Command: `python -m benchmarks.e2e_select"
              f"{' ' + ' '.join(argv if argv is not None else sys.argv[1:])}`.")
    block = header + "\n\n" + table(rows)
    print(block)
    if args.write and not args.tiny:
        write_section(block, pathlib.Path(__file__).resolve().parent.parent / "BENCHMARKS.md")
        progress("BENCHMARKS.md updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
