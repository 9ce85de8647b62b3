"""Interleaved timing: every provider of a shape is timed in turn, many rounds, medians.

This machine's timings drift 2-5x between runs, so providers are compared inside one
process, round-robin, and only medians and ratios are reported.
"""

from __future__ import annotations

import pathlib
import platform
import re
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


L2_FLUSH_BYTES = 256 << 20  # more than any GPU's L2 (H100: 50 MB, H200: 60 MB)


def time_interleaved(fns: Dict[str, Callable[[], object]], device: torch.device, rounds: int,
                     warmup: int = 3, min_seconds: float = 0.0) -> Dict[str, List[float]]:
    """Seconds per call of every fn, measured round-robin (the order rotates each round).

    On CUDA each call is timed by CUDA events on the current stream with a cold L2 (a
    256 MB buffer is zeroed before every call, outside the events); the host waits once
    per round, not once per call. Elsewhere: wall clock per call.
    """
    if device.type == "cuda":
        return _time_cuda(fns, device, rounds, warmup, min_seconds)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    names = list(fns)
    times: Dict[str, List[float]] = {n: [] for n in names}
    start = time.perf_counter()
    i = 0
    while i < rounds or time.perf_counter() - start < min_seconds:
        for name in names[i % len(names):] + names[: i % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
        i += 1
    return times


def _time_cuda(fns, device, rounds: int, warmup: int, min_seconds: float) -> Dict[str, List[float]]:
    with torch.cuda.device(device):
        flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        torch.cuda.synchronize(device)
        names = list(fns)
        times: Dict[str, List[float]] = {n: [] for n in names}
        start = time.perf_counter()
        i = 0
        while i < rounds or time.perf_counter() - start < min_seconds:
            events = []
            for name in names[i % len(names):] + names[: i % len(names)]:
                flush.zero_()
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fns[name]()
                end.record()
                events.append((name, begin, end))
            torch.cuda.synchronize(device)
            for name, begin, end in events:
                times[name].append(begin.elapsed_time(end) / 1e3)
            i += 1
        return times


def median_ms(samples: List[float]) -> float:
    return statistics.median(samples) * 1e3


def machine() -> str:
    """A one-line description of where the numbers were taken."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import os

    gpu = ""
    if torch.cuda.is_available():
        gpu = f", GPU {torch.cuda.get_device_name()}"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads){gpu}, Python {platform.python_version()}")


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def runnable_backends(op: str, device: torch.device) -> List[str]:
    """Names of the vtome_kernels backends available here that run ``op`` on ``device``
    (the others are left out of a table rather than failing it)."""
    import vtome_kernels as vt
    from vtome_kernels.backends import resolve

    names = []
    for name, status in vt.backends().items():
        if not status.available:
            continue
        try:
            resolve(name, op, device)
        except vt.BackendUnavailableError:
            continue
        names.append(name)
    return names


def unavailable_backends(op: str, device: torch.device) -> Dict[str, str]:
    """name -> why, for every backend that does not run ``op`` on ``device`` here: printed
    under the tables, so a backend never silently vanishes from them (vt-triton on CUDA
    with TRITON_INTERPRET=1 set in the shell, for one)."""
    import vtome_kernels as vt
    from vtome_kernels.backends import resolve

    out = {}
    for name, status in vt.backends().items():
        if not status.available:
            out[name] = status.detail
            continue
        try:
            resolve(name, op, device)
        except vt.BackendUnavailableError as exc:
            out[name] = str(exc)
    return out


def absent_note(op: str, device: torch.device) -> str:
    """One line naming the backends absent from a table on ``device`` and why ('' if none)."""
    why = unavailable_backends(op, device)
    return "" if not why else "Not run here: " + "; ".join(f"vt-{n} ({w})" for n, w in why.items()) + "."


def name_matches(keys: str, name: str) -> bool:
    """Whether a comma-separated filter (``--shapes`` / ``--models``) picks name: empty picks
    all; a key matches at the start of a word of the name, so "ViT-B" picks "ViT-B/16 ..."
    and "timm ViT-B/16 ..." but not "ViViT-B"."""
    parts = [k.strip() for k in keys.split(",") if k.strip()]
    return not parts or any(re.search(r"(^|\s)" + re.escape(k), name) for k in parts)


def write_block(path: pathlib.Path, begin: str, end: str, body: str, heading: str = "") -> None:
    """Replace what stands between the markers begin/end in a Markdown file with body (the
    markers kept); a file without them gets ``heading`` (if any) and the block appended."""
    text = path.read_text()
    block = f"{begin}\n{body}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text += "\n" + (f"{heading}\n\n" if heading else "") + block + "\n"
    path.write_text(text)
