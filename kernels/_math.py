"""Small helpers shared by the torch references."""

from __future__ import annotations

import torch

__all__ = ["compute_dtype"]


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the references compute in: at least fp32 (bf16/fp16 are upcast), fp64 stays fp64."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype
