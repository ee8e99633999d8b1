"""Small helpers shared by the torch references."""

from __future__ import annotations

import torch

__all__ = ["compute_dtype", "in_layout_of"]


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
