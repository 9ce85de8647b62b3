"""Static GPU report of the Triton kernels: compiled ahead of time, no GPU needed.

``python -m benchmarks.kernel_report`` calls every launch function of ``vtome_kernels.triton``
at the paper shapes (benchmarks/shapes.py; benchmarks/select.py's layouts for selection) on
CPU tensors with the launches recorded, not run; Triton's own binder gives each launch the
compile key a CUDA device would (integers equal to 1 become constants, integers and
pointers divisible by 16 get the divisibility hint). Each distinct key is compiled for
sm_80 (A100) and sm_90 (H100) with ``triton.compile`` from an empty cache, and the report
prints per compilation: registers per thread, spill stores/loads and shared memory (from
``ptxas -v`` on the kernel's PTX, with Triton's own ptxas flags), whether tensor-core
instructions are used (``mma`` on sm_80, ``wgmma`` / ``mma`` on sm_90, read from the PTX),
the number of fused multiply-adds (0 on the exact paths), the specialisation and the
compile time. Exit status 1 on any spill or shared memory beyond the target's limit.

    --predict         predicted H100 time of every launch at the paper shapes (a roofline model)
    --compile-counts  compilations a first forward of each patched model triggers
    --write           (with --compile-counts) the three tables into BENCHMARKS.md
    --traffic         analytic global-memory traffic of one merge step

Nothing here runs a kernel. Must run without TRITON_INTERPRET=1 (the kernels must be
compiled functions).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Sequence, Tuple

import torch

from benchmarks.harness import progress
from benchmarks.shapes import PAPER_SHAPES

# Largest dynamic shared memory one block may use (bytes): A100 163 KB, H100 227 KB.
SMEM_LIMIT = {80: 166912, 90: 232448}
TARGETS = (80, 90)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compilation, keyed as Triton's JIT keys it at run time (its binder on the
    launch's real arguments: integer arguments equal to 1 become constants, integers and
    pointers divisible by 16 get the divisibility hint, the rest stay plain i32/i64)."""
    kernel: str  # attribute name in its module
    module: str  # match, merge, attention or select
    label: str  # what it is used for, and at which shapes
    signature: Tuple[Tuple[str, str], ...]
    constexprs: Tuple[Tuple[Tuple[int, ...], object], ...]
    attrs: Tuple[Tuple[Tuple[int, ...], Tuple], ...]
    options: Tuple[Tuple[str, object], ...]

    @property
    def num_warps(self) -> int:
        return dict(self.options)["num_warps"]

    @property
    def fp_fusion(self) -> bool:
        return dict(self.options)["enable_fp_fusion"]

    @property
    def specialised(self) -> str:
        """The run-time specialisation in words: args that are 1, args divisible by 16."""
        names = [n for n, _ in self.signature]
        ones = [names[p[0]] for p, v in self.constexprs if dict(self.signature)[names[p[0]]] == "constexpr"
                and v == 1 and not names[p[0]].isupper()]
        div = [names[p[0]] for p, a in self.attrs if a and not names[p[0]].endswith("_ptr")]
        return f"=1: {','.join(ones) or '-'}; %16: {','.join(div) or '-'}"


@dataclasses.dataclass
class Row:
    variant: Variant
    target: int
    regs: int
    spill_stores: int
    spill_loads: int
    smem: int
    mma: str
    fma: int
    compile_s: float = 0.0


@dataclasses.dataclass
class Launch:
    """One recorded launch: the kernel, its grid, its compile key and the work it does."""
    kernel: str
    label: str
    grid: Tuple[int, ...]
    key: str
    bytes: int  # the launch's tensor arguments, each read or written once (compulsory traffic)
    flops: float  # arithmetic (integer ops for rank / top-K) counted from the kernel's loops
    unit: str  # which peak the flops run at: fp32, tensor bf16, tf32, int32
    serial: int  # dependent passes inside one program (each a block-wide reduction)


