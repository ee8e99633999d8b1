"""Small helpers shared by the torch references."""

from __future__ import annotations

import torch

__all__ = ["compute_dtype", "each_needs", "in_layout_of"]


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the references compute in: at least fp32 (bf16/fp16 are upcast), fp64 stays fp64."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def in_layout_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` (same shape as ``like``) in the layout ``torch.empty_like(like)`` has: a custom op's outputs must have
    the strides its fake implementation promises on every backend, and the Triton kernels write into
    ``empty_like`` buffers. A copy only when the reference produced another layout."""
    out = torch.empty_like(like, dtype=t.dtype)
    if out.stride() == t.stride():
        return t
    return out.copy_(t)


def each_needs(needs, n: int) -> list[bool]:
    """A registered backward's ``needs_input_grad`` entry for a ``Tensor[]`` argument of ``n`` tensors: one flag per
    tensor (torch gives a single bool when the list holds no tensor that requires grad)."""
    return list(needs) if isinstance(needs, (list, tuple)) else [bool(needs)] * n
