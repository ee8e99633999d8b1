"""``(1 + scale) * LayerNorm(x) + shift``: FLUX.2's adaLN modulation, one pass over ``x``.

LayerNorm has no affine parameters; ``shift``/``scale`` are per (batch, feature). Eager torch reads ``x`` for the
norm, writes it, reads it again for the modulation and writes again (plus the fp32 upcast copies); the kernel reads
``x`` once and writes the result once: it is memory-bound, so its target is the device-to-device copy bandwidth.

Backward: a torch implementation (the reference's autograd, recomputed from the saved inputs); the forward is the
Triton kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_tensors
from ._dispatch import select_backend
from ._math import compute_dtype
from ._triton import tl, triton

__all__ = ["layernorm_modulate", "layernorm_modulate_reference", "ln_mod_config"]

# One program normalizes one row (one token): the whole row lives in registers, so mean and variance need no
# second pass over memory. Rows up to this width are supported (FLUX.2-dev's hidden size is 6144).
MAX_D = 16384


def ln_mod_config(d: int) -> dict:
    """Launch configuration for a row of ``d`` features: the block covers the row; warps scale with it so each
    thread holds at most ~16 fp32 values (more spills at 8192-wide blocks with 4 warps)."""
    block_d = triton.next_power_of_2(d)
    return {"BLOCK_D": block_d, "num_warps": max(1, min(16, block_d // 512))}


@triton.jit
def _ln_mod_fwd_kernel(
    x_ptr, shift_ptr, scale_ptr, y_ptr,
    S, D,
    stride_xb, stride_xs, stride_yb, stride_ys, stride_mb,
    eps,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // S
    s = row % S
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    x = tl.load(x_ptr + b * stride_xb + s * stride_xs + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    shift = tl.load(shift_ptr + b * stride_mb + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * stride_mb + offs, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd * (1.0 + scale) + shift
    tl.store(y_ptr + b * stride_yb + s * stride_ys + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def layernorm_modulate_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                                 eps: float = 1e-6) -> torch.Tensor:
    """Plain torch: fp32 (fp64 for fp64 inputs) LayerNorm (no affine) then ``(1 + scale) * y + shift``, result in ``x``'s dtype."""
    shift, scale = _as_b1d(shift, x), _as_b1d(scale, x)
    acc = compute_dtype(x)
    y = F.layer_norm(x.to(acc), (x.shape[-1],), eps=eps)
    return ((1 + scale.to(acc)) * y + shift.to(acc)).to(x.dtype)


def _as_b1d(mod: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return mod.unsqueeze(1) if mod.dim() == 2 else mod  # [B, D] -> [B, 1, D]


def _validate(x, shift, scale, eps):
    check_tensors("layernorm_modulate", {"x": x, "shift": shift, "scale": scale},
                  x.device if isinstance(x, torch.Tensor) else None, "x")
    if x.dim() != 3:
        raise ValueError(f"layernorm_modulate: x must be [B, S, D], got shape {tuple(x.shape)}")
    B, _, D = x.shape
    for name, t in (("shift", shift), ("scale", scale)):
        ok = (t.dim() == 2 or (t.dim() == 3 and t.shape[1] == 1)) and t.shape[0] in (1, B) and t.shape[-1] == D
        if not ok:
            raise ValueError(f"layernorm_modulate: {name} must be [B, D] or [B, 1, D] with B={B}, D={D}, "
                             f"got shape {tuple(t.shape)}")
    if shift.shape != scale.shape:
        raise ValueError(f"layernorm_modulate: shift {tuple(shift.shape)} and scale {tuple(scale.shape)} differ")
    if D > MAX_D:
        raise ValueError(f"layernorm_modulate: D={D} exceeds the supported maximum {MAX_D}")
    if not eps > 0:
        raise ValueError(f"layernorm_modulate: eps must be positive, got {eps}")


def _layernorm_modulate_triton(x, shift, scale, eps):
    B, S, D = x.shape
    shift, scale = shift.reshape(shift.shape[0], D), scale.reshape(scale.shape[0], D)  # [B|1, D]
    if shift.stride() != scale.stride():
        shift, scale = shift.contiguous(), scale.contiguous()
    y = torch.empty((B, S, D), device=x.device, dtype=x.dtype)
    cfg = ln_mod_config(D)
    stride_mb = shift.stride(0) if shift.shape[0] == B and B > 1 else 0
    _ln_mod_fwd_kernel[(B * S,)](
        x, shift, scale, y, S, D, x.stride(0), x.stride(1), y.stride(0), y.stride(1), stride_mb, eps,
        BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
    )
    return y


class _LayerNormModulate(torch.autograd.Function):
    """Forward: the Triton kernel, or the csrc one (``impl="cuda"``); backward: torch (recomputed reference)."""

    @staticmethod
    def forward(ctx, x, shift, scale, eps, impl="triton"):
        ctx.save_for_backward(x, shift, scale)
        ctx.eps = eps
        if impl == "cuda":
            from .cuda_backend import layernorm_modulate_cuda

            D = x.shape[-1]
            return layernorm_modulate_cuda(x, shift.reshape(shift.shape[0], D), scale.reshape(scale.shape[0], D),
                                           eps)
        return _layernorm_modulate_triton(x, shift, scale, eps)

    @staticmethod
    def backward(ctx, grad):
        x, shift, scale = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(need) for t, need in zip((x, shift, scale), ctx.needs_input_grad)]
            out = layernorm_modulate_reference(*inputs, ctx.eps)
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad))
        return (*[next(grads) if need else None for need in ctx.needs_input_grad[:3]], None, None)


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                       backend: str | None = None) -> torch.Tensor:
    """``(1 + scale) * LayerNorm(x) + shift`` (LayerNorm without affine); fp32 math, result in ``x``'s dtype.

    Args:
        x: ``[B, S, D]``; any batch/sequence strides, last dim contiguous.
        shift, scale: ``[B, D]`` or ``[B, 1, D]`` (``B`` may be 1 to broadcast).
        backend: ``"torch"``, ``"triton"`` or ``"cuda"`` (csrc forward); default: triton for CUDA tensors,
            torch on CPU (``TPFUSE_BACKEND`` overrides the default).
    """
    _validate(x, shift, scale, eps)
    chosen = select_backend("layernorm_modulate", x.device, backend, cuda_kernel=True)
    if chosen == "torch":
        return layernorm_modulate_reference(x, shift, scale, eps)
    for name, t in (("x", x), ("shift", shift), ("scale", scale)):  # both kernels read rows with unit stride
        if t.stride(-1) != 1:
            raise ValueError(f"layernorm_modulate: {name} must be contiguous in its last dim, got strides "
                             f"{t.stride()}")
    return _LayerNormModulate.apply(x, shift, scale, eps, chosen)
