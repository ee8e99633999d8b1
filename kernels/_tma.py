"""When the GEMM kernels use TMA (Hopper's tensor memory accelerator) and what it needs at launch.

The kernels build their TMA descriptors on the device (``tl.make_tensor_descriptor``), which lets one program
pick its weight rows at run time. Those descriptors live in a global scratch buffer that triton asks an allocator
for at launch; :func:`tma_ready` installs a torch allocator where the user has none (triton's default raises).
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, tl, triton

__all__ = ["tma_ready", "TMA_DTYPES"]

# bf16/fp16: the tensor-core path. fp32 (tests, interpreter) runs the cp.async loop: a float32 dot in "ieee"
# precision is FMA arithmetic whose operands come from registers anyway. Tests widen this to check TMA addressing.
TMA_DTYPES = (torch.bfloat16, torch.float16)


def _torch_allocator(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Keep a user's allocator. triton keeps the current one in a private ``_allocation._allocator``: a ContextVar
    in 3.6-3.9, a plain object in some releases; where neither reads, set ours (a torch allocation works anyway)."""
    try:
        from triton.runtime import _allocation

        current = _allocation._allocator
        current = current.get() if hasattr(current, "get") else current
        if not isinstance(current, _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):
        pass
    triton.set_allocator(_torch_allocator)


def tma_ready(*tensors: torch.Tensor) -> bool:
    """Whether row-major ``tensors`` (each ``[rows, cols]``, unit last stride) can be read through TMA boxes:
    a TMA dtype, 16-byte aligned bases and row strides. Installs the descriptor allocator when they can."""
    if not HAS_TRITON or not hasattr(tl, "make_tensor_descriptor"):
        return False
    if any(t.dtype not in TMA_DTYPES for t in tensors):
        return False
    if not all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in tensors):
        return False
    if tensors[0].device.type == "cuda":
        _ensure_allocator()
    return True
