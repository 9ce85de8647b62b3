"""Input checks shared by the public ops: every error names the argument, what was
expected and what came (API.md, "Errors")."""

from __future__ import annotations

import operator
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _compiling() -> bool:
    """True while torch.compile or an exporter traces: value checks (a device sync, and a
    data-dependent branch an exported graph cannot hold) are skipped then."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool((is_compiling and is_compiling()) or (is_exporting and is_exporting())
                or torch.jit.is_tracing())


def tensor(name: str, t, ranks: Sequence[int], dtypes=FLOAT_DTYPES) -> torch.Tensor:
    """t is a tensor of one of ``ranks`` and ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in ranks:
        want = " or ".join(f"{k}-D" for k in ranks)
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}; got {t.dtype}")
    return t


def same_device(**tensors: Optional[torch.Tensor]) -> None:
    """All given tensors live on one device."""
    given = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in given.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in given.items())
        raise ValueError(f"tensors must be on one device, got {where}")


def leading(name: str, t: torch.Tensor, lead: Sequence[int], last: Optional[int], ref: str):
    """t.shape == lead + (last,) (last None: any last dim >= 1)."""
    shape = tuple(t.shape)
    ok = shape[:-1] == tuple(lead) and (shape[-1] == last if last is not None else shape[-1] > 0)
    if not ok:
        tail = "any" if last is None else str(last)
        want = ", ".join([str(n) for n in lead] + [tail])
        raise ValueError(f"{name} must have shape [{want}] (the leading dims of {ref}), got {shape}")


def sizes(name: str, size: torch.Tensor) -> None:
    """Token sizes are positive (skipped under torch.compile).

    On CPU a ValueError names the smallest size. On any other device reading the answer
    back would make the host wait for the device (one sync per layer), so the check is an
    asynchronous device-side assertion: a bad size fails a later CUDA call instead.
    """
    if _compiling() or not size.numel():
        return
    if size.device.type == "cpu":
        if not bool((size > 0).all()):
            raise ValueError(f"{name} must be positive everywhere, got min {size.min().item()}")
    elif size.device.type != "meta":
        torch._assert_async((size > 0).all(), f"{name} must be positive everywhere")


def count(name: str, value, minimum: int = 0) -> int:
    """An integer >= minimum (bool is refused)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def flag(name: str, value) -> bool:
    """A bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def choice(name: str, value, options: Sequence[str]) -> str:
    """One of ``options``."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


def mode_threshold(mode, threshold, modes: Sequence[str]) -> None:
    """A merge mode of ``modes``; a float threshold for "hybrid" and None for the others."""
    choice("mode", mode, modes)
    if mode == "hybrid":
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"threshold must be a float for mode='hybrid', got {threshold!r}")
    elif threshold is not None:
        raise ValueError(f"threshold is only used by mode='hybrid', got mode={mode!r}")
