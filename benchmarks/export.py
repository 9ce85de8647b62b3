"""Exported models in onnxruntime: unpatched against patched, both exported the same way.

    python -m benchmarks.export                  # the table (minutes: exports are slow)
    python -m benchmarks.export --write          # ... into BENCHMARKS.md ("Exported: onnxruntime")
    python -m benchmarks.export --models VideoMAE --threads 1 --rounds 9

Every model (random weights) is exported with plain
``torch.onnx.export(model, (x,), dynamic_shapes=({0: batch},), dynamo=True)``: unpatched,
patched at r=0 (the patch's own cost: none expected) and patched at its r (the package's
graph backend is chosen while exporting). The graphs
run in onnxruntime on the CPU with ``--threads`` intra-op threads (no spinning),
interleaved round-robin, medians of wall time and of process CPU time (the work done, less
sensitive to other jobs on a shared machine). The FLOP ratio is what the token counts imply
(``vt.patch.flops``); speedup / FLOP ratio says how much of it the exported graph turns
into time. Nodes: the ONNX graphs' node counts (patched at most 3x unpatched is the goal).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import pathlib
import sys
import time
from typing import Callable, List, Tuple

import torch

import vtome_kernels as vt

from .harness import machine, median_ms, name_matches, progress, write_block

BEGIN, END = "<!-- export-table:begin -->", "<!-- export-table:end -->"
ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Case:
    name: str
    build: Callable[[bool], torch.nn.Module]  # tiny -> model with random weights
    shape: Callable[[bool], Tuple[int, ...]]  # tiny -> input shape
    r: int
    patch: Callable


_SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
              num_labels=400)  # the "S" width of VideoMAE/ViT: 12 layers of 384
_TINY = dict(image_size=32, num_frames=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=64, num_labels=5)


def _hf(family: str, full: dict, tiny: dict):
    def build(is_tiny):
        import transformers

        config = getattr(transformers, f"{family}Config")
        model = getattr(transformers, f"{family}ForVideoClassification")
        return model(config(**(dict(_TINY, **tiny) if is_tiny else dict(_SMALL, **full))))

    return build


def _vit(is_tiny):
    import timm

    if is_tiny:
        return timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=2,
                                 embed_dim=32, num_heads=2, num_classes=5)
    return timm.create_model("vit_base_patch16_224", pretrained=False)


CASES = (
    Case("VideoMAE-S 16x224", _hf("VideoMAE", {}, dict(patch_size=8)),
         lambda t: (1, 4, 3, 32, 32) if t else (1, 16, 3, 224, 224), 150, vt.patch.videomae),
    Case("ViViT-S 16x224", _hf("Vivit", dict(num_frames=16), dict(tubelet_size=[2, 8, 8])),
         lambda t: (1, 4, 3, 32, 32) if t else (1, 16, 3, 224, 224), 150, vt.patch.vivit),
    Case("timm ViT-B/16 224 b4", _vit, lambda t: (4, 3, 32, 32) if t else (4, 3, 224, 224), 16, vt.patch.timm),
)


def export_onnx(model: torch.nn.Module, x: torch.Tensor):
    """(ONNX model proto, seconds): torch.onnx.export with dynamo=True and a dynamic batch."""
    t0 = time.perf_counter()
    with torch.no_grad():
        program = torch.onnx.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},),
                                    dynamo=True, verbose=False)
    return program.model_proto, time.perf_counter() - t0


def session(proto, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _interleaved(fns, rounds: int):
    """(wall seconds, process CPU seconds) per call of every fn, round-robin, order rotating."""
    for fn in fns.values():
        fn()
    names = list(fns)
    wall, cpu = {n: [] for n in names}, {n: [] for n in names}
    for i in range(rounds):
        for name in names[i % len(names):] + names[: i % len(names)]:
            w0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    return wall, cpu


def model_rows(cases, rounds: int, tiny: bool, threads: int) -> List[dict]:
    rows = []
    for i, case in enumerate(cases, 1):
        progress(f"[{i}/{len(cases)}] {case.name} r={case.r}: building (random weights), exporting 3 times")
        torch.manual_seed(0)
        model = case.build(tiny).eval()
        shape = case.shape(tiny)
        x = torch.randn(shape)
        base, t_base = export_onnx(model, x)
        case.patch(model, r=0)
        patched0, _ = export_onnx(model, x)
        model.r = case.r
        patched, t_patched = export_onnx(model, x)
        feed = x.numpy()
        sessions = {"unpatched": session(base, threads), "patched r=0": session(patched0, threads),
                    "patched": session(patched, threads)}
        names = {k: s.get_inputs()[0].name for k, s in sessions.items()}
        fns = {k: (lambda s=s, n=names[k]: s.run(None, {n: feed})) for k, s in sessions.items()}
        progress(f"    exported in {t_base:.0f} s / {t_patched:.0f} s; timing {rounds} interleaved rounds")
        wall, cpu = _interleaved(fns, rounds)
        ratio = vt.patch.flops(model, shape, 0) / vt.patch.flops(model, shape)
        counts = vt.patch.token_counts(model, shape)
        row = dict(name=case.name, r=case.r, tokens=(counts[0], counts[-1]), nodes=(len(base.graph.node),
                   len(patched.graph.node)), export_s=(t_base, t_patched), flop_ratio=ratio,
                   wall=(median_ms(wall["unpatched"]), median_ms(wall["patched"])),
                   cpu=(median_ms(cpu["unpatched"]), median_ms(cpu["patched"])),
                   cpu_r0=median_ms(cpu["patched r=0"]), nodes_r0=len(patched0.graph.node))
        row["speedup_wall"] = row["wall"][0] / row["wall"][1]
        row["speedup_cpu"] = row["cpu"][0] / row["cpu"][1]
        progress(f"    wall {row['wall'][0]:.0f} -> {row['wall'][1]:.0f} ms ({row['speedup_wall']:.2f}x), CPU "
                 f"{row['cpu'][0]:.0f} -> {row['cpu'][1]:.0f} ms ({row['speedup_cpu']:.2f}x; patched r=0 "
                 f"{row['cpu_r0']:.0f} ms), FLOPs {ratio:.2f}x, nodes {row['nodes'][0]} -> {row['nodes'][1]}")
        rows.append(row)
    return rows


def table(rows: List[dict]) -> str:
    lines = [
        "| model | r | tokens in -> out | ONNX nodes (unpatched -> patched) | export s | wall ms | speedup (wall) "
        "| CPU ms | speedup (CPU) | FLOP ratio | speedup / FLOP ratio (wall, CPU) | patched r=0: nodes, CPU ms |",
        "|---|---:|---|---|---|---|---:|---|---:|---:|---|---|",
    ]
    for w in rows:
        lines.append(
            f"| {w['name']} | {w['r']} | {w['tokens'][0]} -> {w['tokens'][1]} | {w['nodes'][0]} -> {w['nodes'][1]} "
            f"({w['nodes'][1] / w['nodes'][0]:.2f}x) | {w['export_s'][0]:.0f} / {w['export_s'][1]:.0f} "
            f"| {w['wall'][0]:.1f} -> {w['wall'][1]:.1f} | {w['speedup_wall']:.2f}x "
            f"| {w['cpu'][0]:.1f} -> {w['cpu'][1]:.1f} | {w['speedup_cpu']:.2f}x | {w['flop_ratio']:.2f}x "
            f"| {w['speedup_wall'] / w['flop_ratio']:.2f}, {w['speedup_cpu'] / w['flop_ratio']:.2f} "
            f"| {w['nodes_r0']}, {w['cpu_r0']:.1f} |")
    return "\n".join(lines)


def run(rounds: int = 7, only: str = "", tiny: bool = False, threads: int = 2, write: bool = False,
        command: str = "python -m benchmarks.export") -> str:
    import onnxruntime as ort

    rows = model_rows([c for c in CASES if name_matches(only, c.name)], rounds, tiny, threads)
    header = (f"Machine: {machine()}; onnxruntime {ort.__version__} (CPUExecutionProvider, {threads} intra-op "
              f"threads, no spinning). {datetime.date.today()}, float32, random weights, {rounds} interleaved "
              f"rounds, medians. Command: `{command}`.")
    block = header + "\n\n" + table(rows)
    if write:
        write_block(ROOT / "BENCHMARKS.md", BEGIN, END, block, heading="## Exported: onnxruntime")
        progress("BENCHMARKS.md export section updated")
    return block


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds per model (default 7)")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    ap.add_argument("--models", default="", help="comma-separated starts of words of model names (ViViT, timm)")
    ap.add_argument("--tiny", action="store_true", help="tiny configs (a smoke test of the script)")
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args(argv)
    cmd = "python -m benchmarks.export" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    print(run(args.rounds, args.models, args.tiny, args.threads, args.write, cmd))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