def _module(name: str):
    import importlib

    return importlib.import_module(f"vtome_kernels.triton.{name}")


TARGET = 90  # the binder's target: the specialisation rules are the same on sm_80


class Recorder:
    """Stands in for ``vtome_kernels.triton._run``: records each launch's compile key (by
    Triton's own binder for a CUDA target) and runs nothing. No GPU or driver is touched."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.backend = make_backend(GPUTarget("cuda", TARGET, 32))
        self.binders = {}
        self.label = ""
        self.variants: Dict[str, Variant] = {}
        self.launches: List[Launch] = []

    def __call__(self, kernel, grid, args, kwargs):
        from triton.runtime.jit import create_function_from_signature

        name = kernel.fn.__name__
        if name not in self.binders:
            self.binders[name] = create_function_from_signature(kernel.signature, kernel.params, self.backend)
        bound, spec, opts = self.binders[name](*args, **kwargs)
        options, sig, consts, attrs = kernel._pack_args(self.backend, dict(kwargs), bound, spec, opts)
        module = kernel.fn.__module__.rsplit(".", 1)[1]
        v = Variant(name, module, self.label, tuple(sig.items()),
                    tuple(sorted(consts.items())),
                    tuple(sorted((k, tuple(tuple(a) for a in val)) for k, val in attrs.items())),
                    tuple(sorted((k, val) for k, val in options.__dict__.items()
                                 if k in ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion"))))
        key = repr((v.kernel, v.signature, v.constexprs, v.attrs, v.options))
        if key in self.variants:
            old = self.variants[key]
            use, shapes = old.label.split(", ", 1) if ", " in old.label else (old.label, "")
            new = self.label.split(", ", 1)[1] if ", " in self.label else ""
            if new and new not in shapes.split(" / "):
                self.variants[key] = dataclasses.replace(old, label=f"{use}, {shapes} / {new}")
        else:
            self.variants[key] = v
        work = _work(name, dict(bound), grid)
        self.launches.append(Launch(name, self.label, tuple(grid), key, _bytes(bound.values()), *work))

    @contextlib.contextmanager
    def installed(self):
        import vtome_kernels.triton as backend

        if backend.interpreting():
            raise RuntimeError("run the kernel report without TRITON_INTERPRET=1 (it compiles the kernels)")
        before = backend._run
        backend._run = self
        try:
            yield self
        finally:
            backend._run = before


def _bytes(values) -> int:
    seen, total = set(), 0
    for t in values:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.numel() * t.element_size()
    return total


def _work(name: str, a: Dict[str, object], grid) -> Tuple[float, str, int]:
    """(flops or int ops, unit, dependent passes per program) of one launch, from its loops."""
    import triton

    programs = 1
    for v in grid:
        programs *= v
    if name == "_match_kernel":
        ba, bb, d, steps = a["BLOCK_A"], a["BLOCK_B"], a["D"], a["B_STEPS"]
        per = 2 * ba * d + steps * (2 * bb * d + (ba + bb) * d + 2 * ba * bb * d)  # norms, divisions, dots
        return programs * per, ("tf32" if a["DOT"] else "fp32"), steps
    if name == "_rank_kernel":
        na = a["NA"]
        blocks = triton.cdiv(na, a["BLOCK_J"])
        ops = programs * (4 * 4 * na + a["BLOCK_I"] * na * (4 if a["CLS"] else 3))
        return ops, "int32", 5 * blocks  # 4 histogram passes, 1 counting pass
    if name == "_merge_kernel":
        rows, r = programs, a["R"]  # (g · N_OUT) x channel blocks
        c = a["BLOCK_C"]
        return rows * (r + 3 * c + 3 * c * r / max(1, a["N_OUT"])), "fp32", triton.cdiv(r, a["BLOCK_S"])
    if name == "_scatter_back_kernel":
        return programs * 4 * a["C"], "fp32", 0  # a streaming loop: no reduction between steps
    if name.startswith("_attn"):
        b_h = programs // triton.cdiv(a["NQ"] if name != "_attn_bwd_kv_kernel" else a["NK"],
                                      a["BLOCK_M"] if name != "_attn_bwd_kv_kernel" else a["BLOCK_N"])
        per = {"_attn_fwd_kernel": 4, "_attn_bwd_kv_kernel": 8, "_attn_bwd_q_kernel": 6}[name]
        unit = "fp32" if a["UPCAST"] else "tensor bf16"
        inner = a["NK"] if name != "_attn_bwd_kv_kernel" else a["NQ"]
        step = a["BLOCK_N"] if name != "_attn_bwd_kv_kernel" else a["BLOCK_M"]
        return b_h * per * a["NQ"] * a["NK"] * a["D"], unit, triton.cdiv(inner, step)
    if name == "_score_kernel":
        return 3 * programs * a["BLOCK_L"] * a["C"], "fp32", 0  # streaming, per-thread sums
    if name == "_topk_gather_kernel":
        ng = a["NG"]
        return programs * 33 * ng, "int32", 32 * triton.cdiv(ng, a["BLOCK_N"])
    raise KeyError(name)


def paper_workload(rec: Recorder) -> None:
    """Every launch function at the paper shapes (benchmarks/shapes.py; attention after one
    merge, in bfloat16 and float32; selection at benchmarks/select.py's layouts), on CPU
    tensors, launches recorded by rec. Nothing runs."""
    match, merge, attn, sel = (_module(n) for n in ("match", "merge", "attention", "select"))
    for shape in PAPER_SHAPES:
        x, size, metric = shape.inputs()
        n, c = shape.x[-2], shape.x[-1]
        g = shape.groups
        xf, sf, mf = (t.reshape(g, n, t.shape[-1]) for t in (x, size, metric))
        r = min(shape.r, (n - shape.class_token) // 2)
        rec.label = f"match, {shape.name}"
        node_max, node_idx = match.row_max(mf, shape.class_token, False)
        rec.label = f"match (tf32 option), {shape.name}"
        match.row_max(mf, shape.class_token, False, "tf32")
        rec.label = f"rank, {shape.name}"
        node_max.copy_(torch.rand_like(node_max))  # the ranking reads nothing here; valid values anyway
        out_idx, src_idx, dst_pos, score = match.rank(node_max, node_idx.zero_(), n, r, shape.class_token, False)
        rec.label = f"merge, {shape.name}"
        out_x, out_s = merge.merge_fwd(xf, sf, out_idx, src_idx, dst_pos, None)
        rec.label = f"merge (drop/hybrid), {shape.name}"
        merge.merge_fwd(xf, sf, out_idx, src_idx, dst_pos, torch.ones_like(src_idx, dtype=torch.bool))
        rec.label = f"merge backward, {shape.name}"
        merge.merge_bwd(torch.ones_like(out_x), torch.ones_like(out_s), xf, sf, out_x, out_s, out_idx, src_idx,
                        dst_pos, None)
        rec.label = f"merge_source, {shape.name}"
        merge.merge_source_fwd(torch.zeros(g, n, n, dtype=torch.bool), out_idx, src_idx, dst_pos, None)
        rec.label = f"unmerge, {shape.name}"
        merge.unmerge_fwd(out_x, out_idx, src_idx, dst_pos, n)
        rec.label = f"unmerge backward, {shape.name}"
        merge.unmerge_bwd(xf, out_idx, src_idx, dst_pos)
        # attention over the merged tokens: the batch's heads, per frame for DST (spatial)
        b = shape.x[0] * (shape.x[1] if len(shape.x) == 4 else 1)
        for dtype, tname in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            # q, k, v as a Hugging Face layer hands them over: [B, N, H, d] memory seen as [B, H, N, d]
            q, k, v = (torch.randn(b, n - r, 12, 64, dtype=dtype).transpose(1, 2) for _ in range(3))
            rec.label = f"prop_attention {tname} d=64, {shape.name}"
            o, lse = attn.attn_fwd(q, k, v, out_s, 0.125)
            rec.label = f"prop_attention backward {tname} d=64, {shape.name}"
            attn.attn_bwd(o, q, k, v, out_s, o, lse, 0.125)
    for d in (32, 128):  # the other head dims the tiles were chosen for
        q, k, v = (torch.randn(1, 1568, 12, d, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
        rec.label = f"prop_attention bf16 d={d}, [1, 12, 1568, {d}]"
        o, lse = attn.attn_fwd(q, k, v, None, 0.125)
        rec.label = f"prop_attention backward bf16 d={d}, [1, 12, 1568, {d}]"
        attn.attn_bwd(o, q, k, v, None, o, lse, 0.125)
    _select_workload(rec, sel)


def _select_workload(rec: Recorder, sel) -> None:
    """FluxViT selection at benchmarks/select.py's layouts (C 384 / 768, float32 and
    bfloat16, budget 1024, batch 8) and one group above BLOCK_N_MAX patches."""
    from benchmarks.select import LAYOUTS
    from vtome_kernels.select import resolve_groups

    for t, l in LAYOUTS + ((4, 2500),):
        groups = resolve_groups("auto", t)
        b = 8 if (t, l) in LAYOUTS else 1
        for c in (384, 768):
            for dtype, tname in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
                x = torch.zeros(b, t, l, c, dtype=dtype)
                k = min(1024, t * l - 1) // groups
                rec.label = f"select, T={t} L={l} C={c} {tname} K={k * groups} b{b}"
                sel.select(x, k, groups)


def variants() -> List[Variant]:
    """Every compilation the paper shapes make (deduplicated; labels list the shapes)."""
    rec = Recorder()
    with rec.installed():
        paper_workload(rec)
    return list(rec.variants.values())


def _ptxas() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _ptxas_usage(ptx: str, fp_fusion: bool) -> Tuple[int, int, int, int]:
    """(registers, spill store bytes, spill load bytes, static smem) from ``ptxas -v``."""
    arch = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [_ptxas(), "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src,
               "-o", os.path.join(tmp, "k.o")] + ([] if fp_fusion else ["--fmad=false"])
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    smem = re.search(r"(\d+) bytes smem", log)
    return regs, int(spill.group(1)), int(spill.group(2)), int(smem.group(1)) if smem else 0


def compile_variant(v: Variant, capability: int) -> Row:
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(_module(v.module), v.kernel)
    attrs = {k: [list(a) for a in val] for k, val in v.attrs}
    src = ASTSource(fn, dict(v.signature), constexprs=dict(v.constexprs), attrs=attrs)
    t0 = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=dict(v.options))
    seconds = time.perf_counter() - t0
    ptx = compiled.asm["ptx"]
    regs, st, ld, static_smem = _ptxas_usage(ptx, v.fp_fusion)
    mma = ",".join(k for k in ("wgmma", "mma.sync") if k in ptx) or "no"
    fma = len(re.findall(r"\bfma\.", ptx))
    return Row(v, capability, regs, st, ld, compiled.metadata.shared + static_smem, mma, fma, seconds)


def report(targets=TARGETS) -> List[Row]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("run the kernel report without TRITON_INTERPRET=1 (it compiles the kernels)")
    jobs = [(v, t) for v in variants() for t in targets]
    workers = max(1, min(4, os.cpu_count() or 1))
    before = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # an empty cache: the compile times are real
        try:
            with concurrent.futures.ProcessPoolExecutor(workers) as pool:  # ptxas runs are independent
                return list(pool.map(compile_variant, *zip(*jobs)))
        finally:
            if before is None:
                del os.environ["TRITON_CACHE_DIR"]
            else:
                os.environ["TRITON_CACHE_DIR"] = before


def table(rows: List[Row]) -> str:
    lines = ["| kernel | used for | target | registers | spills (st/ld bytes) | shared memory | "
             "tensor cores | fma in PTX | specialised | compile s |",
             "|---|---|---|---:|---:|---:|---|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r.variant.kernel} | {r.variant.label} | sm_{r.target} | {r.regs} | "
                     f"{r.spill_stores}/{r.spill_loads} | {r.smem} B (limit {SMEM_LIMIT[r.target]}) | "
                     f"{r.mma} | {r.fma} | {r.variant.specialised} | {r.compile_s:.2f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# analytic global-memory traffic (estimates: counted from the ops, nothing measured)
# --------------------------------------------------------------------------------------
F32, I64 = 4, 8


def traffic(shape) -> Dict[str, int]:
    """Bytes read + written from global memory by one merge step at ``shape``, float32.

    "tome-eager": ToMe's op sequence (benchmarks/providers.py), every op reading its inputs
    and writing its output once. "score matrix": the (N/2)² float32 scores it writes.
    "fused": match + rank + merge kernels, assuming a group's metric and its r destination
    indices stay in L2/L1 while a group's programs reread them (they are <= 1 MB).
    """
    g = shape.groups
    n, c, d = shape.x[-2], shape.x[-1], shape.d
    na, nb = (n + 1) // 2, n // 2
    r = min(shape.r, (n - shape.class_token) // 2)
    n_out, unm = n - r, na - r
    cls = shape.class_token

    def combine(ch):  # gather unm + gather src + out-of-place scatter_reduce + cat
        return (2 * unm * ch * F32 + unm * I64 + 2 * r * ch * F32 + r * I64
                + 2 * nb * ch * F32 + 3 * r * ch * F32 + r * I64
                + (unm + nb) * ch * F32 + n_out * ch * F32)

    eager = (
        F32 * (3 * n * d + 2 * n)  # norm, divide
        + F32 * (n * d + na * nb)  # a @ b.T
        + (F32 * nb if cls else 0)  # class row fill
        + F32 * na * nb + na * (F32 + I64)  # max, argmax
        + na * (F32 + I64)  # argsort
        + 3 * r * I64  # dst gather
        + (unm * 3 * I64 if cls else 0)  # unmerged sort
        + F32 * (2 * n * c + n)  # x * size
        + combine(c) + combine(1)
        + F32 * (2 * n_out * c + n_out)  # divide
    )
    fused = (
        F32 * n * d + na * (F32 + F32)  # match: metric in, row max + argmax (int32) out
        + na * (F32 + F32) + n_out * I64 + r * (I64 + I64 + F32)  # rank
        + n_out * I64 + 2 * r * I64 + F32 * (n * c + n) + F32 * (n_out * c + n_out)  # merge
    )
    return {"tome-eager": g * eager, "score matrix": g * F32 * na * nb, "fused": g * fused}


def traffic_table() -> str:
    lines = ["| shape | tome-eager MB | of which score matrix written+read MB | fused kernels MB | "
             "ratio |", "|---|---:|---:|---:|---:|"]
    for shape in PAPER_SHAPES:
        t = traffic(shape)
        lines.append(f"| {shape.name} {list(shape.x)} r={shape.r} | {t['tome-eager'] / 1e6:.2f} | "
                     f"{2 * t['score matrix'] / 1e6:.2f} | {t['fused'] / 1e6:.2f} | "
                     f"{t['tome-eager'] / t['fused']:.2f}x |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# predicted H100 times per launch (a roofline model: predictions, nothing measured)
# --------------------------------------------------------------------------------------
H100 = dict(sms=132, hbm=3.35e12, fp32=67e12, tf32=494.7e12, bf16=989.4e12, int32=16.7e12)
PASS_US = 0.25  # one dependent pass in a program: an L2-resident tile load and a block reduction
LAUNCH_US = 3.0  # the smallest kernel time on a GPU (launch and drain)
PEAK = {"fp32": "fp32", "tf32": "tf32", "tensor bf16": "bf16", "int32": "int32"}


def predict(launch: Launch) -> Tuple[float, str, int]:
    """(predicted µs, what binds, programs) of one launch on an H100 SXM: the largest of the
    launch floor, bytes / HBM bandwidth, work / the unit's peak (both scaled by the share of
    the 132 SMs the grid occupies) and the program's chain of dependent passes."""
    programs = 1
    for v in launch.grid:
        programs *= v
    share = min(1.0, programs / H100["sms"])
    times = {"launch": LAUNCH_US,
             "memory": launch.bytes / (H100["hbm"] * share) * 1e6,
             "compute": launch.flops / (H100[PEAK[launch.unit]] * share) * 1e6,
             "latency": launch.serial * PASS_US}
    bound = max(times, key=times.get)
    return times[bound], bound, programs


