"""Triton proportional attention: flash-style softmax(q·kᵀ·scale + log(size)ᵀ)·v.

Forward: one program per (batch·head, query block), all on grid axis 0, streams the keys
with a running max and sum (the log(size) bias is added to the logits before the running
max) and writes the output and the log-sum-exp. Backward recomputes the probabilities from the log-sum-exp:
one kernel accumulates dk and dv per key block, one dq per query block. size None is plain
attention. Accumulation in float32 (float64 for float64 inputs); bfloat16 / float16 use
tensor cores on a GPU, float32 uses IEEE dots; under the interpreter bfloat16 operands
are upcast (its bfloat16 dot is wrong), float16 operands go into tl.dot as on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting, large_tiles, launch


@triton.jit
def _tile(ptr, rows, stride_row, d, stride_d, mask, UPCAST: tl.constexpr, ACC: tl.constexpr):
    """The [rows, d] tile at ptr (row and column strides), upcast to ACC when asked; 0 outside mask."""
    t = tl.load(ptr + rows[:, None] * stride_row + d[None, :] * stride_d, mask=mask, other=0.0)
    if UPCAST:
        t = t.to(ACC)
    return t


@triton.jit
def _key_bias(s_ptr, n, ssn, n_ok, ACC: tl.constexpr):
    """log(size) of keys n, taken in float32 as the reference takes it, then in ACC."""
    return tl.log(tl.load(s_ptr + n * ssn, mask=n_ok, other=1.0).to(tl.float32)).to(ACC)


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, s_ptr, o_ptr, lse_ptr,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, ssb, ssn, sob, soh, son,
    H, NQ, NK, D, scale, scale_ptr,
    HAS_SIZE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SCALE64: tl.constexpr,
):
    if SCALE64:  # a float argument is float32: float64 runs read the scale from memory
        scale = tl.load(scale_ptr)
    blocks = tl.cdiv(NQ, BLOCK_M)  # axis 0 = bh * blocks + query block (any batch fits)
    bh = tl.program_id(0) // blocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    m = (tl.program_id(0) % blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    m_ok, d_ok = m < NQ, d < D
    q = _tile(q_ptr + b * sqb + h * sqh, m, sqn, d, sqd, m_ok[:, None] & d_ok[None, :], UPCAST, ACC)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for n0 in range(0, NK, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < NK
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = _tile(k_ptr + b * skb + h * skh, n, skn, d, skd, kv_mask, UPCAST, ACC)
        v = _tile(v_ptr + b * svb + h * svh, n, svn, d, svd, kv_mask, UPCAST, ACC)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * scale
        if HAS_SIZE:
            s += _key_bias(s_ptr + b * ssb, n, ssn, n_ok, ACC)[None, :]
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC, out_dtype=ACC)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + b * sob + h * soh + m[:, None] * son + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * NQ + m, m_i + tl.log(l_i), mask=m_ok)


@triton.jit
def _attn_bwd_kv_kernel(
    q_ptr, k_ptr, v_ptr, s_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, ssb, ssn,
    H, NQ, NK, D, scale, scale_ptr,
    HAS_SIZE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SCALE64: tl.constexpr,
):
    """dk, dv of one key block: streams every query block (probabilities recomputed)."""
    if SCALE64:  # a float argument is float32: float64 runs read the scale from memory
        scale = tl.load(scale_ptr)
    blocks = tl.cdiv(NK, BLOCK_N)  # axis 0 = bh * blocks + key block (any batch fits)
    bh = tl.program_id(0) // blocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    n = (tl.program_id(0) % blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    n_ok, d_ok = n < NK, d < D
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = _tile(k_ptr + b * skb + h * skh, n, skn, d, skd, kv_mask, UPCAST, ACC)
    v = _tile(v_ptr + b * svb + h * svh, n, svn, d, svd, kv_mask, UPCAST, ACC)
    bias = tl.zeros([BLOCK_N], dtype=ACC)
    if HAS_SIZE:
        bias = _key_bias(s_ptr + b * ssb, n, ssn, n_ok, ACC)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    qo = b * sqb + h * sqh  # q and do share the query layout (do is made contiguous like q)
    rows = bh.to(tl.int64) * NQ  # first row of this (batch, head) in do, lse and delta
    for m0 in range(0, NQ, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        m_ok = m < NQ
        q_mask = m_ok[:, None] & d_ok[None, :]
        q = _tile(q_ptr + qo, m, sqn, d, sqd, q_mask, UPCAST, ACC)
        do = _tile(do_ptr + rows * D, m, D, d, 1, q_mask, UPCAST, ACC)
        lse = tl.load(lse_ptr + rows + m, mask=m_ok, other=0.0)
        delta = tl.load(delta_ptr + rows + m, mask=m_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * scale + bias[None, :]
        p = tl.exp(s - lse[:, None])
        p = tl.where(m_ok[:, None] & n_ok[None, :], p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC, out_dtype=ACC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC, out_dtype=ACC)
    dk = dk * scale
    out = bh.to(tl.int64) * NK * D + n[:, None] * D + d[None, :]
    tl.store(dk_ptr + out, dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_q_kernel(
    q_ptr, k_ptr, v_ptr, s_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, ssb, ssn,
    H, NQ, NK, D, scale, scale_ptr,
    HAS_SIZE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SCALE64: tl.constexpr,
):
    """dq of one query block: streams every key block (probabilities recomputed)."""
    if SCALE64:  # a float argument is float32: float64 runs read the scale from memory
        scale = tl.load(scale_ptr)
    blocks = tl.cdiv(NQ, BLOCK_M)  # axis 0 = bh * blocks + query block (any batch fits)
    bh = tl.program_id(0) // blocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    m = (tl.program_id(0) % blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    m_ok, d_ok = m < NQ, d < D
    q_mask = m_ok[:, None] & d_ok[None, :]
    rows = bh.to(tl.int64) * NQ  # first row of this (batch, head) in do, lse, delta and dq
    q = _tile(q_ptr + b * sqb + h * sqh, m, sqn, d, sqd, q_mask, UPCAST, ACC)
    do = _tile(do_ptr + rows * D, m, D, d, 1, q_mask, UPCAST, ACC)
    lse = tl.load(lse_ptr + rows + m, mask=m_ok, other=0.0)
    delta = tl.load(delta_ptr + rows + m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for n0 in range(0, NK, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < NK
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = _tile(k_ptr + b * skb + h * skh, n, skn, d, skd, kv_mask, UPCAST, ACC)
        v = _tile(v_ptr + b * svb + h * svh, n, svn, d, svd, kv_mask, UPCAST, ACC)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * scale
        if HAS_SIZE:
            s += _key_bias(s_ptr + b * ssb, n, ssn, n_ok, ACC)[None, :]
        p = tl.exp(s - lse[:, None])
        p = tl.where(m_ok[:, None] & n_ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC, out_dtype=ACC)
    dq = dq * scale
    tl.store(dq_ptr + (rows + m[:, None]) * D + d[None, :], dq.to(dq_ptr.dtype.element_ty), mask=q_mask)


def attn_config(dtype: torch.dtype, d: int, nq: int, nk: int):
    """Launch constants for one call: (UPCAST, PREC, ACC, BLOCK_M, BLOCK_N, BLOCK_D, warps).

    GPU tiles were chosen with benchmarks/kernel_report.py: no register spills on sm_80
    and sm_90 (float32 uses IEEE dots on CUDA cores, so smaller tiles).
    """
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    # The interpreter's bfloat16 tl.dot is wrong (triton 3.8): bfloat16 is upcast there;
    # float16 operands go into tl.dot as on a GPU (the interpreter computes those right).
    upcast = dtype in (torch.float32, torch.float64) or (interpreting() and dtype == torch.bfloat16)
    prec = "ieee" if upcast else "tf32"
    bd = max(16, triton.next_power_of_2(d))
    if large_tiles():
        bm = max(16, min(128, triton.next_power_of_2(nq)))
        bn = max(16, min(128, triton.next_power_of_2(nk)))
    elif dtype in (torch.float32, torch.float64):
        bm, bn = 16, 32
    elif bd > 64:
        bm, bn = 32, 32
    else:
        bm, bn = 64, 64
    return upcast, prec, acc, bm, bn, bd, 4


def bwd_kv_config(dtype: torch.dtype, bm: int, bd: int, warps: int):
    """(BLOCK_M, warps) of the dk/dv kernel, which holds four [BLOCK_N, d] tiles (k, v, dk,
    dv) across its loop: half the query step for bfloat16 / float16 at d <= 64, twice the
    warps for float32, so it compiles spill-free as Triton specialises it at run time
    (unit strides, multiples of 16; benchmarks/kernel_report.py)."""
    if large_tiles():
        return bm, warps
    if dtype in (torch.float32, torch.float64):
        return bm, 2 * warps
    if bd <= 64:
        return min(bm, 32), warps
    return bm, warps


def _size_args(size, ref: torch.Tensor):
    """(pointer, batch stride, key stride) of the sizes; any tensor and 0s when size is None."""
    if size is None:
        return ref, 0, 0
    return size, size.stride(0), size.stride(1)


def _scale_args(scale: float, q: torch.Tensor):
    """(scale as a float32 argument, the same scale in a float64 tensor for float64 runs)."""
    if q.dtype == torch.float64:
        return float(scale), torch.full((1,), scale, dtype=torch.float64, device=q.device)
    return float(scale), q


def attn_fwd(q, k, v, size, scale: float):
    """(out [B, H, Nq, d] in q's dtype, lse [B, H, Nq] float32/64): one launch."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    upcast, prec, acc, bm, bn, bd, warps = attn_config(q.dtype, d, nq, nk)
    out = torch.empty(b, h, nq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, nq, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                      device=q.device)
    s, ssb, ssn = _size_args(size, q)
    launch(_attn_fwd_kernel, (b * h * triton.cdiv(nq, bm),),
           q, k, v, s, out, lse, *q.stride(), *k.stride(), *v.stride(), ssb, ssn,
           out.stride(0), out.stride(1), out.stride(2), h, nq, nk, d, *_scale_args(scale, q),
           HAS_SIZE=size is not None, UPCAST=upcast, PREC=prec, ACC=acc,
           BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, SCALE64=q.dtype == torch.float64, num_warps=warps)
    return out, lse


def attn_bwd(dout, q, k, v, size, out, lse, scale: float):
    """(dq, dk, dv): delta = rowsum(dout·out), then one launch for dk/dv and one for dq."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    upcast, prec, acc, bm, bn, bd, warps = attn_config(q.dtype, d, nq, nk)
    dout = dout.contiguous()
    delta = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1).contiguous()
    dq = torch.empty(b, h, nq, d, dtype=q.dtype, device=q.device)
    dk = torch.empty(b, h, nk, d, dtype=k.dtype, device=q.device)
    dv = torch.empty(b, h, nk, d, dtype=v.dtype, device=q.device)
    s, ssb, ssn = _size_args(size, q)
    common = (*q.stride(), *k.stride(), *v.stride(), ssb, ssn, h, nq, nk, d, *_scale_args(scale, q))
    meta = dict(HAS_SIZE=size is not None, UPCAST=upcast, PREC=prec, ACC=acc,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, SCALE64=q.dtype == torch.float64, num_warps=warps)
    bm_kv, warps_kv = bwd_kv_config(q.dtype, bm, bd, warps)
    launch(_attn_bwd_kv_kernel, (b * h * triton.cdiv(nk, bn),),
           q, k, v, s, dout, lse, delta, dk, dv, *common, **{**meta, "BLOCK_M": bm_kv, "num_warps": warps_kv})
    launch(_attn_bwd_q_kernel, (b * h * triton.cdiv(nq, bm),),
           q, k, v, s, dout, lse, delta, dq, *common, **meta)
    return dq, dk, dv

