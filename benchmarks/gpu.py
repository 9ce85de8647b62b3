"""The prepared GPU check: one command to run once on a machine with a CUDA GPU.

    python -m benchmarks.gpu                    # (a)-(e), report in gpu-report/ (sized for 8 min on one H100)
    python -m benchmarks.gpu --parts a          # only the compiled correctness check
    python -m benchmarks.gpu --out DIR          # the report elsewhere
    TRITON_INTERPRET=1 python -m benchmarks.gpu --interpret   # (a) in Triton's CPU interpreter (CI)

(a) correctness of every Triton op, compiled, against the reference backend run on CPU:
    match (the plan bit for bit, ties included), merge and its backward, merge_source,
    unmerge and its backward, prop_attention and its backward, select; at the GPU tile
    sizes, on the paper shapes and odd shapes, in float32, bfloat16 and float16;
(b) the main merge table (``python -m benchmarks``) on CUDA, float32 and bfloat16:
    tome-eager, tome-compiled, floor, vt-triton, vt-reference, timed with CUDA events and a
    cold L2, every result checked against the reference before timing; and
    prop_attention's Triton kernel against the reference in float32 and bfloat16 (the
    measurement behind "auto"'s per-dtype choice);
(c) the select table (``python -m benchmarks.select``) on CUDA, results checked likewise;
(d) end to end: VideoMAE-B, ViViT-B and TimeSformer-B (random weights) in bfloat16 at batch
    8, unpatched against patched (and patched at r=0 against unpatched, checked first),
    the speedup against the FLOP ratio;
(e) ``report.md`` and ``report.json`` in --out (default gpu-report/).

Exit status: 0 when every check agrees, 1 when one does not, 2 when there is nothing to
run on (no CUDA device; or TRITON_INTERPRET set without --interpret). ``--interpret`` runs
part (a) alone, on CPU tensors, with the GPU tiles forced (``vtome_kernels.triton.gpu_tiles``)
and smaller shapes (the interpreter is slow); that is how CI shows this check works.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import sys
import time
from typing import Dict, List, Sequence, Tuple

import torch

from .harness import machine, progress

PARTS = "abcd"


# --------------------------------------------------------------------------------------
# (a) correctness
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MergeCase:
    name: str
    x: Tuple[int, ...]  # [B, N, C] or [B, T, N, C]
    r: int
    class_token: bool
    d: int


@dataclasses.dataclass(frozen=True)
class AttnCase:
    name: str
    b: int
    h: int
    nq: int
    nk: int
    d: int


@dataclasses.dataclass(frozen=True)
class SelectCase:
    name: str
    shape: Tuple[int, int, int, int]  # [B, T, L, C]
    budget: int


def gpu_cases():
    from .shapes import PAPER_SHAPES

    merge = [MergeCase(s.name, s.x, s.r, s.class_token, s.d) for s in PAPER_SHAPES] + [
        MergeCase("odd ST, class token", (3, 301, 100), 97, True, 24),
        MergeCase("odd DST", (2, 3, 67, 40), 20, False, 16),
        MergeCase("r clamped", (2, 9, 8), 10, True, 8),
    ]
    attn = [
        AttnCase("ViT-B b8 after one merge", 8, 12, 181, 181, 64),
        AttnCase("VideoMAE-B b1 after one merge", 1, 12, 1418, 1418, 64),
        AttnCase("TimeSformer-B b4 temporal (B·n rows)", 4 * 178, 12, 8, 8, 64),
        AttnCase("odd", 3, 5, 77, 131, 40),
        AttnCase("d=128", 2, 4, 200, 200, 128),
    ]
    select = [
        SelectCase("B=8 T=16 L=144 C=768 K=1024", (8, 16, 144, 768), 1024),
        SelectCase("B=1 T=8 L=196 C=384 K=512", (1, 8, 196, 384), 512),
        SelectCase("odd B=3 T=6 L=50 C=24 K=77", (3, 6, 50, 24), 77),
        SelectCase("groups beyond BLOCK_N_MAX B=1 T=4 L=2500 C=16 K=3000", (1, 4, 2500, 16), 3000),
    ]
    return merge, attn, select


def interpret_cases():
    """Just above the GPU tiles: 2 A and B tiles, 3 rank programs, 2 channel and 2 source
    blocks (merge), 3 key blocks (attention), 2 row blocks (select)."""
    merge = [MergeCase("ST, class token", (1, 150, 136), 60, True, 8),
             MergeCase("DST", (1, 2, 132, 16), 20, False, 8)]
    attn = [AttnCase("keys in several blocks", 1, 2, 40, 150, 64), AttnCase("odd d", 1, 1, 17, 70, 40)]
    select = [SelectCase("2 row blocks, ties", (1, 4, 50, 8), 110)]
    return merge, attn, select


TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1e-2), torch.float16: (2e-3, 1e-3)}
ATTN_TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass
class Check:
    op: str
    case: str
    dtype: str
    ok: bool
    detail: str = ""


def _name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _compare(got, want, exact: bool, atol=0.0, rtol=0.0) -> Tuple[bool, str]:
    """(agree, what differs): tensors moved to CPU; exact means bit for bit."""
    got = [t.detach().cpu() for t in got]
    want = [t.detach().cpu() for t in want]
    for a, b in zip(got, want):
        if a.shape != b.shape:
            return False, f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
        if exact:
            if not torch.equal(a, b):
                return False, f"{int((a != b).sum())} of {a.numel()} elements differ"
        else:
            try:
                torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol)
            except AssertionError as exc:
                return False, " ".join(str(exc).split())[:160]
    if exact:
        return True, "bit for bit"
    err = max(((a.double() - b.double()).abs().max().item() if a.numel() else 0.0)
              for a, b in zip(got, want))
    return True, f"max abs err {err:.2e}"


def _merge_inputs(case: MergeCase, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.x, generator=g)
    metric = torch.randn(case.x[:-1] + (case.d,), generator=g)
    n = case.x[-2]
    metric[..., 10:n:9, :] = metric[..., 3:4, :]  # identical tokens: exact ties everywhere
    size = torch.randint(1, 4, case.x[:-1] + (1,), generator=g).float()
    return x.to(dtype), size, metric.to(dtype)


def check_merge(case: MergeCase, dtype, device) -> List[Check]:
    import vtome_kernels as vt

    out: List[Check] = []
    dt = _name(dtype)

    def add(op, result):
        out.append(Check(op, case.name, dt, *result))

    x, size, metric = _merge_inputs(case, dtype)
    xd, sd, md = (t.to(device) for t in (x, size, metric))
    plan = vt.match(md, case.r, class_token=case.class_token, backend="triton")
    want = vt.match(metric, case.r, class_token=case.class_token, backend="reference")
    fields = ("out_idx", "src_idx", "dst_idx", "src_score")
    add("match", _compare([getattr(plan, f) for f in fields], [getattr(want, f) for f in fields], True))
    atol, rtol = TOL[dtype]
    leaves = [xd.clone().requires_grad_(), sd.clone().requires_grad_()]
    ref_leaves = [x.clone().requires_grad_(), size.clone().requires_grad_()]
    got, exp = plan.merge(*leaves), want.merge(*ref_leaves)
    add("merge", _compare(got, exp, False, atol, rtol))
    g = torch.Generator().manual_seed(1)
    up = (torch.randn(exp[0].shape, generator=g).to(dtype), torch.randn(exp[1].shape, generator=g))
    grads = torch.autograd.grad(got, leaves, [u.to(device) for u in up])
    want_grads = torch.autograd.grad(exp, ref_leaves, up)
    # The size gradient sums C products with the rounded merged x: its rounding grows with C.
    ok_x, why_x = _compare(grads[:1], want_grads[:1], False, atol, rtol)
    ok_s, why_s = _compare(grads[1:], want_grads[1:], False, atol * case.x[-1] ** 0.5, rtol)
    add("merge backward", (ok_x and ok_s, f"x: {why_x}; size: {why_s}"))
    add("merge_source", _compare([plan.merge_source()], [want.merge_source()], True))
    y = exp[0].detach()
    yd = y.to(device).requires_grad_()
    yr = y.clone().requires_grad_()
    full, full_want = plan.unmerge(yd), want.unmerge(yr)
    add("unmerge", _compare([full], [full_want], True))
    up = torch.randn(full_want.shape, generator=g).to(dtype)
    add("unmerge backward", _compare(torch.autograd.grad(full, yd, up.to(device)),
                                     torch.autograd.grad(full_want, yr, up), False, atol, rtol))
    return out


def check_attention(case: AttnCase, dtype, device) -> List[Check]:
    import vtome_kernels as vt
    from vtome_kernels import reference

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(case.b, case.h, n, case.d, generator=g).to(dtype) for n in (case.nq, case.nk, case.nk))
    size = torch.randint(1, 40, (case.b, case.nk, 1), generator=g).float()
    leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
    out = vt.prop_attention(*leaves, size.to(device), backend="triton")
    dout = torch.randn(out.shape, generator=g).to(dtype)
    got = [out] + list(torch.autograd.grad(out, leaves, dout.to(device)))
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference.prop_attention(*ref_leaves, size.double(), case.d ** -0.5)
    want = [ref] + list(torch.autograd.grad(ref, ref_leaves, dout.double()))
    tol = ATTN_TOL[dtype]
    return [Check("prop_attention", case.name, _name(dtype), *_compare(got[:1], want[:1], False, tol, tol)),
            Check("prop_attention backward", case.name, _name(dtype),
                  *_compare(got[1:], want[1:], False, tol, tol))]


def check_select(case: SelectCase, dtype, device) -> List[Check]:
    import vtome_kernels as vt

    g = torch.Generator().manual_seed(3)
    x = torch.randn(case.shape, generator=g)
    x[:, 1, ::3] = x[:, 0, ::3]  # unchanged patches: score 0, exact ties
    x = x.to(dtype)
    got = vt.select(x.to(device), case.budget, backend="triton")
    want = vt.select(x, case.budget, backend="reference")
    return [Check("select", case.name, _name(dtype), *_compare(got, want, True))]


def correctness(device: torch.device, cases, dtypes: Sequence[torch.dtype] = DTYPES) -> List[Check]:
    merge, attn, select = cases
    checks: List[Check] = []
    jobs = ([(check_merge, c) for c in merge] + [(check_attention, c) for c in attn]
            + [(check_select, c) for c in select])
    for i, (fn, case) in enumerate(jobs, 1):
        for dtype in dtypes:
            t0 = time.perf_counter()
            try:
                got = fn(case, dtype, device)
            except Exception as exc:  # a crash is a failed check, reported with the rest
                got = [Check(fn.__name__.replace("check_", ""), case.name, _name(dtype), False,
                             f"raised {type(exc).__name__}: {exc}"[:300])]
            checks += got
            bad = [c for c in got if not c.ok]
            progress(f"(a) [{i}/{len(jobs)}] {case.name} {_name(dtype)}: "
                     f"{'ok' if not bad else 'FAILED ' + ', '.join(c.op for c in bad)} "
                     f"({time.perf_counter() - t0:.1f} s)")
    return checks


def checks_table(checks: List[Check]) -> str:
    lines = ["| op | case | dtype | agrees | detail |", "|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c.op} | {c.case} | {c.dtype} | {'yes' if c.ok else '**NO**'} | {c.detail} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# (b) the attention choice of "auto" (vtome_kernels/attention.py, IEEE_DTYPES), measured
# --------------------------------------------------------------------------------------
ATTN_SHAPES = (("VideoMAE-B b8 after one merge", (8, 12, 1418, 64)),
               ("ViViT-B b1", (1, 12, 3137, 64)),
               ("TimeSformer-B b8 temporal", (8 * 178, 12, 8, 64)))


def attention_table(device: torch.device, rounds: int, shapes=ATTN_SHAPES) -> str:
    """prop_attention forward, Triton kernel against the reference (SDPA with the bias as
    mask), float32 and bfloat16: the numbers behind "auto"'s per-dtype choice."""
    import vtome_kernels as vt

    from .harness import median_ms, time_interleaved

    lines = ["| shape | dtype | triton ms | reference ms | reference / triton | auto picks |",
             "|---|---|---:|---:|---:|---|"]
    for name, (b, h, n, d) in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype) for _ in range(3))
            size = torch.randint(1, 8, (b, n, 1), device=device).float()
            fns = {be: (lambda be=be: vt.prop_attention(q, k, v, size, backend=be)) for be in ("triton", "reference")}
            med = {be: median_ms(t) for be, t in time_interleaved(fns, device, rounds).items()}
            from vtome_kernels.attention import IEEE_DTYPES

            pick = "reference" if dtype in IEEE_DTYPES else "triton"
            lines.append(f"| {name} [{b}, {h}, {n}, {d}] | {_name(dtype)} | {med['triton']:.3f} | "
                         f"{med['reference']:.3f} | {med['reference'] / med['triton']:.2f} | {pick} |")
            progress(lines[-1])
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# (d) end to end on CUDA
# --------------------------------------------------------------------------------------
def e2e_rows(device: torch.device, batch: int = 8, rounds: int = 10, dtype=torch.bfloat16,
             tiny: bool = False) -> List[dict]:
    """Unpatched against patched, interleaved; tiny: the smoke-test models (tests)."""
    import copy

    import vtome_kernels as vt

    from .e2e import CASES, _run
    from .harness import median_ms, time_interleaved

    rows = []
    for case in CASES[:3]:  # VideoMAE-B, ViViT-B, TimeSformer-B
        progress(f"(d) {case.name} r={case.r}, batch {batch}, {_name(dtype)}")
        torch.manual_seed(0)
        base = case.build(tiny).eval().to(device=device, dtype=dtype)
        patched = case.patch(copy.deepcopy(base), r=case.r)
        shape = (batch,) + case.shape(tiny)[1:]
        x = torch.randn(shape, device=device, dtype=dtype)
        with torch.inference_mode():
            patched.r = 0  # the patch alone changes nothing: checked before timing
            want = _run(base, x).float()
            err = ((_run(patched, x).float() - want).norm() / want.norm().clamp_min(1e-6)).item()
            same = err < 2e-2  # bfloat16 rounding through 12 layers, not a different model
            patched.r = case.r
            finite = bool(torch.isfinite(_run(patched, x)).all())
            times = time_interleaved({"unpatched": lambda: _run(base, x), "patched": lambda: _run(patched, x)},
                                     device, rounds)
        ms0, ms1 = median_ms(times["unpatched"]), median_ms(times["patched"])
        ratio = vt.patch.flops(patched, shape, 0) / vt.patch.flops(patched, shape)
        rows.append(dict(model=case.name, r=case.r, batch=batch, dtype=_name(dtype), unpatched_ms=ms0,
                         patched_ms=ms1, speedup=ms0 / ms1, flop_ratio=ratio,
                         speedup_over_flop_ratio=ms0 / ms1 / ratio, r0_matches_unpatched=same, r0_rel_err=err,
                         patched_finite=finite))
        progress(f"    unpatched {ms0:.2f} ms, patched {ms1:.2f} ms: {ms0 / ms1:.2f}x (FLOPs imply {ratio:.2f}x)")
        del base, patched
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def e2e_table(rows: List[dict]) -> str:
    lines = ["| model | r | batch | dtype | unpatched ms | patched ms | speedup | FLOP ratio | "
             "speedup / FLOP ratio | r=0 equals unpatched (rel. err) | patched finite |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for w in rows:
        lines.append(f"| {w['model']} | {w['r']} | {w['batch']} | {w['dtype']} | {w['unpatched_ms']:.2f} | "
                     f"{w['patched_ms']:.2f} | {w['speedup']:.2f}x | {w['flop_ratio']:.2f}x | "
                     f"{w['speedup_over_flop_ratio']:.2f} | {w['r0_matches_unpatched']} ({w['r0_rel_err']:.1e}) | "
                     f"{w['patched_finite']} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def write_report(out: pathlib.Path, title: str, sections: List[Tuple[str, str]], data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    body = [f"# {title}", "", f"Machine: {data['machine']}. {data['date']}. Command: `{data['command']}`.", ""]
    for heading, text in sections:
        body += [f"## {heading}", "", text, ""]
    (out / "report.md").write_text("\n".join(body))
    (out / "report.json").write_text(json.dumps(data, indent=1, default=str) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu-report", help="folder of report.md and report.json (default gpu-report/)")
    ap.add_argument("--interpret", action="store_true",
                    help="part (a) on CPU tensors in Triton's interpreter at the GPU tiles (TRITON_INTERPRET=1)")
    ap.add_argument("--parts", default=PARTS, help="which of a, b, c, d to run (default all)")
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds per provider in (b) and (c)")
    args = ap.parse_args(argv)
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    command = "python -m benchmarks.gpu" + (f" {argv_text}" if argv_text else "")

    if args.interpret:
        if "triton" in sys.modules and not _interpreting():
            print("python -m benchmarks.gpu --interpret: triton was imported before TRITON_INTERPRET=1 "
                  "was set; run it as TRITON_INTERPRET=1 python -m benchmarks.gpu --interpret")
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # before the first import of triton
        device = torch.device("cpu")
        parts = "a"
    else:
        if not torch.cuda.is_available():
            print("python -m benchmarks.gpu: no CUDA device here (torch.cuda.is_available() is False); "
                  "run it on a GPU machine, or use --interpret for part (a) in Triton's CPU interpreter")
            return 2
        if _interpreting():
            print("python -m benchmarks.gpu: TRITON_INTERPRET is set, but this check needs the compiled "
                  "kernels; unset it (or pass --interpret)")
            return 2
        device = torch.device("cuda", torch.cuda.current_device())
        parts = "".join(p for p in PARTS if p in args.parts)

    import vtome_kernels.triton as backend

    data: Dict[str, object] = dict(machine=machine(), date=str(datetime.date.today()), command=command,
                                   mode="interpreter, CPU tensors" if args.interpret else "compiled, CUDA")
    sections: List[Tuple[str, str]] = []
    failed = False
    t_start = time.perf_counter()

    if "a" in parts:
        cases = interpret_cases() if args.interpret else gpu_cases()
        with contextlib.ExitStack() as stack:
            if args.interpret:  # CPU tensors: the ops' CPU kernels lent to Triton's interpreter
                from vtome_kernels.triton.backend import cpu_interpreter

                stack.enter_context(cpu_interpreter())
                stack.enter_context(backend.gpu_tiles())
            checks = correctness(device, cases)
        bad = [c for c in checks if not c.ok]
        failed |= bool(bad)
        data["correctness"] = [dataclasses.asdict(c) for c in checks]
        summary = (f"{len(checks) - len(bad)} of {len(checks)} checks agree with the reference"
                   + ("" if not bad else f"; FAILED: {', '.join(f'{c.op} {c.case} {c.dtype}' for c in bad)}"))
        sections.append(("(a) Correctness of the Triton ops against the reference",
                         f"{summary}. Mode: {data['mode']}, GPU tile sizes.\n\n{checks_table(checks)}"))
        print(f"(a) correctness: {summary}")

    if "b" in parts:
        from .__main__ import merge_table
        from .shapes import PAPER_SHAPES

        for dtype in (torch.float32, torch.bfloat16):
            # tome-compiled in float32 only (each shape and dtype is a compilation: minutes)
            table = merge_table(PAPER_SHAPES, device, args.rounds, dtype == torch.float32, dtype)
            # ToMe's GEMM scores may break near-ties differently: only a vt- mismatch fails
            failed |= any("DIFFERS" in line and "| vt-" in line for line in table.splitlines())
            sections.append((f"(b) Merge table, {_name(dtype)} (CUDA events, cold L2, results checked)", table))
            data[f"merge_table_{_name(dtype)}"] = table
            print(f"(b) merge table {_name(dtype)}:\n{table}\n")
        table = attention_table(device, args.rounds)
        sections.append(("(b) prop_attention forward: Triton against the reference (auto's per-dtype choice)",
                         table))
        data["attention_table"] = table
        print(f"(b) attention:\n{table}\n")

    if "c" in parts:
        from .select import paper_shapes, select_table

        try:
            table = select_table(paper_shapes(), device, max(5, args.rounds // 2), torch.float32)
        except AssertionError as exc:
            table, failed = f"FAILED: {exc}", True
        sections.append(("(c) Select table, float32 (CUDA events, cold L2, results checked)", table))
        data["select_table"] = table
        print(f"(c) select table:\n{table}\n")

    if "d" in parts:
        rows = e2e_rows(device)
        failed |= not all(w["r0_matches_unpatched"] and w["patched_finite"] for w in rows)
        table = e2e_table(rows)
        sections.append(("(d) End to end, bfloat16, batch 8 (random weights)", table))
        data["e2e"] = rows
        print(f"(d) end to end:\n{table}\n")

    data["seconds"] = round(time.perf_counter() - t_start, 1)
    data["all_agree"] = not failed
    out = pathlib.Path(args.out)
    write_report(out, "vtome_kernels GPU check", sections, data)
    print(f"report: {out / 'report.md'}, {out / 'report.json'} ({data['seconds']} s); "
          f"{'every check agrees' if not failed else 'SOME CHECKS FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