def predict_table(launches: Sequence[Launch]) -> str:
    lines = ["| launch | at | programs | MB (tensor arguments, each once) | G ops (unit) | dependent passes | "
             "predicted H100 µs | bound by |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for w in launches:
        us, bound, programs = predict(w)
        lines.append(f"| {w.kernel} | {w.label} | {programs} | {w.bytes / 1e6:.2f} | "
                     f"{w.flops / 1e9:.3f} ({w.unit}) | {w.serial} | {us:.1f} | {bound} |")
    return "\n".join(lines)


def paper_launches() -> List[Launch]:
    """The launches of one merge step (match, rank, merge), of bf16 attention after it and
    of selection, at every paper shape (the rest of the workload: backward, options)."""
    rec = Recorder()
    with rec.installed():
        paper_workload(rec)
    keep = ("match, ", "rank, ", "merge, ", "prop_attention bf16 d=64, ", "select, ")
    return [w for w in rec.launches if w.label.startswith(keep) and "1568, 32]" not in w.label]


# --------------------------------------------------------------------------------------
# compilations of a first forward of each patched model (recorded, nothing compiled or run)
# --------------------------------------------------------------------------------------
def _reference_stage(name: str):
    """The reference's result for one vtome:: op (what the model goes on with)."""
    from vtome_kernels import reference

    def merge_fused(x, size, metric, r, class_token, distill_token):
        out_idx, src_idx, dst_pos, _ = reference.match(metric, r, class_token, distill_token)
        if size is None:
            size = torch.ones(x.shape[:-1] + (1,), dtype=torch.float32)
        out_x, out_s = reference.merge(x, size, out_idx, src_idx, dst_pos, None)
        return out_x, out_s, out_idx, src_idx, dst_pos

    def prop_attention(q, k, v, size, scale):
        logits = (q.float() @ k.float().transpose(-1, -2)) * scale
        if size is not None:
            logits = logits + size.float().log()[:, None, None, :, 0]
        return reference.prop_attention(q, k, v, size, scale), torch.logsumexp(logits, -1)

    special = {"merge_fused": merge_fused, "prop_attention": prop_attention}
    return special.get(name) or getattr(reference, name)


def first_forward_keys(case, batch: int = 2, dtype=torch.bfloat16) -> Tuple[int, int]:
    """(distinct compile keys, launches) of the first forward of a patched model with
    backend="triton" at the paper input, batch ``batch``, in ``dtype``. The vtome:: ops'
    CPU dispatch key is lent, for the forward, to kernels that call the Triton launch
    functions on the CPU tensors (each launch recorded with the key Triton's binder makes
    for an sm_90 device, and not run) and return the reference's result, so every layer
    sees the shapes and values a GPU run would."""
    from vtome_kernels import ops
    from vtome_kernels.triton import backend

    rec = Recorder()

    def spy(name):
        def run(*args):
            backend.KERNELS[name](*args)  # records the launches; their outputs are never written
            return _reference_stage(name)(*args)
        return run

    torch.manual_seed(0)
    model = case.patch(case.build(False).eval().to(dtype), r=case.r, backend="triton")
    x = torch.randn((batch,) + case.shape(False)[1:], dtype=dtype)
    lib = torch.library.Library("vtome", "IMPL")
    supports = backend.supports
    try:
        for name in backend.KERNELS:
            lib.impl(name, spy(name), "CPU")
        ops.cpu_override, backend.supports = "kernel_report", (lambda device: None)
        rec.label = case.name
        with rec.installed(), torch.inference_mode():
            model(x)
    finally:
        ops.cpu_override, backend.supports = None, supports
        lib._destroy()
    return len(rec.variants), len(rec.launches)


def compile_counts_table(median_compile_s: float) -> str:
    from benchmarks.e2e import CASES

    lines = ["| model (r, bf16, backend triton) | launches in a first forward | distinct compilations | "
             "expected first-call compile time |", "|---|---:|---:|---:|"]
    for case in CASES:
        progress(f"first forward of patched {case.name}")
        keys, launches = first_forward_keys(case)
        lines.append(f"| {case.name} (r={case.r}) | {launches} | {keys} | "
                     f"~{keys * median_compile_s:.0f} s ({keys} x {median_compile_s:.1f} s) |")
    return "\n".join(lines)


def summary_table(rows: List[Row]) -> str:
    """One line per compilation, sm_80 and sm_90 side by side (for BENCHMARKS.md)."""
    by: Dict[Variant, Dict[int, Row]] = {}
    for r in rows:
        by.setdefault(r.variant, {})[r.target] = r
    targets = sorted({r.target for r in rows})
    head = " | ".join(f"sm_{t} regs / spills / smem B / tensor cores" for t in targets)
    lines = [f"| kernel | used for | specialised at run time | {head} | compile s (sm_{targets[-1]}) |",
             "|---|---|---|" + "---|" * len(targets) + "---:|"]
    for v, per in by.items():
        cells = " | ".join(f"{per[t].regs} / {per[t].spill_stores}/{per[t].spill_loads} / {per[t].smem} / "
                           f"{per[t].mma}" for t in targets)
        lines.append(f"| {v.kernel} | {v.label} | {v.specialised} | {cells} | {per[targets[-1]].compile_s:.1f} |")
    return "\n".join(lines)


MARKERS = {name: (f"<!-- kernel-report-{name}:begin -->", f"<!-- kernel-report-{name}:end -->")
           for name in ("compile", "predict", "counts")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="80,90", help="compute capabilities, e.g. 80,90")
    parser.add_argument("--traffic", action="store_true",
                        help="print only the analytic global-memory traffic per paper shape")
    parser.add_argument("--predict", action="store_true",
                        help="print only the predicted H100 time of every launch at the paper shapes")
    parser.add_argument("--compile-counts", action="store_true",
                        help="also count the compilations of a first forward of each patched model (minutes)")
    parser.add_argument("--write", action="store_true",
                        help="with --compile-counts: put the tables into BENCHMARKS.md (compile report, "
                             "predictions, compile counts)")
    args = parser.parse_args(argv)
    if args.traffic:
        print(traffic_table())
        return 0
    if args.predict:
        print(predict_table(paper_launches()))
        return 0
    rows = report(tuple(int(t) for t in args.targets.split(",")))
    import statistics

    import triton

    print(f"triton {triton.__version__}, ptxas {_ptxas()}; {len(rows)} compiled kernels (the specialisations "
          f"Triton's binder makes at the paper shapes)\n")
    print(table(rows))
    if args.compile_counts:
        median = statistics.median(r.compile_s for r in rows if r.target == TARGET)
        counts = compile_counts_table(median)
        print("\n" + counts)
        if args.write:
            import pathlib

            from benchmarks.harness import write_block

            path = pathlib.Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
            write_block(path, *MARKERS["compile"], summary_table(rows))
            write_block(path, *MARKERS["predict"], predict_table(paper_launches()))
            write_block(path, *MARKERS["counts"], counts)
            progress("BENCHMARKS.md updated")
    bad = [r for r in rows if r.spill_stores or r.spill_loads or r.smem > SMEM_LIMIT[r.target]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
