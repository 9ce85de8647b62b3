"""The backend registry and contract: which implementations exist, which run here, "auto".

The ops. Every pipeline stage is one op of the ``vtome`` namespace, defined once in
ops.py (schema, fake, autograd): ``match``, ``merge`` (+ ``merge_backward``),
``merge_fused`` (match + merge, what vt.merge calls), ``merge_source``, ``unmerge``
(+ ``unmerge_backward``), ``select``, ``select_scores``, ``prop_attention``
(+ ``prop_attention_backward``). A kernel backend registers implementations of these ops
for its dispatch key and never defines ops of its own.

A backend is a module with ``NAME``, ``status()`` -> (available, why),
``supports(device)`` -> None or the reason it cannot run there, and one function per
stage with the signatures of reference.py: ``match``, ``merge``, ``merge_fused``,
``merge_source``, ``unmerge``, ``select``, ``select_scores``, ``prop_attention``. A
kernel backend's stage functions are those of ops.py (they call the vtome:: ops); one
without a fused kernel registers its match then its merge as the ``merge_fused`` kernel.

The names users pass (API.md):
- "reference": reference.py, plain PyTorch on every device; the specification.
- "cpp": the CPU kernels of the C++ extension (cpp.py, csrc/); attention is torch's SDPA.
- "triton": the Triton kernels, CUDA tensors (triton/backend.py); CPU tensors only in
  Triton's interpreter inside ``vtome_kernels.triton.cpu_interpreter()`` (tests).
- "graph": graph.py, plain vectorised aten ops (no vtome:: op) on every device; while
  torch.onnx.export or torch.jit.trace traces every name gives it, so those graphs hold
  standard ops only (torch.export keeps the vtome:: ops).
- "auto": per device type, the first backend of ``_AUTO_ORDER[device.type]`` that is
  available, has the stage and supports the device; the reference otherwise. On CPU
  "cpp" then "reference"; on CUDA "triton" then "reference".

Adding a backend (docs/DESIGN.md, "Adding a backend"), e.g. CUDA C++ kernels: register
their implementations for the ops' dispatch key (``TORCH_LIBRARY_IMPL(vtome, CUDA, m)``
in csrc/, built into the extension), write a module like cpp.py (stage functions from
ops.py, status, supports), add it to ``_MODULES`` and to the device's ``_AUTO_ORDER``, and
add its name to the backend list of tests/test_backends.py. Modules are imported on first
use or, for the kernels' registration, at package import without importing Triton or
touching a GPU driver.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict, NamedTuple

import torch

from . import graph

# name -> module; "auto" tries them in this order for each device type.
_MODULES = {
    "reference": "vtome_kernels.reference",
    "cpp": "vtome_kernels.cpp",
    "triton": "vtome_kernels.triton.backend",
    "graph": "vtome_kernels.graph",
}
_AUTO_ORDER = {"cuda": ("triton", "reference"), "cpu": ("cpp", "reference")}
NAMES = ("auto",) + tuple(_MODULES)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why."""


class BackendStatus(NamedTuple):
    available: bool
    detail: str


def _load(name: str):
    """(module or None, why) for a backend name."""
    module = importlib.import_module(_MODULES[name])
    ok, why = module.status()
    return (module if ok else None), why


def backends() -> Dict[str, BackendStatus]:
    """Every backend, whether it is usable in this process and why (or why not)."""
    out = {}
    for name in _MODULES:
        module, why = _load(name)
        out[name] = BackendStatus(module is not None, why)
    return out


def resolve(backend: str, op: str, device: torch.device) -> ModuleType:
    """The backend module that runs ``op`` on ``device`` (see ``_resolve``)."""
    return _RESOLVED[_choose(backend, op, device)]


_RESOLVED: Dict[str, ModuleType] = {}  # module name -> module, filled by _choose


def _choose(backend: str, op: str, device: torch.device) -> str:
    """The name of the module ``_resolve`` picks (a constant dynamo can trace through)."""
    module = _resolve(backend, op, device)
    _RESOLVED[module.__name__] = module
    return module.__name__


# torch.compile makes the choice once, while tracing. This is what
# torch.compiler.assume_constant_result does (torch/_dynamo/decorators.py); calling it would
# import torch._dynamo, and with it Triton, at ``import vtome_kernels`` (2-3 s here).
# tests/test_api.py compiles vt.merge with fullgraph=True, so a torch that renames the
# mark fails there.
_choose._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _resolve(backend: str, op: str, device: torch.device) -> ModuleType:
    """The backend module that runs ``op`` on ``device``.

    While torch.onnx.export / torch.jit.trace traces, every name gives the
    "graph" backend (plain aten ops, no custom op: see graph.py). Otherwise "auto" takes
    the first usable backend of the device's order that implements the op; a named backend that cannot run the op here raises BackendUnavailableError saying why.
    """
    if not isinstance(backend, str) or backend not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {backend!r}")
    if graph.exporting():  # exported graphs hold plain aten ops only, whatever was asked for
        return graph
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("reference",)):
            if name not in _MODULES:
                continue
            module, _ = _load(name)
            if module is not None and hasattr(module, op) and module.supports(device) is None:
                return module
        return importlib.import_module(_MODULES["reference"])
    module, why = _load(backend)
    if module is None:
        raise BackendUnavailableError(f"backend {backend!r} is unavailable: {why}")
    if not hasattr(module, op):
        raise BackendUnavailableError(f"backend {backend!r} has no {op!r} operation")
    why_not = module.supports(device)
    if why_not is not None:
        raise BackendUnavailableError(f"backend {backend!r} cannot run on {device}: {why_not}")
    return module
