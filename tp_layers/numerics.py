"""Error metrics and per-dtype tolerances shared by ``tpfuse verify`` and the tests.

Tensor parallelism changes only the *order* of floating-point sums: a row-parallel layer adds N partial sums of
K/N terms instead of one sum of K terms, and (for low precision) rounds each partial to the activation dtype
before the all-reduce. The tolerances below bound that reordering, relative to the Frobenius norm of the
reference; they are a small multiple of the dtype's unit roundoff ``u``, with the multiple set by what the block
accumulates (a handful of GEMMs, a softmax and two norms in sequence):

- float64: u = 1.1e-16 -> 1e-12
- float32: u = 6.0e-8  -> 1e-5 (measured on klein-4b blocks, 2 and 4 ranks: ~3e-7 relative)
- float16: u = 4.9e-4  -> 1e-2
- bfloat16: u = 3.9e-3 -> 5e-2 (every activation is rounded to 8 bits of mantissa; the all-reduce of rounded
  partials alone contributes ~u)
"""

from __future__ import annotations

import torch

__all__ = ["TOLERANCE", "tolerance", "rel_error", "max_abs_error"]

TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}


def tolerance(dtype: torch.dtype) -> float:
    try:
        return TOLERANCE[dtype]
    except KeyError:
        raise ValueError(f"no tolerance defined for dtype {dtype}; use one of {list(TOLERANCE)}") from None


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected||_F / ||expected||_F`` computed in float64 (0 when both are zero)."""
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    if denom == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / denom


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max().item()
