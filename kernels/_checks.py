"""Argument checks shared by the kernel launchers."""

from __future__ import annotations

import math
import numbers

import torch


def check_tensors(op: str, named: dict, device: torch.device, ref_name: str, last_contiguous: bool = False) -> None:
    """Every value in ``named`` is a floating-point tensor on ``device`` (and, if asked, contiguous in its last
    dim); the error names the op, the argument and the offending value."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device}, {ref_name} is on {device}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be floating point, got {t.dtype}")
        if last_contiguous and t.dim() > 0 and t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must be contiguous in its last dim, got strides {t.stride()}")


def check_eps(op: str, eps, name: str = "eps") -> float:
    """``eps`` as a float: a real number (a Python or numpy scalar, not a bool or a tensor), finite and >= 0 (0 as
    torch's LayerNorm and RMSNorm accept it, and as a model config may say). ``inf`` would normalize every row to
    zero, a negative value NaN the rows whose mean square is below it, NaN every row."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{op}: {name} must be a float, got {eps!r} ({type(eps).__name__})")
    if not eps >= 0:  # NaN too
        raise ValueError(f"{op}: {name} must be >= 0, got {eps}")
    if not math.isfinite(eps):
        raise ValueError(f"{op}: {name} must be finite, got {eps}")
    return float(eps)


def check_dim(op: str, name: str, value) -> int:
    """A positive int size argument (numpy ints too; not a bool), as a Python int for the ops' schemas."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{op}: {name} must be a positive int, got {value!r}")
    return int(value)


def check_rope_pair(op: str, cos, sin, named: dict) -> None:
    """``cos`` and ``sin`` come together or not at all; adds them to ``named`` when present."""
    if (cos is None) != (sin is None):
        raise ValueError(f"{op}: pass both cos and sin, or neither")
    if cos is not None:
        named.update(cos=cos, sin=sin)


INT32_MAX = 2**31 - 1


def check_int32_addressable(op: str, named: dict, shapes: dict | None = None) -> None:
    """The kernels compute element offsets in int32: every tensor's largest offset (from its strides, so views of
    wider buffers count in full) must stay below 2^31. ``shapes``: contiguous outputs not allocated yet, by shape."""
    def last_offset(t: torch.Tensor) -> int:
        return sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) if t.numel() else 0

    too_big = {name: last_offset(t) for name, t in named.items() if t is not None and last_offset(t) > INT32_MAX}
    for name, shape in (shapes or {}).items():
        numel = 1
        for n in shape:
            numel *= n
        if numel - 1 > INT32_MAX:
            too_big[name] = numel - 1
    if too_big:
        raise ValueError(f"{op}: the kernel addresses with int32 offsets; largest offsets {too_big} exceed 2^31 - 1: "
                         "split the batch")
