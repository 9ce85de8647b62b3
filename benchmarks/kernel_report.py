"""Static GPU report of the Triton kernels: compiled ahead of time, no GPU needed.

``python -m benchmarks.kernel_report`` compiles every kernel of ``vtome_kernels.triton`` for
sm_80 (A100) and sm_90 (H100) with ``triton.compile`` and a ``GPUTarget``, at the
constexprs the paper shapes (benchmarks/shapes.py, and benchmarks/select.py's layouts for
the selection kernels) run with, and prints per kernel:
registers per thread, spill stores/loads and shared memory (from ``ptxas -v`` on the
kernel's PTX, with Triton's own ptxas flags), whether tensor-core instructions are used
(``mma`` on sm_80, ``wgmma`` / ``mma`` on sm_90, read from the PTX) and the number of fused
multiply-adds in the match kernels (0: the exact path has none). Nothing here runs a kernel.
Must run without TRITON_INTERPRET=1 (the kernels must be compiled functions).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

import torch

from benchmarks.shapes import PAPER_SHAPES

# Largest dynamic shared memory one block may use (bytes): A100 163 KB, H100 227 KB.
SMEM_LIMIT = {80: 166912, 90: 232448}
TARGETS = (80, 90)
ATTN_HEAD_DIMS = (32, 64, 128)  # ViT-B, VideoMAE-B, ViViT-B, TimeSformer use 64


@dataclasses.dataclass(frozen=True)
class Variant:
    kernel: str  # attribute name in its module
    module: str  # match, merge, attention or select
    label: str  # what it is used for
    signature: Tuple[Tuple[str, str], ...]
    constexprs: Tuple[Tuple[str, object], ...]
    fp_fusion: bool = True
    num_warps: int = 4
    # Arguments Triton would see as multiples of 16 at the benchmark shapes (it specialises
    # a launch on that: pointers from the allocator, C = 384 / 768); empty: no hints.
    aligned: Tuple[str, ...] = ()


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


def _module(name: str):
    import importlib

    return importlib.import_module(f"vtome_kernels.triton.{name}")


def _sig(names: str, kinds: Dict[str, str], default: str = "i32") -> Tuple[Tuple[str, str], ...]:
    return tuple((n, kinds.get(n, default)) for n in names.split())


def variants() -> List[Variant]:
    """Every kernel at the constexprs the paper shapes use (deduplicated)."""
    import triton.language as tl

    match, merge, attn = _module("match"), _module("merge"), _module("attention")
    out: Dict[Tuple, Variant] = {}

    def add(v: Variant):
        """Keep one variant per distinct compilation; list every shape that uses it."""
        key = (v.kernel, v.signature, v.constexprs, v.num_warps, v.fp_fusion, v.aligned)
        if key in out:
            use, shapes = out[key].label.split(", ", 1)
            new = v.label.split(", ", 1)[1]
            if new not in shapes.split(" / "):
                out[key] = dataclasses.replace(out[key], label=f"{use}, {shapes} / {new}")
        else:
            out[key] = v

    for shape in PAPER_SHAPES:
        n, c = shape.x[-2], shape.x[-1]
        na, nb = (n + 1) // 2, n // 2
        r = min(shape.r, (n - shape.class_token) // 2)
        ba, bb = match.match_blocks(na, nb)
        add(Variant("_match_kernel", "match", f"match, {shape.name}",
                    _sig("m_ptr max_ptr idx_ptr NA NB D stride_g stride_n stride_d",
                         {"m_ptr": "*fp32", "max_ptr": "*fp32", "idx_ptr": "*i32"}),
                    (("CLS", shape.class_token), ("DIST", False), ("BLOCK_A", ba), ("BLOCK_B", bb),
                     ("DOT", ""), ("BLOCK_D", match.match_block_d(shape.d))),
                    fp_fusion=False, num_warps=match.MATCH_WARPS))
        for prec in ("tf32",):  # the optional faster similarities (MATCH_PRECISION)
            add(Variant("_match_kernel", "match", f"match ({prec} option), {shape.name}",
                        _sig("m_ptr max_ptr idx_ptr NA NB D stride_g stride_n stride_d",
                             {"m_ptr": "*fp32", "max_ptr": "*fp32", "idx_ptr": "*i32"}),
                        (("CLS", shape.class_token), ("DIST", False), ("BLOCK_A", ba),
                         ("BLOCK_B", bb), ("DOT", prec), ("BLOCK_D", match.match_block_d(shape.d))),
                        num_warps=match.MATCH_WARPS))
        bi, bj = match.rank_blocks(na)
        add(Variant("_rank_kernel", "match", f"rank, {shape.name}",
                    _sig("max_ptr idx_ptr out_idx_ptr src_idx_ptr dst_pos_ptr score_ptr NA NB R SEARCH",
                         {"max_ptr": "*fp32", "idx_ptr": "*i32", "out_idx_ptr": "*i64",
                          "src_idx_ptr": "*i64", "dst_pos_ptr": "*i64", "score_ptr": "*fp32"}),
                    (("CLS", shape.class_token), ("DIST", False), ("BLOCK_I", bi), ("BLOCK_J", bj)),
                    num_warps=match.RANK_WARPS))
        bs, bc = merge._block_s(r), merge._block_c(c)
        idx = {"out_idx_ptr": "*i64", "src_idx_ptr": "*i64", "dst_pos_ptr": "*i64"}
        merge_names = ("x_ptr s_ptr out_ptr out_s_ptr out_idx_ptr src_idx_ptr dst_pos_ptr merged_ptr "
                       "N_OUT R C sxg sxn sxc ssg ssn sog son")
        # HAS_MERGED: a src_merged mask (drop / hybrid modes); without it merged_ptr is unused
        for union, has_merged, label in ((False, False, "merge"), (False, True, "merge (drop/hybrid)"),
                                         (True, False, "merge_source")):
            add(Variant("_merge_kernel", "merge", f"{label}, {shape.name}",
                        _sig(merge_names, {**idx, "x_ptr": "*fp32", "s_ptr": "*fp32", "out_ptr": "*fp32",
                                           "out_s_ptr": "*fp32",
                                           "merged_ptr": "*i1" if has_merged else "*i64"}),
                        (("HAS_MERGED", has_merged), ("UNION", union), ("SUM", False),
                         ("ACC", tl.float32), ("BLOCK_S", bs), ("BLOCK_C", bc)), num_warps=merge.WARPS))
        back_names = ("y_ptr out_ptr out_idx_ptr src_idx_ptr dst_pos_ptr N N_OUT R C syg syn syc sog son "
                      "x_ptr s_ptr mx_ptr ms_ptr gs_ptr merged_ptr grad_s_ptr sxg sxn sxc ssg ssn smg smn")
        ptrs = {**idx, "y_ptr": "*fp32", "out_ptr": "*fp32", "x_ptr": "*fp32", "s_ptr": "*fp32",
                "mx_ptr": "*fp32", "ms_ptr": "*fp32", "gs_ptr": "*fp32", "merged_ptr": "*i1",
                "grad_s_ptr": "*fp32"}
        for grad, has_merged, label in ((True, False, "merge backward"),
                                        (True, True, "merge backward (drop/hybrid)"),
                                        (False, False, "unmerge")):
            add(Variant("_scatter_back_kernel", "merge", f"{label}, {shape.name}",
                        _sig(back_names, {**ptrs, "merged_ptr": "*i1" if has_merged else "*i64"}),
                        (("GRAD", grad), ("HAS_GS", grad), ("HAS_MERGED", has_merged),
                         ("ACC", tl.float32), ("BLOCK_C", bc)), num_warps=merge.WARPS))
        add(Variant("_merge_kernel", "merge", f"unmerge backward, {shape.name}",
                    _sig(merge_names, {**idx, "x_ptr": "*fp32", "s_ptr": "*fp32", "out_ptr": "*fp32",
                                       "out_s_ptr": "*fp32", "merged_ptr": "*i64"}),
                    (("HAS_MERGED", False), ("UNION", False), ("SUM", True), ("ACC", tl.float32),
                     ("BLOCK_S", bs), ("BLOCK_C", bc)), num_warps=merge.WARPS))

    _select_variants(add)

    strides = ("sqb sqh sqn sqd skb skh skn skd svb svh svn svd ssb ssn")
    for dtype, tname in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        for d in ATTN_HEAD_DIMS:
            if dtype == torch.float32 and d != 64:
                continue
            upcast, prec, acc, bm, bn, bd, warps = attn.attn_config(dtype, d, 1568, 1568)
            meta = (("HAS_SIZE", True), ("UPCAST", upcast), ("PREC", prec), ("ACC", acc),
                    ("BLOCK_M", bm), ("BLOCK_N", bn), ("BLOCK_D", bd), ("SCALE64", False))
            p = "*" + tname
            common = {"q_ptr": p, "k_ptr": p, "v_ptr": p, "s_ptr": p, "scale": "fp32", "scale_ptr": p}
            add(Variant("_attn_fwd_kernel", "attention", f"prop_attention forward, {tname} d={d}",
                        _sig(f"q_ptr k_ptr v_ptr s_ptr o_ptr lse_ptr {strides} sob soh son H NQ NK D scale "
                             "scale_ptr", {**common, "o_ptr": p, "lse_ptr": "*fp32"}), meta, num_warps=warps))
            bwd = {**common, "do_ptr": p, "lse_ptr": "*fp32", "delta_ptr": "*fp32", "dk_ptr": p,
                   "dv_ptr": p, "dq_ptr": p}
            add(Variant("_attn_bwd_kv_kernel", "attention", f"prop_attention backward dk/dv, {tname} d={d}",
                        _sig(f"q_ptr k_ptr v_ptr s_ptr do_ptr lse_ptr delta_ptr dk_ptr dv_ptr {strides} "
                             "H NQ NK D scale scale_ptr", bwd), meta, num_warps=warps))
            add(Variant("_attn_bwd_q_kernel", "attention", f"prop_attention backward dq, {tname} d={d}",
                        _sig(f"q_ptr k_ptr v_ptr s_ptr do_ptr lse_ptr delta_ptr dq_ptr {strides} "
                             "H NQ NK D scale scale_ptr", bwd), meta, num_warps=warps))
    return list(out.values())


def _select_variants(add) -> None:
    """FluxViT selection (vtome_kernels/triton/select.py) at the layouts of
    benchmarks/select.py: the score kernel per input dtype (exact: no fused multiply-add),
    the top-K + gather kernel per group size (BLOCK_N: the group's patches, rounded up to
    a power of two; rows copied as int64 words, as float32 and bfloat16 rows of C=384 or
    768 are). The score kernel gets the alignment hints Triton gives it at these shapes:
    its 8-channel vector loads depend on C % 8 == 0."""
    import triton

    from benchmarks.select import LAYOUTS
    from vtome_kernels.select import resolve_groups

    sel = _module("select")
    for tname in ("fp32", "bf16"):
        add(Variant("_score_kernel", "select", f"select scores, {tname}",
                    _sig("x_ptr score_ptr T L C F", {"x_ptr": "*" + tname, "score_ptr": "*fp32"}),
                    (("BLOCK_L", sel._BLOCK_L),), fp_fusion=False, num_warps=sel._SCORE_WARPS,
                    aligned=("x_ptr", "score_ptr", "C")))
    for t, l in LAYOUTS:
        groups = resolve_groups("auto", t)
        ng = (t // groups) * l
        add(Variant("_topk_gather_kernel", "select", f"select top-K + gather, T={t} L={l} ({groups} groups)",
                    _sig("score_ptr x_ptr kept_ptr index_ptr G NG W K",
                         {"score_ptr": "*fp32", "x_ptr": "*i64", "kept_ptr": "*i64", "index_ptr": "*i64"}),
                    (("BLOCK_N", sel.topk_block_n(ng)), ("BLOCK_R", sel._BLOCK_R),
                     ("BLOCK_W", sel._BLOCK_W), ("NAN_KEY", sel._NAN_KEY)), num_warps=sel._GATHER_WARPS))
    # groups above BLOCK_N_MAX patches (denser clips) all run this one: the search is bounded
    add(Variant("_topk_gather_kernel", "select", f"select top-K + gather, groups of > {sel.BLOCK_N_MAX} patches",
                _sig("score_ptr x_ptr kept_ptr index_ptr G NG W K",
                     {"score_ptr": "*fp32", "x_ptr": "*i64", "kept_ptr": "*i64", "index_ptr": "*i64"}),
                (("BLOCK_N", sel.BLOCK_N_MAX), ("BLOCK_R", sel._BLOCK_R),
                 ("BLOCK_W", sel._BLOCK_W), ("NAN_KEY", sel._NAN_KEY)), num_warps=sel._GATHER_WARPS))


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
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(_module(v.module), v.kernel)
    sig = dict(v.signature)
    consts = dict(v.constexprs)
    sig.update({k: "constexpr" for k in consts})
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in v.aligned}
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": v.num_warps, "enable_fp_fusion": v.fp_fusion})
    ptx = compiled.asm["ptx"]
    regs, st, ld, static_smem = _ptxas_usage(ptx, v.fp_fusion)
    mma = ",".join(k for k in ("wgmma", "mma.sync") if k in ptx) or "no"
    fma = len(re.findall(r"\bfma\.", ptx))
    return Row(v, capability, regs, st, ld, compiled.metadata.shared + static_smem, mma, fma)


def report(targets=TARGETS) -> List[Row]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("run the kernel report without TRITON_INTERPRET=1 (it compiles the kernels)")
    jobs = [(v, t) for v in variants() for t in targets]
    workers = max(1, min(4, os.cpu_count() or 1))
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:  # ptxas runs are independent
        return list(pool.map(compile_variant, *zip(*jobs)))


def table(rows: List[Row]) -> str:
    lines = ["| kernel | used for | target | registers | spills (st/ld bytes) | shared memory | "
             "tensor cores | fma in PTX |", "|---|---|---|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r.variant.kernel} | {r.variant.label} | sm_{r.target} | {r.regs} | "
                     f"{r.spill_stores}/{r.spill_loads} | {r.smem} B (limit {SMEM_LIMIT[r.target]}) | "
                     f"{r.mma} | {r.fma} |")
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="80,90", help="compute capabilities, e.g. 80,90")
    parser.add_argument("--traffic", action="store_true",
                        help="print only the analytic global-memory traffic per paper shape")
    args = parser.parse_args(argv)
    if args.traffic:
        print(traffic_table())
        return 0
    rows = report(tuple(int(t) for t in args.targets.split(",")))
    import triton

    print(f"triton {triton.__version__}, ptxas {_ptxas()}; {len(rows)} compiled kernels\n")
    print(table(rows))
    bad = [r for r in rows if r.spill_stores or r.spill_loads or r.smem > SMEM_LIMIT[r.target]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
